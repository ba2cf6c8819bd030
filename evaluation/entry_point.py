"""The command-line shape of the evaluation scripts: cli.entry_point.run with the evaluation presets
(``--config|--preset NAME``, evaluation/configs/) and the ``--model`` path checked (a missing folder says so)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from entmax_vit.cli import entry_point

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


def run(config_cls: type, main: Callable[[Any], Any], prog: str, default_preset: Optional[str] = None,
        argv: Optional[Sequence[str]] = None) -> Any:
    """Parse, check ``--model``, run ``main(cfg)``; a bad key, value or model path exits with the message alone."""
    return entry_point.run(main, config_cls, prog, preset_dir=PRESET_DIR, default_preset=default_preset, argv=argv,
                           model_fields=("model",))


__all__ = ["PRESET_DIR", "check_config", "run"]
