"""Fused exact sparse attention in Triton (kernel ``triton``): one launch forward, two backward, never holding the
(B, H, N, N) scores; ``thresholds.py``'s method with every row certified on the device. Statistics are float32;
matmuls take the input dtype (float32 in IEEE float32, matching the references to 1e-6). Design: EntmaxViT's
docs/performance.md, "The triton kernel"."""

import os
from functools import lru_cache
from typing import Optional

import torch

try:  # transformers' check of remote code's imports skips try blocks: loading the model never requires triton
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - torch's CUDA builds ship triton
    raise ImportError("attn_implementation='triton' needs the triton package (it ships with torch's CUDA builds)") from error

from .thresholds import BISECT_CHECK_EVERY, BISECT_MAX_ITER, MAX_CERTIFY_PASSES, SPARSE_TRANSFORMS, alpha_per_row

TRANSFORM_IDS = {name: i for i, name in enumerate(SPARSE_TRANSFORMS)}  # entmax15 0, sparsemax 1, entmax_bisect 2
ONE_TILE_MAX = 256  # all keys in one register tile up to this N (one QK^T per program instead of one per pass)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b with float32 accumulation. ``PRECISION`` "ieee" (float32 inputs), "tf32" (half inputs), or "upcast":
    triton's interpreter (3.8) multiplies bfloat16 operands as integers, so they are widened first (exact)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _scores(q, k_base, start_n, N, D, stride_kn, stride_kd, scaling, m,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """y = scaling q k^T - m for keys [start_n, start_n + BLOCK_N), -inf past N. (BLOCK_M, BLOCK_N) float32."""
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_t = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                  mask=(cols[None, :] < N) & (offs_d[:, None] < D), other=0.0)  # (BLOCK_D, BLOCK_N)
    s = _dot(q, k_t, PRECISION) * scaling
    return tl.where(cols[None, :] < N, s - m[:, None], float("-inf"))


@triton.jit
def _probs(y, t, z, am1, TRANSFORM: tl.constexpr):
    """(p, g = p^(2 - alpha)) of a tile."""
    if TRANSFORM == 0:  # entmax-1.5: p = (e / 2)^2, g = sqrt(p) = e / 2
        e = tl.maximum(y - t[:, None], 0.0)
        return e * e * 0.25, e * 0.5
    elif TRANSFORM == 1:  # sparsemax: p = e, g = 1 on the support
        p = tl.maximum(y - t[:, None], 0.0)
        return p, tl.where(p > 0, 1.0, 0.0)
    else:  # alpha-entmax: p = (x - tau)_+^(1 / (alpha - 1)) / z with x = (alpha - 1) y
        d = tl.maximum(y * am1[:, None] - t[:, None], 0.0)
        p = tl.where(d > 0, tl.exp2(tl.log2(d) / am1[:, None]), 0.0) / z[:, None]
        g = tl.where(p > 0, tl.exp2(tl.log2(p) * (1.0 - am1[:, None])), 0.0)
        return p, g


@triton.jit
def _fwd(Q, K, V, Alpha, Out, M, T, Z,
         sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
         H, N, D, scaling, tol,
         TRANSFORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
         ONE_TILE: tl.constexpr, MAX_PASSES: tl.constexpr, PRECISION: tl.constexpr,
         CHECK_EVERY: tl.constexpr = BISECT_CHECK_EVERY):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    zero = tl.zeros([BLOCK_M], dtype=tl.float32)

    # pass 0: row max and row mean of the scores
    m = zero + float("-inf")
    total = zero
    for start_n in range(0, N, BLOCK_N):
        y = _scores(q, k_base, start_n, N, D, skn, skd, scaling, zero, BLOCK_N, BLOCK_D, PRECISION)
        m = tl.maximum(m, tl.max(y, 1))
        total += tl.sum(tl.where(y > float("-inf"), y, 0.0), 1)
    mean = total / N - m  # row mean of y = s - m
    if ONE_TILE:  # every key in one tile: keep y in registers for all passes
        y_all = _scores(q, k_base, 0, N, D, skn, skd, scaling, m, BLOCK_N, BLOCK_D, PRECISION)

    done = rows >= N  # padding rows need no threshold
    z = zero + 1.0
    am1 = zero + 1.0
    if TRANSFORM == 2:
        am1 = tl.load(Alpha + bh * N + rows, mask=row_ok, other=1.5) - 1.0
        # certified bracket: f(lo) >= 0 >= f(hi) (thresholds.bisect_block_threshold)
        lo = tl.maximum(mean * am1 - tl.exp2(-tl.minimum(am1, 1.0) * tl.log2(N * 1.0)), -1.0)
        hi = -tl.exp2(-am1 * tl.log2(N * 1.0))
        tau = lo
        err = zero + float("inf")
        it = 0
        while (it < MAX_PASSES) & (tl.min(done.to(tl.int32), 0) == 0):
            for _ in tl.static_range(CHECK_EVERY):  # as thresholds.bisect_block_threshold: rounds, then a check
                sq = zero
                sq1 = zero
                for start_n in range(0, N, BLOCK_N):
                    if not ONE_TILE:
                        y_all = _scores(q, k_base, start_n, N, D, skn, skd, scaling, m, BLOCK_N, BLOCK_D, PRECISION)
                    d = tl.maximum(y_all * am1[:, None] - tau[:, None], 0.0)
                    d_q1 = tl.where(d > 0, tl.exp2(tl.log2(d) * ((1.0 - am1) / am1)[:, None]), 0.0)  # d^(q-1)
                    sq += tl.sum(d_q1 * d, 1)
                    sq1 += tl.sum(d_q1, 1)
                above = sq >= 1
                lo = tl.where(above, tau, lo)
                hi = tl.where(above, hi, tau)
                err = tl.where(above, sq - 1, err)
                newton = tau + (sq - tl.exp2(tl.log2(sq) * (1.0 - am1))) / sq1
                tau = tl.where(above & (newton < hi) & (newton >= tau), newton, (lo + hi) * 0.5)
            done = done | (err <= tol) | (hi - lo <= tol * tl.abs(hi))
            it += CHECK_EVERY
        t = lo
    else:
        if TRANSFORM == 0:  # score units: t = 2 tau, tau >= max(-1, mean / 2 - N^-1/2)
            t = 2.0 * tl.maximum(mean * 0.5 - tl.sqrt(1.0 / N), -1.0)
        else:
            t = tl.maximum(mean - 1.0 / N, -1.0)
        u = t  # closed-form candidate of the previous pass, certified when its support count equals k_u
        k_u = zero - 1.0
        t_final = t
        it = 0
        while (it < MAX_PASSES) & (tl.min(done.to(tl.int32), 0) == 0):
            k = zero
            s1 = zero
            s2 = zero
            k_at_u = zero
            for start_n in range(0, N, BLOCK_N):
                if not ONE_TILE:
                    y_all = _scores(q, k_base, start_n, N, D, skn, skd, scaling, m, BLOCK_N, BLOCK_D, PRECISION)
                e = tl.maximum(y_all - t[:, None], 0.0)
                k += tl.sum(tl.where(e > 0, 1.0, 0.0), 1)
                s1 += tl.sum(e, 1)
                s2 += tl.sum(e * e, 1)
                k_at_u += tl.sum(tl.where(y_all > u[:, None], 1.0, 0.0), 1)
            certified = (k_at_u == k_u) & (~done)
            t_final = tl.where(certified, u, t_final)
            done = done | certified
            mean_e = s1 / k
            if TRANSFORM == 0:
                # smaller root of k w^2 - 2 s1 w + s2 - 4 = 0 (sum over the support of (e - w)^2 = 4)
                u_next = t + mean_e - tl.sqrt(tl.maximum((4.0 - s2 + s1 * mean_e) / k, 0.0))
                norm = tl.sqrt(s2) * 0.5  # ||d||_2, d = e / 2; Newton on ||d||_2 - 1
                t_next = tl.maximum(t, tl.minimum(t + 4.0 * norm * (norm - 1.0) / s1, u_next))
            else:
                u_next = t + (s1 - 1.0) / k  # Michelot: the closed form on the support is also the Newton step
                t_next = tl.maximum(t, u_next)
            t = tl.where(done, t, t_next)
            u = tl.where(done, u, u_next)
            k_u = tl.where(done, k_u, k)
            it += 1
        t = tl.where(done, t_final, u)  # open after MAX_PASSES: the converged closed form

    # last pass: out = P V (alpha-entmax: normalised by z = sum (x - tau)_+^q, accumulated alongside)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    z_acc = zero
    for start_n in range(0, N, BLOCK_N):
        if not ONE_TILE:
            y_all = _scores(q, k_base, start_n, N, D, skn, skd, scaling, m, BLOCK_N, BLOCK_D, PRECISION)
        cols = start_n + tl.arange(0, BLOCK_N)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd,
                    mask=(cols[:, None] < N) & (offs_d[None, :] < D), other=0.0)  # (BLOCK_N, BLOCK_D)
        p, _ = _probs(y_all, t, z, am1, TRANSFORM)  # z = 1 here: unnormalised for alpha-entmax
        z_acc += tl.sum(p, 1)
        acc += _dot(p.to(v.dtype), v, PRECISION)
    if TRANSFORM == 2:
        acc = acc / z_acc[:, None]
    tl.store(Z + bh * N + rows, z_acc, mask=row_ok)  # every row state defined: z, or sum P (1 up to rounding)
    tl.store(Out + b * sob + h * soh + rows[:, None] * son + offs_d[None, :] * sod, acc.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))
    tl.store(M + bh * N + rows, m, mask=row_ok)
    tl.store(T + bh * N + rows, t, mask=row_ok)


@triton.jit
def _row_state(Alpha, M, T, Z, bh, rows, row_ok, N, TRANSFORM: tl.constexpr):
    m = tl.load(M + bh * N + rows, mask=row_ok, other=0.0)
    t = tl.load(T + bh * N + rows, mask=row_ok, other=0.0)
    if TRANSFORM == 2:
        z = tl.load(Z + bh * N + rows, mask=row_ok, other=1.0)
        am1 = tl.load(Alpha + bh * N + rows, mask=row_ok, other=1.5) - 1.0
    else:
        z = m * 0.0 + 1.0
        am1 = z
    return m, t, z, am1


@triton.jit
def _bwd_dq(Q, K, V, DO, Alpha, M, T, Z, DQ, Delta, DAlpha,
            sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, H, N, D, scaling,
            TRANSFORM: tl.constexpr, NEED_ALPHA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dQ and delta = sum(g dP) / sum(g) per row (read by _bwd_dkdv); alpha-entmax: d alpha per row."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    tile_mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd, mask=tile_mask, other=0.0)
    do = tl.load(DO + bh * N * D + rows[:, None] * D + offs_d[None, :], mask=tile_mask, other=0.0).to(q.dtype)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    m, t, z, am1 = _row_state(Alpha, M, T, Z, bh, rows, row_ok, N, TRANSFORM)
    zero = m * 0.0
    g_sum = zero
    gdp_sum = zero
    pdp_sum = zero
    plogp_sum = zero
    plogp_dp_sum = zero
    for start_n in range(0, N, BLOCK_N):
        y = _scores(q, k_base, start_n, N, D, skn, skd, scaling, m, BLOCK_N, BLOCK_D, PRECISION)
        p, g = _probs(y, t, z, am1, TRANSFORM)
        cols = start_n + tl.arange(0, BLOCK_N)
        v_t = tl.load(v_base + cols[None, :] * svn + offs_d[:, None] * svd,
                      mask=(cols[None, :] < N) & (offs_d[:, None] < D), other=0.0)
        dp = _dot(do, v_t, PRECISION)  # dL/dP (BLOCK_M, BLOCK_N)
        g_sum += tl.sum(g, 1)
        gdp_sum += tl.sum(g * dp, 1)
        if NEED_ALPHA:
            plogp = tl.where(p > 0, p * tl.log(tl.maximum(p, 1e-38)), 0.0)
            pdp_sum += tl.sum(p * dp, 1)
            plogp_sum += tl.sum(plogp, 1)
            plogp_dp_sum += tl.sum(plogp * dp, 1)
    delta = gdp_sum / g_sum
    tl.store(Delta + bh * N + rows, delta, mask=row_ok)
    if NEED_ALPHA:  # sum_j dP_j [(p_j - g_j / G) / am1^2 - (plogp_j - g_j / G PL) / am1]
        dalpha = (pdp_sum - delta) / (am1 * am1) - (plogp_dp_sum - delta * plogp_sum) / am1
        tl.store(DAlpha + bh * N + rows, dalpha, mask=row_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        y = _scores(q, k_base, start_n, N, D, skn, skd, scaling, m, BLOCK_N, BLOCK_D, PRECISION)
        p, g = _probs(y, t, z, am1, TRANSFORM)
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < N) & (offs_d[None, :] < D)
        v_t = tl.load(v_base + cols[None, :] * svn + offs_d[:, None] * svd,
                      mask=(cols[None, :] < N) & (offs_d[:, None] < D), other=0.0)
        dp = _dot(do, v_t, PRECISION)
        ds = g * (dp - delta[:, None])
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    tl.store(DQ + bh * N * D + rows[:, None] * D + offs_d[None, :], dq * scaling, mask=tile_mask)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, Alpha, M, T, Z, Delta, DK, DV,
              sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, H, N, D, scaling,
              TRANSFORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr):
    """One program per key block: dK = scaling dS^T Q and dV = P^T dO summed over every query block."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < N
    kv_mask = col_ok[:, None] & (offs_d[None, :] < D)
    k_t = tl.load(K + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None] * skd,
                  mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)  # (BLOCK_D, BLOCK_N)
    v_t = tl.load(V + b * svb + h * svh + cols[None, :] * svn + offs_d[:, None] * svd,
                  mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        tile_mask = row_ok[:, None] & (offs_d[None, :] < D)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd, mask=tile_mask, other=0.0)
        do = tl.load(DO + bh * N * D + rows[:, None] * D + offs_d[None, :], mask=tile_mask, other=0.0).to(q.dtype)
        m, t, z, am1 = _row_state(Alpha, M, T, Z, bh, rows, row_ok, N, TRANSFORM)
        delta = tl.load(Delta + bh * N + rows, mask=row_ok, other=0.0)
        s = _dot(q, k_t, PRECISION) * scaling
        y = tl.where(row_ok[:, None] & col_ok[None, :], s - m[:, None], float("-inf"))
        p, g = _probs(y, t, z, am1, TRANSFORM)  # (BLOCK_M, BLOCK_N); zero outside the valid rows and keys
        dp = _dot(do, v_t, PRECISION)
        ds = g * (dp - delta[:, None])
        dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)
    base = bh * N * D + cols[:, None] * D + offs_d[None, :]
    tl.store(DK + base, dk * scaling, mask=kv_mask)
    tl.store(DV + base, dv, mask=kv_mask)


def _pow2(x: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(x))


def block_sizes(n: int, d: int) -> dict:
    """The launch configuration without the autotuner (triton's interpreter, tests)."""
    one_tile = n <= ONE_TILE_MAX
    block_n = _pow2(n) if one_tile else 64
    block_m = 32 if (one_tile and block_n >= 256) or d > 64 else 64
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, ONE_TILE=one_tile, num_warps=8 if block_n >= 128 else 4)


# Autotuning (CUDA): all keys in registers while BLOCK_M x pow2(N) float32 fits, else QK^T recomputed per pass.
def _fwd_configs() -> list:
    one_tile = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "ONE_TILE": True}, num_warps=4 if m * n <= 4096 else 8)
                for n in (16, 32, 64, 128, 256, 512, 1024) for m in (16, 32, 64) if m * n <= 16384]
    recompute = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "ONE_TILE": False}, num_warps=w, num_stages=2)
                 for m in (64, 128) for n in (32, 64, 128) for w in (4, 8)]
    return one_tile + recompute


def prune_fwd_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Candidates that fit N: one tile of exactly pow2(N) keys, plus shorter key tiles when N > ONE_TILE_MAX."""
    n = named_args["N"]
    one = [c for c in configs if c.kwargs["ONE_TILE"] and c.kwargs["BLOCK_N"] == _pow2(n)]
    tiled = [c for c in configs if not c.kwargs["ONE_TILE"] and c.kwargs["BLOCK_N"] < n]
    return one + (tiled if n > ONE_TILE_MAX or not one else [])


def _bwd_configs(rows: tuple[int, ...], keys: tuple[int, ...]) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": k}, num_warps=w, num_stages=2)
            for m in rows for k in keys for w in (4, 8)]


@lru_cache(maxsize=None)
def tuned_kernels() -> dict:
    """Built on first CUDA use (the autotuner needs a GPU)."""
    key = ["N", "D", "TRANSFORM"]
    return {
        "fwd": triton.autotune(_fwd_configs(), key=key, prune_configs_by={"early_config_prune": prune_fwd_configs})(_fwd),
        "dq": triton.autotune(_bwd_configs((32, 64, 128), (32, 64)), key=key)(_bwd_dq),
        "dkdv": triton.autotune(_bwd_configs((32, 64), (32, 64, 128)), key=key)(_bwd_dkdv),
    }


def autotuned(query: torch.Tensor) -> bool:
    """CUDA launches take the autotuner's configuration (triton's interpreter has no timer)."""
    return query.is_cuda


def _launch(name: str, grid, cfg: Optional[dict], *args, **meta) -> None:
    if cfg is None:
        tuned_kernels()[name][lambda config: grid(config)](*args, **meta)
    else:
        {"fwd": _fwd, "dq": _bwd_dq, "dkdv": _bwd_dkdv}[name][grid(cfg)](*args, **meta, **cfg)


class _TritonEntmax(torch.autograd.Function):
    """out = P V over (B, H, N, d); saves Q, K, V and the per-row (m, t[, z]) only."""

    @staticmethod
    def forward(ctx, query, key, value, alpha_rows, transform: str, scaling: float, blocks: Optional[dict]):
        batch, heads, n, d = query.shape
        tid = TRANSFORM_IDS[transform]
        blocks = dict(blocks or {})
        max_passes = blocks.pop("MAX_PASSES", BISECT_MAX_ITER if tid == 2 else MAX_CERTIFY_PASSES)
        cfg = None  # CUDA without an explicit configuration: the autotuner's
        if blocks or not autotuned(query):
            cfg = dict(block_sizes(n, d), **blocks)
            cfg["ONE_TILE"] = cfg["BLOCK_N"] >= n
        precision = "ieee" if query.dtype == torch.float32 else "tf32"
        if not query.is_cuda and query.dtype == torch.bfloat16:
            precision = "upcast"  # the interpreter's bfloat16 dot (see _dot)
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
        state = torch.empty(3, batch * heads, n, device=query.device, dtype=torch.float32)  # m, t, z
        _launch("fwd", lambda c: (triton.cdiv(n, c["BLOCK_M"]), batch * heads), cfg,
                query, key, value, alpha_rows, out, state[0], state[1], state[2],
                *query.stride(), *key.stride(), *value.stride(), *out.stride(),
                heads, n, d, scaling, 4 * torch.finfo(torch.float32).eps,
                TRANSFORM=tid, MAX_PASSES=max_passes, PRECISION=precision, BLOCK_D=_pow2(d))
        ctx.save_for_backward(query, key, value, alpha_rows, state)
        ctx.transform, ctx.scaling, ctx.cfg, ctx.precision = tid, scaling, cfg, precision
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, alpha_rows, state = ctx.saved_tensors
        batch, heads, n, d = query.shape
        cfg = None
        if ctx.cfg is not None:  # the forward's tiles; the backward keeps several live: at most 64 keys
            cfg = {k: v for k, v in ctx.cfg.items() if k != "ONE_TILE"}
            if cfg["BLOCK_N"] > 64:
                cfg.update(BLOCK_N=64, num_warps=4)
        need_alpha = ctx.needs_input_grad[3]
        do = grad_out.contiguous()
        dq = torch.empty(batch, heads, n, d, device=query.device, dtype=torch.float32)
        dk, dv = torch.empty_like(dq), torch.empty_like(dq)
        delta = torch.empty(batch * heads, n, device=query.device, dtype=torch.float32)
        dalpha = torch.empty_like(delta) if need_alpha else delta
        common = (*query.stride(), *key.stride(), *value.stride(), heads, n, d, ctx.scaling)
        meta = dict(TRANSFORM=ctx.transform, PRECISION=ctx.precision, BLOCK_D=_pow2(d))
        _launch("dq", lambda c: (triton.cdiv(n, c["BLOCK_M"]), batch * heads), cfg,
                query, key, value, do, alpha_rows, state[0], state[1], state[2], dq, delta, dalpha, *common,
                NEED_ALPHA=need_alpha, **meta)
        _launch("dkdv", lambda c: (triton.cdiv(n, c["BLOCK_N"]), batch * heads), cfg,
                query, key, value, do, alpha_rows, state[0], state[1], state[2], delta, dk, dv, *common, **meta)
        grads = [g.to(query.dtype) for g in (dq, dk, dv)]
        return (*grads, dalpha.view(alpha_rows.shape) if need_alpha else None, None, None, None)


def triton_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, transform: str,
                     scaling: float, alpha=None, blocks: Optional[dict] = None) -> torch.Tensor:
    """Exact sparse attention ``transform(scaling q k^T) v`` in fused Triton kernels (self-attention, d <= 128).
    ``alpha`` as in ``tiled_attention``; ``blocks`` overrides the launch configuration (tests: ``MAX_PASSES``...)."""
    if transform not in TRANSFORM_IDS:
        raise ValueError(f"the triton kernel runs {SPARSE_TRANSFORMS}, not {transform!r}")
    if query.ndim != 4 or key.shape != query.shape or value.shape != query.shape:
        raise ValueError(f"the triton kernel needs query, key, value of one shape (B, H, N, d); got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if query.shape[-1] > 128:
        raise ValueError(f"the triton kernel supports head dims up to 128, not {query.shape[-1]}")
    if not (query.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        raise ValueError("the triton kernel needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the triton kernel takes float32/bfloat16/float16 inputs, not {query.dtype}; use the "
                         f"tiled kernel for float64")
    batch, heads, n, _ = query.shape
    alpha_rows = query.new_empty(1, dtype=torch.float32)  # placeholder for the fixed-alpha transforms
    if transform == "entmax_bisect":  # one alpha per row, (B*H, N); autograd sums back to alpha's shape
        alpha_rows = alpha_per_row(alpha, (batch, heads, n), query.device, torch.float32)[0].reshape(batch * heads, n)
        alpha_rows = alpha_rows.contiguous()  # the kernels index it densely (an expanded view has 0 strides)
    key, value = key.to(query.dtype), value.to(query.dtype)  # autocast may hand over mixed dtypes
    with torch.autocast(query.device.type, enabled=False):
        return _TritonEntmax.apply(query, key, value, alpha_rows, transform, scaling, blocks)
