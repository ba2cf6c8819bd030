"""What the evaluation commands (cli.entry_point.eval_*) share below the command line: the presets' folder (the
start every evaluation makes is features.start_run)."""

from __future__ import annotations

from pathlib import Path

PRESET_DIR = Path(__file__).parent / "configs"
