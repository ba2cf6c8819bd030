"""Atomic training checkpoints ``OUTPUT_DIR/checkpoints/step_XXXXXXX/``: written into ``.tmp_step_XXXXXXX`` and
renamed when complete (layout and guarantees: docs/training.md, "Outputs" and "Never losing work").
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from torch import nn

STEP_DIR = re.compile(r"^step_(\d{7,})$")
TMP_PREFIX = ".tmp_"
STATE_FILE = "trainer_state.json"
TEACHER_FILE = "teacher.safetensors"
CONFIG_FILE = "training_config.yaml"
MANIFEST_FILE = "manifest.json"
PRUNED_PREFIX = f"{TMP_PREFIX}old_"  # a pruned checkpoint, renamed before it is deleted
DAMAGED_PREFIX = "damaged_"  # a checkpoint that failed verification, kept aside for inspection


def list_checkpoints(checkpoint_root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (renamed folders holding trainer_state.json), oldest first."""
    root = Path(checkpoint_root)
    found = [p for p in (root.iterdir() if root.is_dir() else ())
             if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(checkpoint_root: str | os.PathLike) -> Optional[Path]:
    return (list_checkpoints(checkpoint_root) or [None])[-1]


def remove_incomplete(checkpoint_root: str | os.PathLike) -> list[Path]:
    """Delete temporary folders left by a killed run (see :func:`describe_leftover`). Main process only."""
    root = Path(checkpoint_root)
    removed = [p for p in (root.iterdir() if root.is_dir() else ())
               if p.name.startswith(TMP_PREFIX) or (STEP_DIR.match(p.name) and not (p / STATE_FILE).is_file())]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def describe_leftover(path: Path) -> str:
    """What a folder removed by :func:`remove_incomplete` was, for the log."""
    if path.name.startswith(PRUNED_PREFIX):
        return (f"removed {path.name}: the rest of checkpoint {path.name[len(PRUNED_PREFIX):]}, pruned by "
                "checkpoint.keep_last (the previous run stopped while deleting it; nothing is lost)")
    return f"removed incomplete checkpoint {path.name} (the previous run stopped while writing it)"


def save_teacher(path: str | os.PathLike, teacher: nn.Module, center: torch.Tensor) -> None:
    state = {f"teacher.{k}": v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}
    save_file({**state, "loss.center": center.detach().cpu().contiguous()}, str(path))


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


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, quota, I/O error); the previous one is untouched."""


def save_checkpoint(accelerator: Any, checkpoint_root: str | os.PathLike, step: int, teacher: nn.Module,
                    center: torch.Tensor, trainer_state: dict, config_yaml: str, keep_last: int = 0) -> Path:
    """Collective: every rank calls it. Decisions are the main process's, shared by ``gather_object`` (a stale
    network-file-system view on one rank cannot make ranks disagree and hang). A write failing on any rank raises
    :class:`CheckpointWriteError` on every rank, the temporary folder removed and the previous checkpoint intact."""
    root = Path(checkpoint_root)
    final = root / f"step_{step:07d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    exists = final.exists() if accelerator.is_main_process else None
    if gather_object([exists])[0]:  # e.g. an epoch end that coincides with every_steps
        return final
    previous = latest_checkpoint(root) if accelerator.is_main_process else None
    error = None
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # every rank writes its RNG state; the main rank the rest
    except OSError as err:
        error = f"rank {accelerator.process_index}: {err}"
    errors = [e for e in gather_object([error]) if e]
    if accelerator.is_main_process and not errors:
        try:
            save_teacher(tmp / TEACHER_FILE, teacher, center)
            (tmp / CONFIG_FILE).write_text(config_yaml)
            write_manifest(tmp)
            _write_json(tmp / STATE_FILE, trainer_state)  # last file: its presence marks completeness
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(root)
        except OSError as err:
            errors = [f"rank 0: {err}"]
    errors, previous_name = gather_object([(errors, previous and previous.name)])[0]  # main's verdict
    if errors:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(
            f"could not write checkpoint {final} ({'; '.join(errors)}); its temporary folder is removed. "
            + (f"The previous checkpoint {previous_name} is intact: free disk space, then relaunch the same "
               "command to resume from it." if previous_name else
               "There is no earlier checkpoint: free disk space and start again.")
        )
    if accelerator.is_main_process and keep_last > 0:
        # Renamed first, so a kill never leaves a half-deleted step_* (only a .tmp_old_step_*).
        for old in list_checkpoints(root)[:-keep_last]:
            doomed = root / f"{PRUNED_PREFIX}{old.name}"
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(checkpoint: Path) -> None:
    """Size and SHA-256 of every file but itself and trainer_state.json; about a second per GB (page cache)."""
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        rel = path.relative_to(checkpoint).as_posix()
        if rel not in (MANIFEST_FILE, STATE_FILE):
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    _write_json(checkpoint / MANIFEST_FILE, {"files": files})


def verify_checkpoint(checkpoint: str | os.PathLike) -> list[str]:
    """Problems of a complete checkpoint (state unreadable, manifest files missing or changed); empty if intact."""
    ckpt = Path(checkpoint)
    problems = []
    try:
        read_trainer_state(ckpt)
    except (OSError, ValueError) as err:
        problems.append(f"{STATE_FILE}: {err}")
    try:
        files = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return problems + [f"{MANIFEST_FILE}: unreadable ({err})"]
    for rel, expected in files.items():
        path = ckpt / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, {expected['size']} when written")
        elif _sha256(path) != expected["sha256"]:
            problems.append(f"{rel}: contents changed since it was written (SHA-256 differs)")
    return problems


def set_aside_damaged(checkpoint: Path) -> Path:
    """Move a damaged checkpoint aside to ``damaged_step_XXXXXXX[.n]``, out of the resumed run's way. Main only."""
    target = checkpoint.with_name(f"{DAMAGED_PREFIX}{checkpoint.name}")
    n = 1
    while target.exists():
        target, n = checkpoint.with_name(f"{DAMAGED_PREFIX}{checkpoint.name}.{n}"), n + 1
    os.replace(checkpoint, target)
    return target


def read_trainer_state(checkpoint: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system syncs a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

