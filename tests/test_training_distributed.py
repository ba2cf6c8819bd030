"""A real 2-process CPU DINO run (gloo) through `accelerate launch`: finite loss, identical teacher weights and
loss centers on both ranks, every sample read by exactly one rank once per epoch, and unreadable rows counted
once per epoch over both ranks."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from training_helpers import (
    HOOKED_DINO, RANK_STATE, REPO, env, final_digests, losses, make_image_dataset, tiny_args,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_cpu_run(tmp_path):
    data = make_image_dataset(tmp_path, num_images=16, unreadable=(3, 9, 10))  # replaced, counted over ranks
    out = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(HOOKED_DINO), json.dumps(RANK_STATE), *tiny_args(data, out, **{"optim.epochs": 2})]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(env(), ACCELERATE_USE_CPU="true"), capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # 16 images, 4 per rank per step, 2 ranks: 2 steps per epoch, 4 in all; total batch 8 sets the lr
    steps = losses(out)
    assert sorted(steps) == [1, 2, 3, 4] and all(math.isfinite(v) for v in steps.values())
    state = json.loads((out / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["total_batch"] == 8

    rank0, rank1 = final_digests(out, 0), final_digests(out, 1)
    assert rank0["teacher_digest"] == rank1["teacher_digest"]
    assert rank0["center_digest"] == rank1["center_digest"]
    assert rank0["student_digest"] == rank1["student_digest"]  # DDP keeps the students in step

    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            rows = [json.loads(line) for line in (out / "debug" / f"rank{rank}.jsonl").read_text().splitlines()]
            per_rank.append([i for r in rows if r.get("epoch") == epoch and "indices" in r for i in r["indices"]])
        assert len(per_rank[0]) == len(per_rank[1]) == 8
        assert not set(per_rank[0]) & set(per_rank[1])  # no sample on both ranks
        assert sorted(per_rank[0] + per_rank[1]) == list(range(16))  # every sample once
    assert (out / "final_model" / "model.safetensors").is_file()
    # every sample is drawn once per epoch, by one rank: the 3 unreadable rows count 3 per epoch, summed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["images_skipped"] == 2 * 3


# ------------------------------------------------------------------------------ stops and faults, 2 processes
def _launch(data: Path, out: Path, hooks: dict, **extra: object) -> subprocess.Popen:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(HOOKED_DINO), json.dumps(hooks), *tiny_args(data, out, **extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=dict(env(), ACCELERATE_USE_CPU="true"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _ranks(launcher: int) -> dict[int, int]:
    """{rank: pid} of the training processes below ``launcher`` (read from /proc)."""
    found, todo = {}, [launcher]
    while todo:
        pid = todo.pop()
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
            environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if pid != launcher and "RANK" in environ and "training_hooks.py" in Path(f"/proc/{pid}/cmdline").read_text():
            found[int(environ["RANK"])] = pid
    return found


def _alive(pid: int) -> bool:
    try:
        return "\tZ" not in Path(f"/proc/{pid}/status").read_text().split("State:")[1][:4]
    except (OSError, IndexError):
        return False


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, checkpoint: bool = True) -> dict[int, int]:
    """Poll until rank 0 drew the batch of ``step`` (after the checkpoint of the step before, when asked)."""
    import time

    path = out / "debug" / "rank0.jsonl"
    while True:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        ckpt_ok = not checkpoint or (out / "checkpoints" / f"step_{step:07d}" / "trainer_state.json").is_file()
        if any(r.get("step", -1) >= step for r in rows) and ckpt_ok:
            ranks = _ranks(proc.pid)
            if len(ranks) == 2:
                return ranks
        time.sleep(0.1)


@pytest.mark.slow
def test_sigterm_to_both_ranks_before_the_first_log_line_exits_0(tmp_path):
    """Issue 24: SIGTERM (what a scheduler sends every task) at step 2 of a 2-process run, before any metrics
    line: both ranks finish the step, write one checkpoint, and the launch exits 0 with the resume/export line."""
    import signal

    data = make_image_dataset(tmp_path, num_images=16)
    out = tmp_path / "run"
    proc = _launch(data, out, {**RANK_STATE, "sleep_per_step": 0.3},
                   **{"optim.epochs": 20, "logging.every_steps": 1000, "checkpoint.every_steps": 1000,
                      "checkpoint.at_epoch_end": False})
    for pid in _wait_for_step(proc, out, 2, checkpoint=False).values():
        os.kill(pid, signal.SIGTERM)
    rc, stderr = proc.wait(timeout=600), proc.stderr.read()
    assert rc == 0, stderr[-4000:]
    assert "stopped at step" in stderr and "scripts/export_checkpoint.py" in stderr and "Traceback" not in stderr
    assert len(list((out / "checkpoints").glob("step_*"))) == 1 and not (out / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_lost_rank_stops_the_other_with_a_clear_error_and_the_relaunch_resumes(tmp_path, fault):
    """Rank 1 is SIGKILLed (or frozen by SIGSTOP) in mid-run: rank 0 does not hang, it exits with the one-line
    'lost contact' error (for a frozen rank after distributed.timeout_s); relaunching the same command resumes
    from the last intact checkpoint and finishes."""
    import signal
    import time

    data = make_image_dataset(tmp_path, num_images=16)
    out = tmp_path / "run"
    extra = {"optim.epochs": 4, "distributed.timeout_s": 20}
    proc = _launch(data, out, {**RANK_STATE, "sleep_per_step": 0.3}, **extra)
    ranks = _wait_for_step(proc, out, 2)
    os.kill(ranks[1], signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    if fault == "frozen":
        deadline = time.time() + 300  # a hang guard, far above distributed.timeout_s
        while _alive(ranks[0]):
            assert time.time() < deadline, "rank 0 hangs beside a frozen rank"
            time.sleep(0.5)
        os.kill(ranks[1], signal.SIGKILL)
    rc, stderr = proc.wait(timeout=600), proc.stderr.read()
    assert rc != 0
    assert "lost contact with another process of the run" in stderr, stderr[-4000:]
    assert "Relaunch the same command" in stderr
    relaunch = _launch(data, out, RANK_STATE, **extra)
    rc, stderr = relaunch.wait(timeout=600), relaunch.stderr.read()
    assert rc == 0, stderr[-4000:]
    assert "resumed from" in stderr and (out / "final_model" / "model.safetensors").is_file()
    assert sorted(losses(out)) == list(range(1, 9))
    assert final_digests(out, 0)["teacher_digest"] == final_digests(out, 1)["teacher_digest"]


@pytest.mark.slow
def test_compiled_student_with_accumulation_keeps_ddp(tmp_path):
    """model.compile + gradient accumulation on 2 processes: the EMA reads the student's own parameters instead of
    unwrapping the compiled DDP module every step (accelerate's unwrap_model(keep_torch_compile=True) re-points the
    compiled module at the bare model: DDP's no_sync is then out of reach and every micro-batch all-reduces). The
    compiled student still wraps DDP at the end; both ranks end with the same student, teacher and center."""
    data = make_image_dataset(tmp_path, num_images=16)
    out = tmp_path / "run"
    proc = _launch(data, out, {**RANK_STATE, "compile_backend": "eager"},
                   **{"optim.epochs": 2, "model.compile": True, "optim.gradient_accumulation_steps": 2})
    rc, stderr = proc.wait(timeout=900), proc.stderr.read()
    assert rc == 0, stderr[-4000:]
    assert sorted(losses(out)) == [1, 2]  # 2 steps per rank per epoch / 2 accumulation x 2 epochs
    rank0, rank1 = final_digests(out, 0), final_digests(out, 1)
    assert rank0["student_inner"] == rank1["student_inner"] == "DistributedDataParallel"  # no_sync still reachable
    assert rank0["student_digest"] == rank1["student_digest"]
    assert rank0["teacher_digest"] == rank1["teacher_digest"] and rank0["center_digest"] == rank1["center_digest"]
