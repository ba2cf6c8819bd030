"""Model card: ``ModelCardData`` metadata + data for templates/model_card.md, which holds all the card's prose."""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from entmax_vit.data.config_io import flatten
from entmax_vit.recipe import BIBTEX, PAPER_ARXIV, PAPER_RESULTS, PAPER_TITLE

from .sparsity import SparsityReport

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"

# The owner in usage snippets of a card assembled without --repo-id (never a local folder path).
PLACEHOLDER_OWNER = "YOUR_USERNAME"
# Config keys that only say where a run wrote on its machine: left out of cards and shipped configs.
LOCAL_KEYS = ("output_dir",)
LOCAL_PATH = "<local>"

BASE_TAGS = ("entmax", "sparse-attention", "dino", "vision-transformer", "self-supervised", "custom_code")

# results["task"] -> (model-index task type, task name)
TASK_TYPES = {
    "knn": ("image-classification", "k-NN classification (frozen features)"),
    "linear": ("image-classification", "Linear probe classification (frozen features)"),
    "segmentation": ("image-segmentation", "Linear probe semantic segmentation (frozen features)"),
    "analysis": ("image-feature-extraction", "Feature analysis"),
}


@dataclass
class CardInputs:
    """Everything the card shows, gathered by the assembler from the model folder and the results files."""

    repo_id: str                              # Hub id (a placeholder OWNER/NAME for an offline assembly)
    model_config: dict
    num_parameters: int
    sparsity: Optional[SparsityReport] = None
    results: list[dict] = field(default_factory=list)
    training_config: Optional[dict] = None
    segmentation_head: Optional[dict] = None  # segmentation_head.json contents
    base_model: Optional[str] = None
    conversion: Optional[dict] = None         # conversion_config.yaml of a converted checkpoint
    license: str = "apache-2.0"
    datasets: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    repo_id_is_placeholder: bool = False      # no --repo-id: the usage snippets say to replace it
    training_progress: Optional[dict] = None  # training_progress.json of an export of a checkpoint


def public_config(node: Any) -> Any:
    """A config / results record without :data:`LOCAL_KEYS` and with absolute or home paths (also after
    ``imagefolder:`` / ``webdataset:``) reduced to ``<local>/LAST_PART``."""
    if isinstance(node, dict):
        return {k: public_config(v) for k, v in node.items() if k not in LOCAL_KEYS}
    if isinstance(node, list):
        return [public_config(v) for v in node]
    if isinstance(node, str):
        kind, sep, rest = node.partition(":")
        prefix, path = (kind + sep, rest) if sep and kind in ("imagefolder", "webdataset") else ("", node)
        if path.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", path):
            return f"{prefix}{LOCAL_PATH}/{Path(path.rstrip('/')).name}"
    return node


def metric_type(name: str) -> str:
    """Hub metric type for a results metric key (``miou`` -> mean_iou, ``top1`` -> accuracy)."""
    low = name.lower()
    if "iou" in low:
        return "mean_iou"
    if "acc" in low or low.startswith("top"):
        return "accuracy"
    return low


def eval_results(results: list[dict]) -> list[EvalResult]:
    """One ``EvalResult`` per metric, grouped as huggingface_hub writes model-index entries: one per (task type,
    dataset, config, split, revision), named by its first result. Records sharing those (k-NN and linear probe on
    one split) get a joint task name, so ``ModelCard.load`` gives back exactly these results, in this order."""
    out: list[EvalResult] = []
    for record in results:
        task_type, task_name = TASK_TYPES[record["task"]]
        dataset = record["dataset"]
        protocol = record["protocol"].get("name", "")
        for key, value in record["metrics"].items():
            out.append(EvalResult(
                task_type=task_type, task_name=task_name,
                dataset_type=dataset["name"], dataset_name=dataset["name"],
                dataset_split=dataset.get("split") or None,
                dataset_config=dataset.get("config") or None,
                dataset_revision=dataset.get("revision") or None,
                metric_type=metric_type(key), metric_name=f"{key} ({protocol})" if protocol else key,
                metric_value=round(float(value), 4), metric_config=protocol or None,
            ))
    groups: dict[tuple, list[EvalResult]] = {}
    for result in out:
        groups.setdefault(result.unique_identifier, []).append(result)
    for group in groups.values():
        joint = " / ".join(dict.fromkeys(r.task_name for r in group))
        for result in group:
            result.task_name = joint
    return [result for group in groups.values() for result in group]


def card_data(inputs: CardInputs) -> ModelCardData:
    tags = [*BASE_TAGS, inputs.model_config.get("attention", "softmax").replace("_", "-")]
    if inputs.segmentation_head:
        tags.append("image-segmentation")
    datasets = [d for d in dict.fromkeys(inputs.datasets) if d]
    evals = eval_results(inputs.results)
    return ModelCardData(
        library_name="transformers", pipeline_tag="image-feature-extraction", license=inputs.license, tags=tags,
        datasets=datasets or None, base_model=inputs.base_model or None, eval_results=evals or None,
        # model_name is only written inside model-index, so it is set only when there are results.
        model_name=card_name(inputs) if evals else None,
    )


def card_name(inputs: CardInputs) -> str:
    return inputs.repo_id.rstrip("/").split("/")[-1]


def template_values(inputs: CardInputs) -> dict[str, Any]:
    """The template's variables (everything but ``card_data``): data only, no sentences."""
    head = inputs.segmentation_head or {}
    labels = head.get("id2label", {})
    progress = inputs.training_progress or {}
    trained, planned = int(progress.get("steps_trained", 0)), int(progress.get("steps_planned") or 0)
    training_rows = training_yaml = None
    if inputs.training_config:
        config = public_config(inputs.training_config)
        training_rows = [(k, v) for k, v in flatten(config).items()
                         if not isinstance(v, (list, dict)) or len(str(v)) < 60]
        training_yaml = yaml.safe_dump(config, sort_keys=False).strip()
    return dict(
        title=card_name(inputs), c=inputs.model_config, num_parameters=inputs.num_parameters,
        base_model=inputs.base_model, conversion=inputs.conversion, sparsity=inputs.sparsity,
        repo=inputs.repo_id, repo_id_is_placeholder=inputs.repo_id_is_placeholder,
        head=inputs.segmentation_head, head_labels=[str(labels[k]) for k in sorted(labels, key=int)],
        training_rows=training_rows, training_yaml=training_yaml,
        partial=trained < planned,  # weights exported from a checkpoint before the end of the planned training
        progress=progress and {"trained": trained, "planned": planned,
                               "epochs_planned": progress.get("epochs_planned")},
        rows=[{"task": r["task"], "dataset": r["dataset"]["name"], "split": r["dataset"].get("split", ""),
               "protocol": r["protocol"].get("name", ""), "samples": r["dataset"].get("num_samples", ""),
               "metric": key, "value": float(value)}
              for r in inputs.results for key, value in r["metrics"].items()],
        files=inputs.files, paper_title=PAPER_TITLE, paper_arxiv=PAPER_ARXIV, paper_results=PAPER_RESULTS,
        bibtex=BIBTEX,
    )


def _check_template_variables(template: str, given: set[str]) -> None:
    """Jinja renders an unknown variable as empty text; a card with a silently empty section is refused."""
    import jinja2
    import jinja2.meta

    wanted = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    missing = sorted(wanted - given - {"card_data"})
    if missing:
        raise ValueError(f"{TEMPLATE_PATH}: no value for template variables {missing}")


def build_card(inputs: CardInputs) -> ModelCard:
    """The card as huggingface_hub's ``ModelCard``: ``ModelCardData`` metadata + our template's sections."""
    values = template_values(inputs)
    _check_template_variables(TEMPLATE_PATH.read_text(encoding="utf-8"), set(values))
    card = ModelCard.from_template(card_data(inputs), template_path=str(TEMPLATE_PATH), **values)
    if not card.text.endswith("\n"):  # Jinja drops the template's final newline; a text file ends with one
        card.text += "\n"
    return card

