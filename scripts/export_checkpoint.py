"""Export the teacher backbone of a DINO training checkpoint as a Hugging Face model folder.

    python scripts/export_checkpoint.py runs/tiny/checkpoints/step_0000080 runs/tiny/exported
    python scripts/export_checkpoint.py runs/tiny latest_export      # a run folder: its newest checkpoint
    python scripts/export_checkpoint.py --checkpoint runs/tiny --out latest_export

OUT then holds config.json, model.safetensors, the EntmaxViT remote code, preprocessor_config.json and
training_config.yaml, loadable with ``AutoModel.from_pretrained(OUT, trust_remote_code=True)``.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from entmax_vit.cli import entry_point
from entmax_vit.data.config_io import ConfigError
from entmax_vit.training.checkpointing import STATE_FILE, latest_checkpoint
from entmax_vit.training.export import export_checkpoint


@dataclass
class ExportConfig:
    # A step_XXXXXXX checkpoint folder, or a training output_dir (its newest checkpoint); the first positional.
    checkpoint: str = ""
    # Folder to write the model to; the second positional argument.
    out: str = ""


def main(cfg: ExportConfig) -> Path:
    if not cfg.checkpoint or not cfg.out:
        raise ConfigError("Usage: export_checkpoint.py CHECKPOINT_OR_RUN_DIR OUT")
    ckpt = Path(cfg.checkpoint)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt}")
    if not (ckpt / STATE_FILE).is_file():
        newest = latest_checkpoint(ckpt / "checkpoints")
        if newest is None:
            raise ConfigError(f"{ckpt} is neither a checkpoint folder nor a training output_dir with checkpoints/")
        ckpt = newest
    out = export_checkpoint(ckpt, cfg.out)
    logging.getLogger(__name__).info("exported %s -> %s", ckpt, out)
    print(out)
    return out


if __name__ == "__main__":
    entry_point.run(main, ExportConfig, "export_checkpoint", positionals=("checkpoint", "out"), description=__doc__,
                    log_format="%(levelname)s %(name)s: %(message)s")
