"""Fault-injection run for DINO training: an uninterrupted reference run, then the same run SIGKILLed N times
(half of them while a checkpoint is being written) and resumed with --checkpoint.resume auto each time.
Exits 0 when the killed run ends identical to the reference (losses, teacher/student/center digests), no
checkpoint folder is ever half-written and no kill loses more than one checkpoint interval.

    python scripts/chaos_train.py --kills 10 --seed 3 --workdir /tmp/chaos
    python scripts/chaos_train.py --kills 5 -- --optim.epochs 3 --model.attention softmax   # extra dino.py overrides

The default run is tiny (embedded scenes at 32 px, 16 images, a 2-block width-32 EntmaxViT, 8 steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from entmax_vit.training.chaos import compare, kill_and_resume, run_to_end
from entmax_vit.training.chaos import DINO_SCRIPT


def tiny_run_args(workdir: Path, out: Path) -> list[str]:
    settings = {
        "config": "tiny_cpu", "output_dir": out,
        "data.source": "embedded:image_size=32,num_train=16,num_validation=4", "data.cache_dir": workdir / "cache",
        "data.max_samples": "none", "data.batch_size_per_device": 4, "data.num_workers": 0,
        "model.backbone_overrides": "{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2}",
        "model.out_dim": 256, "model.head_hidden_dim": 64, "model.head_bottleneck_dim": 32,
        "crops.global_size": 32, "crops.local_size": 16, "crops.local_crops_number": 2,
        "optim.epochs": 2, "optim.warmup_epochs": 1, "checkpoint.every_steps": 1, "checkpoint.keep_last": 2,
        "logging.every_steps": 1, "logging.progress_bar": False, "logging.tensorboard": False,
        "debug.dump_rank_state": True, "debug.pause_in_checkpoint": 0.3,
    }
    return [x for k, v in settings.items() for x in (f"--{k}", str(v))]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5, help="number of SIGKILLs (>= 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill timings")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/chaos"), help="scratch folder (wiped)")
    parser.add_argument("--max-delay", type=float, default=1.5, help="max seconds after a logged step to kill")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills must be >= 1")
    shutil.rmtree(args.workdir / "reference", ignore_errors=True)
    shutil.rmtree(args.workdir / "killed", ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    reference, killed = args.workdir / "reference", args.workdir / "killed"
    logging.info("reference run -> %s", reference)
    run_to_end([sys.executable, str(DINO_SCRIPT), *tiny_run_args(args.workdir, reference), *extra], env=env)
    logging.info("%d kills -> %s", args.kills, killed)
    report = kill_and_resume([*tiny_run_args(args.workdir, killed), *extra], kills=args.kills, seed=args.seed,
                             env=env, max_delay=args.max_delay)
    report = compare(killed, reference, report)
    print(json.dumps({"identical": report.identical, "mismatches": report.mismatches, "kills": report.kills},
                     indent=2))
    return 0 if report.identical else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
