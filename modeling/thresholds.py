"""Threshold solvers of the sparse transforms, shared by every kernel (the Triton kernel mirrors them and is
tested against them): p_i = [x_i - tau]_+^(1/(alpha-1)), x = (alpha-1) z, sum_i p_i = 1 (Peters et al., 2019).
entmax-1.5 and sparsemax: Newton from a lower bound of tau over a block, a closed-form root on the support found,
certified exact per row (no support entry below the root); rows that fail take the sort-based reference. Details:
EntmaxViT's docs/performance.md, "How it is exact without sorting". Hub code: imports only torch.
"""

from typing import Callable, Optional

import torch

# Newton steps before the closed-form finish: speed only (uncertified rows take the exact path). With these no
# Gaussian row failed the certificate at N = 37 and 197; at N >= 785 a few in a thousand.
NEWTON_STEPS = {"entmax15": 4, "sparsemax": 6}
BISECT_CHECK_EVERY = 4  # alpha-entmax: iterations per convergence check
BISECT_MAX_ITER = 64  # float64 rows at alpha > 2 need more than 48 (Newton creeps where phi is not convex)
MAX_CERTIFY_PASSES = 64  # Triton: cap on passes over the keys per row (attention-like rows certify after ~6)

SPARSE_TRANSFORMS = ("entmax15", "sparsemax", "entmax_bisect")


def tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def _lower_bound(mean: torch.Tensor, n: int, power) -> torch.Tensor:
    """Certified lower bound on tau for rows with max 0 and the given mean: max(-1, mean - n^-power)."""
    # mean is -inf if the row has masked entries (nan if all are): then -1 wins
    return torch.clamp(torch.nan_to_num(mean - n**-power, nan=-1.0, neginf=-1.0), min=-1.0)


def entmax15_sort_threshold(y: torch.Tensor) -> torch.Tensor:
    """Exact 1.5-entmax threshold t (p = ((y - t)_+ / 2)^2) of rows ``y`` with max 0, the sort fallback: on x = y / 2,
    tau_k = mean_k - sqrt((1 - k var_k) / k) over the k largest, k the largest with tau_k <= x_(k); t = 2 tau."""
    x_sorted, _ = torch.sort(y / 2, dim=-1, descending=True)  # (..., N)
    rho = torch.arange(1, y.shape[-1] + 1, device=y.device, dtype=y.dtype)
    mean = x_sorted.cumsum(-1) / rho
    mean_sq = (x_sorted * x_sorted).cumsum(-1) / rho
    tau = mean - torch.sqrt(torch.clamp((1 - rho * (mean_sq - mean * mean)) / rho, min=0))
    support = (tau <= x_sorted).sum(dim=-1, keepdim=True).clamp(min=1)
    return 2 * tau.gather(-1, support - 1)


def sparsemax_sort_threshold(y: torch.Tensor) -> torch.Tensor:
    """Exact sparsemax threshold (p = (y - t)_+) of rows ``y`` with max 0 (Martins & Astudillo)."""
    y_sorted, _ = torch.sort(y, dim=-1, descending=True)
    rho = torch.arange(1, y.shape[-1] + 1, device=y.device, dtype=y.dtype)
    cumsum = y_sorted.cumsum(-1)
    support = ((1 + rho * y_sorted) > cumsum).sum(dim=-1, keepdim=True).clamp(min=1)
    return (cumsum.gather(-1, support - 1) - 1) / support.to(y.dtype)


# Thresholds on one block y (G, Bq, N), rows max 0; e: a work buffer of that shape or None (then y is scratch too);
# ``rescore()`` recomputes y for the sort fallback. In-place: on CPU a fresh multi-MB tensor's page faults cost more.
def _relu_sub(y: torch.Tensor, t: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    return (y - t if out is None else torch.sub(y, t, out=out)).clamp_min_(0)


def _count_positive(e: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    # ``out`` may be e. sign().sum() is several times faster on CPU than count_nonzero or (e > 0).sum()
    return (torch.sign(e) if out is None else torch.sign(e, out=out)).sum(dim=-1, keepdim=True)


def sparse_block_threshold(transform: str, y, e, mean, steps: int,
                           rescore: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, e = (y - t)_+) of entmax-1.5 (p = (e / 2)^2) or sparsemax (p = e; Newton is Michelot's algorithm)."""
    buf, entmax15 = e, transform == "entmax15"
    t = 2 * _lower_bound(mean / 2, y.shape[-1], 0.5) if entmax15 else _lower_bound(mean, y.shape[-1], 1.0)  # <= t*
    for _ in range(steps):
        e = _relu_sub(y, t, buf)
        if entmax15:
            norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True) / 2  # ||d||_2
            t = t + 4 * norm * (norm - 1) / e.sum(dim=-1, keepdim=True)  # tau += norm (norm - 1) / sum(d)
        else:
            t = t + (e.sum(dim=-1, keepdim=True) - 1) / _count_positive(e, out=buf)
    e = _relu_sub(y, t, buf)
    s1 = e.sum(dim=-1, keepdim=True)
    s2 = torch.linalg.vector_norm(e, dim=-1, keepdim=True) ** 2 if entmax15 else None
    k = _count_positive(e, out=buf)  # support size at t (e is scratch until recomputed below)
    if entmax15:  # smaller root u of k u^2 - 2 s1 u + s2 - 4 = 0: sum over the support of (e - u)^2 = 4, sum p = 1
        mean_e = s1 / k
        t = t + mean_e - torch.sqrt(torch.clamp((4 - s2 + s1 * mean_e) / k, min=0))
    else:
        t = t + (s1 - 1) / k
    e = _relu_sub(y, t, buf)
    ok = _count_positive(e, out=None if buf is None else y) == k  # (G, Bq, 1); y is scratch from here
    return _certified(ok, t, e, rescore, entmax15_sort_threshold if entmax15 else sparsemax_sort_threshold)


def _certified(ok, t, e, rescore: Callable, sort_threshold: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, e) with the uncertified rows sorted: only those eagerly, the whole block under graph capture."""
    if torch.compiler.is_compiling():

        def exact(t, ok, e):
            y = rescore()
            t = torch.where(ok, t, sort_threshold(y))
            return t, torch.clamp(y - t, min=0)

        return torch.cond(ok.all(), lambda t, ok, e: (t.clone(), e.clone()), exact, (t, ok, e))
    if bool(ok.all()):
        return t, e
    bad = ~ok.squeeze(-1)  # (G, Bq)
    y_bad = rescore()[bad]  # (R, N)
    t = t.clone()
    t[bad] = sort_threshold(y_bad)
    e[bad] = torch.clamp(y_bad - t[bad], min=0)
    return t, e


def bisect_block_threshold(
    x: torch.Tensor, mean: torch.Tensor, am1: torch.Tensor, q, tol: float, check_every: int = BISECT_CHECK_EVERY
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha-entmax threshold of ``x`` = (alpha - 1) y (row max 0): safeguarded Newton in rounds of ``check_every``
    (the bracket test is relative: near-uniform rows at alpha > 2 have |tau| ~ 1e-3). ``q`` is a float when alpha
    is one number (d ** 2.0 is a square, not exp/log). Returns (lo, z), p = (x - lo)_+^q / z as ``entmax`` does."""
    n = x.shape[-1]
    lo = _lower_bound(mean, n, torch.clamp(am1, max=1.0))
    hi = (-((1.0 / n) ** am1)).expand_as(lo)  # every entry contributes at most 1/n there
    tau, err = lo, torch.full_like(lo, float("inf"))
    state = torch.stack(torch.broadcast_tensors(lo, hi, tau, err))  # (4, ..., 1): one operand for the branch

    # check_every safeguarded Newton steps on ||(x - tau)_+||_q - 1 keeping the bracket f(lo) >= 0 >= f(hi):
    # bisection where Newton would leave it (alpha > 2)
    def more(state, x):
        lo, hi, tau, err = state.unbind(0)
        for _ in range(check_every):
            d = torch.clamp(x - tau, min=0)
            dq = d**q
            sq = dq.sum(dim=-1, keepdim=True)
            sq1 = dq.div_(d).nan_to_num_(0.0).sum(dim=-1, keepdim=True)  # sum d^(q-1) (0/0 -> 0 off the support)
            above = sq >= 1
            lo = torch.where(above, tau, lo)
            hi = torch.where(above, hi, tau)
            err = torch.where(above, sq - 1, err)
            newton = tau + (sq - sq ** (1 - 1 / q)) / sq1
            tau = torch.where(above & (newton < hi) & (newton >= tau), newton, (lo + hi) / 2)
        return torch.stack((lo, hi, tau, err))

    for _ in range(BISECT_MAX_ITER // check_every):
        lo, hi, _, err = state.unbind(0)
        done = (err <= tol) | (hi - lo <= tol * hi.abs())
        if torch.compiler.is_compiling():  # eagerly a plain branch: an eager torch.cond compiles itself per call
            state = torch.cond(done.all(), lambda state, x: state.clone(), more, (state, x))
        elif not bool(done.all()):
            state = more(state, x)
    lo = state[0]
    z = (torch.clamp(x - lo, min=0) ** q).sum(dim=-1, keepdim=True)
    return lo, z


def block_probabilities(y, e, mean, transform: str, alpha_rows, scalar_alpha: Optional[float], rescore: Callable,
                        newton_steps: Optional[int] = None, check_every: int = BISECT_CHECK_EVERY):
    """(t, w, z), p = w / z, of ``transform`` on a block ``y`` (..., N) with row max 0 (y is scratch). Any
    ``newton_steps`` / ``check_every`` is exact (fewer: more sort fallbacks)."""
    steps = NEWTON_STEPS.get(transform) if newton_steps is None else newton_steps
    if transform != "entmax_bisect":
        t, e = sparse_block_threshold(transform, y, e, mean, steps, rescore)
        # entmax-1.5: the 1/4 is applied to the (Bq, d) output in the tiled kernel, not to the block
        return (t, e.mul_(e), 4.0) if transform == "entmax15" else (t, e, 1.0)
    am1 = alpha_rows - 1
    q = 1.0 / (scalar_alpha - 1.0) if scalar_alpha is not None else 1.0 / am1
    x = y.mul_(am1)
    t, z = bisect_block_threshold(x, mean * am1, am1, q, 4 * torch.finfo(x.dtype).eps, check_every)
    return t, torch.clamp(x - t, min=0) ** q, z


def probabilities(scores: torch.Tensor, transform: str, alpha_rows: Optional[torch.Tensor] = None,
                  scalar_alpha: Optional[float] = None, **solver) -> torch.Tensor:
    """Exact ``transform`` of ``scores`` (float32 or wider) over the last dimension, as one block (the dense path)."""
    m = scores.amax(dim=-1, keepdim=True)
    y = scores - m  # (..., N), row max 0
    _, w, z = block_probabilities(y, None, y.mean(dim=-1, keepdim=True), transform, alpha_rows, scalar_alpha,
                                  lambda: scores - m, **solver)  # the sort fallback's fresh y
    return w / z


def jacobian_weights(probs: torch.Tensor, transform: str, alpha=None) -> torch.Tensor:
    """g = p^(2 - alpha) (sqrt(p) for entmax-1.5, the support indicator for sparsemax), 0 off the support."""
    if transform == "entmax15":
        return torch.sqrt(probs)
    if transform == "sparsemax":
        return torch.sign(probs)
    return torch.where(probs > 0, probs.clamp(min=1e-38) ** (2 - alpha), 0)


def jacobian_product(g: torch.Tensor, dp: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """dL/dscores = g dP - g sum(g dP) / sum(g) per row."""
    gdp = dp.mul_(g) if inplace else dp * g
    return gdp.addcmul_(g, gdp.sum(dim=-1, keepdim=True) / g.sum(dim=-1, keepdim=True), value=-1)


def alpha_gradient(probs: torch.Tensor, g: torch.Tensor, dp: torch.Tensor, am1: torch.Tensor) -> torch.Tensor:
    """dL/dalpha per row (..., 1) of alpha-entmax (Correia et al., 2019, eq. 13); am1 = alpha - 1 per row."""
    plogp = torch.where(probs > 0, probs * torch.log(probs.clamp(min=1e-38)), 0)
    g_norm = g / g.sum(dim=-1, keepdim=True)
    d_alpha = (probs - g_norm) / am1**2 - (plogp - g_norm * plogp.sum(dim=-1, keepdim=True)) / am1
    return (dp * d_alpha).sum(dim=-1, keepdim=True)


def alpha_per_row(alpha, rows_shape: tuple[int, ...], device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, Optional[float]]:
    """alpha (None = 1.5, a float, or a tensor broadcastable to the rows) as an expanded view ``rows_shape + (1,)``
    (autograd sums the broadcast back), and the float when alpha is one fixed number (else None)."""
    alpha = 1.5 if alpha is None else alpha
    scalar = None
    if not torch.is_tensor(alpha):
        scalar = float(alpha)
        alpha = torch.tensor(scalar, device=device)
    elif alpha.numel() == 1 and not alpha.requires_grad and not tracing():
        scalar = float(alpha)  # a fixed tensor alpha: the float exponent is cheaper (d ** 2.0 is a square)
    if (scalar is not None and not scalar > 1) or (scalar is None and not tracing() and bool((alpha <= 1).any())):
        raise ValueError("entmax_bisect needs alpha > 1 (alpha = 1 is softmax)")
    return alpha.to(device=device, dtype=dtype).expand(*rows_shape, 1), scalar
