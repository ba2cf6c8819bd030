"""Evaluation of frozen backbones: cached features, DINO k-NN, linear probe, linear segmentation probe, metrics,
results JSON. Names are loaded lazily so ``entmax_vit.evaluation.results`` stays a light import."""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "extract_features": "features", "load_backbone": "features", "split_features": "features",
    "knn_classify": "knn", "KNNEvalConfig": "knn",
    "LinearEvalConfig": "linear_probe", "LinearGrid": "linear_probe",
    "SegmentationEvalConfig": "segmentation_probe", "train_probe": "segmentation_probe",
    "evaluate_probe": "segmentation_probe",
    "confusion_matrix": "metrics", "segmentation_scores": "metrics",
    "make_results": "results", "write_results": "results", "load_results": "results",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
