"""Attention transforms (softmax, entmax-1.5, sparsemax, alpha-entmax) and the attention kernels.

Two separate choices, as in the house style:

* the *transform* (``config.attention``) maps attention scores to probabilities. Each transform is a pure
  function ``fn(scores, alpha=None, *, compiled=False) -> probs`` over the last dimension, registered by name
  in ``ATTENTION_TRANSFORMS``: adding one is one function and one entry.
* the *kernel* (``attn_implementation``) decides how the attention product is computed. ``ATTENTION_KERNELS``
  maps each kernel name to one function; ``KERNEL_TRANSFORMS`` says which transforms a kernel runs:
  ``eager`` (explicit scores, any transform), ``compiled`` (the same threshold search and backward through
  ``torch.compile``, same numbers up to float rounding), ``sdpa`` (torch's scaled_dot_product_attention:
  softmax only, so it is refused for a sparse transform instead of silently running something else),
  ``tiled`` (the sparse transforms in cache-sized query blocks, ``tiled_attention.py``: no (B, H, N, N)
  tensor, O(B H N) saved for backward; the default for entmax15 / sparsemax / entmax_bisect) and
  ``tiled_compiled`` (the same through ``torch.compile``).

Both reach transformers through its ``AttentionInterface``: ``attention_function(transform, kernel)`` is a
function with transformers' eager signature, and importing this module registers one per pair under
``attention_interface_name(transform, kernel)`` ("entmax15", "sparsemax", "entmax_bisect" for the eager
kernel, "entmax15_compiled", ...). EntmaxViT looks its pair up in ``ALL_ATTENTION_FUNCTIONS``; transformers'
own models (ViTModel, Dinov2Model, ...) accept the same names as ``attn_implementation``.

This file is copied to the Hub with the model: it imports only the standard library, torch and transformers.

How the sparse transforms are fast and still exact
--------------------------------------------------
alpha-entmax is p_i = [x_i - tau]_+^(1/(alpha-1)) with x = (alpha-1) z and tau the unique solution of
sum_i p_i = 1 (Peters, Niculae & Martins, 2019). Sorting each row finds tau exactly but costs a full sort.
Instead, with x shifted so that max x = 0 and d = [x - tau]_+ :

1. Start from a *certified lower bound* tau_0 <= tau*: the max entry alone gives mass 1 at tau = -1, and the
   power-mean inequality gives sum_i d_i^q >= 1 at tau = mean(x) - N^-min(alpha-1, 1).
2. Take Newton steps on phi(tau) = ||d||_q - 1 (q = 1/(alpha-1)). For q >= 1 (alpha <= 2) phi is a norm of
   a convex map, hence convex and decreasing, so Newton from the left never overshoots: every iterate is
   still a lower bound and its support {x > tau} contains the true support. Newton on the norm (rather than
   on ||d||_q^q) is nearly linear far from the root, which is what makes a few steps enough.
3. For entmax-1.5 and sparsemax, finish in closed form on the current support S (k entries): tau solves
   k u^2 - 2 s1 u + s2 - 1 = 0 (entmax-1.5) or k u - s1 + 1 = 0 (sparsemax) in u = tau_new - tau, where
   s1, s2 are sums of d and d^2. Because S contains the true support, that root is exact iff no entry of S
   falls below it; rows failing this check (rare, ~0 after 4 steps on attention-like scores) are recomputed
   with the exact sort-based reference. So the result is exact for every row, not "exact with high
   probability". Traced, the recomputation is a ``torch.cond`` (a tensor operator, not a Python branch), so
   the same exact result comes out of ``torch.compile(fullgraph=True)`` and ``torch.export``.
4. alpha-entmax has no closed form: safeguarded Newton (bisection where Newton leaves the bracket, which
   only happens for alpha > 2) runs to float precision, then p is renormalised, as in the ``entmax`` package.

Backward passes need only the output p: with s = p^(2-alpha), dp/dz = diag(s) - s s^T / sum(s) (sqrt(p) for
entmax-1.5, the support indicator for sparsemax). Half-precision inputs are computed in float32.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from .tiled_attention import (
    ENTMAX15_NEWTON_STEPS,
    SPARSEMAX_NEWTON_STEPS,
    TILED_TRANSFORMS,
    _lower_bound,
    compiled_twin,
    tiled_attention,
    tracing,
)

# Newton steps before the closed-form finish (ENTMAX15_NEWTON_STEPS, SPARSEMAX_NEWTON_STEPS, shared with the
# tiled kernel and imported from it): with these, no row failed the support check on Gaussian scores of any
# scale we tried at N = 37 and 197 (sparsemax's Michelot steps converge more slowly on flat rows); at N = 785
# and 3137 a few near-uniform rows in a thousand do. Failing rows are still exact (sort fallback), only slower.
# Read at call time (tests lower them).
# alpha-entmax: cap on Newton/bisection iterations; eagerly the loop stops once every row has converged.
ENTMAX_BISECT_MAX_ITER = 50


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    """Half precision is computed in float32 (thresholds need the mantissa); float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _count_positive(d: torch.Tensor) -> torch.Tensor:
    """Number of positive entries per row of a non-negative ``d``, as float (..., 1). sign().sum() is several
    times faster than count_nonzero / (d > 0).sum() on CPU (no bool -> int64 copy)."""
    return torch.sign(d).sum(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------
# Exact sort-based references (used as the fallback for rows the fast path cannot certify, and by tests)
# ----------------------------------------------------------------------------------------------------------
def _entmax15_sort(x: torch.Tensor) -> torch.Tensor:
    """Exact 1.5-entmax probabilities for ``x`` = scores/2 with row max 0, by a full sort.

    On a support of the k largest entries tau solves k tau^2 - 2 S1 tau + S2 - 1 = 0, smaller root
    tau_k = mean_k - sqrt((1 - k var_k) / k). The support is the largest k with tau_k <= x_(k).
    """
    x_sorted, _ = torch.sort(x, dim=-1, descending=True)  # (..., N)
    rho = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    mean = x_sorted.cumsum(-1) / rho
    mean_sq = (x_sorted * x_sorted).cumsum(-1) / rho
    delta = (1 - rho * (mean_sq - mean * mean)) / rho
    tau = mean - torch.sqrt(torch.clamp(delta, min=0))
    # NaNs (from -inf masked entries) compare False and so never enter the support.
    support = (tau <= x_sorted).sum(dim=-1, keepdim=True).clamp(min=1)
    return torch.clamp(x - tau.gather(-1, support - 1), min=0) ** 2


def _sparsemax_sort(x: torch.Tensor) -> torch.Tensor:
    """Exact sparsemax for ``x`` with row max 0, by a full sort (Martins & Astudillo, 2016)."""
    x_sorted, _ = torch.sort(x, dim=-1, descending=True)
    rho = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    cumsum = x_sorted.cumsum(-1)
    support = ((1 + rho * x_sorted) > cumsum).sum(dim=-1, keepdim=True).clamp(min=1)
    tau = (cumsum.gather(-1, support - 1) - 1) / support.to(x.dtype)
    return torch.clamp(x - tau, min=0)


# ----------------------------------------------------------------------------------------------------------
# Fast cores: pure tensor functions (no data-dependent control flow), so torch.compile can fuse them.
# ----------------------------------------------------------------------------------------------------------
def _entmax15_core(scores: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (..., N) -> (probs (..., N), ok (...,) rows certified exact).

    Works in score units: y = scores - max (exact for nearby values), threshold t = 2 tau, e = [y - t]_+ = 2 d.
    """
    y = scores - scores.amax(dim=-1, keepdim=True)  # (..., N), row max 0
    t = 2 * _lower_bound(y.mean(dim=-1, keepdim=True) / 2, scores.shape[-1], 0.5)  # (..., 1), tau <= tau*
    for _ in range(steps):
        e = torch.clamp(y - t, min=0)  # e = 2 d
        norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True) / 2  # ||d||_2
        # Newton on ||d||_2 - 1: tau += norm (norm - 1) / sum(d), which stays <= tau*; t = 2 tau.
        t = t + 4 * norm * (norm - 1) / e.sum(dim=-1, keepdim=True)
    e = torch.clamp(y - t, min=0)
    k = _count_positive(e)  # (..., 1) support size at tau
    s1 = e.sum(dim=-1, keepdim=True) / 2
    s2 = torch.linalg.vector_norm(e, dim=-1, keepdim=True) ** 2 / 4
    mean = s1 / k
    u = mean - torch.sqrt(torch.clamp((1 - s2 + s1 * mean) / k, min=0))  # smaller root, shift from tau
    u = u.clamp_min(0)  # tau is a lower bound, so u >= 0; a negative u is rounding only
    d = torch.clamp(e / 2 - u, min=0)  # [d - u]_+
    # Exact iff no entry of the support at tau falls below the closed-form threshold: same count after.
    ok = (_count_positive(d) == k).squeeze(-1)
    return d * d, ok


def _sparsemax_core(scores: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (..., N) -> (probs, ok (...,)). Newton here is Michelot's algorithm."""
    y = scores - scores.amax(dim=-1, keepdim=True)
    tau = _lower_bound(y.mean(dim=-1, keepdim=True), scores.shape[-1], 1.0)
    for _ in range(steps):
        d = torch.clamp(y - tau, min=0)
        tau = tau + (d.sum(dim=-1, keepdim=True) - 1) / _count_positive(d)
    d = torch.clamp(y - tau, min=0)
    k = _count_positive(d)
    u = ((d.sum(dim=-1, keepdim=True) - 1) / k).clamp_min(0)  # >= 0 up to rounding
    probs = torch.clamp(d - u, min=0)
    return probs, (_count_positive(probs) == k).squeeze(-1)


def _entmax15_backward(probs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Jacobian-vector product of 1.5-entmax w.r.t. the scores: s = sqrt(p), g*s - s (g.s)/sum(s)."""
    s = torch.sqrt(probs)
    gs = grad * s
    return gs - s * (gs.sum(dim=-1, keepdim=True) / s.sum(dim=-1, keepdim=True))


def _sparsemax_backward(probs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """On the support: the gradient minus its support mean; zero elsewhere."""
    on = torch.sign(probs)
    g = grad * on
    return g - on * (g.sum(dim=-1, keepdim=True) / on.sum(dim=-1, keepdim=True))


def _kernel(fn: Callable, compiled: bool) -> Callable:
    """``fn`` itself, or its torch.compile'd twin (static shapes). Inside an outer torch.compile / torch.export
    the plain function is traced (the outer compiler fuses it anyway)."""
    return compiled_twin(fn, compiled and not tracing(), dynamic=False)


def _certified(probs: torch.Tensor, scores: torch.Tensor, ok: torch.Tensor, reference: Callable) -> torch.Tensor:
    """``probs`` where the row is certified, else the exact sort-based ``reference`` of the row.

    The sort runs only when some row failed (rare). Traced (torch.compile(fullgraph=True), torch.export) the
    choice is ``torch.cond``, an operator the graph keeps; eagerly the same two branches are chosen in Python,
    because torch.cond is not supported under TorchDispatchModes (memory and FLOP counters).
    """

    def fix(p: torch.Tensor, s: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return torch.where(o.unsqueeze(-1), p, reference(s).to(p.dtype))

    all_ok = ok.all()
    if tracing():
        # cond's branches may not return an input unchanged, hence the clone
        return torch.cond(all_ok, lambda p, s, o: p.clone(), fix, (probs, scores, ok))
    return probs if bool(all_ok) else fix(probs, scores, ok)


def _entmax15_forward(scores: torch.Tensor) -> torch.Tensor:
    probs, ok = _entmax15_core(scores, ENTMAX15_NEWTON_STEPS)
    return _certified(probs, scores, ok, lambda s: _entmax15_sort(s / 2 - (s / 2).amax(dim=-1, keepdim=True)))


def _sparsemax_forward(scores: torch.Tensor) -> torch.Tensor:
    probs, ok = _sparsemax_core(scores, SPARSEMAX_NEWTON_STEPS)
    return _certified(probs, scores, ok, lambda s: _sparsemax_sort(s - s.amax(dim=-1, keepdim=True)))


# Two explicit Function classes rather than a shared base with classmethods: torch.compile(fullgraph=True)
# traces autograd.Function only through staticmethod forward/backward.
class Entmax15Function(torch.autograd.Function):
    """1.5-entmax over the last dimension: Newton + closed-form forward with the per-row certificate and sort
    fallback; the backward needs only the saved output."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        probs = _kernel(_entmax15_forward, compiled)(scores)
        ctx.compiled = compiled
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (probs,) = ctx.saved_tensors
        return _kernel(_entmax15_backward, ctx.compiled)(probs, grad_output.contiguous()), None


class SparsemaxFunction(torch.autograd.Function):
    """Euclidean projection onto the simplex over the last dimension; saves only its output."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        probs = _kernel(_sparsemax_forward, compiled)(scores)
        ctx.compiled = compiled
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (probs,) = ctx.saved_tensors
        return _kernel(_sparsemax_backward, ctx.compiled)(probs, grad_output.contiguous()), None


# ----------------------------------------------------------------------------------------------------------
# entmax-1.5 and sparsemax (alpha = 2)
# ----------------------------------------------------------------------------------------------------------
def entmax15_reference(scores: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sort-based exact 1.5-entmax (slow; the reference the fast path is tested against). Differentiable."""
    x = _as_float32(scores) / 2
    return _entmax15_sort(x - x.amax(dim=-1, keepdim=True)).to(scores.dtype)


def entmax15(scores: torch.Tensor, alpha: Optional[torch.Tensor] = None, *, compiled: bool = False) -> torch.Tensor:
    """Exact 1.5-entmax over the last dimension (computed in float32 or wider, returned in the input dtype)."""
    return Entmax15Function.apply(_as_float32(scores), compiled).to(scores.dtype)


def sparsemax_reference(scores: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sort-based exact sparsemax (slow reference). Differentiable."""
    x = _as_float32(scores)
    return _sparsemax_sort(x - x.amax(dim=-1, keepdim=True)).to(scores.dtype)


def sparsemax(scores: torch.Tensor, alpha: Optional[torch.Tensor] = None, *, compiled: bool = False) -> torch.Tensor:
    """Exact sparsemax over the last dimension (float32 under half precision)."""
    return SparsemaxFunction.apply(_as_float32(scores), compiled).to(scores.dtype)


# ----------------------------------------------------------------------------------------------------------
# alpha-entmax (any alpha > 1, optionally a learnable tensor broadcast over rows)
# ----------------------------------------------------------------------------------------------------------
def _bisect_init(scores: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x = (alpha-1) scores - max, exponent q, bracket [lo, hi] with f(lo) >= 0 >= f(hi). Rows (..., 1)."""
    am1 = alpha - 1
    x = scores * am1
    x = x - x.amax(dim=-1, keepdim=True)
    n = x.shape[-1]
    lo = _lower_bound(x.mean(dim=-1, keepdim=True), n, torch.clamp(am1, max=1.0))
    hi = -((1.0 / n) ** am1)  # every entry contributes at most 1/n there
    return x, 1.0 / am1, lo, hi.expand_as(lo)


def _bisect_step(x, q, lo, hi, tau, err):
    """Evaluate f(tau) = sum d^q - 1, update the bracket, propose the next tau (Newton on ||d||_q - 1 from
    lo, bisection if that leaves the bracket). Returns (lo, hi, next_tau, |f(lo)|)."""
    d = torch.clamp(x - tau, min=0)
    dq = d**q
    sq = dq.sum(dim=-1, keepdim=True)  # (..., 1)
    sq1 = torch.nan_to_num(dq / d, nan=0.0).sum(dim=-1, keepdim=True)  # sum d^(q-1) (0/0 -> 0 off the support)
    above = sq >= 1
    lo = torch.where(above, tau, lo)
    hi = torch.where(above, hi, tau)
    newton = tau + (sq - sq ** (1 - 1 / q)) / sq1
    mid = (lo + hi) / 2
    nxt = torch.where(above & (newton < hi) & (newton >= tau), newton, mid)
    return lo, hi, nxt, torch.where(above, sq - 1, err)


def _bisect_finish(x, q, lo):
    p = torch.clamp(x - lo, min=0) ** q
    return p / p.sum(dim=-1, keepdim=True)


def _bisect_backward(probs, alpha, grad, need_alpha: bool, scalar_alpha: Optional[float] = None):
    """Gradients w.r.t. scores (s = p^(2-alpha)) and alpha (Correia et al., 2019, eq. 13), per row."""
    pos = probs > 0
    exponent = 2 - (alpha if scalar_alpha is None else scalar_alpha)  # a float exponent is much faster
    s = torch.where(pos, probs.clamp(min=1e-38) ** exponent, 0)
    gs = grad * s
    s_sum = s.sum(dim=-1, keepdim=True)
    grad_scores = gs - s * (gs.sum(dim=-1, keepdim=True) / s_sum)
    if not need_alpha:
        return grad_scores, None
    am1 = alpha - 1
    plogp = torch.where(pos, probs * torch.log(probs.clamp(min=1e-38)), 0)
    s_norm = s / s_sum
    d_alpha = (probs - s_norm) / am1**2 - (plogp - s_norm * plogp.sum(dim=-1, keepdim=True)) / am1
    return grad_scores, (grad * d_alpha).sum(dim=-1, keepdim=True)


class EntmaxBisectFunction(torch.autograd.Function):
    """alpha-entmax over the last dimension; ``alpha`` has shape (..., 1) (one value per row)."""

    @staticmethod
    def forward(
        ctx, scores: torch.Tensor, alpha: torch.Tensor, compiled: bool = False, scalar_alpha: Optional[float] = None
    ) -> torch.Tensor:
        x, q, lo, hi = _bisect_init(scores, alpha)
        if scalar_alpha is not None:  # one alpha for all rows: a float exponent (d**2.0 is a square, not exp/log)
            q = 1.0 / (scalar_alpha - 1.0)
        tol = 4 * torch.finfo(scores.dtype).eps
        step = _kernel(_bisect_step, compiled)
        tau, err = lo, torch.full_like(lo, float("inf"))
        for i in range(ENTMAX_BISECT_MAX_ITER):
            lo, hi, tau, err = step(x, q, lo, hi, tau, err)
            # Converged rows stay put (Newton step ~0), so stopping early changes nothing: eagerly, check every
            # few steps (a host sync); traced graphs run all the steps.
            if i % 4 == 3 and not tracing() and bool(((err <= tol) | (hi - lo <= tol)).all()):
                break
        probs = _kernel(_bisect_finish, compiled)(x, q, lo)
        ctx.compiled, ctx.scalar_alpha = compiled, scalar_alpha
        ctx.save_for_backward(probs, alpha)
        return probs

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        probs, alpha = ctx.saved_tensors
        need_alpha = ctx.needs_input_grad[1]
        grad_scores, grad_alpha = _kernel(_bisect_backward, ctx.compiled)(
            probs, alpha, grad_output, need_alpha, ctx.scalar_alpha
        )
        return grad_scores, grad_alpha, None, None


def entmax_bisect(scores: torch.Tensor, alpha: Union[None, float, torch.Tensor] = None, *, compiled: bool = False) -> torch.Tensor:
    """alpha-entmax over the last dimension. ``alpha``: None (1.5), a float, or a tensor broadcastable to
    scores.shape[:-1] + (1,), e.g. (H, 1, 1) per head against (B, H, N, N) scores; gradients flow to it."""
    alpha = 1.5 if alpha is None else alpha
    x = _as_float32(scores)
    if torch.is_tensor(alpha):
        if not tracing() and bool((alpha <= 1).any()):
            raise ValueError("entmax_bisect needs alpha > 1 (alpha = 1 is softmax)")
        # A one-element tensor is read as a float for the fast exponent, except while tracing (no host sync).
        scalar = float(alpha) if alpha.numel() == 1 and not alpha.requires_grad and not tracing() else None
        alpha_rows = alpha.to(device=x.device, dtype=x.dtype).expand(*x.shape[:-1], 1)  # autograd sums it back
    else:
        if not alpha > 1:
            raise ValueError("entmax_bisect needs alpha > 1 (alpha = 1 is softmax)")
        scalar = float(alpha)
        alpha_rows = torch.full((*x.shape[:-1], 1), scalar, device=x.device, dtype=x.dtype)
    return EntmaxBisectFunction.apply(x, alpha_rows, compiled, scalar).to(scores.dtype)


def softmax(scores: torch.Tensor, alpha: Optional[torch.Tensor] = None, *, compiled: bool = False) -> torch.Tensor:
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

# Sort-based exact references of the sparse transforms (tests and benchmarks; not config choices).
REFERENCE_TRANSFORMS: dict[str, Callable[..., torch.Tensor]] = {
    "entmax15": entmax15_reference,
    "sparsemax": sparsemax_reference,
}


def get_attention_transform(name: str) -> Callable[..., torch.Tensor]:
    """Look up a transform by name; unknown names raise ValueError listing the choices."""
    try:
        return ATTENTION_TRANSFORMS[name]
    except KeyError:
        raise ValueError(
            f"Unknown attention transform {name!r}; choose one of {sorted(ATTENTION_TRANSFORMS)}"
        ) from None


# ----------------------------------------------------------------------------------------------------------
# Kernels: kernel name -> one function. Every kernel has the signature
#   kernel(query, key, value, attention_mask, *, transform, alpha, scaling, dropout, need_weights)
#     -> (out (B, H, N, d), probs (B, H, N, N) or None)
# with query/key/value (B, H, N, d), attention_mask None or broadcastable to (B, H, N, N) (bool: True = keep,
# float: added to the scores) and ``dropout`` the probability to apply (0 outside training).
# ----------------------------------------------------------------------------------------------------------
def _scores(query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor], scaling: float) -> torch.Tensor:
    # Scale the (N, d) query rather than the (N, N) scores: same math, a third of the work at d = 64.
    scores = torch.matmul(query * scaling, key.transpose(-2, -1))  # (B, H, N, N)
    if attention_mask is None:
        return scores
    if attention_mask.dtype == torch.bool:
        return scores.masked_fill(~attention_mask, float("-inf"))
    return scores + attention_mask


def eager_kernel(query, key, value, attention_mask=None, *, transform: str, alpha=None, scaling: float,
                 dropout: float = 0.0, need_weights: bool = False, compiled: bool = False):
    """Explicit scores -> transform -> dropout -> product. Any transform."""
    scores = _scores(query, key, attention_mask, scaling)
    probs = get_attention_transform(transform)(scores, alpha, compiled=compiled)
    dropped = F.dropout(probs, p=dropout, training=True) if dropout > 0 else probs
    return torch.matmul(dropped, value), (probs if need_weights else None)


def compiled_kernel(query, key, value, attention_mask=None, **kwargs):
    """The eager kernel with the transform's threshold search and backward run through torch.compile."""
    return eager_kernel(query, key, value, attention_mask, compiled=True, **kwargs)


def tiled_kernel(query, key, value, attention_mask=None, *, transform: str, alpha=None, scaling: float,
                 dropout: float = 0.0, need_weights: bool = False, compiled: bool = False):
    """Exact sparse attention in query blocks (``tiled_attention.py``): the (B, H, N, N) scores never exist and
    backward keeps O(B H N) state. The probabilities exist only when something needs them (requested weights,
    a mask, attention dropout): then the eager kernel runs (the same math)."""
    if need_weights or attention_mask is not None or dropout > 0:
        return eager_kernel(query, key, value, attention_mask, transform=transform, alpha=alpha, scaling=scaling,
                            dropout=dropout, need_weights=need_weights, compiled=compiled)
    return tiled_attention(query, key, value, transform=transform, scaling=scaling, alpha=alpha,
                           compiled=compiled), None  # tiled_attention ignores it under an outer capture


def tiled_compiled_kernel(query, key, value, attention_mask=None, **kwargs):
    """The tiled kernel with each block through torch.compile (the block loop stays in Python): a block's
    passes fuse into a few loops (C++ on CPU, Triton kernels on CUDA)."""
    return tiled_kernel(query, key, value, attention_mask, compiled=True, **kwargs)


def sdpa_kernel(query, key, value, attention_mask=None, *, transform: str, alpha=None, scaling: float,
                dropout: float = 0.0, need_weights: bool = False):
    """torch's scaled_dot_product_attention (softmax only). SDPA cannot return the probabilities: when they are
    requested the eager kernel computes them (the same math)."""
    if transform != "softmax":
        raise ValueError(_unsupported_message(transform, "sdpa"))
    if need_weights:
        return eager_kernel(query, key, value, attention_mask, transform=transform, scaling=scaling,
                            dropout=dropout, need_weights=True)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out, None


# The one place where a kernel name maps to its function. A new kernel is one function and one entry here
# (plus an entry in KERNEL_TRANSFORMS if it runs only some transforms, and DEFAULT_KERNELS if it should be
# the default); AttentionInterface names are derived from these tables.
ATTENTION_KERNELS: dict[str, Callable[..., tuple[torch.Tensor, Optional[torch.Tensor]]]] = {
    "eager": eager_kernel,
    "compiled": compiled_kernel,
    "sdpa": sdpa_kernel,
    "tiled": tiled_kernel,
    "tiled_compiled": tiled_compiled_kernel,
}
# Kernels that run only some transforms (absent: every transform).
KERNEL_TRANSFORMS: dict[str, tuple[str, ...]] = {
    "sdpa": ("softmax",),
    "tiled": TILED_TRANSFORMS,
    "tiled_compiled": TILED_TRANSFORMS,
}
# Kernel chosen when none is requested (transformers' automatic default); absent transforms use "eager".
DEFAULT_KERNELS: dict[str, str] = {"softmax": "sdpa", **{t: "tiled" for t in TILED_TRANSFORMS}}
# Kernels that compute the probabilities only when asked (output_attentions); the others always return them.
WEIGHTS_ON_REQUEST = ("sdpa", "tiled", "tiled_compiled")


def kernels_for(transform: str) -> list[str]:
    """Kernel names that run ``transform``."""
    get_attention_transform(transform)
    return [k for k in ATTENTION_KERNELS if transform in KERNEL_TRANSFORMS.get(k, (transform,))]


def _unsupported_message(transform: str, kernel: str) -> str:
    return (
        f"attn_implementation={kernel!r} does not run attention={transform!r}"
        + (" (torch's scaled_dot_product_attention computes softmax only)" if kernel == "sdpa" else "")
        + f"; choose one of {kernels_for(transform)} for it"
    )


def resolve_kernel(transform: str, requested: Optional[str] = None) -> str:
    """The kernel that runs ``transform``: ``requested``, checked, or the default when None. Raises ValueError
    for an unknown kernel or one that does not run this transform (e.g. "sdpa" for a sparse transform)."""
    if requested is None:
        return DEFAULT_KERNELS.get(transform, "eager")
    if requested not in ATTENTION_KERNELS:
        raise ValueError(  # transformers' wording, then ours
            f'Specified `attn_implementation="{requested}"` is not supported: it names the attention kernel; '
            f"choose one of {kernels_for(transform)} for attention={transform!r}"
        )
    if requested not in kernels_for(transform):
        raise ValueError(_unsupported_message(transform, requested))
    return requested


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
    attention_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Multi-head attention product with a chosen transform and kernel (functional form, for benchmarks).

    query/key/value: (B, H, N, d). Returns (out (B, H, N, d), probs (B, H, N, N) or None).
    """
    fn = ATTENTION_KERNELS[resolve_kernel(transform, kernel)]
    return fn(query, key, value, attention_mask, transform=transform, alpha=alpha, scaling=scaling,
              dropout=dropout if training else 0.0, need_weights=need_weights)


# ----------------------------------------------------------------------------------------------------------
# transformers' AttentionInterface
# ----------------------------------------------------------------------------------------------------------
def attention_interface_name(transform: str, kernel: str) -> str:
    """The AttentionInterface name of a (transform, kernel) pair: the transform for the eager kernel
    ("entmax15"), else "<transform>_<kernel>" ("entmax15_compiled", "softmax_sdpa")."""
    return transform if kernel == "eager" else f"{transform}_{kernel}"


def _module_alpha(module: nn.Module, transform: str) -> Union[None, float, torch.Tensor]:
    """alpha of entmax_bisect for this attention module: EntmaxViT's (possibly learnt, per head) ``alpha()``,
    else ``config.attention_alpha`` of a transformers model (default 1.5). None for the other transforms."""
    if transform != "entmax_bisect":
        return None
    if callable(getattr(module, "alpha", None)):
        return module.alpha()
    return float(getattr(getattr(module, "config", None), "attention_alpha", 1.5))


@lru_cache(maxsize=None)  # one function object per pair, so AttentionInterface lookups return the same one
def attention_function(transform: str, kernel: str) -> Callable[..., tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """An attention function with transformers' eager signature running ``transform`` with ``kernel``:

    ``fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs)`` with query/key/value
    (B, H, N, d) -> (attn_output (B, N, H, d), attn_weights (B, H, N, N) or None). ``attn_weights`` are the
    exact probabilities (None only from SDPA when ``output_attentions`` is not requested).
    """
    kernel = resolve_kernel(transform, kernel)
    run = ATTENTION_KERNELS[kernel]

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        scaling: Optional[float] = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        # transformers asks for weights only through output_attentions; kernels that materialise them anyway
        # (eager, compiled) return them always.
        need_weights = kernel not in WEIGHTS_ON_REQUEST or bool(kwargs.get("output_attentions", False))
        out, probs = run(query, key, value, attention_mask, transform=transform,
                         alpha=_module_alpha(module, transform), scaling=scaling, dropout=dropout,
                         need_weights=need_weights)
        return out.transpose(1, 2).contiguous(), probs  # (B, N, H, d)

    attention.__name__ = attention.__qualname__ = f"{attention_interface_name(transform, kernel)}_attention_forward"
    attention.__doc__ = f"attention={transform!r} with the {kernel!r} kernel, in transformers' eager signature."
    return attention


def register_attention_functions() -> list[str]:
    """Register every (transform, kernel) pair with transformers' AttentionInterface; returns the names.

    Called on import, so ``ViTModel`` / ``Dinov2Model`` / ... accept ``attn_implementation="entmax15"`` (and
    "sparsemax", "entmax_bisect" with alpha from ``config.attention_alpha``, and "<name>_compiled").
    """
    names = []
    for transform in ATTENTION_TRANSFORMS:
        for kernel in kernels_for(transform):
            name = attention_interface_name(transform, kernel)
            AttentionInterface.register(name, attention_function(transform, kernel))
            names.append(name)
    return names


ATTENTION_INTERFACE_NAMES: list[str] = register_attention_functions()


def support_size(probs: torch.Tensor) -> torch.Tensor:
    """Number of non-zero attention weights per row, (B, H, N)."""
    return (probs > 0).sum(dim=-1)


__all__ = [
    "ATTENTION_INTERFACE_NAMES",
    "ATTENTION_KERNELS",
    "ATTENTION_TRANSFORMS",
    "DEFAULT_KERNELS",
    "KERNEL_TRANSFORMS",
    "REFERENCE_TRANSFORMS",
    "attention_forward",
    "attention_function",
    "attention_interface_name",
    "entmax15",
    "entmax15_reference",
    "entmax_bisect",
    "get_attention_transform",
    "kernels_for",
    "register_attention_functions",
    "resolve_kernel",
    "softmax",
    "sparsemax",
    "sparsemax_reference",
    "support_size",
]
