"""What the evaluation commands (cli.entry_point.eval_*) share below the command line: the presets' folder and the
first check every evaluation makes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
