"""The project's commands, installed as console scripts (pyproject ``[project.scripts]``) and called by the
``scripts/*.py`` and ``training/dino.py`` ``__main__`` blocks: each is one :func:`entmax_vit.cli.entry_point.run`
call, so every entry point has the same shape (typed config, presets, checked overrides, ``main(cfg)``).

    entmax-vit-eval-segmentation --preset voc --model RUN/final_model --dataset SOURCE
    entmax-vit-train --config tiny_cpu --output_dir runs/tiny
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence


def _doc(module: str) -> Optional[str]:
    return sys.modules[module].__doc__


def train(argv: Optional[Sequence[str]] = None) -> Any:
    """DINO training (training/dino.py); a non-finite loss exits with status 3, a checkpoint that cannot be
    written (full disk) with 4, a lost rank (dead, frozen past distributed.timeout_s) with 5: one line each."""
    from entmax_vit.cli.entry_point import run
    from entmax_vit.training.checkpointing import CheckpointWriteError
    from entmax_vit.training.dino import CONFIG_DIR, DinoConfig, LostRankError, NonFiniteLossError, main

    return run(main, DinoConfig, "dino", preset_dir=CONFIG_DIR, argv=argv, description=_doc(main.__module__),
               exit_codes={NonFiniteLossError: 3, CheckpointWriteError: 4, LostRankError: 5},
               log_format=None)  # main sets the log level per rank


def eval_knn(argv: Optional[Sequence[str]] = None) -> Any:
    """Weighted k-NN evaluation (evaluation/knn.py)."""
    from entmax_vit.evaluation.entry_point import run
    from entmax_vit.evaluation.knn import KNNEvalConfig, main

    return run(KNNEvalConfig, main, "eval_knn", argv=argv)


def eval_linear(argv: Optional[Sequence[str]] = None) -> Any:
    """Linear probe (evaluation/linear_probe.py)."""
    from entmax_vit.evaluation.entry_point import run
    from entmax_vit.evaluation.linear_probe import LinearEvalConfig, main

    return run(LinearEvalConfig, main, "eval_linear", argv=argv)


def eval_segmentation(argv: Optional[Sequence[str]] = None) -> Any:
    """Linear segmentation probe (evaluation/segmentation_probe.py); default preset ``embedded``."""
    from entmax_vit.evaluation.entry_point import run
    from entmax_vit.evaluation.segmentation_probe import SegmentationEvalConfig, main

    return run(SegmentationEvalConfig, main, "eval_segmentation", default_preset="embedded", argv=argv)


def analyze(argv: Optional[Sequence[str]] = None) -> Any:
    """Semantic-diffusion analysis (analysis/run.py); ``--model`` and ``--compare`` paths are checked."""
    from entmax_vit.analysis.run import PRESET_DIR, AnalyzeConfig, main
    from entmax_vit.cli.entry_point import run

    return run(main, AnalyzeConfig, "analyze", preset_dir=PRESET_DIR, argv=argv, description=_doc(main.__module__),
               model_fields=("model", "compare"), log_format=None)  # main configures its own log format


__all__ = ["analyze", "eval_knn", "eval_linear", "eval_segmentation", "train"]
