"""scripts/gpu_check.py: its CPU mode (toy sizes, Triton through the interpreter) end to end in the slow suite;
in the default suite, that a kernel which raises is a failed row (the check goes on) and that a newly registered
kernel is covered without a change to the check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training_helpers import REPO, env


def test_every_registered_kernel_is_checked_and_a_raising_one_is_a_failed_row(monkeypatch):
    from entmax_vit.jobs import gpu_check
    from entmax_vit.modeling import attention

    def broken(*args, **kwargs):
        raise RuntimeError("no such device")

    monkeypatch.setitem(attention.ATTENTION_KERNELS, "broken", broken)
    rows = gpu_check.kernel_exactness_rows(torch.device("cpu"), (1, 2, 8, 8))
    by_kernel = {(r["transform"], r["kernel"]): r for r in rows}
    for transform in gpu_check.SPARSE:
        expected = set(attention.kernels_for(transform)) - set(gpu_check.EXACTNESS_SKIPS)
        assert {k for t, k in by_kernel if t == transform} == expected and "broken" in expected
        assert by_kernel[transform, "broken"]["status"] == "failed"
        assert "no such device" in by_kernel[transform, "broken"]["error"]
        assert by_kernel[transform, "eager"]["status"] == "ok"
        assert by_kernel[transform, "eager"]["max_abs_err_probs"] <= gpu_check.PROBS_TOL
    text = gpu_check.format_markdown({"mode": "cpu-toy", "date": "d", "seconds": 1.0, "failed_rows": 3,
                                      "sections": {"kernel_exactness": rows}})
    assert "## kernel_exactness" in text
    assert "| broken | [1, 2, 8, 8] | float32 |  |  | failed | RuntimeError: no such device |" in text


@pytest.mark.slow
def test_cpu_mode_writes_the_whole_report(tmp_path):
    """The whole check at toy sizes on the CPU: every section, every kernel of every sparse transform exact, the
    DINO relaunch bit-identical, both reports written."""
    out = tmp_path / "check"
    e = {k: v for k, v in env().items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(out), "--cpu"],
                          cwd=REPO, env=e, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["environment", "kernel_exactness", "kernel_timing", "dino_resume", "multicrop_step",
                              "feature_extraction"]
    assert report["failed_rows"] == 0, [r for rows in sections.values() for r in rows if r.get("status") == "failed"]
    environment = sections["environment"][0]
    assert environment["torch"] == torch.__version__ and environment["triton_interpret"] == "1"
    from entmax_vit.jobs.gpu_check import EXACTNESS_SKIPS, TIMING_SKIPS
    from entmax_vit.modeling.attention import kernels_for

    exact = {(r["transform"], r["kernel"]) for r in sections["kernel_exactness"]}
    assert exact == {(t, k) for t in ("entmax15", "sparsemax", "entmax_bisect") for k in kernels_for(t)
                     if k not in EXACTNESS_SKIPS}
    timing = sections["kernel_timing"]
    assert {r["tokens"] for r in timing} == {17, 33, 65} and all("forward_ratio_vs_sdpa" in r for r in timing)
    timed = {f"{t}:{k}" for t, k in exact if k not in TIMING_SKIPS}
    assert "entmax15:tiled" in timed and {r["method"] for r in timing} >= {"softmax:sdpa"} | timed
    resume = sections["dino_resume"][0]
    assert resume["bit_identical_losses"] and resume["bit_identical_weights"] and resume["resumed_log_line"]
    entmax_row = [r for r in sections["multicrop_step"] if r["attention"] == "entmax15"][0]
    assert entmax_row["images_per_s_ratio_vs_softmax"] > 0 and entmax_row["peak_memory_mib"] > 0
    assert sorted({r["image_size"] for r in sections["feature_extraction"]}) == [32, 64, 128]
    text = (out / "report.md").read_text()
    assert all(f"## {name}" in text for name in sections) and "cpu-toy" in text
