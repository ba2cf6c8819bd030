"""Attention transforms (softmax, entmax-1.5, sparsemax, alpha-entmax) and the attention kernels.

Two separate choices, as in the house style:

* the *transform* (``config.attention``) maps attention scores to probabilities. Each transform is a pure
  function ``fn(scores, alpha=None, *, compiled=False) -> probs`` over the last dimension, registered by name
  in ``ATTENTION_TRANSFORMS``: adding one is one function and one entry.
* the *kernel* (``config._attn_implementation``: ``eager`` / ``sdpa`` / ``compiled``) decides how it is
  computed. ``sdpa`` is used only where it is the same math (softmax); ``compiled`` runs the same threshold
  and backward code through ``torch.compile`` (fused loops, same numbers up to float rounding).

This file is copied to the Hub with the model: it imports only the standard library and torch.

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
   probability".
4. alpha-entmax has no closed form: safeguarded Newton (bisection where Newton leaves the bracket, which
   only happens for alpha > 2) runs to float precision, then p is renormalised, as in the ``entmax`` package.

Backward passes need only the output p: with s = p^(2-alpha), dp/dz = diag(s) - s s^T / sum(s) (sqrt(p) for
entmax-1.5, the support indicator for sparsemax). Half-precision inputs are computed in float32.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.nn.functional as F

# Newton steps before the closed-form finish: with these, no row failed the support check on Gaussian scores
# of any scale we tried (N = 37 and 197; sparsemax's Michelot steps converge more slowly on flat rows).
# Failing rows would still be exact (sort fallback), only slower.
ENTMAX15_NEWTON_STEPS = 4
SPARSEMAX_NEWTON_STEPS = 6
# alpha-entmax: cap on Newton/bisection iterations; the loop stops once every row has converged.
ENTMAX_BISECT_MAX_ITER = 50


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    """Half precision is computed in float32 (thresholds need the mantissa); float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _count_positive(d: torch.Tensor) -> torch.Tensor:
    """Number of positive entries per row of a non-negative ``d``, as float (..., 1). sign().sum() is several
    times faster than count_nonzero / (d > 0).sum() on CPU (no bool -> int64 copy)."""
    return torch.sign(d).sum(dim=-1, keepdim=True)


_SCRATCH = threading.local()
_SCRATCH_SLOTS = 4  # shapes kept per thread (multi-crop alternates two)


def _scratch_like(t: torch.Tensor, compiled: bool) -> Optional[torch.Tensor]:
    """A reusable scratch buffer shaped like ``t`` (CPU eager only; never returned to callers or saved).

    On CPU every fresh multi-MB tensor is page-faulted in again (glibc hands large blocks back to the OS),
    which costs more than the arithmetic of the threshold search; one cached buffer per shape removes that.
    CUDA has a caching allocator and compiled code allocates its own buffers: None there.
    """
    if compiled or t.device.type != "cpu":
        return None
    cache = getattr(_SCRATCH, "buffers", None)
    if cache is None:
        cache = _SCRATCH.buffers = OrderedDict()
    key = (tuple(t.shape), t.dtype)
    buf = cache.pop(key, None)
    if buf is None:
        buf = torch.empty_like(t, memory_format=torch.contiguous_format)
    cache[key] = buf
    while len(cache) > _SCRATCH_SLOTS:
        cache.popitem(last=False)
    return buf


def _lower_bound(mean: torch.Tensor, n: int, power: float) -> torch.Tensor:
    """Certified lower bound on tau for rows with max 0 and the given mean: max(-1, mean - n^-power)."""
    # mean is -inf if the row has masked entries (nan if all are): then -1 wins
    return torch.clamp(torch.nan_to_num(mean - n**-power, nan=-1.0, neginf=-1.0), min=-1.0)


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
def _entmax15_core(
    scores: torch.Tensor, steps: int, scratch: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (..., N) -> (probs (..., N), ok (...,) rows certified exact).

    Works in score units: y = scores - max (exact for nearby values), threshold t = 2 tau, e = [y - t]_+ = 2 d.
    One (..., N) buffer is allocated (the output, used as scratch first) besides ``scratch``: fresh large
    allocations cost page faults on CPU, which is much of what the eager path pays; under torch.compile the
    passes fuse anyway.
    """
    y = scores - scores.amax(dim=-1, keepdim=True)  # (..., N), row max 0
    t = 2 * _lower_bound(y.mean(dim=-1, keepdim=True) / 2, scores.shape[-1], 0.5)  # (..., 1), tau <= tau*
    e = torch.empty_like(y) if scratch is None else scratch
    for _ in range(steps):
        torch.sub(y, t, out=e).clamp_min_(0)  # e = 2 d
        norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True) / 2  # ||d||_2
        # Newton on ||d||_2 - 1: tau += norm (norm - 1) / sum(d), which stays <= tau*; t = 2 tau.
        t = t + 4 * norm * (norm - 1) / e.sum(dim=-1, keepdim=True)
    torch.sub(y, t, out=e).clamp_min_(0)
    k = torch.sign(e, out=y).sum(dim=-1, keepdim=True)  # (..., 1) support size at tau; y is scratch now
    s1 = e.sum(dim=-1, keepdim=True) / 2
    s2 = torch.linalg.vector_norm(e, dim=-1, keepdim=True) ** 2 / 4
    mean = s1 / k
    u = mean - torch.sqrt(torch.clamp((1 - s2 + s1 * mean) / k, min=0))  # smaller root, shift from tau
    u = u.clamp_min(0)  # tau is a lower bound, so u >= 0; a negative u is rounding only
    probs = torch.sub(e, 2 * u, out=y).clamp_min_(0).mul_(0.5)  # [d - u]_+
    # Exact iff no entry of the support at tau falls below the closed-form threshold: same count after.
    ok = (torch.sign(probs, out=e).sum(dim=-1, keepdim=True) == k).squeeze(-1)
    return probs.mul_(probs), ok


def _sparsemax_core(
    scores: torch.Tensor, steps: int, scratch: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (..., N) -> (probs, ok (...,)). Newton here is Michelot's algorithm. Two (..., N) buffers."""
    y = scores - scores.amax(dim=-1, keepdim=True)
    tau = _lower_bound(y.mean(dim=-1, keepdim=True), scores.shape[-1], 1.0)
    d = torch.empty_like(y) if scratch is None else scratch
    for _ in range(steps):
        torch.sub(y, tau, out=d).clamp_min_(0)
        tau = tau + (d.sum(dim=-1, keepdim=True) - 1) / _count_positive(d)
    torch.sub(y, tau, out=d).clamp_min_(0)
    k = torch.sign(d, out=y).sum(dim=-1, keepdim=True)
    u = ((d.sum(dim=-1, keepdim=True) - 1) / k).clamp_min(0)  # >= 0 up to rounding
    probs = torch.sub(d, u, out=y).clamp_min_(0)
    return probs, (torch.sign(probs, out=d).sum(dim=-1, keepdim=True) == k).squeeze(-1)


def _entmax15_backward(probs: torch.Tensor, grad: torch.Tensor, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Jacobian-vector product of 1.5-entmax w.r.t. the scores: s = sqrt(p), g*s - s (g.s)/sum(s)."""
    s = torch.sqrt(probs) if scratch is None else torch.sqrt(probs, out=scratch)
    gs = grad * s
    q = gs.sum(dim=-1, keepdim=True) / s.sum(dim=-1, keepdim=True)
    return gs.sub_(s.mul_(q))


def _sparsemax_backward(probs: torch.Tensor, grad: torch.Tensor, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """On the support: the gradient minus its support mean; zero elsewhere."""
    on = torch.sign(probs) if scratch is None else torch.sign(probs, out=scratch)
    g = grad * on
    q = g.sum(dim=-1, keepdim=True) / on.sum(dim=-1, keepdim=True)
    return g.sub_(on.mul_(q))


_COMPILED: dict[str, Callable] = {}


def _kernel(fn: Callable, compiled: bool) -> Callable:
    """``fn`` itself, or its torch.compile'd twin (compiled once per process; same code, fused loops)."""
    if not compiled:
        return fn
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn.__name__]


def _fix_failed_rows(probs: torch.Tensor, scores: torch.Tensor, ok: torch.Tensor, reference: Callable) -> torch.Tensor:
    """Recompute rows whose support check failed with the exact sort-based reference (rare; in place)."""
    if bool(ok.all()):
        return probs
    bad = ~ok  # (...,)
    probs[bad] = reference(scores[bad]).to(probs.dtype)
    return probs


class _ExactThresholdFunction(torch.autograd.Function):
    """Shared autograd of the exact fast transforms (entmax-1.5, sparsemax): Newton + closed-form forward
    with the per-row certificate and sort fallback, a backward that needs only the saved output. Subclasses
    name their core, backward, Newton step count and reference."""

    _core: Callable = None  # (scores, steps, scratch) -> (probs, ok)
    _backward: Callable = None  # (probs, grad_output, scratch) -> grad_scores

    @staticmethod
    def _steps() -> int:  # read at call time, so tests can change the module constants
        raise NotImplementedError

    @staticmethod
    def _reference(scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def forward(cls, ctx, scores: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        probs, ok = _kernel(cls._core, compiled)(scores, cls._steps(), _scratch_like(scores, compiled))
        probs = _fix_failed_rows(probs, scores, ok, cls._reference)
        ctx.compiled = compiled
        ctx.save_for_backward(probs)
        return probs

    @classmethod
    def backward(cls, ctx, grad_output: torch.Tensor):
        (probs,) = ctx.saved_tensors
        scratch = _scratch_like(probs, ctx.compiled)
        return _kernel(cls._backward, ctx.compiled)(probs, grad_output.contiguous(), scratch), None


# ----------------------------------------------------------------------------------------------------------
# entmax-1.5
# ----------------------------------------------------------------------------------------------------------
def entmax15_reference(scores: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sort-based exact 1.5-entmax (slow; the reference the fast path is tested against). Differentiable."""
    x = _as_float32(scores) / 2
    return _entmax15_sort(x - x.amax(dim=-1, keepdim=True)).to(scores.dtype)


class Entmax15Function(_ExactThresholdFunction):
    """1.5-entmax over the last dimension; saves only its output for backward."""

    _core = staticmethod(_entmax15_core)
    _backward = staticmethod(_entmax15_backward)

    @staticmethod
    def _steps() -> int:
        return ENTMAX15_NEWTON_STEPS

    @staticmethod
    def _reference(scores: torch.Tensor) -> torch.Tensor:
        return entmax15_reference(scores)


def entmax15(scores: torch.Tensor, alpha: Optional[torch.Tensor] = None, *, compiled: bool = False) -> torch.Tensor:
    """Exact 1.5-entmax over the last dimension (computed in float32 or wider, returned in the input dtype)."""
    return Entmax15Function.apply(_as_float32(scores), compiled).to(scores.dtype)


# ----------------------------------------------------------------------------------------------------------
# sparsemax (alpha = 2)
# ----------------------------------------------------------------------------------------------------------
def sparsemax_reference(scores: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sort-based exact sparsemax (slow reference). Differentiable."""
    x = _as_float32(scores)
    return _sparsemax_sort(x - x.amax(dim=-1, keepdim=True)).to(scores.dtype)


class SparsemaxFunction(_ExactThresholdFunction):
    """Euclidean projection onto the simplex over the last dimension; saves only its output."""

    _core = staticmethod(_sparsemax_core)
    _backward = staticmethod(_sparsemax_backward)

    @staticmethod
    def _steps() -> int:
        return SPARSEMAX_NEWTON_STEPS

    @staticmethod
    def _reference(scores: torch.Tensor) -> torch.Tensor:
        return sparsemax_reference(scores)


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


def _bisect_step(x, q, lo, hi, tau, err, d=None, dq=None):
    """Evaluate f(tau) = sum d^q - 1, update the bracket, propose the next tau (Newton on ||d||_q - 1 from
    lo, bisection if that leaves the bracket). Returns (lo, hi, next_tau, |f(lo)|). ``d``/``dq``: optional
    (..., N) scratch buffers (CPU eager), so the iterations allocate nothing large."""
    d = torch.sub(x, tau, out=d).clamp_min_(0) if d is not None else torch.clamp(x - tau, min=0)
    dq = torch.pow(d, q, out=dq) if dq is not None else d**q
    sq = dq.sum(dim=-1, keepdim=True)  # (..., 1)
    sq1 = dq.div_(d).nan_to_num_(0.0).sum(dim=-1, keepdim=True)  # sum d^(q-1) (0/0 -> 0 off the support)
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
        d = _scratch_like(x, compiled)
        dq = None if d is None else torch.empty_like(x)  # one more scratch, reused over the iterations
        for i in range(ENTMAX_BISECT_MAX_ITER):
            lo, hi, tau, err = step(x, q, lo, hi, tau, err, d, dq)
            # Converged rows stay put (Newton step ~0); check every few steps to limit host syncs.
            if i % 4 == 3 and bool(((err <= tol) | (hi - lo <= tol)).all()):
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


def entmax_bisect(scores: torch.Tensor, alpha=None, *, compiled: bool = False) -> torch.Tensor:
    """alpha-entmax over the last dimension. ``alpha``: None (1.5), a float, or a tensor broadcastable to
    scores.shape[:-1] + (1,), e.g. (H, 1, 1) per head against (B, H, N, N) scores; gradients flow to it."""
    if alpha is None:
        alpha = 1.5
    x = _as_float32(scores)
    if not torch.is_tensor(alpha):
        alpha = torch.tensor(float(alpha), device=scores.device)
    if bool((alpha <= 1).any()):
        raise ValueError("entmax_bisect needs alpha > 1 (alpha = 1 is softmax)")
    alpha_rows = alpha.to(x.dtype).expand(*x.shape[:-1], 1)  # autograd sums the broadcast back
    scalar = float(alpha) if alpha.numel() == 1 else None
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
    ``compiled`` runs the transform's threshold search and backward through torch.compile.
    """
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"Unknown attention kernel {kernel!r}; choose one of {ATTENTION_KERNELS}")
    fn = get_attention_transform(transform)
    if transform == "softmax" and kernel == "sdpa" and not need_weights:
        out = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout if training else 0.0, scale=scaling
        )
        return out, None
    # Scale the (N, d) query rather than the (N, N) scores: same math, a third of the work at d = 64.
    scores = torch.matmul(query * scaling, key.transpose(-2, -1))  # (B, H, N, N)
    probs = fn(scores, alpha, compiled=kernel == "compiled")
    dropped = F.dropout(probs, p=dropout, training=training) if dropout > 0 else probs
    out = torch.matmul(dropped, value)  # (B, H, N, d)
    return out, (probs if need_weights else None)


def support_size(probs: torch.Tensor) -> torch.Tensor:
    """Number of non-zero attention weights per row, (B, H, N)."""
    return (probs > 0).sum(dim=-1)


__all__ = [
    "ATTENTION_TRANSFORMS",
    "ATTENTION_KERNELS",
    "REFERENCE_TRANSFORMS",
    "attention_forward",
    "entmax15",
    "entmax15_reference",
    "entmax_bisect",
    "get_attention_transform",
    "softmax",
    "sparsemax",
    "sparsemax_reference",
    "support_size",
]
