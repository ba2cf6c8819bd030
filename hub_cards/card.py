"""Model card renderer: metadata as huggingface_hub's ``ModelCardData`` (model-index built from ``EvalResult``s
by the library) + prose sections filled from what the model folder records, rendered through
``ModelCard.from_template`` with templates/model_card.md. Nothing here is per-model prose: every model-specific
sentence comes from data."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from huggingface_hub.repocard_data import eval_results_to_model_index

from entmax_vit.data.config_io import flatten

from .sparsity import SparsityReport

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"

PAPER_TITLE = "Vision Transformers Need Better Token Interaction"
PAPER_ARXIV = "2605.23868"
PAPER_AUTHOR = "Su, Linxiang"
# The citation, character for character the README's (tests/test_hub_card.py checks README contains it).
BIBTEX = (
    "@article{su2026entmaxvit,\n"
    f"  title         = {{{PAPER_TITLE}}},\n"
    f"  author        = {{{PAPER_AUTHOR}}},\n"
    f"  journal       = {{arXiv preprint arXiv:{PAPER_ARXIV}}},\n"
    f"  eprint        = {{{PAPER_ARXIV}}},\n"
    "  archivePrefix = {arXiv},\n"
    "  primaryClass  = {cs.CV},\n"
    "  year          = {2026}\n"
    "}"
)
# The paper's headline numbers (DINOv1 ViT-S/16, 200 epochs, linear segmentation probe mIoU, softmax -> entmax-1.5).
PAPER_RESULTS = {"VOC": (42.80, 48.78), "ADE20K": (19.85, 21.97), "Cityscapes": (36.79, 37.87)}

# The owner in usage snippets of a card assembled without --repo-id (never a local folder path).
PLACEHOLDER_OWNER = "YOUR_USERNAME"
# Config keys that only say where a run wrote on its machine: left out of cards and shipped configs.
LOCAL_KEYS = ("output_dir",)
LOCAL_PATH = "<local>"

BASE_TAGS = ("entmax", "sparse-attention", "dino", "vision-transformer", "self-supervised", "custom_code")

TRANSFORMS = {
    "softmax": "softmax (the standard dense attention: every key gets a positive weight; the paper's baseline)",
    "entmax15": "entmax-1.5 (sparse: each query's weights are a thresholded power of the scores, so "
                "low-scoring keys get exactly zero weight; the paper's intervention)",
    "sparsemax": "sparsemax (alpha = 2 entmax: Euclidean projection of the scores onto the simplex, the sparsest member "
                 "of the family)",
    "entmax_bisect": "alpha-entmax computed by bisection (alpha = {alpha}{learnable})",
}

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


def public_config(node: Any, key: str = "") -> Any:
    """A config / results record without the local paths of the machine that made it: :data:`LOCAL_KEYS`
    dropped, an absolute or home path (also after ``imagefolder:`` / ``webdataset:``) reduced to
    ``<local>/LAST_PART``. Hub ids, relative names and numbers are kept."""
    if isinstance(node, dict):
        return {k: public_config(v, str(k)) for k, v in node.items() if k not in LOCAL_KEYS}
    if isinstance(node, list):
        return [public_config(v, key) for v in node]
    if isinstance(node, str):
        kind, sep, rest = node.partition(":")
        prefix, path = (kind + sep, rest) if sep and kind in ("imagefolder", "webdataset") else ("", node)
        if path.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", path):
            return f"{prefix}{LOCAL_PATH}/{Path(path.rstrip('/')).name}"
    return node


# ----------------------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------------------
def metric_type(name: str) -> str:
    """Hub metric type for a results metric key (``miou`` -> mean_iou, ``top1`` -> accuracy)."""
    low = name.lower()
    if "iou" in low:
        return "mean_iou"
    if "acc" in low or low.startswith("top"):
        return "accuracy"
    return low


def eval_results(results: list[dict]) -> list[EvalResult]:
    """One ``EvalResult`` per metric of every results record, ordered as the library's model-index groups them.

    huggingface_hub writes one model-index entry per (task type, dataset, dataset config, split, revision) and
    takes that entry's task name from its first result. Two records that share those fields (a k-NN and a
    linear probe on the same split) therefore share an entry: they get a joint task name, and the protocol
    stays per metric (``metric_config`` and the name's suffix), so ``ModelCard.load`` gives back exactly these
    results, in this order.
    """
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


def model_index(name: str, results: list[dict]) -> list[dict]:
    """The ``model-index`` block as huggingface_hub serialises it (``[]`` when there is no metric)."""
    evals = eval_results(results)
    return eval_results_to_model_index(name, evals) if evals else []


def card_data(inputs: CardInputs) -> ModelCardData:
    """The card's YAML metadata as huggingface_hub's ``ModelCardData``."""
    tags = list(BASE_TAGS)
    attention = inputs.model_config.get("attention", "softmax")
    tags.append(attention.replace("_", "-"))
    if inputs.segmentation_head:
        tags.append("image-segmentation")
    datasets = [d for d in dict.fromkeys(inputs.datasets) if d]
    evals = eval_results(inputs.results)
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license=inputs.license,
        tags=tags,
        datasets=datasets or None,
        base_model=inputs.base_model or None,
        # model_name is only written inside model-index, so it is set only when there are results.
        eval_results=evals or None,
        model_name=card_name(inputs) if evals else None,
    )


def build_metadata(inputs: CardInputs) -> dict:
    """The card's YAML metadata as a plain dict (what the README's front matter holds)."""
    return card_data(inputs).to_dict()


def card_name(inputs: CardInputs) -> str:
    """The model's name: the last part of the repo id (or of the folder path)."""
    return inputs.repo_id.rstrip("/").split("/")[-1]


# ----------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------
def _transform_text(config: dict) -> str:
    attention = config.get("attention", "softmax")
    text = TRANSFORMS.get(attention, attention)
    return text.format(alpha=config.get("attention_alpha"),
                       learnable=", learnt per head" if config.get("attention_alpha_learnable") else "")


def _model_table(inputs: CardInputs) -> str:
    c = inputs.model_config
    rows = [
        ("Architecture", f"ViT, {c.get('num_hidden_layers')} blocks, width {c.get('hidden_size')}, "
                         f"{c.get('num_attention_heads')} heads, MLP {c.get('intermediate_size')}"),
        ("Patch size / training resolution", f"{c.get('patch_size')} px / {c.get('image_size')} px"),
        ("Parameters", f"{inputs.num_parameters / 1e6:.2f} M" if inputs.num_parameters >= 1e5 else f"{inputs.num_parameters:,}"),
        ("Attention transform", f"`{c.get('attention')}`"),
        ("Register tokens", str(c.get("num_register_tokens", 0))),
        ("Outputs", "`last_hidden_state` = final-normed [CLS], registers, patches; `pooler_output` = normed [CLS]"),
    ]
    if inputs.base_model:
        rows.append(("Converted from", f"[{inputs.base_model}](https://huggingface.co/{inputs.base_model})"))
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _attention_section(inputs: CardInputs) -> str:
    lines = [f"Every attention layer uses {_transform_text(inputs.model_config)}."]
    s = inputs.sparsity
    if s is None:
        lines.append("\nSparsity was not measured for this card.")
        return "\n".join(lines)
    lines.append(
        f"\nMeasured on {len(s.images)} photographs bundled with scikit-image ({', '.join(s.images)}), "
        f"center-cropped to {s.resolution} px ({s.num_tokens} tokens per attention row): on average "
        f"**{100 * s.mean_zero_fraction:.1f}%** of attention weights are exactly zero, i.e. each query attends "
        f"to **{s.mean_support:.1f}** of {s.num_tokens} tokens.\n"
    )
    lines.append("| Layer | Exact zeros (%) | Keys attended (mean) |\n|---|---|---|")
    for i, (z, k) in enumerate(zip(s.zero_fraction_per_layer, s.support_per_layer), start=1):
        lines.append(f"| {i} | {100 * z:.1f} | {k:.1f} |")
    return "\n".join(lines)


def _usage(inputs: CardInputs) -> str:
    repo = inputs.repo_id
    placeholder = (f"Replace `{repo}` with the repository id this folder is uploaded to. "
                   if inputs.repo_id_is_placeholder else "")
    parts = [
        f"{placeholder}The code ships with the weights, so pass `trust_remote_code=True`.\n",
        "```python",
        "import torch",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, AutoModel",
        "",
        f'processor = AutoImageProcessor.from_pretrained("{repo}", trust_remote_code=True)',
        f'model = AutoModel.from_pretrained("{repo}", trust_remote_code=True).eval()',
        'image = Image.open("image.jpg")',
        "with torch.no_grad():",
        '    out = model(**processor(image, return_tensors="pt"))',
        "cls = out.pooler_output                     # (1, D) normed [CLS]: global feature",
        f"patches = out.last_hidden_state[:, 1 + model.config.num_register_tokens:]  # (1, N, D) patch features",
        "```\n",
        "With the feature-extraction pipeline:\n",
        "```python",
        "from transformers import pipeline",
        "",
        f'extractor = pipeline("image-feature-extraction", model="{repo}", trust_remote_code=True)',
        'tokens = extractor("image.jpg")             # [[CLS, registers..., patches...]] each a D-list',
        'cls = extractor("image.jpg", pool=True)     # pooled output: the normed [CLS]',
        "```",
    ]
    head = inputs.segmentation_head
    if head:
        labels = head.get("id2label", {})
        names = ", ".join(str(labels[k]) for k in sorted(labels, key=int)) if 0 < len(labels) <= 40 else ""
        reads = f"blocks {head.get('layers')}" + (" + [CLS]" if head.get("use_cls_token") else "")
        parts += [
            "\nSemantic segmentation with the shipped linear probe "
            f"({len(labels) or head.get('num_labels')} classes{': ' + names if names else ''}; reads {reads}; "
            f"protocol `{head.get('protocol')}`, trained at {head.get('input_size')} px):\n",
            "```python",
            "from transformers import pipeline",
            "",
            f'segmenter = pipeline("image-segmentation", model="{repo}", trust_remote_code=True)',
            'for segment in segmenter("image.jpg"):',
            '    print(segment["label"], segment["score"])  # segment["mask"]: PIL "L" mask, 0/255, input size',
            "```\n",
            "`score` is the mean probability of the predicted class over the segment's pixels. The image is resized "
            f"to {head.get('input_size')}x{head.get('input_size')}, the logits are bilinearly upsampled to the input "
            "size. Grayscale, palette, RGBA, CMYK, 16-bit and EXIF-rotated images are converted to upright RGB; "
            "unreadable input raises a ValueError.",
        ]
    return "\n".join(parts)


def _training(inputs: CardInputs) -> str:
    if not inputs.training_config:
        if inputs.conversion or inputs.base_model:
            conv = inputs.conversion or {}
            source = inputs.base_model or conv.get("input", "an external checkpoint")
            family = f" ({conv['source']} format)" if conv.get("source") else ""
            return (f"Not trained here: weights converted from `{source}`{family} with the EntmaxViT project's "
                    "`scripts/convert_checkpoint.py`; see the original release for its training recipe.")
        return "No training configuration was recorded with these weights."
    config = public_config(inputs.training_config)
    rows = [(k, v) for k, v in flatten(config).items() if not isinstance(v, (list, dict)) or len(str(v)) < 60]
    table = "| Setting | Value |\n|---|---|\n" + "\n".join(f"| `{k}` | `{v}` |" for k, v in rows)
    full = yaml.safe_dump(config, sort_keys=False).strip()
    return (
        _progress_text(inputs) +
        "DINO self-distillation; the resolved training configuration recorded with the weights "
        "(`training_config.yaml`):\n\n" + table +
        f"\n\n<details><summary>training_config.yaml</summary>\n\n```yaml\n{full}\n```\n\n</details>"
    )


def is_partial(inputs: CardInputs) -> bool:
    """True for weights exported from a checkpoint before the end of the planned training."""
    p = inputs.training_progress or {}
    return bool(p.get("steps_planned")) and int(p.get("steps_trained", 0)) < int(p["steps_planned"])


def _progress_text(inputs: CardInputs) -> str:
    """The first paragraph of the training section for an export of a checkpoint: how far it had trained."""
    p = inputs.training_progress
    if not p:
        return ""
    trained, planned = int(p.get("steps_trained", 0)), p.get("steps_planned")
    if not planned:
        return f"Exported from a training checkpoint after {trained} optimizer steps.\n\n"
    if not is_partial(inputs):
        return f"Trained to the end: {trained} of {planned} planned optimizer steps.\n\n"
    return (f"**Partially trained:** exported from a checkpoint after **{trained} of {int(planned)} planned optimizer "
            f"steps** ({100 * trained / int(planned):.0f}%, of {p.get('epochs_planned')} epochs planned). The "
            "learning-rate and momentum schedules span the planned run, so these weights are an intermediate state, "
            "not the configuration's result.\n\n")


def _evaluation(inputs: CardInputs) -> str:
    paper = "\n".join(
        f"| {name} | {soft:.2f} | {ent:.2f} |" for name, (soft, ent) in PAPER_RESULTS.items()
    )
    paper_text = (
        "For reference, the paper reports linear-probe segmentation mIoU for DINO ViT-S/16 trained 200 epochs "
        "on ImageNet-1K (not this checkpoint):\n\n| Dataset | softmax | entmax-1.5 |\n|---|---|---|\n" + paper
    )
    if not inputs.results:
        return "No evaluation results were supplied for this checkpoint.\n\n" + paper_text
    lines = ["Results of this checkpoint (frozen backbone; from the evaluation results files):\n",
             "| Task | Dataset | Split | Protocol | Samples | Metric | Value |", "|---|---|---|---|---|---|---|"]
    for r in inputs.results:
        ds = r["dataset"]
        for key, value in r["metrics"].items():
            lines.append(f"| {r['task']} | {ds['name']} | {ds.get('split', '')} | {r['protocol'].get('name', '')} | "
                         f"{ds.get('num_samples', '')} | {key} | {float(value):.2f} |")
    return "\n".join(lines) + "\n\n" + paper_text


def _limitations(inputs: CardInputs) -> str:
    items = [
        "The backbone is self-supervised: it yields features, not labels. Heads other than the shipped linear "
        "probe must be trained by the user.",
        "The paper's probe protocol and 200-epoch recipe are not published; numbers from this repository's "
        "evaluation scripts follow their documented protocols and may differ from the paper's.",
        "Loading runs the repository's Python code (`trust_remote_code=True`); read it before use.",
    ]
    if is_partial(inputs):
        items.insert(0, "Partially trained (see Training): an intermediate checkpoint, not the end of its planned run.")
    if inputs.model_config.get("attention", "softmax") != "softmax":
        items.insert(1, "Sparse transforms have no fused SDPA kernel. The default CPU kernel (`tiled`) processes "
                        "keys in blocks, so its peak memory matches softmax with SDPA (measured 1.00x for a ViT-S/16 "
                        "training step at 448 px and inference at 896 px), but it is slower: 1.1x softmax SDPA's "
                        "time for a ViT-S/16 training step at 224 px, 1.4x for feature extraction at 448 px (CPU, "
                        "the EntmaxViT project's benchmarks).")
    if inputs.segmentation_head:
        items.append("The segmentation probe is a single 1x1 convolution on patch features: boundaries follow the "
                     f"{inputs.model_config.get('patch_size')}-px patch grid, upsampled bilinearly.")
    if not inputs.results:
        items.append("No evaluation results accompany this checkpoint.")
    return "\n".join(f"- {item}" for item in items)


def sections(inputs: CardInputs) -> dict[str, str]:
    """The template's prose variables (everything but ``card_data``)."""
    attention = inputs.model_config.get("attention", "softmax")
    summary = (
        f"A DINO-style Vision Transformer with **{attention}** attention, released with the code of "
        f"[{PAPER_TITLE}](https://arxiv.org/abs/{PAPER_ARXIV}). The paper replaces softmax with entmax-1.5 in every "
        "attention layer of DINO to limit the spread of global semantics into patch tokens, which improves linear "
        "segmentation from frozen patch features while keeping ImageNet linear accuracy."
    )
    return dict(
        title=card_name(inputs),
        summary=summary,
        model_table=_model_table(inputs),
        attention_section=_attention_section(inputs),
        usage=_usage(inputs),
        training=_training(inputs),
        evaluation=_evaluation(inputs),
        limitations=_limitations(inputs),
        contents="\n".join(f"- `{f}`" for f in sorted(inputs.files)) or "- (not listed)",
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
    text = sections(inputs)
    _check_template_variables(TEMPLATE_PATH.read_text(encoding="utf-8"), set(text))
    card = ModelCard.from_template(card_data(inputs), template_path=str(TEMPLATE_PATH), **text)
    if not card.text.endswith("\n"):  # Jinja drops the template's final newline; a text file ends with one
        card.text += "\n"
    return card


def render_card(inputs: CardInputs) -> str:
    """The README.md text: YAML front matter (written by huggingface_hub) + sections."""
    return str(build_card(inputs))


def parse_card_metadata(text: str) -> dict:
    """The YAML front matter of a card, read through ``ModelCard`` (raises ValueError when missing or invalid)."""
    if not REGEX_YAML_BLOCK.search(text):  # ModelCard would only log a warning and return empty metadata
        raise ValueError("Card has no YAML front matter")
    card = ModelCard(text)  # a non-mapping block or an unparsable model-index raises ValueError
    return card.data.to_dict()


__all__ = ["BIBTEX", "CardInputs", "PAPER_RESULTS", "PLACEHOLDER_OWNER", "build_card", "is_partial", "public_config", "build_metadata", "card_data", "eval_results",
           "metric_type", "model_index", "parse_card_metadata", "render_card", "sections"]
