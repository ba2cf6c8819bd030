"""Helpers of the training tests (no tests here): a tiny generated image dataset, the overrides of a
seconds-long run, and running training/dino.py in a subprocess, optionally with test hooks
(tests/training_hooks.py). Imported by tests/test_training_*.py and tests/chaos.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DINO = REPO / "training" / "dino.py"
HOOKED_DINO = Path(__file__).resolve().with_name("training_hooks.py")  # dino.py's CLI with test hooks
RANK_STATE = {"dump_rank_state": True}  # the hook of the per-rank indices and digests (tests/training_hooks.py)


def dino_command(args: Sequence[str], hooks: Optional[dict] = None, python: str = sys.executable) -> list[str]:
    """``python training/dino.py ARGS``, or through the hooks launcher when ``hooks`` are given."""
    if hooks:
        return [python, str(HOOKED_DINO), json.dumps(hooks), *args]
    return [python, str(DINO), *args]


def make_image_dataset(root: Path, num_images: int = 16, size: int = 40, seed: int = 0,
                       unreadable: Sequence[int] = ()) -> Path:
    """A save_to_disk dataset of smooth random RGB images (coloured blobs on gradients) in ``root``; the rows
    in ``unreadable`` hold zero-byte files instead."""
    from datasets import Dataset, Image as ImageFeature
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(num_images):
        base = np.stack([a * xx + b * yy + c for a, b, c in rng.uniform(-0.5, 0.5, (3, 3))], -1) + 0.5
        for _ in range(3):
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
            blob = ((xx - cx) ** 2 + (yy - cy) ** 2) < r**2
            base[blob] = rng.uniform(0, 1, 3)
        images.append(Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8)))
    cells = [{"bytes": b"", "path": f"row{i}.png"} if i in unreadable else image for i, image in enumerate(images)]
    path = root / "images"
    Dataset.from_dict({"image": cells}).cast_column("image", ImageFeature()).save_to_disk(str(path))
    return path


def tiny_args(data: Path, out: Path, **extra: object) -> list[str]:
    """Overrides of the tiny_cpu preset down to a seconds-per-epoch run (image 32, patch 8, hidden 32, 2 layers)."""
    args = {
        "config": "tiny_cpu", "output_dir": out, "data.source": data, "data.max_samples": "None",
        "data.batch_size_per_device": 4, "data.num_workers": 0,
        "model.backbone_overrides": "{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2}",
        "model.out_dim": 256, "model.head_hidden_dim": 64, "model.head_bottleneck_dim": 32,
        "crops.global_size": 32, "crops.local_size": 16, "crops.local_crops_number": 2,
        "optim.epochs": 2, "optim.warmup_epochs": 1, "checkpoint.every_steps": 2, "checkpoint.keep_last": 0,
        "logging.every_steps": 1, "logging.progress_bar": False,
    }
    args.update(extra)
    return as_options(args)


def as_options(settings: dict) -> list[str]:
    """``{"a.b": value}`` -> command-line options; a boolean is tyro's flag, ``--a.b`` or ``--a.no_b``."""
    def option(key: str, value: object) -> list[str]:
        if isinstance(value, bool):
            section, dot, name = key.rpartition(".")
            return [f"--{section}{dot}{'' if value else 'no_'}{name}"]
        return [f"--{key}", str(value)]
    return [x for k, v in settings.items() for x in option(k, v)]


def env() -> dict:
    # the caller's PYTHONPATH first: a checkout tested through a path entry runs its own code in the subprocess
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
    e.pop("ACCELERATE_USE_CPU", None)
    return e


def run_dino(args: Sequence[str], timeout: float = 600, check: bool = True,
             hooks: Optional[dict] = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(dino_command(args, hooks), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dino.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def start_dino(args: Sequence[str], hooks: Optional[dict] = None) -> subprocess.Popen:
    return subprocess.Popen(dino_command(args, hooks), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def final_digests(out: Path, rank: int = 0) -> Optional[dict]:
    """The last digests the ``dump_rank_state`` hook wrote for ``rank`` (those of the end of the run)."""
    path = out / "debug" / f"rank{rank}.jsonl"
    digests = [r for r in map(json.loads, path.read_text().splitlines()) if "teacher_digest" in r]
    return digests[-1] if digests else None
