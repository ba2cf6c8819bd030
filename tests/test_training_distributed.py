"""A real 2-process CPU DINO run (gloo) through `accelerate launch`: finite loss, identical teacher weights and
loss centers on both ranks, every sample read by exactly one rank once per epoch, and unreadable rows counted
once per epoch over both ranks."""

from __future__ import annotations

import json
import math
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
