"""The one ``__main__`` shape of every entry point: logging, the typed config parsed from ``[--config|--preset
NAME] --key value ...`` (cli.config), model paths checked, then ``main(cfg)``. An error the user can act on (a bad
key or value, a refused resume, a missing model folder, a damaged weights file) ends the process with its message
alone and a non-zero exit code, no Python traceback; ``ENTMAX_VIT_TRACEBACK=1`` shows the traceback.

    if __name__ == "__main__":
        run(main, KNNEvalConfig, "eval_knn", preset_dir=PRESET_DIR, model_fields=("model",))
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from entmax_vit.cli.config import parse_config, positionals_to_options
from entmax_vit.data.model_path import check_model_path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Errors whose message tells the user what to fix (ConfigError is a ValueError): reported without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError)


def run(main: Callable[[Any], Any], config_cls: type, prog: str, *, preset_dir: Optional[Path] = None,
        default_preset: Optional[str] = None, argv: Optional[Sequence[str]] = None,
        description: Optional[str] = None, positionals: Sequence[str] = (), model_fields: Sequence[str] = (),
        exit_codes: Optional[Mapping[type[BaseException], int]] = None,
        log_format: Optional[str] = LOG_FORMAT) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``) into ``config_cls``, check ``model_fields`` (paths or Hub ids, or
    lists of them, through check_model_path), return ``main(cfg)``.

    ``positionals`` names the config keys that positional arguments stand for (``export_checkpoint.py CKPT OUT``).
    ``exit_codes`` maps further exception types to exit codes (a message alone on stderr, then that status); a user
    error exits via ``SystemExit("prog: message")`` (status 1). ``log_format=None`` leaves logging to ``main``."""
    if log_format is not None:
        logging.basicConfig(level=logging.INFO, format=log_format)
    try:
        if positionals:
            argv = positionals_to_options(config_cls, sys.argv[1:] if argv is None else argv, positionals)
        cfg = parse_config(config_cls, argv, preset_dir=preset_dir, default_preset=default_preset,
                           description=description, prog=prog)
        for name in model_fields:
            value = getattr(cfg, name)
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if item:
                    check_model_path(str(item))
        return main(cfg)
    except Exception as err:  # noqa: BLE001 - classified below, anything else keeps its traceback
        code = next((c for kind, c in (exit_codes or {}).items() if isinstance(err, kind)), None)
        if os.environ.get("ENTMAX_VIT_TRACEBACK") or (code is None and not isinstance(err, USER_ERRORS)):
            raise
        if code is None:
            raise SystemExit(f"{prog}: {err}") from None
        print(f"{prog}: {err}", file=sys.stderr)
        raise SystemExit(code) from None


__all__ = ["LOG_FORMAT", "USER_ERRORS", "run"]
