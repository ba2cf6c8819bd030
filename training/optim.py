"""Optimizer parameter groups, per-parameter gradient clipping and last-layer freezing, as official DINO."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def param_groups(model: nn.Module) -> list[dict]:
    """Two AdamW groups: ``regularized`` (weights of rank >= 2) and ``not_regularized`` (biases and all 1-D
    parameters: norms, ...). The second group gets ``weight_decay = 0`` for the whole run; the training loop
    writes the scheduled weight decay into group 0 only. Frozen parameters are left out."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim <= 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [
        {"params": regularized, "name": "regularized"},
        {"params": not_regularized, "name": "not_regularized", "weight_decay": 0.0},
    ]


@torch.no_grad()
def clip_gradients_per_parameter(parameters: Iterable[nn.Parameter], clip: float) -> torch.Tensor:
    """Official DINO clipping: EACH parameter's gradient is scaled to L2 norm <= ``clip`` on its own (not
    the global norm of all gradients). Returns the global L2 norm of the gradients BEFORE clipping (logged
    as ``grad_norm``). ``clip <= 0`` disables clipping."""
    norms = []
    for p in parameters:
        if p.grad is None:
            continue
        norm = p.grad.detach().norm(2)
        norms.append(norm)
        if clip > 0:
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """During the first ``freeze_last_layer`` epochs drop the gradients of the head's last layer (so AdamW
    skips it entirely, weight decay included), as official DINO."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


__all__ = ["cancel_last_layer_gradients", "clip_gradients_per_parameter", "param_groups"]
