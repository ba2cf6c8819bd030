"""The one command-line shape of the evaluation scripts: logging, ``[--config|--preset NAME] --key value``
parsed into the typed config (a bad key or value exits with the message, no traceback), then ``main(cfg)``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from entmax_vit.cli.config import ConfigError, parse_config

PRESET_DIR = Path(__file__).parent / "configs"


def preset_alias(argv: Sequence[str]) -> list[str]:
    """``--preset X`` / ``--preset=X`` -> ``--config X``."""
    return [("--config" + a[len("--preset"):]) if a == "--preset" or a.startswith("--preset=") else a for a in argv]


def run(config_cls: type, main: Callable[[Any], Any], prog: str, default_preset: Optional[str] = None,
        argv: Optional[Sequence[str]] = None) -> Any:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = preset_alias(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_config(config_cls, argv, preset_dir=PRESET_DIR, default_preset=default_preset)
    except ConfigError as err:
        sys.exit(f"{prog}: {err}")
    return main(cfg)


__all__ = ["PRESET_DIR", "preset_alias", "run"]
