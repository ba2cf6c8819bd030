"""The evaluation presets' folder (cli.entry_point's eval_* commands; their shared start is features.start_run)."""

from pathlib import Path

PRESET_DIR = Path(__file__).parent / "configs"
