"""The one ``__main__`` shape of every entry point: logging, the config parsed (cli.config), model paths checked, then
``main(cfg)``. An error the user can act on (bad key or value, refused resume, missing model, damaged weights) ends
the process with its message alone and a non-zero status; ``ENTMAX_VIT_TRACEBACK=1`` shows the traceback.

    if __name__ == "__main__":
        run(main, KNNEvalConfig, "eval_knn", preset_dir=PRESET_DIR, model_fields=("model",))
"""

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from entmax_vit.cli.config import parse_config, positionals_to_options
from entmax_vit.data.model_path import check_model_path
from entmax_vit.evaluation.entry_point import PRESET_DIR as EVAL_PRESETS

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Errors whose message tells the user what to fix (ConfigError is a ValueError): reported without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError)


def run(main: Callable[[Any], Any], config_cls: type, prog: str, *, preset_dir: Optional[Path] = None,
        default_preset: Optional[str] = None, argv: Optional[Sequence[str]] = None,
        description: Optional[str] = None, positionals: Sequence[str] = (), model_fields: Sequence[str] = (),
        exit_codes: Optional[Mapping[type[BaseException], int]] = None,
        log_format: Optional[str] = LOG_FORMAT) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``) into ``config_cls``, check ``model_fields`` (paths or Hub ids, or lists
    of them), return ``main(cfg)``. ``positionals``: the keys positional arguments stand for; ``exit_codes``: further
    exception types -> status (message alone on stderr); a user error exits via ``SystemExit("prog: message")``."""
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


def exit_status(main: Callable[[Any], Any], config_cls: type, prog: str, **kwargs: Any) -> int:
    """``run`` as an exit status, for commands whose ``cli()`` returns one (the Hub scripts): 0, or 2 with the
    message alone on stderr for an error the user can act on."""
    try:
        run(main, config_cls, prog, exit_codes=dict.fromkeys(USER_ERRORS, 2), **kwargs)
    except SystemExit as stop:
        return stop.code or 0
    return 0


# The evaluation commands (scripts/eval_*.py, the entmax-vit-eval-* console scripts): one hop to main(cfg). They
# return None: a console script's wrapper exits with sys.exit(returned value), and any value but None or an int
# would print it and exit 1 after a successful run (main(cfg) returns the results for callers in Python).
def eval_knn(argv: Optional[Sequence[str]] = None) -> None:
    """Weighted k-NN evaluation (evaluation/knn.py)."""
    from entmax_vit.evaluation.knn import KNNEvalConfig, main

    run(main, KNNEvalConfig, "eval_knn", preset_dir=EVAL_PRESETS, argv=argv, model_fields=("model",))


def eval_linear(argv: Optional[Sequence[str]] = None) -> None:
    """Linear probe (evaluation/linear_probe.py)."""
    from entmax_vit.evaluation.linear_probe import LinearEvalConfig, main

    run(main, LinearEvalConfig, "eval_linear", preset_dir=EVAL_PRESETS, argv=argv, model_fields=("model",))


def eval_segmentation(argv: Optional[Sequence[str]] = None) -> None:
    """Linear segmentation probe (evaluation/segmentation_probe.py); default preset ``embedded``."""
    from entmax_vit.evaluation.segmentation_probe import SegmentationEvalConfig, main

    run(main, SegmentationEvalConfig, "eval_segmentation", preset_dir=EVAL_PRESETS, default_preset="embedded",
        argv=argv, model_fields=("model",))
