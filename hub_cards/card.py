"""Model card renderer: YAML metadata (incl. model-index from results JSONs) + sections filled from what the
model folder records. Nothing here is per-model prose: every model-specific sentence comes from data."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any, Optional

import yaml

from .sparsity import SparsityReport

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"

PAPER_TITLE = "Vision Transformers Need Better Token Interaction"
PAPER_ARXIV = "2605.23868"
BIBTEX = (
    "@article{entmaxvit2026,\n"
    f"  title={{{PAPER_TITLE}}},\n"
    f"  journal={{arXiv preprint arXiv:{PAPER_ARXIV}}},\n"
    "  year={2026}\n"
    "}"
)
# The paper's headline numbers (DINOv1 ViT-S/16, 200 epochs, linear segmentation probe mIoU, softmax -> entmax-1.5).
PAPER_RESULTS = {"VOC": (42.80, 48.78), "ADE20K": (19.85, 21.97), "Cityscapes": (36.79, 37.87)}

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

    repo_id: str                              # Hub id, or the folder path for an offline assembly
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


def model_index(name: str, results: list[dict]) -> list[dict]:
    """The ``model-index`` block: one result per (task, dataset, protocol) with all its metrics."""
    entries = []
    for record in results:
        task_type, task_name = TASK_TYPES[record["task"]]
        dataset = record["dataset"]
        protocol = record["protocol"].get("name", "")
        metrics = [
            {"type": metric_type(key), "name": f"{key} ({protocol})" if protocol else key, "value": round(float(v), 4)}
            for key, v in record["metrics"].items()
        ]
        if not metrics:
            continue
        ds = {"name": dataset["name"], "type": dataset["name"]}
        if dataset.get("split"):
            ds["split"] = dataset["split"]
        entries.append({"task": {"type": task_type, "name": task_name}, "dataset": ds, "metrics": metrics})
    return [{"name": name, "results": entries}] if entries else []


def build_metadata(inputs: CardInputs) -> dict:
    tags = list(BASE_TAGS)
    attention = inputs.model_config.get("attention", "softmax")
    tags.append(attention.replace("_", "-"))
    if inputs.segmentation_head:
        tags.append("image-segmentation")
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "image-feature-extraction",
        "license": inputs.license,
        "tags": tags,
    }
    datasets = [d for d in dict.fromkeys(inputs.datasets) if d]
    if datasets:
        meta["datasets"] = datasets
    if inputs.base_model:
        meta["base_model"] = inputs.base_model
    index = model_index(inputs.repo_id.rstrip("/").split("/")[-1], inputs.results)
    if index:
        meta["model-index"] = index
    return meta


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
    parts = [
        "The code ships with the weights, so pass `trust_remote_code=True`.\n",
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


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        out = []
        for k, v in d.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, d)]


def _training(inputs: CardInputs) -> str:
    if not inputs.training_config:
        if inputs.conversion or inputs.base_model:
            conv = inputs.conversion or {}
            source = inputs.base_model or conv.get("input", "an external checkpoint")
            family = f" ({conv['source']} format)" if conv.get("source") else ""
            return (f"Not trained here: weights converted from `{source}`{family} with the EntmaxViT project's "
                    "`scripts/convert_checkpoint.py`; see the original release for its training recipe.")
        return "No training configuration was recorded with these weights."
    rows = [(k, v) for k, v in _flatten(inputs.training_config) if not isinstance(v, (list, dict)) or len(str(v)) < 60]
    table = "| Setting | Value |\n|---|---|\n" + "\n".join(f"| `{k}` | `{v}` |" for k, v in rows)
    full = yaml.safe_dump(inputs.training_config, sort_keys=False).strip()
    return (
        "DINO self-distillation; the resolved training configuration recorded with the weights "
        "(`training_config.yaml`):\n\n" + table +
        f"\n\n<details><summary>training_config.yaml</summary>\n\n```yaml\n{full}\n```\n\n</details>"
    )


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
    if inputs.model_config.get("attention", "softmax") != "softmax":
        items.insert(1, "Sparse transforms have no fused SDPA kernel: attention runs as explicit matrix products, "
                        "slower and more memory-hungry than softmax with SDPA at high resolution.")
    if inputs.segmentation_head:
        items.append("The segmentation probe is a single 1x1 convolution on patch features: boundaries follow the "
                     f"{inputs.model_config.get('patch_size')}-px patch grid, upsampled bilinearly.")
    if not inputs.results:
        items.append("No evaluation results accompany this checkpoint.")
    return "\n".join(f"- {item}" for item in items)


def render_card(inputs: CardInputs) -> str:
    """The README.md text: YAML front matter + sections."""
    meta = yaml.safe_dump(build_metadata(inputs), sort_keys=False, allow_unicode=True).strip()
    attention = inputs.model_config.get("attention", "softmax")
    name = inputs.repo_id.rstrip("/").split("/")[-1]
    summary = (
        f"A DINO-style Vision Transformer with **{attention}** attention, released with the code of "
        f"[{PAPER_TITLE}](https://arxiv.org/abs/{PAPER_ARXIV}). The paper replaces softmax with entmax-1.5 in every "
        "attention layer of DINO to limit the spread of global semantics into patch tokens, which improves linear "
        "segmentation from frozen patch features while keeping ImageNet linear accuracy."
    )
    contents = "\n".join(f"- `{f}`" for f in sorted(inputs.files)) or "- (not listed)"
    return Template(TEMPLATE_PATH.read_text()).substitute(
        metadata=meta,
        title=name,
        summary=summary,
        model_table=_model_table(inputs),
        attention_section=_attention_section(inputs),
        usage=_usage(inputs),
        training=_training(inputs),
        evaluation=_evaluation(inputs),
        limitations=_limitations(inputs),
        contents=contents,
        bibtex=BIBTEX,
    )


def parse_card_metadata(text: str) -> dict:
    """The YAML front matter of a card (raises ValueError when missing or not a mapping)."""
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
    if not match:
        raise ValueError("Card has no YAML front matter")
    data = yaml.safe_load(match.group(1))
    if not isinstance(data, dict):
        raise ValueError("Card front matter is not a mapping")
    return data


__all__ = ["BIBTEX", "CardInputs", "PAPER_RESULTS", "build_metadata", "metric_type", "model_index",
           "parse_card_metadata", "render_card"]
