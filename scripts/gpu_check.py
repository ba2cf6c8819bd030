"""The GPU acceptance check: environment, exactness of every sparse attention kernel, kernel timings against
softmax SDPA, a 100-step bf16 DINO run of ViT-S/16 under accelerate with a bit-identical resume, multi-crop step
and feature-extraction throughput and memory; writes DIR/report.json and DIR/report.md (jobs/gpu_check.py).

    python scripts/gpu_check.py --out gpu_report                  # one GPU: under 8 minutes
    python scripts/gpu_check.py --out /tmp/check --cpu       # toy sizes on the CPU (tests the check itself)
    python scripts/gpu_check.py --out DIR --sections kernel_exactness kernel_timing

Without CUDA (or with --cpu) the same rows run at toy sizes on the CPU, Triton kernels through the Triton
interpreter (TRITON_INTERPRET=1, set here before anything imports triton). Exit status 0 even when rows fail:
the report says which (report.json "failed_rows").
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class GpuCheckConfig:
    # Folder of report.json, report.md and the DINO runs' work files.
    out: str = "outputs/gpu_check"
    # Run the CPU toy sizes even where CUDA is available.
    cpu: bool = False
    # Only these sections (environment, kernel_exactness, kernel_timing, dino_resume, multicrop_step,
    # feature_extraction); empty = all.
    sections: list[str] = field(default_factory=list)


def main(cfg: GpuCheckConfig) -> dict:
    on_gpu = torch.cuda.is_available() and not cfg.cpu
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the project imports it)
    from entmax_vit.jobs.gpu_check import run_check

    report = run_check(Path(cfg.out), torch.device("cuda" if on_gpu else "cpu"), cfg.sections or None)
    print(f"[gpu_check] {report['mode']}: {report['failed_rows']} failed row(s) in {report['seconds']} s -> "
          f"{Path(cfg.out) / 'report.md'}")
    return report


if __name__ == "__main__":
    from entmax_vit.cli import entry_point  # imports no triton: main sets TRITON_INTERPRET in time

    entry_point.run(main, GpuCheckConfig, "gpu_check", description=__doc__)
