"""What the evaluation commands (cli.entry_point.eval_*) share below the command line: the presets' folder and the
start every evaluation makes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)
PRESET_DIR = Path(__file__).parent / "configs"


def start_run(cfg: Any, seed: Optional[int] = None) -> tuple[Any, Any]:
    """Every evaluation's start, before it loads data or writes a file: ``--model`` is given and ``--dataset`` is a
    well-formed source (data.datasets.check_source); then an Accelerator, the seed, and the frozen backbone on the
    accelerator's device. Returns (accelerator, model)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from entmax_vit.data.datasets import check_source

    from .features import load_backbone

    if not cfg.model:
        raise ValueError("--model is required (an EntmaxViT folder, training output dir or Hub id)")
    try:
        check_source(cfg.dataset)
    except ValueError as err:
        raise ValueError(f"--dataset: {err}") from None
    accelerator = Accelerator()
    if seed is not None:
        set_seed(seed)
    logger.info("%d process(es) on %s", accelerator.num_processes, accelerator.device)
    return accelerator, load_backbone(cfg.model, cfg.revision, accelerator.device)
