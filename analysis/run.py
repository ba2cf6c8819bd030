"""The analysis entry point (``scripts/analyze.py --model A [--compare B ...] --dataset SOURCE``): each model on the
same images, into ``output_dir`` (the files: docs/analysis.md). ``analyze_and_save`` / ``save_comparison`` write
the same for models already in memory."""

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from entmax_vit.data.config_io import save_config, to_dict
from entmax_vit.evaluation.results import make_results, weights_fingerprint, write_results

from .figures import plot_head_distances, plot_layer_curves, save_attention_maps, save_pca_image
from .foreground import DINO_MASS_THRESHOLD
from .inputs import load_analysis_images
from .per_layer import PerLayerMetrics, analyze_model, flatten_metrics, resolve_backbone
from .token_metrics import DEFAULT_OUTLIER_K

logger = logging.getLogger("entmax_vit.analysis")
PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class AnalyzeConfig:
    # --- models

    model: str = ""                    # EntmaxViT folder or Hub id (required)
    compare: list[str] = field(default_factory=list)  # more models analysed on the same images, e.g. softmax
    names: list[str] = field(default_factory=list)    # display names, one per model (default: folder names)
    device: str = "cpu"                # device the models run on: "cpu", "cuda", "cuda:1", ...

    # --- images

    dataset: str = "embedded"          # load_image_dataset source, or a plain folder of images
    split: str = "validation"          # dataset split the images are taken from (not used for a plain folder)
    streaming: bool = False            # stream Hub datasets instead of downloading them first
    num_images: int = 16               # the first N readable images are used
    # Resize shorter side + centre crop to this (a multiple of the patch size). None: --model's own resolution, the
    # size it was trained at (evaluation/resolution.py: 224 for ViT-S/16, 64 for tiny_cpu); another size is warned about.
    image_size: Optional[int] = None
    image_column: Optional[str] = None  # image column of a dataset; default: found by find_column
    mask_column: Optional[str] = None   # default: found by find_column if the dataset has one
    mask_dir: Optional[str] = None      # masks for a plain image folder, named like the images
    use_masks: bool = True             # foreground Jaccard where masks exist

    # --- metrics

    batch_size: int = 8                # images per forward pass (lower it if memory runs out)
    outlier_k: float = DEFAULT_OUTLIER_K  # high-norm token: norm > median + k * 1.4826 * MAD (per layer; 6)
    mass_threshold: float = DINO_MASS_THRESHOLD  # share of [CLS] attention mass kept (DINO: 0.6)
    feature_norm: bool = True          # cosine/PCA on final-LayerNormed tokens (what a probe sees)

    # --- figures

    num_figure_images: int = 4         # attention-map PNGs per model and images in the PCA figure
    pca_layer: int = -1                # block whose patch features the PCA shows (-1 = last)
    pca_foreground_only: bool = False  # fit the PCA on foreground patches (masks or [CLS] attention)
    separate_curves: bool = True       # also one curve_<metric>.png per metric beside layer_curves.png

    # --- output

    output_dir: str = "outputs/analysis"  # config.yaml, one folder per model, curves/, comparison.md

    def __post_init__(self) -> None:
        checks = [
            (self.num_images >= 1, f"num_images must be >= 1, got {self.num_images}"),
            (self.image_size is None or self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.outlier_k > 0, f"outlier_k must be > 0, got {self.outlier_k}"),
            (0 < self.mass_threshold <= 1, f"mass_threshold must be in (0, 1], got {self.mass_threshold}"),
            (self.num_figure_images >= 0, f"num_figure_images must be >= 0, got {self.num_figure_images}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# The columns of the markdown tables: the headline quantity of each metric family.
TABLE_METRICS = ("attention_zero_share", "support_mean", "support_median", "entropy", "attention_distance",
                 "patch_to_prefix_mass", "outlier_share", "cos_to_cls", "cos_neighbors", "cos_pairwise",
                 "fg_jaccard_best_head")


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def _table(corner: str, columns: Sequence[str], rows: Mapping[Any, Mapping[str, Any]], by_metric: bool = False) -> str:
    """Markdown table of ``rows`` ({row name: {metric: value}}): a row per entry with the :data:`TABLE_METRICS` as
    columns, or (``by_metric``) a row per metric with one column per entry. Metrics no entry has are left out."""
    present = [m for m in TABLE_METRICS if any(m in r for r in rows.values())]
    cols, lines = (columns, present) if by_metric else (present, list(rows))
    out = [f"| {corner} | " + " | ".join(map(str, cols)) + " |", "|---" * (len(cols) + 1) + "|"]
    for line in lines:
        cells = [rows[c].get(line) for c in columns] if by_metric else [rows[line].get(m) for m in present]
        out.append(f"| {line} | " + " | ".join(_fmt(v) for v in cells) + " |")
    return "\n".join(out) + "\n"


def analyze_and_save(model: nn.Module, pixel_values: torch.Tensor, out_dir: str | os.PathLike, *,
                     masks: Optional[torch.Tensor] = None, name: str = "model", cfg: Optional[AnalyzeConfig] = None,
                     model_name_or_path: Optional[str] = None, dataset: Optional[Mapping[str, Any]] = None,
                     image_names: Optional[Sequence[str]] = None, progress: bool = False) -> PerLayerMetrics:
    """``analyze_model`` of one in-memory model, writing into ``out_dir`` the files ``main`` writes per model."""
    record_config = {} if cfg is None else to_dict(cfg)  # an in-memory call without cfg: no config to record
    cfg = cfg or AnalyzeConfig()
    out = Path(out_dir)
    n = pixel_values.shape[0]
    per_layer = analyze_model(model, pixel_values, masks, batch_size=cfg.batch_size, outlier_k=cfg.outlier_k,
                              mass_threshold=cfg.mass_threshold, feature_norm=cfg.feature_norm, progress=progress)
    source = model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", "") or name
    dataset_info = dict(dataset or {"name": "in_memory", "split": "", "num_samples": n, "num_classes": None})
    backbone = resolve_backbone(model)
    # non-finite values (a Jaccard with no foreground) are dropped: the schema allows finite numbers only
    metrics = {k: v for k, v in flatten_metrics(per_layer).items() if isinstance(v, (int, float)) and math.isfinite(v)}
    record = make_results(
        task="analysis", model_name_or_path=source, model_config=backbone.config.to_dict(), dataset=dataset_info,
        protocol={"name": "semantic_diffusion", "image_size": list(pixel_values.shape[-2:]),
                  "mass_threshold": cfg.mass_threshold, "outlier_k": cfg.outlier_k, "feature_norm": cfg.feature_norm,
                  "masks": masks is not None},
        metrics=metrics, config=record_config, weights_sha256=weights_fingerprint(backbone))
    write_results(record, out / "analysis_results.json")
    layers = {str(l): {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
              for l, m in per_layer.items()}  # NaN written as null
    meta = {"model": source, "name": name, "dataset": dataset_info, "images": list(image_names or [])}
    (out / "per_layer.json").write_text(json.dumps({"meta": meta, "layers": layers}, indent=2))
    (out / "per_layer.md").write_text(f"# {name}\n\n" + _table("layer", [], dict(sorted(per_layer.items()))))
    k = min(cfg.num_figure_images, n)
    for i in range(k):
        save_attention_maps(model, pixel_values[i], out / f"attention_maps_{i}.png", mass=cfg.mass_threshold)
    if k > 0:
        save_pca_image(model, pixel_values[:k], out / "pca.png", layer=cfg.pca_layer,
                       foreground_only=cfg.pca_foreground_only, masks=masks[:k] if masks is not None else None,
                       mass=cfg.mass_threshold, feature_norm=cfg.feature_norm)
    last = per_layer[max(per_layer)]
    logger.info("%s last layer: zero share %.3f, support %.1f, distance %.2f, cos neighbours %.3f", name,
                last["attention_zero_share"], last["support_mean"], last.get("attention_distance", float("nan")),
                last.get("cos_neighbors", float("nan")))
    return per_layer


def save_comparison(runs: Mapping[str, PerLayerMetrics], out_dir: str | os.PathLike,
                    separate_curves: bool = False) -> list[Path]:
    """``curves/*.png`` and ``comparison.md`` for ``{name: per_layer_metrics}``."""
    out = Path(out_dir)
    paths = plot_layer_curves(runs, out / "curves", separate=separate_curves)
    paths.append(plot_head_distances(runs, out / "curves" / "head_attention_distance.png"))
    table = out / "comparison.md"  # the last layer of each model side by side, one row per metric
    last = {n: runs[n][max(runs[n])] if runs[n] else {} for n in runs}
    table.write_text(_table("metric (last layer)", list(runs), last, by_metric=True))
    return [*paths, table]


def _model_names(cfg: AnalyzeConfig) -> list[str]:
    sources = [cfg.model, *cfg.compare]
    if cfg.names:
        if len(cfg.names) != len(sources):
            raise ValueError(f"names has {len(cfg.names)} entries for {len(sources)} models ({sources})")
        names = list(cfg.names)
    else:
        names = [Path(s.rstrip("/")).name if Path(s).exists() else s.replace("/", "__") for s in sources]
    names = [re.sub(r"[^A-Za-z0-9._+-]", "_", n) or "model" for n in names]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}; set --names a b ...")
    return names


def main(cfg: AnalyzeConfig) -> dict[str, dict]:
    """Run the analysis; returns ``{name: per_layer_metrics}``."""
    from entmax_vit.data.datasets import check_source
    from entmax_vit.evaluation.features import load_backbone
    from entmax_vit.evaluation.resolution import eval_resolution

    if not cfg.model:
        raise ValueError("--model is required (an EntmaxViT folder or Hub id)")
    if not Path(cfg.dataset).expanduser().is_dir():  # a plain folder of images is a source here too
        check_source(cfg.dataset)
    logging.basicConfig(level=logging.INFO, format="[analyze] %(message)s")
    out = Path(cfg.output_dir)
    names = _model_names(cfg)
    sources = [cfg.model, *cfg.compare]
    # One size for every model (they are compared on the same images): --model's own unless given; a model
    # trained at another size is warned about.
    image_size = cfg.image_size
    for source in sources:
        image_size = eval_resolution(None, image_size, source, what="image_size")[1]
    cfg = dataclasses.replace(cfg, image_size=image_size)

    images = load_analysis_images(cfg.dataset, split=cfg.split, num_images=cfg.num_images, image_size=cfg.image_size,
                                  mask_dir=cfg.mask_dir, image_column=cfg.image_column, mask_column=cfg.mask_column,
                                  use_masks=cfg.use_masks, streaming=cfg.streaming)
    n = images.pixel_values.shape[0]
    logger.info("%d images from %s (%s), masks: %s", n, cfg.dataset, cfg.split, images.masks is not None)
    if n < cfg.num_images:
        logger.warning("only %d of the requested %d images were available", n, cfg.num_images)
    dataset_info = {"name": cfg.dataset, "split": cfg.split, "num_samples": n, "num_classes": None}

    runs: dict[str, dict] = {}
    for name, source in zip(names, sources):
        model = load_backbone(source, device=cfg.device, attn_implementation="eager")  # eager returns probabilities
        patch = resolve_backbone(model).config.patch_size
        if cfg.image_size % patch:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of {name}'s patch size {patch}")
        logger.info("analysing %s (%s)", name, source)
        runs[name] = analyze_and_save(model, images.pixel_values, out / name, masks=images.masks, name=name, cfg=cfg,
                                      model_name_or_path=source, dataset=dataset_info, image_names=images.names,
                                      progress=True)
        del model
    save_comparison(runs, out, separate_curves=cfg.separate_curves)
    save_config(cfg, out / "config.yaml")  # after success, with the resolved image size
    logger.info("wrote %s", out)
    return runs
