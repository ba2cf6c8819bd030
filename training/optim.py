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
    as ``grad_norm``), a 0-d tensor left on the device. ``clip <= 0`` disables clipping.

    Same numbers as official DINO's ``if clip_coef < 1: p.grad.mul_(clip_coef)``, without its host sync per
    parameter: the coefficient is clamped to 1 on the device (multiplying by 1.0 leaves a gradient
    bit-identical), and the norms and products are one ``torch._foreach_*`` launch each."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2)  # one 0-d tensor per parameter
    if clip > 0:
        stacked = torch.stack(norms)  # (P,)
        coefs = (clip / (stacked + 1e-6)).clamp_max(1.0)  # official clip_coef, 1 where it would not clip
        torch._foreach_mul_(grads, list(coefs.to(grads[0].dtype).unbind()))
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


@torch.no_grad()
def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], momentum: float) -> None:
    """Teacher EMA, official DINO's ``param_k.mul_(m).add_((1 - m) * param_q)`` for every parameter, as two
    ``torch._foreach_*`` launches (no Python loop over parameters, no host sync)."""
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """During the first ``freeze_last_layer`` epochs drop the gradients of the head's last layer (so AdamW
    skips it entirely, weight decay included), as official DINO."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


__all__ = ["cancel_last_layer_gradients", "clip_gradients_per_parameter", "ema_update", "param_groups"]
