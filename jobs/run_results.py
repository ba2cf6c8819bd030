"""Reading an evaluated run folder of the main job: where its evaluation stages write, and the headline numbers
that the main job's summary, the mini reproduction's rows and the degradation curves all take from it."""

from pathlib import Path
from typing import Sequence

FEATURES = ("patch", "patch+cls")  # segmentation probe inputs: last-layer patch tokens, with [CLS] concatenated
# The probes' headline numbers in summary_metrics (what a random-init baseline is compared on).
PROBE_KEYS = ("knn_top1", *(f"seg_miou_{f.replace('+', '_')}" for f in FEATURES))


def seg_dir(out: Path, features: str) -> Path:
    return out / f"segmentation_{features.replace('+', '_')}"


def load_analysis(analysis_dir: Path) -> dict[int, dict[str, float]]:
    from entmax_vit.analysis.per_layer import unflatten_metrics
    from entmax_vit.evaluation.results import load_results

    for path in sorted(analysis_dir.rglob("analysis_results.json")):
        record = load_results(path)
        if record["task"] == "analysis":
            return dict(unflatten_metrics(record["metrics"]))
    raise ValueError(f"no analysis results JSON (task 'analysis') in {analysis_dir}")


def summary_metrics(out: Path, attention: str, segmentation_features: Sequence[str]) -> dict[str, float]:
    """The headline numbers of one evaluated model folder (the results files the stages wrote)."""
    from entmax_vit.analysis.claims import HEADLINE_KEYS
    from entmax_vit.evaluation.results import load_results

    metrics: dict[str, float] = {}
    if (path := out / "knn" / "results_knn.json").is_file():
        top1 = {k: v for k, v in load_results(path)["metrics"].items() if k.startswith("top1_k")}
        best = max(top1, key=top1.get)
        metrics.update(knn_top1=top1[best], knn_best_k=float(best.removeprefix("top1_k")))
    for features in segmentation_features:
        if (path := seg_dir(out, features) / "results_segmentation.json").is_file():
            metrics[f"seg_miou_{features.replace('+', '_')}"] = load_results(path)["metrics"]["mIoU"]
    if (out / "analysis" / attention / "analysis_results.json").is_file():
        per_layer = load_analysis(out / "analysis" / attention)
        for name in ("attention_zero_share", "support_mean", "attention_distance", "cos_to_cls"):
            metrics[f"last_layer_{name}"] = per_layer[max(per_layer)][name]
    if (path := out / "claims" / "claims_results.json").is_file():
        metrics.update({k: v for k, v in load_results(path)["metrics"].items() if k in HEADLINE_KEYS})
    return metrics
