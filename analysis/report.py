"""Writing analysis outputs: the per-layer metrics JSON, markdown tables, and the results record
(schema ``entmax_vit.results/v1``, task "analysis", metrics flattened as ``layer_<i>/<metric>``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from entmax_vit.evaluation.results import make_results, write_results

from .per_layer import PerLayerMetrics, flatten_metrics

# The columns of the markdown tables: the headline quantity of each metric family.
TABLE_METRICS: tuple[str, ...] = (
    "attention_zero_share",
    "support_mean",
    "support_median",
    "entropy",
    "attention_distance",
    "patch_to_prefix_mass",
    "outlier_share",
    "cos_to_cls",
    "cos_neighbors",
    "cos_pairwise",
    "fg_jaccard_best_head",
)


def write_per_layer_json(per_layer: PerLayerMetrics, path: str | os.PathLike, meta: Optional[Mapping[str, Any]] = None) -> Path:
    """``{"meta": {...}, "layers": {"<i>": {metric: value}}}`` (NaN written as null)."""
    clean = {str(l): {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
             for l, m in per_layer.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": dict(meta or {}), "layers": clean}, indent=2))
    return path


def _fmt(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4g}"


def per_layer_table(per_layer: PerLayerMetrics, metrics: Sequence[str] = TABLE_METRICS) -> str:
    """Markdown table, one row per layer, the given metrics as columns (absent ones shown as '-')."""
    present = [m for m in metrics if any(m in row for row in per_layer.values())]
    lines = ["| layer | " + " | ".join(present) + " |", "|---" * (len(present) + 1) + "|"]
    for layer in sorted(per_layer):
        lines.append(f"| {layer} | " + " | ".join(_fmt(per_layer[layer].get(m)) for m in present) + " |")
    return "\n".join(lines) + "\n"


def comparison_table(runs: Mapping[str, PerLayerMetrics], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """Markdown table of the last layer of each model side by side (one row per metric)."""
    names = list(runs)
    last = {n: runs[n][max(runs[n])] for n in names if runs[n]}
    present = [m for m in metrics if any(m in row for row in last.values())]
    lines = ["| metric (last layer) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for m in present:
        lines.append(f"| {m} | " + " | ".join(_fmt(last.get(n, {}).get(m)) for n in names) + " |")
    return "\n".join(lines) + "\n"


def analysis_record(
    per_layer: PerLayerMetrics,
    *,
    model_name_or_path: str,
    model_config: Mapping[str, Any],
    dataset: Mapping[str, Any],
    config: Mapping[str, Any],
    protocol: Optional[Mapping[str, Any]] = None,
    weights_sha256: Optional[str] = None,
) -> dict:
    """A validated results record for ``per_layer`` (non-finite values, e.g. a Jaccard with no foreground,
    are dropped: the schema allows finite numbers only)."""
    metrics = {k: v for k, v in flatten_metrics(per_layer).items() if isinstance(v, (int, float)) and math.isfinite(v)}
    return make_results(
        task="analysis",
        model_name_or_path=model_name_or_path,
        model_config=model_config,
        dataset=dataset,
        protocol=dict(protocol or {"name": "semantic_diffusion"}),
        metrics=metrics,
        config=config,
        weights_sha256=weights_sha256,
    )


def write_analysis_results(record: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a record made by ``analysis_record`` (validated again on write)."""
    return write_results(record, path)


__all__ = [
    "TABLE_METRICS",
    "analysis_record",
    "comparison_table",
    "per_layer_table",
    "write_analysis_results",
    "write_per_layer_json",
]
