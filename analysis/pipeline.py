"""Analyse an in-memory model and write every output, and compare several analysed models (what
``analysis.run.main`` does per model and at the end)::

    runs = {name: analyze_and_save(model, pixel_values, out / name, masks=masks, name=name)
            for name, model in models.items()}
    save_comparison(runs, out)
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from entmax_vit.evaluation.results import make_results, weights_fingerprint, write_results

from .figures import plot_head_distances, plot_layer_curves, save_attention_maps, save_pca_image
from .foreground import DINO_MASS_THRESHOLD
from .per_layer import PerLayerMetrics, analyze_model, flatten_metrics, resolve_backbone
from .token_metrics import DEFAULT_OUTLIER_K

logger = logging.getLogger("entmax_vit.analysis")

# The columns of the markdown tables: the headline quantity of each metric family.
TABLE_METRICS = ("attention_zero_share", "support_mean", "support_median", "entropy", "attention_distance",
                 "patch_to_prefix_mass", "outlier_share", "cos_to_cls", "cos_neighbors", "cos_pairwise",
                 "fg_jaccard_best_head")


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def _table(corner: str, columns: Sequence[str], rows: Mapping[Any, Mapping[str, Any]],
           metrics: Sequence[str] = TABLE_METRICS, by_metric: bool = False) -> str:
    """Markdown table of ``rows`` ({row name: {metric: value}}): a row per entry with the metrics as columns, or
    (``by_metric``) a row per metric with one column per entry. Metrics no entry has are left out."""
    present = [m for m in metrics if any(m in r for r in rows.values())]
    cols, lines = (columns, present) if by_metric else (present, list(rows))
    out = [f"| {corner} | " + " | ".join(map(str, cols)) + " |", "|---" * (len(cols) + 1) + "|"]
    for line in lines:
        cells = [rows[c].get(line) for c in columns] if by_metric else [rows[line].get(m) for m in present]
        out.append(f"| {line} | " + " | ".join(_fmt(v) for v in cells) + " |")
    return "\n".join(out) + "\n"


def per_layer_table(per_layer: PerLayerMetrics) -> str:
    """One row per layer, the headline metrics as columns (absent ones '-')."""
    return _table("layer", [], dict(sorted(per_layer.items())))


def comparison_table(runs: Mapping[str, PerLayerMetrics]) -> str:
    """The last layer of each model side by side, one row per metric."""
    last = {n: runs[n][max(runs[n])] if runs[n] else {} for n in runs}
    return _table("metric (last layer)", list(runs), last, by_metric=True)


def analyze_and_save(
    model: nn.Module,
    pixel_values: torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    masks: Optional[torch.Tensor] = None,
    name: str = "model",
    model_name_or_path: Optional[str] = None,
    dataset: Optional[Mapping[str, Any]] = None,
    config: Optional[Mapping[str, Any]] = None,
    image_names: Optional[Sequence[str]] = None,
    batch_size: int = 8,
    outlier_k: float = DEFAULT_OUTLIER_K,
    mass_threshold: float = DINO_MASS_THRESHOLD,
    feature_norm: bool = True,
    num_figure_images: int = 4,
    pca_layer: int = -1,
    pca_foreground_only: bool = False,
    progress: bool = False,
) -> PerLayerMetrics:
    """``analyze_model`` plus, in ``out_dir``: ``analysis_results.json`` (results schema, task "analysis",
    ``layer_<i>/<metric>``), ``per_layer.json`` / ``per_layer.md``, ``attention_maps_<k>.png`` for the first
    ``num_figure_images`` images and their ``pca.png``. ``dataset``: the results' dataset block (default:
    "in_memory")."""
    out = Path(out_dir)
    n = pixel_values.shape[0]
    per_layer = analyze_model(model, pixel_values, masks, batch_size=batch_size, outlier_k=outlier_k,
                              mass_threshold=mass_threshold, feature_norm=feature_norm, progress=progress)
    source = model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", "") or name
    dataset_info = dict(dataset or {"name": "in_memory", "split": "", "num_samples": n, "num_classes": None})
    backbone = resolve_backbone(model)
    # non-finite values (a Jaccard with no foreground) are dropped: the schema allows finite numbers only
    metrics = {k: v for k, v in flatten_metrics(per_layer).items() if isinstance(v, (int, float)) and math.isfinite(v)}
    record = make_results(
        task="analysis", model_name_or_path=source, model_config=backbone.config.to_dict(), dataset=dataset_info,
        protocol={"name": "semantic_diffusion", "image_size": list(pixel_values.shape[-2:]),
                  "mass_threshold": mass_threshold, "outlier_k": outlier_k, "feature_norm": feature_norm,
                  "masks": masks is not None},
        metrics=metrics, config=dict(config or {}), weights_sha256=weights_fingerprint(backbone))
    write_results(record, out / "analysis_results.json")
    layers = {str(l): {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
              for l, m in per_layer.items()}  # NaN written as null
    meta = {"model": source, "name": name, "dataset": dataset_info, "images": list(image_names or [])}
    (out / "per_layer.json").write_text(json.dumps({"meta": meta, "layers": layers}, indent=2))
    (out / "per_layer.md").write_text(f"# {name}\n\n{per_layer_table(per_layer)}")
    k = min(num_figure_images, n)
    for i in range(k):
        save_attention_maps(model, pixel_values[i], out / f"attention_maps_{i}.png", mass=mass_threshold)
    if k > 0:
        save_pca_image(model, pixel_values[:k], out / "pca.png", layer=pca_layer,
                       foreground_only=pca_foreground_only, masks=masks[:k] if masks is not None else None,
                       mass=mass_threshold, feature_norm=feature_norm)
    last = per_layer[max(per_layer)]
    logger.info("%s last layer: zero share %.3f, support %.1f, distance %.2f, cos neighbours %.3f", name,
                last["attention_zero_share"], last["support_mean"], last.get("attention_distance", float("nan")),
                last.get("cos_neighbors", float("nan")))
    return per_layer


def save_comparison(runs: Mapping[str, PerLayerMetrics], out_dir: str | os.PathLike,
                    separate_curves: bool = False) -> list[Path]:
    """``curves/layer_curves.png`` (+ ``curve_<metric>.png`` with ``separate_curves``),
    ``curves/head_attention_distance.png`` and ``comparison.md`` for ``{name: per_layer_metrics}``."""
    out = Path(out_dir)
    paths = plot_layer_curves(runs, out / "curves", separate=separate_curves)
    paths.append(plot_head_distances(runs, out / "curves" / "head_attention_distance.png"))
    table = out / "comparison.md"
    table.write_text(comparison_table(runs))
    return [*paths, table]
