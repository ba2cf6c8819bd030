"""Command-line helpers only the tests need."""

import contextlib
import io

from entmax_vit.cli.config import parse_config


def usage(cls: type, description=None, preset_dir=None) -> str:
    """The ``--help`` text of ``parse_config(cls, ["--help"], ...)``."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.suppress(SystemExit):
        parse_config(cls, ["--help"], preset_dir, description=description or cls.__doc__)
    return stdout.getvalue()
