"""A backbone's speed and peak memory on CPU or CUDA (scripts/bench_model.py, jobs/gpu_check.py)."""

import statistics
import time
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def backbone_step(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """Forward + backward over each resolution group (as DINO's multi-crop wrapper), grads cleared after."""
    loss = 0.0
    for pixel_values in batches:
        tokens = model(pixel_values).last_hidden_state  # (B, 1 + N, D)
        loss = loss + tokens.float().square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages allocated under this mode (CPU or CUDA, autograd's backward included),
    each counted once until its storage object dies; torch.compile'd code allocates outside it, unseen."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        _, nbytes = self.live.pop(key, (None, 0))
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key not in self.live or self.live[key][0]() is not storage:  # a storage not counted yet
                self.live[key] = (weakref.ref(storage, lambda _ref, key=key: self._release(key)), storage.nbytes())
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
        return out


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before: CUDA's allocator statistics
    on a GPU (every kernel, compiled ones included), the dispatch-mode tracker on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    tracker = PeakMemory()
    with tracker:
        fn()
    return tracker.peak


def median_seconds(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                   warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, in interleaved rounds (load from other processes hits all
    alike), CUDA synchronised around every call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}
