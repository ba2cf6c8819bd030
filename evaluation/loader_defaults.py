"""Feature-extraction batch size and DataLoader workers sized to the machine, for configs that leave them unset.

On a GPU, decoding on the main process starves the model: batch 256 and up to 8 workers per process (the cores shared
among this node's processes, one left for the main loop). On CPU the model is the bottleneck: batch 64, no workers.
"""

from __future__ import annotations

import os
from typing import Any, Optional

GPU_BATCH, CPU_BATCH = 256, 64
MAX_WORKERS = 8  # per process; more rarely helps decoding keep up and multiplies memory


def sized_to_machine(batch_size: Optional[int], num_workers: Optional[int], accelerator: Any) -> tuple[int, int]:
    """``(batch_size, num_workers)``: the given values, or where None the defaults for ``accelerator.device``."""
    on_gpu = accelerator.device.type == "cuda"
    if batch_size is None:
        batch_size = GPU_BATCH if on_gpu else CPU_BATCH
    if num_workers is None:
        per_node = max(1, getattr(accelerator.state, "num_processes", 1) // max(1, _num_nodes()))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_workers = min(MAX_WORKERS, max(0, cores // per_node - 1)) if on_gpu else 0
    return batch_size, num_workers


def _num_nodes() -> int:
    return int(os.environ.get("NUM_NODES", os.environ.get("SLURM_NNODES", "1")) or 1)
