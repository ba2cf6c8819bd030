"""Optimizer parameter groups, per-parameter gradient clipping and last-layer freezing, as official DINO."""

from typing import Iterable

import torch
from torch import nn


def param_groups(model: nn.Module) -> list[dict]:
    """Two AdamW groups: ``regularized`` (weights of rank >= 2; the loop schedules group 0's weight decay) and
    ``not_regularized`` (biases and 1-D parameters, weight decay 0). Frozen parameters are left out."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    not_regularized = [p for name, p in trained if name.endswith(".bias") or p.ndim <= 1]
    regularized = [p for name, p in trained if not (name.endswith(".bias") or p.ndim <= 1)]
    return [
        {"params": regularized, "name": "regularized"},
        {"params": not_regularized, "name": "not_regularized", "weight_decay": 0.0},
    ]


@torch.no_grad()
def clip_gradients_per_parameter(parameters: Iterable[nn.Parameter], clip: float) -> torch.Tensor:
    """Official DINO clipping: EACH parameter's gradient scaled to L2 norm <= ``clip`` on its own (``clip <= 0``:
    none). Returns the global L2 norm BEFORE clipping (``grad_norm``), a 0-d tensor left on the device. Official
    ``if clip_coef < 1: p.grad.mul_(clip_coef)`` without its host sync per parameter: the coefficient is clamped
    to 1 on the device (x 1.0 is bit-identical), norms and products one ``torch._foreach_*`` launch each."""
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

