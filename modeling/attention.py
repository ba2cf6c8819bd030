"""Attention transforms (softmax, entmax-1.5, sparsemax, alpha-entmax) and the attention kernels.

Two separate choices, as in the house style:

* the *transform* (``config.attention``) maps attention scores to probabilities. Each transform is a pure
  function ``fn(scores, alpha=None) -> probs`` over the last dimension, registered by name in
  ``ATTENTION_TRANSFORMS``: adding one is one function and one entry.
* the *kernel* (``config._attn_implementation``: ``eager`` / ``sdpa`` / ``compiled``) decides how the
  attention product is computed. ``sdpa`` is used only where it gives the same math (softmax); every other
  transform runs the eager product with our own exact transform, optionally ``torch.compile``'d.

This file is copied to the Hub with the model: it imports only the standard library and torch.
The sparse transforms are exact (no iteration tolerance), written from the closed forms in
Peters, Niculae & Martins (2019), "Sparse Sequence-to-Sequence Models" and Martins & Astudillo (2016),
"From Softmax to Sparsemax". Each is a custom autograd function that saves only its output.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------
# entmax-1.5
# ----------------------------------------------------------------------------------------------------------
def _entmax15_threshold(z: torch.Tensor) -> torch.Tensor:
    """Exact threshold tau of 1.5-entmax for ``z`` already scaled by (alpha - 1) = 1/2 and max-shifted.

    p_i = [z_i - tau]_+^2 with sum_i p_i = 1. On a support of the k largest entries tau solves
    k tau^2 - 2 S1 tau + S2 - 1 = 0 (S1, S2: sums of the entries and of their squares), whose smaller root is
    tau_k = mean_k - sqrt((1 - k var_k) / k). The support is the largest k with tau_k <= z_(k).
    """
    z_sorted, _ = torch.sort(z, dim=-1, descending=True)  # (..., N)
    n = z.shape[-1]
    rho = torch.arange(1, n + 1, device=z.device, dtype=z.dtype)
    mean = z_sorted.cumsum(-1) / rho
    mean_sq = (z_sorted * z_sorted).cumsum(-1) / rho
    ss = rho * (mean_sq - mean * mean)
    delta = (1 - ss) / rho
    tau = mean - torch.sqrt(torch.clamp(delta, min=0))
    # NaNs (from -inf masked entries) compare False and so never enter the support.
    support = (tau <= z_sorted).sum(dim=-1, keepdim=True).clamp(min=1)
    return tau.gather(-1, support - 1)


class Entmax15Function(torch.autograd.Function):
    """1.5-entmax over the last dimension. Backward needs only the output: dp/dz = diag(s) - s s^T / sum(s),
    s = sqrt(p) (times the 1/2 scale, which cancels with the pre-scaling of the input)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        z = scores / 2
        z = z - z.amax(dim=-1, keepdim=True)
        tau = _entmax15_threshold(z)
        probs = torch.clamp(z - tau, min=0) ** 2
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        s = probs.sqrt()
        g = grad_output * s
        q = g.sum(-1, keepdim=True) / s.sum(-1, keepdim=True)
        return g - q * s


def entmax15(scores: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact 1.5-entmax over the last dimension (computed in float32 or wider, returned in the input dtype)."""
    dtype = scores.dtype
    out = Entmax15Function.apply(scores.float() if dtype in (torch.float16, torch.bfloat16) else scores)
    return out.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# sparsemax (alpha = 2)
# ----------------------------------------------------------------------------------------------------------
class SparsemaxFunction(torch.autograd.Function):
    """Euclidean projection onto the simplex. Backward: on the support, grad minus its support mean."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        z = scores - scores.amax(dim=-1, keepdim=True)
        z_sorted, _ = torch.sort(z, dim=-1, descending=True)
        n = z.shape[-1]
        rho = torch.arange(1, n + 1, device=z.device, dtype=z.dtype)
        cumsum = z_sorted.cumsum(-1)
        support = ((1 + rho * z_sorted) > cumsum).sum(dim=-1, keepdim=True).clamp(min=1)
        tau = (cumsum.gather(-1, support - 1) - 1) / support.to(z.dtype)
        probs = torch.clamp(z - tau, min=0)
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        on = (probs > 0).to(grad_output.dtype)
        g = grad_output * on
        q = g.sum(-1, keepdim=True) / on.sum(-1, keepdim=True)
        return g - q * on


def sparsemax(scores: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact sparsemax over the last dimension."""
    dtype = scores.dtype
    out = SparsemaxFunction.apply(scores.float() if dtype in (torch.float16, torch.bfloat16) else scores)
    return out.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# alpha-entmax by bisection (any alpha > 1, optionally a learnable tensor broadcast over rows)
# ----------------------------------------------------------------------------------------------------------
class EntmaxBisectFunction(torch.autograd.Function):
    """alpha-entmax: p_i = [(alpha-1) z_i - tau]_+^(1/(alpha-1)), tau found by bisection, then renormalised.

    Backward w.r.t. the scores uses s = p^(2-alpha); w.r.t. alpha it follows Correia et al. (2019),
    "Adaptively Sparse Transformers", eq. (13)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, alpha: torch.Tensor, n_iter: int = 50) -> torch.Tensor:
        alpha = alpha.to(scores.dtype).expand(*scores.shape[:-1], 1)
        n = scores.shape[-1]
        am1 = alpha - 1
        z = scores * am1
        z_max = z.amax(dim=-1, keepdim=True)
        # Bracket: tau = max - 1 gives sum >= 1 (the max alone contributes 1); tau = max - (1/n)^(alpha-1)
        # gives sum <= 1 (each entry contributes at most 1/n).
        tau_lo = z_max - 1.0
        width = 1.0 - (1.0 / n) ** am1
        inv = 1.0 / am1
        for _ in range(n_iter):
            width = width / 2
            tau_mid = tau_lo + width
            p = torch.clamp(z - tau_mid, min=0) ** inv
            tau_lo = torch.where(p.sum(-1, keepdim=True) >= 1, tau_mid, tau_lo)
        p = torch.clamp(z - tau_lo, min=0) ** inv
        p = p / p.sum(-1, keepdim=True)
        ctx.save_for_backward(p, alpha)
        return p

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        p, alpha = ctx.saved_tensors
        pos = p > 0
        s = torch.where(pos, p.clamp(min=1e-38) ** (2 - alpha), torch.zeros_like(p))
        g = grad_output * s
        s_sum = s.sum(-1, keepdim=True)
        grad_scores = g - (g.sum(-1, keepdim=True) / s_sum) * s
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            plogp = torch.where(pos, p * torch.log(p.clamp(min=1e-38)), torch.zeros_like(p))
            entropy_term = plogp.sum(-1, keepdim=True)
            s_norm = s / s_sum
            am1 = alpha - 1
            grad_alpha = grad_output * ((p - s_norm) / am1**2 - (plogp - s_norm * entropy_term) / am1)
            grad_alpha = grad_alpha.sum(-1, keepdim=True)
        return grad_scores, grad_alpha, None


def entmax_bisect(scores: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """alpha-entmax over the last dimension; ``alpha`` is a float or a tensor broadcastable to (..., 1)."""
    if alpha is None:
        alpha = 1.5
    if not torch.is_tensor(alpha):
        alpha = torch.tensor(float(alpha), device=scores.device)
    dtype = scores.dtype
    x = scores.float() if dtype in (torch.float16, torch.bfloat16) else scores
    return EntmaxBisectFunction.apply(x, alpha.to(x.dtype)).to(dtype)


def softmax(scores: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax over the last dimension, computed in float32 under half precision."""
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


# ----------------------------------------------------------------------------------------------------------
# Registry: one function and one entry per transform.
# ----------------------------------------------------------------------------------------------------------
ATTENTION_TRANSFORMS: dict[str, Callable[..., torch.Tensor]] = {
    "softmax": softmax,
    "entmax15": entmax15,
    "sparsemax": sparsemax,
    "entmax_bisect": entmax_bisect,
}

# Kernel choices accepted in config._attn_implementation.
ATTENTION_KERNELS = ("eager", "sdpa", "compiled")


def get_attention_transform(name: str) -> Callable[..., torch.Tensor]:
    """Look up a transform by name; unknown names raise ValueError listing the choices."""
    try:
        return ATTENTION_TRANSFORMS[name]
    except KeyError:
        raise ValueError(
            f"Unknown attention transform {name!r}; choose one of {sorted(ATTENTION_TRANSFORMS)}"
        ) from None


_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def _compiled_transform(name: str) -> Callable[..., torch.Tensor]:
    """torch.compile'd version of a transform (same math; compiled once per process and transform)."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(get_attention_transform(name), dynamic=False)
    return _COMPILED[name]


def attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    transform: str,
    scaling: float,
    kernel: str = "eager",
    alpha: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
    training: bool = False,
    need_weights: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Multi-head attention product with a chosen transform and kernel.

    query/key/value: (B, H, N, d). Returns (out (B, H, N, d), probs (B, H, N, N) or None).
    ``sdpa`` is used only for softmax when the probabilities are not requested; it computes the same math.
    """
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"Unknown attention kernel {kernel!r}; choose one of {ATTENTION_KERNELS}")
    if transform == "softmax" and kernel == "sdpa" and not need_weights:
        out = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout if training else 0.0, scale=scaling
        )
        return out, None
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling  # (B, H, N, N)
    fn = _compiled_transform(transform) if kernel == "compiled" else get_attention_transform(transform)
    probs = fn(scores, alpha) if alpha is not None else fn(scores)
    dropped = F.dropout(probs, p=dropout, training=training) if dropout > 0 else probs
    out = torch.matmul(dropped, value)  # (B, H, N, d)
    return out, (probs if need_weights else None)


def support_size(probs: torch.Tensor) -> torch.Tensor:
    """Number of non-zero attention weights per row, (B, H, N)."""
    return (probs > 0).sum(dim=-1)


__all__ = [
    "ATTENTION_TRANSFORMS",
    "ATTENTION_KERNELS",
    "attention_forward",
    "entmax15",
    "entmax_bisect",
    "get_attention_transform",
    "softmax",
    "sparsemax",
    "support_size",
]
