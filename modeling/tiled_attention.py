"""Tiled exact sparse attention: entmax-1.5, sparsemax and alpha-entmax at the memory cost of softmax SDPA.

``tiled_attention(q, k, v, transform=..., scaling=...)`` computes ``P V`` with ``P`` the exact row-wise
entmax of ``S = scaling q k^T`` without ever holding the (B, H, N, N) scores:

* queries are processed in blocks of ``Bq`` rows, sized so that a block's (B, H, Bq, N) scores (and the one
  or two work buffers of the same size) stay in cache while the threshold search passes over them;
* the row threshold is solved on the block with the same exact method as the dense transforms (certified
  lower bound, Newton on ``||[x - tau]_+||_q - 1``, closed-form finish on the support, a per-row certificate,
  the sort-based reference for rows it cannot certify; see ``attention.py``);
* the block's output ``P V`` is written at once; only the row max ``m`` and the threshold ``t`` (and for
  alpha-entmax the normaliser ``z``) are kept: O(B H N) state instead of O(B H N^2);
* the backward (FlashAttention's recompute idea applied to entmax) recomputes each block's probabilities from
  the saved ``(m, t)`` with the same arithmetic as the forward, hence bit-identical, and forms
  ``dP = dO V^T``, ``dS = g * (dP - sum(g dP) / sum(g))`` with ``g = p^(2-alpha)`` (``sqrt(p)`` for
  entmax-1.5, the support indicator for sparsemax), ``dQ = scaling dS K``, ``dK = scaling dS^T Q``,
  ``dV = P^T dO``, and for alpha-entmax the gradient for alpha (Correia et al., 2019, eq. 13).

The code is plain tensor ops with no data-dependent Python control flow under graph capture, so
``torch.export`` and ``torch.compile(fullgraph=True)`` take it whole. The two data-dependent decisions (sort
fallback for uncertified rows, more alpha-entmax iterations for unconverged rows) are ``torch.cond`` while a
graph is captured and a plain ``if`` in eager mode (``torch.cond`` called eagerly compiles itself on every call,
about 2 ms, which would cost more than the block). ``torch.compile`` of the same code
fuses each block's passes into a few loops (C++/OpenMP on CPU, Triton kernels on CUDA).

Everything runs in float32 or wider; half-precision inputs are computed in float32 (also under autocast) and
the output is returned in the input dtype. This file is copied to the Hub: it imports only torch.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# A block's (B, H, Bq, N) float32 scores take at most this many bytes (with one or two work buffers of the
# same size they stay in a 2-core CPU's L2 + L3). Measured on the 2-core EPYC dev machine: 1-4 MB blocks run
# the elementwise passes 3-5x faster than whole (B, H, N, N) tensors; see docs/performance.md.
BLOCK_BYTES = 2 * 2**20
BLOCK_ROWS = 128  # preferred query rows per block (GEMM efficiency)
MIN_BLOCK_ROWS = 16  # below this the matmuls lose efficiency and the Python overhead per block dominates

# Newton steps before the closed-form finish, for this kernel and the dense transforms in attention.py
# (uncertified rows are recomputed exactly, so these trade speed only). alpha-entmax: iterations per
# convergence check and their cap.
ENTMAX15_NEWTON_STEPS = 4
SPARSEMAX_NEWTON_STEPS = 6
BISECT_CHECK_EVERY = 4
BISECT_MAX_ITER = 64  # float64 rows at alpha > 2 need more than 48 (Newton creeps where phi is not convex)

TILED_TRANSFORMS = ("entmax15", "sparsemax", "entmax_bisect")


def block_shape(batch_heads: int, n_keys: int, block_bytes: int = BLOCK_BYTES) -> tuple[int, int]:
    """(heads, rows) of a block over the flattened (B*H, N) query rows: up to BLOCK_ROWS query rows (CPU GEMMs
    lose efficiency below ~64 rows) and as many (batch, head) pairs as keep the float32 scores within
    ``block_bytes``; for very long rows, fewer query rows instead."""
    rows = min(n_keys, BLOCK_ROWS)
    heads = block_bytes // (4 * rows * n_keys)
    if heads == 0:
        rows = max(MIN_BLOCK_ROWS, min(rows, block_bytes // (4 * n_keys)))
    return max(1, min(batch_heads, heads)), rows


def _unless_all(done: torch.Tensor, fix: Callable, operands: tuple) -> torch.Tensor:
    """``operands[0]`` if ``done`` is all True, else ``fix(*operands)``; exportable and compilable.

    Under graph capture (torch.compile, torch.export) this is ``torch.cond``; in eager mode a plain branch,
    because ``torch.cond`` called eagerly compiles itself per call. Both branches return the same values.
    """
    if torch.compiler.is_compiling():
        return torch.cond(done.all(), lambda x, *rest: x.clone(), fix, operands)
    if bool(done.all()):
        return operands[0]
    return fix(*operands)


def _lower_bound(mean: torch.Tensor, n: int, power) -> torch.Tensor:
    """Certified lower bound on tau for rows with max 0 and the given mean: max(-1, mean - n^-power)."""
    # mean is -inf if the row has masked entries (nan if all are): then -1 wins
    return torch.clamp(torch.nan_to_num(mean - n**-power, nan=-1.0, neginf=-1.0), min=-1.0)


# ----------------------------------------------------------------------------------------------------------
# Exact sort-based thresholds (the fallback for rows the fast search cannot certify)
# ----------------------------------------------------------------------------------------------------------
def entmax15_sort_threshold(y: torch.Tensor) -> torch.Tensor:
    """Exact 1.5-entmax threshold t (score units: p = ((y - t)_+ / 2)^2) of rows ``y`` with max 0, (..., 1).

    On the support of the k largest entries of x = y / 2, tau_k = mean_k - sqrt((1 - k var_k) / k); the support
    is the largest k with tau_k <= x_(k) (Peters et al., 2019). t = 2 tau.
    """
    x_sorted, _ = torch.sort(y / 2, dim=-1, descending=True)  # (..., N)
    rho = torch.arange(1, y.shape[-1] + 1, device=y.device, dtype=y.dtype)
    mean = x_sorted.cumsum(-1) / rho
    mean_sq = (x_sorted * x_sorted).cumsum(-1) / rho
    tau = mean - torch.sqrt(torch.clamp((1 - rho * (mean_sq - mean * mean)) / rho, min=0))
    support = (tau <= x_sorted).sum(dim=-1, keepdim=True).clamp(min=1)
    return 2 * tau.gather(-1, support - 1)


def sparsemax_sort_threshold(y: torch.Tensor) -> torch.Tensor:
    """Exact sparsemax threshold (p = (y - t)_+) of rows ``y`` with max 0, by a sort (Martins & Astudillo)."""
    y_sorted, _ = torch.sort(y, dim=-1, descending=True)
    rho = torch.arange(1, y.shape[-1] + 1, device=y.device, dtype=y.dtype)
    cumsum = y_sorted.cumsum(-1)
    support = ((1 + rho * y_sorted) > cumsum).sum(dim=-1, keepdim=True).clamp(min=1)
    return (cumsum.gather(-1, support - 1) - 1) / support.to(y.dtype)


# ----------------------------------------------------------------------------------------------------------
# Thresholds on one block. y: (G, Bq, N) scores minus their row max (row max 0); e: a work buffer of the same
# shape, or None. Each returns the threshold t (G, Bq, 1) and e = (y - t)_+, the basis of the probabilities;
# with a buffer y is overwritten too (scratch for the certificate). ``rescore()`` recomputes y for the sort
# fallback. Eagerly, buffers are reused and ops run in place because on CPU a fresh multi-MB tensor costs page
# faults that are dearer than the arithmetic on it (about 3x for a 2 MB block); compiled (no buffers), the
# passes fuse and inductor plans the memory.
# ----------------------------------------------------------------------------------------------------------
def _relu_sub(y: torch.Tensor, t: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """(y - t)_+, written into ``out`` if given."""
    return (y - t if out is None else torch.sub(y, t, out=out)).clamp_min_(0)


def _count_positive(e: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """Positive entries per row of a non-negative ``e``, as float (G, Bq, 1); ``out`` is scratch (may be e).
    sign().sum() is several times faster on CPU than count_nonzero or (e > 0).sum() (no bool/int64 pass)."""
    return (torch.sign(e) if out is None else torch.sign(e, out=out)).sum(dim=-1, keepdim=True)


def entmax15_block_threshold(y, e, mean, steps: int, rescore: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact entmax-1.5 threshold in score units (p = (e / 2)^2, e = (y - t)_+); ``mean`` is y's row mean.

    Newton on ||d||_2 - 1 (d = e / 2) from the certified lower bound, the closed-form root on the support
    found, then the certificate: the support at the new threshold has the same size as the one the root was
    solved on, so the root solves the equation on its own support and is the unique threshold. The check
    holds whatever the iterates were (no lower-bound assumption, so rounding cannot certify a wrong row).
    """
    buf = e
    t = 2 * _lower_bound(mean / 2, y.shape[-1], 0.5)  # (G, Bq, 1), t <= t*
    for _ in range(steps):
        e = _relu_sub(y, t, buf)
        norm = torch.linalg.vector_norm(e, dim=-1, keepdim=True) / 2  # ||d||_2
        t = t + 4 * norm * (norm - 1) / e.sum(dim=-1, keepdim=True)  # tau += norm (norm - 1) / sum(d)
    e = _relu_sub(y, t, buf)
    s1 = e.sum(dim=-1, keepdim=True)
    s2 = torch.linalg.vector_norm(e, dim=-1, keepdim=True) ** 2
    k = _count_positive(e, out=buf)  # support size at t (e is scratch until recomputed below)
    mean_e = s1 / k
    # smaller root u of k u^2 - 2 s1 u + s2 - 4 = 0: sum over the support of (e - u)^2 = 4, i.e. sum p = 1
    t = t + mean_e - torch.sqrt(torch.clamp((4 - s2 + s1 * mean_e) / k, min=0))
    e = _relu_sub(y, t, buf)
    ok = _count_positive(e, out=None if buf is None else y) == k  # (G, Bq, 1); y is scratch from here
    return _certified(ok, t, e, rescore, entmax15_sort_threshold)


def sparsemax_block_threshold(y, e, mean, steps: int, rescore: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact sparsemax threshold (p = e = (y - t)_+): Michelot's algorithm (Newton on sum(e) - 1) from the
    certified lower bound, the closed form on the support found, the same certificate as entmax-1.5."""
    buf = e
    t = _lower_bound(mean, y.shape[-1], 1.0)
    for _ in range(steps):
        e = _relu_sub(y, t, buf)
        s1 = e.sum(dim=-1, keepdim=True)
        t = t + (s1 - 1) / _count_positive(e, out=buf)
    e = _relu_sub(y, t, buf)
    s1 = e.sum(dim=-1, keepdim=True)
    k = _count_positive(e, out=buf)
    t = t + (s1 - 1) / k
    e = _relu_sub(y, t, buf)
    ok = _count_positive(e, out=None if buf is None else y) == k
    return _certified(ok, t, e, rescore, sparsemax_sort_threshold)


def _certified(ok, t, e, rescore: Callable, sort_threshold: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, e) with the rows failing the certificate recomputed exactly by ``sort_threshold`` on rescored y.

    Rare (a few rows in thousands, mostly near-uniform rows of long sequences). Eager mode sorts only the
    failing rows; under graph capture (torch.compile, torch.export) shapes are static, so the whole block is
    sorted inside a ``torch.cond`` branch that runs only when some row failed.
    """
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


def _bisect_iterations(x, q, lo, hi, tau, err, count: int):
    """``count`` safeguarded Newton steps on ||(x - tau)_+||_q - 1 keeping the bracket f(lo) >= 0 >= f(hi)
    (bisection where Newton would leave it; only happens for alpha > 2). Rows (..., 1); x (..., N)."""
    for _ in range(count):
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
    return lo, hi, tau, err


def bisect_block_threshold(
    x: torch.Tensor, mean: torch.Tensor, am1: torch.Tensor, q, tol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha-entmax threshold of ``x`` = (alpha - 1) y (row max 0, row mean ``mean``); ``am1`` = alpha - 1
    per row (..., 1) and
    ``q`` = 1 / (alpha - 1) (a float when alpha is one number: d ** 2.0 is a square, not exp/log).

    Runs the safeguarded Newton iteration in rounds of BISECT_CHECK_EVERY steps until every row of the block
    has converged (|f(lo)| or the bracket within ``tol``) or BISECT_MAX_ITER. Returns (lo, z) with
    p = (x - lo)_+^q / z renormalised, as the ``entmax`` package does.
    """
    n = x.shape[-1]
    lo = _lower_bound(mean, n, torch.clamp(am1, max=1.0))
    hi = (-((1.0 / n) ** am1)).expand_as(lo)  # every entry contributes at most 1/n there
    tau, err = lo, torch.full_like(lo, float("inf"))
    state = torch.stack(torch.broadcast_tensors(lo, hi, tau, err))  # (4, ..., 1): one operand for the branch

    def more(state, x):
        return torch.stack(_bisect_iterations(x, q, *state.unbind(0), BISECT_CHECK_EVERY))

    for _ in range(BISECT_MAX_ITER // BISECT_CHECK_EVERY):
        lo, hi, _, err = state.unbind(0)
        state = _unless_all((err <= tol) | (hi - lo <= tol), more, (state, x))
    lo = state[0]
    z = (torch.clamp(x - lo, min=0) ** q).sum(dim=-1, keepdim=True)
    return lo, z


# ----------------------------------------------------------------------------------------------------------
# One block: scores -> probability basis, and the backward's dS from it
# ----------------------------------------------------------------------------------------------------------
def _block_scores(q_blk, key_t, out: Optional[torch.Tensor], m: Optional[torch.Tensor] = None):
    """y = q_blk key^T - row max (written into ``out`` if given), (G, Bq, N); returns (y, m). q_blk is scaled."""
    s = torch.matmul(q_blk, key_t) if out is None else torch.matmul(q_blk, key_t, out=out)
    if m is None:
        m = s.amax(dim=-1, keepdim=True)  # (G, Bq, 1)
    return s.sub_(m), m


def forward_block(q_blk, key_t, key_mean, value, alpha_blk, y_buf, e_buf, transform: str,
                  scalar_alpha: Optional[float]):
    """One block of the forward: (out, m, t, z) = P V of the block and its per-row state (z: alpha-entmax's
    normaliser, else None). q_blk (G, Bq, d) is already scaled; key_t (G, d, N); key_mean (G, d, 1);
    value (G, N, e); alpha_blk (G, Bq, 1) (alpha-entmax only); y_buf, e_buf: (G, Bq, N) work buffers or None."""
    y, m = _block_scores(q_blk, key_t, y_buf)  # (G, Bq, N), (G, Bq, 1)
    mean = torch.matmul(q_blk, key_mean) - m  # (G, Bq, 1), row mean of y

    def rescore():  # fresh y for the sort fallback
        return torch.matmul(q_blk, key_t) - m

    z = None
    if transform == "entmax15":
        t, e = entmax15_block_threshold(y, e_buf, mean, ENTMAX15_NEWTON_STEPS, rescore)
        # p = e^2 / 4: the 1/4 is applied to the (Bq, d) output rather than the (Bq, N) block
        out = torch.matmul(e.mul_(e), value).mul_(0.25)
    elif transform == "sparsemax":
        t, e = sparsemax_block_threshold(y, e_buf, mean, SPARSEMAX_NEWTON_STEPS, rescore)
        out = torch.matmul(e, value)
    else:
        am1 = alpha_blk - 1
        q = 1.0 / (scalar_alpha - 1.0) if scalar_alpha is not None else 1.0 / am1
        x = y.mul_(am1)
        t, z = bisect_block_threshold(x, mean * am1, am1, q, 4 * torch.finfo(y.dtype).eps)
        out = torch.matmul(torch.clamp(x - t, min=0) ** q, value) / z
    return out, m, t, z


def backward_block(q_blk, do_blk, key, key_t, value_t, m_blk, t_blk, z_blk, alpha_blk, dk, dv, y_buf, dp_buf,
                   transform: str, scalar_alpha: Optional[float], need_alpha: bool, scaling: float):
    """One block of the backward: recomputes the block's probabilities with the forward's arithmetic, adds its
    share to ``dk``, ``dv`` (G, N, d) in place, and returns (dq_blk, dalpha_blk or None)."""
    y, _ = _block_scores(q_blk, key_t, y_buf, m_blk)  # the forward's arithmetic: bit-identical probabilities
    dp = torch.matmul(do_blk, value_t) if dp_buf is None else torch.matmul(do_blk, value_t, out=dp_buf)  # dL/dP
    dalpha = None
    if transform == "entmax15":
        e = y.sub_(t_blk).clamp_min_(0)  # p = e^2 / 4, g = sqrt(p) = e / 2
        gdp = dp.mul_(e)
        r = gdp.sum(dim=-1, keepdim=True) / e.sum(dim=-1, keepdim=True)
        ds, ds_scale = gdp.addcmul_(e, r, value=-1), 0.5  # ds = 2 dS
        dv.baddbmm_(e.mul_(e).transpose(-2, -1), do_blk, alpha=0.25)
    elif transform == "sparsemax":
        e = y.sub_(t_blk).clamp_min_(0)  # p = e, g = 1 on the support
        dv.baddbmm_(e.transpose(-2, -1), do_blk)
        g = e.sign_()
        gdp = dp.mul_(g)
        r = gdp.sum(dim=-1, keepdim=True) / g.sum(dim=-1, keepdim=True)
        ds, ds_scale = gdp.addcmul_(g, r, value=-1), 1.0
    else:
        am1 = alpha_blk - 1
        exponent = 1.0 / (scalar_alpha - 1.0) if scalar_alpha is not None else 1.0 / am1
        p = torch.clamp(y.mul_(am1) - t_blk, min=0) ** exponent / z_blk
        pos = p > 0
        g_exp = 2 - (scalar_alpha if scalar_alpha is not None else alpha_blk)
        g = torch.where(pos, p.clamp(min=1e-38) ** g_exp, 0)  # p^(2 - alpha) on the support
        g_sum = g.sum(dim=-1, keepdim=True)
        gdp = dp * g
        ds, ds_scale = gdp - g * (gdp.sum(dim=-1, keepdim=True) / g_sum), 1.0
        if need_alpha:  # Correia et al. (2019), eq. 13, per row
            plogp = torch.where(pos, p * torch.log(p.clamp(min=1e-38)), 0)
            g_norm = g / g_sum
            d_alpha = (p - g_norm) / am1**2 - (plogp - g_norm * plogp.sum(dim=-1, keepdim=True)) / am1
            dalpha = (dp * d_alpha).sum(dim=-1, keepdim=True)
        dv.baddbmm_(p.transpose(-2, -1), do_blk)
    dk.baddbmm_(ds.transpose(-2, -1), q_blk, alpha=ds_scale)  # q_blk carries the scaling
    return torch.matmul(ds, key).mul_(ds_scale * scaling), dalpha


# Compiled twins (kernel "tiled_compiled", and attention.py's "compiled"): the same function through
# torch.compile, built once per process. Here the block functions are compiled, not the whole call: the Python
# block loop stays eager and each block's passes run as a few fused loops (C++/OpenMP on CPU, Triton on CUDA),
# with a graph one block long whatever N (compiling the whole call unrolls its loop: at N = 3137 about 150
# blocks, which took over 15 minutes to compile on 2 cores). dynamic=None for the blocks: the edge blocks'
# shapes make dynamo recompile once with dynamic sizes instead of once per shape.
_COMPILED: dict[str, Callable] = {}


def tracing() -> bool:
    """True under torch.compile / torch.export / jit tracing, where a host sync cannot be taken and an outer
    capture must not meet the compiled blocks."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def compiled_twin(fn: Callable, compiled: bool = True, dynamic: Optional[bool] = None) -> Callable:
    """``fn`` itself, or its torch.compile'd twin (one per function and process; same code, same numbers)."""
    if not compiled:
        return fn
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=dynamic)
    return _COMPILED[fn.__name__]


def _blocks(batch_heads: int, n: int, heads: int, rows: int):
    """Block index slices over (B*H, N) query rows: for each group of ``heads``, the list of row slices."""
    return [
        (slice(g, g + heads), [slice(r, r + rows) for r in range(0, n, rows)]) for g in range(0, batch_heads, heads)
    ]


def _cat_blocks(blocks: list[list[torch.Tensor]]) -> torch.Tensor:
    """Reassemble per-block (G, Bq, .) results into (B*H, N, .): rows within a group, then groups."""
    return torch.cat([torch.cat(group, dim=1) for group in blocks], dim=0)


class _Buffers:
    """Two (G, Bq, N) work buffers reused by every block of one call (views of the same storage for the
    smaller edge blocks), so the eager block loop allocates nothing large. None for compiled blocks."""

    def __init__(self, like: torch.Tensor, block: tuple[int, int], n: int, enabled: bool = True) -> None:
        size = min(block[0], like.shape[0]) * min(block[1], like.shape[1]) * n
        self.flat = [like.new_empty(size), like.new_empty(size)] if enabled else None

    def views(self, q_blk: torch.Tensor, n: int) -> list[Optional[torch.Tensor]]:
        if self.flat is None:
            return [None, None]
        g, r = q_blk.shape[:2]
        return [buf[: g * r * n].view(g, r, n) for buf in self.flat]


class _TiledEntmax(torch.autograd.Function):
    """out = P V with P = transform(scaling Q K^T) over (B*H, N, d) tensors, in (heads, rows) blocks.
    Saves Q, K, V and the per-row (m, t[, z]) only."""

    @staticmethod
    def forward(ctx, query, key, value, alpha_rows, transform: str, scaling: float, block: tuple[int, int],
                scalar_alpha: Optional[float], compiled: bool = False):
        n, bisect = key.shape[1], transform == "entmax_bisect"
        key_t = key.transpose(-2, -1)  # (BH, d, N)
        key_mean = key.mean(dim=-2).unsqueeze(-1)  # (BH, d, 1): a row mean of the scores is q . mean(k)
        buffers = _Buffers(query, block, n, enabled=not compiled)
        run = compiled_twin(forward_block, compiled)
        outs, ms, ts, zs = [], [], [], []
        for heads, row_slices in _blocks(query.shape[0], query.shape[1], *block):  # unrolled when captured
            for blocks in (outs, ms, ts, zs):
                blocks.append([])
            for rows in row_slices:
                q_blk = query[heads, rows] * scaling  # (G, Bq, d)
                out, m, t, z = run(q_blk, key_t[heads], key_mean[heads], value[heads],
                                   alpha_rows[heads, rows] if bisect else None, *buffers.views(q_blk, n),
                                   transform, scalar_alpha)
                for blocks, value_blk in ((outs, out), (ms, m), (ts, t), (zs, z)):
                    blocks[-1].append(value_blk)
        state = [_cat_blocks(ms), _cat_blocks(ts)] + ([_cat_blocks(zs)] if bisect else [])
        ctx.save_for_backward(query, key, value, alpha_rows, *state)
        ctx.transform, ctx.scaling, ctx.block, ctx.scalar_alpha = transform, scaling, block, scalar_alpha
        ctx.compiled = compiled
        return _cat_blocks(outs)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):  # float32 matmuls, as the forward
            return _TiledEntmax._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        query, key, value, alpha_rows, m, t, *z = ctx.saved_tensors
        bisect, need_alpha = ctx.transform == "entmax_bisect", ctx.needs_input_grad[3]
        n = key.shape[1]
        grad_out = grad_out.contiguous()
        key_t, value_t = key.transpose(-2, -1), value.transpose(-2, -1)
        buffers = _Buffers(query, ctx.block, n, enabled=not ctx.compiled)
        run = compiled_twin(backward_block, ctx.compiled)
        dq_blocks, dk_blocks, dv_blocks, dalpha_blocks = [], [], [], []
        for heads, row_slices in _blocks(query.shape[0], query.shape[1], *ctx.block):
            dq_blocks.append([])
            dalpha_blocks.append([])
            dk = torch.zeros_like(key[heads])  # (G, N, d), summed over the query blocks
            dv = torch.zeros_like(value[heads])
            for rows in row_slices:
                q_blk = query[heads, rows] * ctx.scaling  # (G, Bq, d)
                dq, dalpha = run(q_blk, grad_out[heads, rows], key[heads], key_t[heads], value_t[heads],
                                 m[heads, rows], t[heads, rows], z[0][heads, rows] if bisect else None,
                                 alpha_rows[heads, rows] if bisect else None, dk, dv, *buffers.views(q_blk, n),
                                 ctx.transform, ctx.scalar_alpha, need_alpha, ctx.scaling)
                dq_blocks[-1].append(dq)
                dalpha_blocks[-1].append(dalpha)
            dk_blocks.append(dk)
            dv_blocks.append(dv)
        dalpha = _cat_blocks(dalpha_blocks) if need_alpha else None
        return _cat_blocks(dq_blocks), torch.cat(dk_blocks), torch.cat(dv_blocks), dalpha, None, None, None, None, None


def tiled_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    transform: str,
    scaling: float,
    alpha=None,
    block: Optional[tuple[int, int]] = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Exact sparse attention ``transform(scaling q k^T) v`` computed in blocks: query (B, H, N, d), key
    (B, H, M, d), value (B, H, M, e) -> (B, H, N, e).

    ``transform``: one of TILED_TRANSFORMS. ``alpha`` (entmax_bisect only): None (1.5), a float, or a tensor
    broadcastable to (B, H, N, 1), e.g. (H, 1, 1) per head; gradients flow to it. ``block``: (heads, query
    rows) per block over the flattened (B*H, N) rows (default: ``block_shape``, from BLOCK_BYTES). Half
    precision is computed in float32. ``compiled``: run each block through ``torch.compile`` (the block loop
    stays eager; ignored while an outer graph is captured, which traces the plain blocks).
    """
    if transform not in TILED_TRANSFORMS:
        raise ValueError(f"tiled_attention supports {TILED_TRANSFORMS}, not {transform!r}")
    if query.ndim != 4 or key.shape[:-1] != value.shape[:-1] or query.shape[:2] + query.shape[3:] != key.shape[:2] + key.shape[3:]:
        raise ValueError(
            f"expected query (B, H, N, d), key (B, H, M, d), value (B, H, M, e); got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    dtype = query.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    batch, heads, n_q, _ = query.shape
    block = block or block_shape(batch * heads, key.shape[-2])
    scalar_alpha: Optional[float] = None
    alpha_rows = query.new_empty(0, dtype=compute)  # placeholder for the fixed-alpha transforms
    if transform == "entmax_bisect":
        if alpha is None:
            alpha = 1.5
        if not torch.is_tensor(alpha):
            scalar_alpha = float(alpha)
            alpha = torch.tensor(scalar_alpha, device=query.device)
        if not torch.compiler.is_compiling() and bool((alpha <= 1).any()):
            raise ValueError("entmax_bisect needs alpha > 1 (alpha = 1 is softmax)")
        # (B*H, N, 1), one alpha per row; autograd sums the broadcast back to alpha's shape
        alpha_rows = alpha.to(compute).expand(batch, heads, n_q, 1).reshape(batch * heads, n_q, 1)

    def rows(x: torch.Tensor) -> torch.Tensor:  # (B, H, N, d) -> (B*H, N, d) in the compute dtype
        return x.to(compute).reshape(batch * heads, *x.shape[-2:])

    with torch.autocast(query.device.type, enabled=False):  # the kernel's matmuls stay in float32
        out = _TiledEntmax.apply(
            rows(query), rows(key), rows(value), alpha_rows, transform, scaling, block, scalar_alpha,
            compiled and not tracing(),
        )
    return out.view(batch, heads, n_q, value.shape[-1]).to(dtype)


__all__ = [
    "BLOCK_BYTES",
    "TILED_TRANSFORMS",
    "block_shape",
    "compiled_twin",
    "entmax15_sort_threshold",
    "sparsemax_sort_threshold",
    "tiled_attention",
    "tracing",
]
