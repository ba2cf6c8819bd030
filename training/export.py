"""Export a trained DINO teacher backbone as a Hugging Face folder:

    OUT/config.json + model.safetensors + *.py (EntmaxViT remote code, via save_pretrained)
    OUT/preprocessor_config.json (make_image_processor(): DINO eval preprocessing)
    OUT/training_config.yaml (the resolved training config)

Loadable with ``AutoModel.from_pretrained(OUT, trust_remote_code=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from entmax_vit.modeling import EntmaxViTModel, make_image_processor
from entmax_vit.training.checkpointing import CONFIG_FILE, TEACHER_FILE


def export_backbone(backbone: EntmaxViTModel, out_dir: str | os.PathLike, config_yaml: Optional[str] = None) -> Path:
    """Write ``backbone`` (a teacher's EntmaxViTModel) with the image processor and the training config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(out)
    make_image_processor().save_pretrained(out)
    if config_yaml is not None:
        (out / CONFIG_FILE).write_text(config_yaml)
    return out


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Rebuild the teacher from a ``step_XXXXXXX`` checkpoint folder (its training_config.yaml) and export."""
    from entmax_vit.cli.config import from_dict
    import yaml

    from entmax_vit.training.checkpointing import load_teacher
    from entmax_vit.training.config import DinoConfig, without_retired_keys
    from entmax_vit.training.networks import build_networks

    ckpt = Path(checkpoint)
    for name in (CONFIG_FILE, TEACHER_FILE):
        if not (ckpt / name).is_file():
            raise ValueError(f"{ckpt} is not a DINO checkpoint folder: {name} is missing")
    config_yaml = (ckpt / CONFIG_FILE).read_text()
    cfg = from_dict(DinoConfig, without_retired_keys(yaml.safe_load(config_yaml)))
    _, teacher = build_networks(cfg)
    center = torch.zeros(1, cfg.model.out_dim)  # read (and checked) but not exported
    load_teacher(ckpt / TEACHER_FILE, teacher, center)
    return export_backbone(teacher.backbone, out_dir, config_yaml)


__all__ = ["export_backbone", "export_checkpoint"]
