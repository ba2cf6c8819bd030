"""Fault injection for DINO training (a test helper, also runnable): SIGKILL a run at random moments and while
it writes a checkpoint, prunes old ones or exports, resume it each time with ``--checkpoint.resume auto``, and
check that it ends exactly like an uninterrupted run. Used by tests/test_training_run.py.

    python tests/chaos.py --kills 10 --seed 3 --workdir /tmp/chaos
    python tests/chaos.py --kills 5 -- --optim.epochs 3 --model.attention softmax   # extra dino.py overrides

Checks after every kill: no ``step_*`` folder is incomplete, at most one checkpoint interval of logged steps
was lost, and a relaunch after a kill during pruning reports the pruned checkpoint's leftover as such. At the
end: the same per-step losses and the same teacher, center and student digests as the reference run, and no
temporary checkpoint folder left over. The pauses that widen the kill windows are test hooks
(tests/training_hooks.py), so the command line runs training/dino.py through that launcher.

It lives in tests/ (not scripts/) because it drives the test-only hooks, and nothing outside tests imports
tests; the default run is tiny (embedded scenes at 32 px, 16 images, a 2-block width-32 EntmaxViT, 8 steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from entmax_vit.training.checkpointing import (
    PRUNED_PREFIX, STATE_FILE, TMP_PREFIX, describe_leftover, list_checkpoints, read_trainer_state,
)
from entmax_vit.training.metrics_log import read_metrics
from training_helpers import RANK_STATE, as_options, dino_command

logger = logging.getLogger("chaos")
KILL_HOOKS = {"pause_in_checkpoint": 0.3, "pause_in_pruning": 0.3, "pause_in_export": 0.5, "dump_rank_state": True}


@dataclass
class ChaosReport:
    kills: list[dict] = field(default_factory=list)  # per kill: mode, logged step, checkpoint step
    identical: bool = False
    mismatches: list[str] = field(default_factory=list)


def _override(args: Sequence[str], key: str) -> Optional[str]:
    for i, a in enumerate(args):
        if a == f"--{key}" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(f"--{key}="):
            return a.split("=", 1)[1]
    return None


def _logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path)] if path.is_file() else []


def _leftovers(root: Path, prefix: str) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(prefix)] if root.is_dir() else []


def final_state(out: Path) -> dict:
    """Losses per step and the rank-0 end-of-run digests (needs the dump_rank_state hook)."""
    rows = [json.loads(line) for line in (out / "debug" / "rank0.jsonl").read_text().splitlines() if line.strip()]
    finals = [r for r in rows if "teacher_digest" in r]
    return {"losses": {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")},
            "digests": {k: v for k, v in (finals[-1] if finals else {}).items() if k.endswith("digest")}}


def run_to_end(cmd: Sequence[str], env: Optional[dict] = None, timeout: float = 3600) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc


def kill_mode(k: int, kills: int) -> str:
    """random | checkpoint (while a checkpoint is written) | pruning (while an old one is deleted) | export."""
    if kills >= 3 and k == kills - 1:
        return "export"
    return ("random", "checkpoint", "pruning")[k % 3]


def kill_and_resume(
    train_args: Sequence[str],
    kills: int,
    seed: int = 0,
    env: Optional[dict] = None,
    python: str = sys.executable,
    max_delay: float = 1.5,
    timeout: float = 600,
) -> ChaosReport:
    """SIGKILL ``training/dino.py TRAIN_ARGS`` (with the pauses of KILL_HOOKS) ``kills`` times, then let it finish.

    Kill k strikes as ``kill_mode(k, kills)`` says: at a random moment up to ``max_delay`` seconds after the
    run logged a new step, while a ``.tmp_step_*`` folder exists, while a ``.tmp_old_step_*`` one exists, or
    once ``final_model`` exists. TRAIN_ARGS must include --output_dir and a
    checkpoint interval (--checkpoint.every_steps); --checkpoint.keep_last > 0 for pruning kills.
    """
    out = Path(_override(train_args, "output_dir") or "")
    if not out.name:
        raise ValueError("train_args must contain --output_dir")
    interval = int(_override(train_args, "checkpoint.every_steps") or 0)
    rng = random.Random(seed)
    cmd = dino_command([*train_args, "--checkpoint.resume", "auto"], KILL_HOOKS, python)
    root = out / "checkpoints"
    report = ChaosReport()
    expect_in_next_log: Optional[str] = None
    for k in range(kills):
        mode = kill_mode(k, kills)
        before = max(_logged_steps(out), default=0)
        out.mkdir(parents=True, exist_ok=True)
        log_path = out.parent / f"{out.name}.launch{k + 1}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
            deadline = time.time() + timeout
            while proc.poll() is None and time.time() < deadline:
                if mode == "checkpoint" and _leftovers(root, f"{TMP_PREFIX}step_"):
                    break
                if mode == "pruning" and _leftovers(root, PRUNED_PREFIX):
                    break
                if mode == "export" and (out / "final_model").is_dir():
                    break
                if mode == "random" and max(_logged_steps(out), default=0) > before:
                    time.sleep(rng.uniform(0.0, max_delay))
                    break
                time.sleep(0.02)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        text = log_path.read_text()
        if expect_in_next_log is not None and expect_in_next_log not in text:
            report.mismatches.append(f"launch {k + 1}: log lacks {expect_in_next_log!r}")
        if any("while writing it" in line and PRUNED_PREFIX in line for line in text.splitlines()):
            report.mismatches.append(f"launch {k + 1}: a pruned leftover reported as an interrupted write")
        pruned = _leftovers(root, PRUNED_PREFIX)
        expect_in_next_log = describe_leftover(root / pruned[0]) if pruned else None
        ckpts = list_checkpoints(root)
        saved = read_trainer_state(ckpts[-1])["global_step"] if ckpts else 0
        logged = max(_logged_steps(out), default=0)
        entry = {"kill": k + 1, "mode": mode, "during_checkpoint": mode == "checkpoint", "logged_step": logged,
                 "checkpoint_step": saved, "finished_before_kill": proc.returncode == 0}
        report.kills.append(entry)
        logger.info("kill %d: %s", k + 1, entry)
        for path in root.glob("step_*"):
            if not (path / STATE_FILE).is_file():
                report.mismatches.append(f"kill {k + 1}: incomplete checkpoint folder {path.name}")
        if interval > 0 and logged - saved > interval:
            report.mismatches.append(f"kill {k + 1}: lost {logged - saved} steps (> interval {interval})")
    last = run_to_end(cmd, env=env, timeout=timeout)
    if expect_in_next_log is not None and expect_in_next_log not in last.stderr:
        report.mismatches.append(f"final launch: log lacks {expect_in_next_log!r}")
    leftovers = _leftovers(root, TMP_PREFIX)
    if leftovers:
        report.mismatches.append(f"temporary folders left: {leftovers}")
    return report


def compare(run: Path, reference: Path, report: ChaosReport) -> ChaosReport:
    a, b = final_state(run), final_state(reference)
    if a["losses"] != b["losses"]:
        steps = [s for s in sorted(set(a["losses"]) | set(b["losses"])) if a["losses"].get(s) != b["losses"].get(s)]
        report.mismatches.append(f"losses differ at steps {steps[:10]}")
    for key, value in b["digests"].items():
        if a["digests"].get(key) != value:
            report.mismatches.append(f"{key} differs")
    report.identical = not report.mismatches
    return report


def tiny_run_args(workdir: Path, out: Path) -> list[str]:
    settings = {
        "config": "tiny_cpu", "output_dir": out,
        "data.source": "embedded:image_size=32,num_train=16,num_validation=4", "data.cache_dir": workdir / "cache",
        "data.max_samples": "None", "data.batch_size_per_device": 4, "data.num_workers": 0,
        "model.backbone_overrides": "{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2}",
        "model.out_dim": 256, "model.head_hidden_dim": 64, "model.head_bottleneck_dim": 32,
        "crops.global_size": 32, "crops.local_size": 16, "crops.local_crops_number": 2,
        "optim.epochs": 2, "optim.warmup_epochs": 1, "checkpoint.every_steps": 1, "checkpoint.keep_last": 2,
        "logging.every_steps": 1, "logging.progress_bar": False, "logging.tensorboard": False,
    }
    return as_options(settings)


def main(argv: Optional[list[str]] = None) -> int:
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
    logger.info("reference run -> %s", reference)
    run_to_end(dino_command([*tiny_run_args(args.workdir, reference), *extra], RANK_STATE), env=env)
    logger.info("%d kills -> %s", args.kills, killed)
    report = kill_and_resume([*tiny_run_args(args.workdir, killed), *extra], kills=args.kills, seed=args.seed,
                             env=env, max_delay=args.max_delay)
    report = compare(killed, reference, report)
    print(json.dumps({"identical": report.identical, "mismatches": report.mismatches, "kills": report.kills},
                     indent=2))
    return 0 if report.identical else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
