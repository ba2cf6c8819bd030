"""Fault injection for DINO training: SIGKILL a run at random moments (some while a checkpoint is being
written), resume it each time with ``--checkpoint.resume auto``, and check it ends exactly like an
uninterrupted run. Used by tests/test_training_run.py and scripts/chaos_train.py.

Checks after every kill: no ``step_*`` folder is incomplete, at most one checkpoint interval of logged steps
was lost. At the end: the same per-step losses and the same teacher, center and student digests as the
reference run, and no temporary checkpoint folder left over.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from entmax_vit.training.checkpointing import STATE_FILE, TMP_PREFIX, list_checkpoints, read_trainer_state
from entmax_vit.training.metrics_log import read_metrics

logger = logging.getLogger(__name__)
DINO_SCRIPT = Path(__file__).resolve().parent / "dino.py"


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


def final_state(out: Path) -> dict:
    """Losses per step and the rank-0 end-of-run digests (needs --debug.dump_rank_state true)."""
    rows = [json.loads(line) for line in (out / "debug" / "rank0.jsonl").read_text().splitlines() if line.strip()]
    finals = [r for r in rows if r.get("final")]
    return {"losses": {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")},
            "digests": {k: v for k, v in (finals[-1] if finals else {}).items() if k.endswith("digest")}}


def run_to_end(cmd: Sequence[str], env: Optional[dict] = None, timeout: float = 3600) -> None:
    proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({proc.returncode}): {proc.stderr[-3000:]}")


def kill_and_resume(
    train_args: Sequence[str],
    kills: int,
    seed: int = 0,
    env: Optional[dict] = None,
    python: str = sys.executable,
    max_delay: float = 1.5,
    timeout: float = 600,
) -> ChaosReport:
    """SIGKILL ``python training/dino.py TRAIN_ARGS`` ``kills`` times, then let it finish.

    Odd-numbered kills strike while a checkpoint is being written (a ``.tmp_*`` folder exists; pass
    ``--debug.pause_in_checkpoint`` to widen that window), the others at a random moment up to ``max_delay``
    seconds after the run logged a new step. TRAIN_ARGS must include --output_dir, --debug.dump_rank_state
    true and a checkpoint interval (--checkpoint.every_steps).
    """
    out = Path(_override(train_args, "output_dir") or "")
    if not out.name:
        raise ValueError("train_args must contain --output_dir")
    interval = int(_override(train_args, "checkpoint.every_steps") or 0)
    rng = random.Random(seed)
    cmd = [python, str(DINO_SCRIPT), *train_args, "--checkpoint.resume", "auto"]
    report = ChaosReport()
    for k in range(kills):
        during_checkpoint = k % 2 == 1
        before = max(_logged_steps(out), default=0)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while proc.poll() is None and time.time() < deadline:
            root = out / "checkpoints"
            if during_checkpoint:
                if root.is_dir() and any(p.name.startswith(TMP_PREFIX) for p in root.iterdir()):
                    break
            elif max(_logged_steps(out), default=0) > before:
                time.sleep(rng.uniform(0.0, max_delay))
                break
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpts = list_checkpoints(out / "checkpoints")
        saved = read_trainer_state(ckpts[-1])["global_step"] if ckpts else 0
        logged = max(_logged_steps(out), default=0)
        entry = {"kill": k + 1, "during_checkpoint": during_checkpoint, "logged_step": logged,
                 "checkpoint_step": saved, "finished_before_kill": proc.returncode == 0}
        report.kills.append(entry)
        logger.info("kill %d: %s", k + 1, entry)
        for path in (out / "checkpoints").glob("step_*"):
            if not (path / STATE_FILE).is_file():
                report.mismatches.append(f"kill {k + 1}: incomplete checkpoint folder {path.name}")
        if interval > 0 and logged - saved > interval:
            report.mismatches.append(f"kill {k + 1}: lost {logged - saved} steps (> interval {interval})")
    run_to_end(cmd, env=env, timeout=timeout)
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]
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


__all__ = ["ChaosReport", "compare", "final_state", "kill_and_resume", "run_to_end"]
