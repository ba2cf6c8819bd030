"""Export a trained DINO teacher backbone as a Hugging Face folder:

    OUT/config.json + model.safetensors + *.py (EntmaxViT remote code, via save_pretrained)
    OUT/preprocessor_config.json (make_image_processor(): DINO eval preprocessing at the training resolution)
    OUT/training_config.yaml (the resolved training config)
    OUT/training_progress.json (an export of a checkpoint: steps trained of the steps planned, for the model card)

Loadable with ``AutoModel.from_pretrained(OUT, trust_remote_code=True)``.
"""

import json
import os
from pathlib import Path
from typing import Optional

import torch
import yaml

from entmax_vit.data.config_io import from_dict
from entmax_vit.modeling import EntmaxViTModel, make_image_processor
from entmax_vit.training.checkpointing import CONFIG_FILE, TEACHER_FILE, load_teacher, read_trainer_state
from entmax_vit.training.config import DinoConfig
from entmax_vit.training.networks import build_networks

PROGRESS_FILE = "training_progress.json"


def export_backbone(backbone: EntmaxViTModel, out_dir: str | os.PathLike, config_yaml: Optional[str] = None,
                    progress: Optional[dict] = None) -> Path:
    """Write ``backbone`` (a teacher's EntmaxViTModel) with the image processor, the training config and, for an
    export of a checkpoint, ``progress`` (``{"steps_trained", "steps_planned", "epochs_planned"}``)."""
    out = Path(out_dir)
    backbone.save_pretrained(out)  # creates the folder
    # DINO's eval preprocessing at the training resolution (config.image_size = crops.global_size), so that
    # AutoImageProcessor users and our evaluations feed the model the size it learnt (64 px for tiny_cpu).
    make_image_processor(crop=backbone.config.image_size).save_pretrained(out)
    if config_yaml is not None:
        (out / CONFIG_FILE).write_text(config_yaml)
    if progress is not None:
        (out / PROGRESS_FILE).write_text(json.dumps(progress, indent=2) + "\n")
    return out


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Rebuild the teacher from a ``step_XXXXXXX`` checkpoint folder (its training_config.yaml) and export, with
    how far its run had trained: its global step of the ``optim.epochs`` x steps-per-epoch planned (the schedules
    span them whatever ``debug.max_steps`` says)."""
    ckpt = Path(checkpoint)
    for name in (CONFIG_FILE, TEACHER_FILE):
        if not (ckpt / name).is_file():
            raise ValueError(f"{ckpt} is not a DINO checkpoint folder: {name} is missing")
    config_yaml = (ckpt / CONFIG_FILE).read_text()
    cfg = from_dict(DinoConfig, yaml.safe_load(config_yaml))
    _, teacher = build_networks(cfg)
    center = torch.zeros(1, cfg.model.out_dim)  # read (and checked) but not exported
    load_teacher(ckpt / TEACHER_FILE, teacher, center)
    state = read_trainer_state(ckpt)
    steps_per_epoch = int(state.get("iters_per_epoch") or 0)
    progress = {"steps_trained": int(state.get("global_step", 0)),
                "steps_planned": cfg.optim.epochs * steps_per_epoch if steps_per_epoch else None,
                "epochs_planned": cfg.optim.epochs, "checkpoint": ckpt.name}
    return export_backbone(teacher.backbone, out_dir, config_yaml, progress=progress)
