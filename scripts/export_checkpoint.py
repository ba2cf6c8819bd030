"""Export the teacher backbone of a DINO training checkpoint as a Hugging Face model folder.

    python scripts/export_checkpoint.py runs/tiny/checkpoints/step_0000080 runs/tiny/exported
    python scripts/export_checkpoint.py runs/tiny latest_export      # a run folder: its newest checkpoint

OUT then holds config.json, model.safetensors, the EntmaxViT remote code, preprocessor_config.json and
training_config.yaml, loadable with ``AutoModel.from_pretrained(OUT, trust_remote_code=True)``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from entmax_vit.training.checkpointing import STATE_FILE, latest_checkpoint
from entmax_vit.training.export import export_checkpoint


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a step_XXXXXXX checkpoint folder, or a training output_dir")
    parser.add_argument("out", type=Path, help="folder to write the model to")
    args = parser.parse_args(argv)
    ckpt = args.checkpoint
    if not (ckpt / STATE_FILE).is_file():
        newest = latest_checkpoint(ckpt / "checkpoints")
        if newest is None:
            parser.error(f"{ckpt} is neither a checkpoint folder nor a training output_dir with checkpoints/")
        ckpt = newest
    out = export_checkpoint(ckpt, args.out)
    logging.getLogger(__name__).info("exported %s -> %s", ckpt, out)
    print(out)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
