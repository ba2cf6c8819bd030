"""The evaluation commands (``scripts/eval_*.py``, the ``entmax-vit-eval-*`` console scripts): cli.entry_point.run
with the evaluation presets (evaluation/configs/) and the ``--model`` path checked; and the first check of each."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

PRESET_DIR = Path(__file__).parent / "configs"


def check_config(cfg: Any) -> None:
    """What every evaluation checks before it loads a model or data or writes a file: ``--model`` is given and
    ``--dataset`` is a well-formed source (data.datasets.check_source)."""
    from entmax_vit.data.datasets import check_source

    if not cfg.model:
        raise ValueError("--model is required (an EntmaxViT folder, training output dir or Hub id)")
    try:
        check_source(cfg.dataset)
    except ValueError as err:
        raise ValueError(f"--dataset: {err}") from None


def eval_knn(argv: Optional[Sequence[str]] = None) -> Any:
    """Weighted k-NN evaluation (evaluation/knn.py)."""
    from entmax_vit.cli.entry_point import run
    from entmax_vit.evaluation.knn import KNNEvalConfig, main

    return run(main, KNNEvalConfig, "eval_knn", preset_dir=PRESET_DIR, argv=argv, model_fields=("model",))


def eval_linear(argv: Optional[Sequence[str]] = None) -> Any:
    """Linear probe (evaluation/linear_probe.py)."""
    from entmax_vit.cli.entry_point import run
    from entmax_vit.evaluation.linear_probe import LinearEvalConfig, main

    return run(main, LinearEvalConfig, "eval_linear", preset_dir=PRESET_DIR, argv=argv, model_fields=("model",))


def eval_segmentation(argv: Optional[Sequence[str]] = None) -> Any:
    """Linear segmentation probe (evaluation/segmentation_probe.py); default preset ``embedded``."""
    from entmax_vit.cli.entry_point import run
    from entmax_vit.evaluation.segmentation_probe import SegmentationEvalConfig, main

    return run(main, SegmentationEvalConfig, "eval_segmentation", preset_dir=PRESET_DIR, default_preset="embedded",
               argv=argv, model_fields=("model",))
