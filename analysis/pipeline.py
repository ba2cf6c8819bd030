"""Analyse an in-memory model and write every output, and compare several analysed models.

What ``scripts/analyze.py`` (``analysis.run.main``) does per model and at the end, as two calls for code that
already holds its models in memory::

    runs = {name: analyze_and_save(model, pixel_values, out / name, masks=masks, name=name)
            for name, model in models.items()}
    save_comparison(runs, out)

Who calls them: ``analysis.run.main`` (loading each model from its folder or Hub id). The main job and the mini
reproduction (``entmax_vit.jobs``) run their analysis stage in-process through ``analysis.run.main`` with a
config, reading the trained model back from its saved folder; they do not call these functions directly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from entmax_vit.evaluation.results import weights_fingerprint

from .figures import plot_head_distances, plot_layer_curves, save_attention_maps, save_pca_image
from .foreground import DINO_MASS_THRESHOLD
from .per_layer import PerLayerMetrics, analyze_model, resolve_backbone
from .report import analysis_record, comparison_table, per_layer_table, write_analysis_results, write_per_layer_json
from .token_metrics import DEFAULT_OUTLIER_K

logger = logging.getLogger("entmax_vit.analysis")


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
    """``analyze_model`` plus, in ``out_dir``: ``analysis_results.json`` (results schema, task "analysis"),
    ``per_layer.json`` / ``per_layer.md``, ``attention_maps_<k>.png`` for the first ``num_figure_images``
    images and ``pca.png`` of them. ``dataset`` is the results JSON's dataset block (default: "in_memory")."""
    out = Path(out_dir)
    n = pixel_values.shape[0]
    per_layer = analyze_model(
        model, pixel_values, masks, batch_size=batch_size, outlier_k=outlier_k, mass_threshold=mass_threshold,
        feature_norm=feature_norm, progress=progress,
    )
    source = model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", "") or name
    dataset_info = dict(dataset or {"name": "in_memory", "split": "", "num_samples": n, "num_classes": None})
    protocol = {"name": "semantic_diffusion", "image_size": list(pixel_values.shape[-2:]),
                "mass_threshold": mass_threshold, "outlier_k": outlier_k, "feature_norm": feature_norm,
                "masks": masks is not None}
    record = analysis_record(per_layer, model_name_or_path=source,
                             model_config=resolve_backbone(model).config.to_dict(), dataset=dataset_info,
                             config=dict(config or {}), protocol=protocol,
                             weights_sha256=weights_fingerprint(resolve_backbone(model)))
    write_analysis_results(record, out / "analysis_results.json")
    write_per_layer_json(per_layer, out / "per_layer.json",
                         meta={"model": source, "name": name, "dataset": dataset_info,
                               "images": list(image_names or [])})
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


__all__ = ["analyze_and_save", "save_comparison"]
