"""The one ``__main__`` shape of every entry point: logging, the typed config parsed from ``[--config|--preset
NAME] --key value ...`` (cli.config), model paths checked, then ``main(cfg)``. An error the user can act on (a bad
key or value, a refused resume, a missing model folder, a damaged weights file) ends the process with its
message alone and a non-zero exit code, no Python traceback; ``ENTMAX_VIT_TRACEBACK=1`` shows the traceback.

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
from entmax_vit.cli.model_path import check_model_path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Errors whose message tells the user what to fix (ConfigError is a ValueError): reported without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError)


def check_model_fields(cfg: Any, fields: Sequence[str]) -> None:
    """Each named config field (a path or Hub id, or a list of them; empty = unset) through check_model_path."""
    for name in fields:
        value = getattr(cfg, name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item:
                check_model_path(str(item))


def fail(prog: str, err: BaseException, code: int = 1) -> None:
    """Print ``prog: message`` on stderr and exit with ``code`` (re-raise under ENTMAX_VIT_TRACEBACK=1)."""
    if os.environ.get("ENTMAX_VIT_TRACEBACK"):
        raise err
    print(f"{prog}: {err}", file=sys.stderr)
    raise SystemExit(code)


def run(main: Callable[[Any], Any], config_cls: type, prog: str, *, preset_dir: Optional[Path] = None,
        default_preset: Optional[str] = None, argv: Optional[Sequence[str]] = None,
        description: Optional[str] = None, positionals: Sequence[str] = (), model_fields: Sequence[str] = (),
        exit_codes: Optional[Mapping[type[BaseException], int]] = None,
        log_format: Optional[str] = LOG_FORMAT) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``) into ``config_cls``, check ``model_fields``, return ``main(cfg)``.

    ``positionals`` names the config keys that positional arguments stand for (``export_checkpoint.py CKPT OUT``).

    ``exit_codes`` maps further exception types to exit codes (reported like USER_ERRORS); a user error exits
    via ``SystemExit("prog: message")`` (status 1). ``log_format=None`` leaves logging to ``main`` (training
    sets a level per rank)."""
    if log_format is not None:
        logging.basicConfig(level=logging.INFO, format=log_format)
    codes = dict(exit_codes or {})
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if positionals:
            argv = positionals_to_options(config_cls, argv, positionals)
        cfg = parse_config(config_cls, argv, preset_dir=preset_dir, default_preset=default_preset,
                           description=description, prog=prog)
        check_model_fields(cfg, model_fields)
        return main(cfg)
    except Exception as err:  # noqa: BLE001 - classified below, anything else keeps its traceback
        for kind, code in codes.items():
            if isinstance(err, kind):
                fail(prog, err, code)
        if not isinstance(err, USER_ERRORS) or os.environ.get("ENTMAX_VIT_TRACEBACK"):
            raise
        raise SystemExit(f"{prog}: {err}") from None


__all__ = ["LOG_FORMAT", "USER_ERRORS", "check_model_fields", "fail", "run"]
