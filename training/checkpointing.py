"""Atomic training checkpoints: ``OUTPUT_DIR/checkpoints/step_XXXXXXX/``.

A checkpoint is first written into ``.tmp_step_XXXXXXX`` and renamed when complete, so a folder named
``step_*`` is always whole: a kill during writing leaves only a temporary folder, ignored and deleted at the
next start. Contents:

    (Accelerate save_state)  model.safetensors (student), optimizer.bin, scheduler/scaler, random_states_R.pkl
    teacher.safetensors      teacher weights ("teacher.*") and the loss center ("loss.center")
    trainer_state.json       epoch, position in the epoch, global step, world size, ...
    training_config.yaml     the resolved training config (export needs it; resume compares it)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

STEP_DIR = re.compile(r"^step_(\d{7,})$")
TMP_PREFIX = ".tmp_"
STATE_FILE = "trainer_state.json"
TEACHER_FILE = "teacher.safetensors"
CONFIG_FILE = "training_config.yaml"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(checkpoint_root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (renamed folders holding trainer_state.json), oldest first."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_root: str | os.PathLike) -> Optional[Path]:
    ckpts = list_checkpoints(checkpoint_root)
    return ckpts[-1] if ckpts else None


def remove_incomplete(checkpoint_root: str | os.PathLike) -> list[Path]:
    """Delete temporary folders left by a run killed while writing a checkpoint. Main process only."""
    root = Path(checkpoint_root)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX) or (STEP_DIR.match(path.name) and not (path / STATE_FILE).is_file()):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def teacher_state(teacher: nn.Module, center: torch.Tensor) -> dict[str, torch.Tensor]:
    state = {f"teacher.{k}": v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}
    state["loss.center"] = center.detach().cpu().contiguous()
    return state


def save_teacher(path: str | os.PathLike, teacher: nn.Module, center: torch.Tensor) -> None:
    save_file(teacher_state(teacher, center), str(path))


def load_teacher(path: str | os.PathLike, teacher: nn.Module, center: torch.Tensor) -> None:
    """Load teacher weights and the center in place; ValueError naming mismatched keys/shapes."""
    state = load_file(str(path))
    center_value = state.pop("loss.center", None)
    weights = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
    expected = teacher.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or shapes or center_value is None or center_value.shape != center.shape:
        raise ValueError(
            f"{path} does not match this model: missing {missing[:10]}, unexpected {unexpected[:10]}, "
            f"shape mismatches {[(k, tuple(weights[k].shape), tuple(expected[k].shape)) for k in shapes[:10]]}"
            + ("" if center_value is not None and center_value.shape == center.shape else
               f", loss.center {None if center_value is None else tuple(center_value.shape)} vs {tuple(center.shape)}")
        )
    teacher.load_state_dict(weights)
    with torch.no_grad():
        center.copy_(center_value.to(center.device))


def save_checkpoint(
    accelerator: Any,
    checkpoint_root: str | os.PathLike,
    step: int,
    teacher: nn.Module,
    center: torch.Tensor,
    trainer_state: dict,
    config_yaml: str,
    keep_last: int = 0,
    pause_before_commit: float = 0.0,
) -> Path:
    """Collective: every rank calls it. Writes ``step_XXXXXXX`` atomically and prunes to ``keep_last``."""
    root = Path(checkpoint_root)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}"
    if final.exists():  # e.g. an epoch end that coincides with every_steps
        return final
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its RNG state; the main rank the rest
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_teacher(tmp / TEACHER_FILE, teacher, center)
        (tmp / CONFIG_FILE).write_text(config_yaml)
        _write_json(tmp / STATE_FILE, trainer_state)  # last file: its presence marks completeness
        if pause_before_commit > 0:  # fault-injection tests: widen the window of a half-written checkpoint
            time.sleep(pause_before_commit)
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(root)
        if keep_last > 0:
            for old in list_checkpoints(root)[:-keep_last]:
                doomed = root / f"{TMP_PREFIX}old_{old.name}"  # rename first: never a half-deleted step_*
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(checkpoint: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = [
    "CONFIG_FILE", "STATE_FILE", "TEACHER_FILE", "latest_checkpoint", "list_checkpoints", "load_teacher",
    "read_trainer_state", "remove_incomplete", "save_checkpoint", "save_teacher", "step_dir_name", "teacher_state",
]
