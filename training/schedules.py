"""Per-iteration schedules as official DINO: precomputed arrays indexed by the global optimizer step.

    lr_schedule[it], wd_schedule[it], momentum_schedule[it]   (length epochs * iters_per_epoch)
    teacher_temp_schedule[epoch]                               (length epochs; official indexes it by epoch)
"""

import numpy as np


def cosine_schedule(base_value: float, final_value: float, epochs: int, iters_per_epoch: int,
                    warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Linear warmup ``linspace(start, base, W)`` over ``warmup_epochs``, then at iteration i of the remaining R
    ``final + (base - final) * (1 + cos(pi * i / R)) / 2`` (never quite ``final``); float64, one entry per step."""
    if epochs <= 0 or iters_per_epoch <= 0:
        raise ValueError(f"epochs ({epochs}) and iters_per_epoch ({iters_per_epoch}) must be positive")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs ({warmup_epochs}) must be in 0..epochs ({epochs})")
    warmup_iters = warmup_epochs * iters_per_epoch
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    remaining = epochs * iters_per_epoch - warmup_iters
    i = np.arange(remaining)
    cosine = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(np.pi * i / max(remaining, 1)))
    return np.concatenate((warmup, cosine))


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Teacher temperature per epoch: linear from ``warmup_temp`` to ``temp`` over ``warmup_epochs`` epochs,
    then constant (official DINO; e.g. 0.04 -> 0.07 over 30 epochs in the "boosted" ViT-S recipe)."""
    if warmup_epochs > epochs:
        raise ValueError(f"loss.warmup_teacher_temp_epochs ({warmup_epochs}) exceeds optim.epochs ({epochs})")
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.full(epochs - warmup_epochs, temp)))

