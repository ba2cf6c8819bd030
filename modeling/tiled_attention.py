"""Tiled exact sparse attention at the memory cost of softmax SDPA (EntmaxViT's docs/performance.md, "The tiled
kernel"): ``P V`` in cache-sized query blocks, keeping only the row max ``m``, threshold ``t`` (and alpha-entmax's
``z``); backward rebuilds each block's probabilities from them with the forward's arithmetic, hence bit-identical.
Hub code: imports only torch."""

from typing import Optional

import torch

from .thresholds import (BISECT_CHECK_EVERY, SPARSE_TRANSFORMS, alpha_gradient, alpha_per_row, block_probabilities,
                         jacobian_product, jacobian_weights)

# Max bytes of a block's float32 scores. CPU: with their work buffers they stay in cache (EntmaxViT's docs).
# CUDA: one block per layer for a ViT-S/16 DINO step at 224 px instead of thousands of launches.
BLOCK_BYTES = {"cpu": 2 * 2**20, "cuda": 256 * 2**20}
BLOCK_ROWS = 128  # preferred query rows per block on CPU (GEMM efficiency)
MIN_BLOCK_ROWS = 16  # below this the matmuls lose efficiency and the Python overhead per block dominates


def block_shape(batch_heads: int, n_keys: int, device_type: str = "cpu") -> tuple[int, int]:
    """(heads, rows) of a block over the flattened (B*H, N) query rows, its float32 scores within BLOCK_BYTES."""
    budget = BLOCK_BYTES.get(device_type, BLOCK_BYTES["cuda"])
    rows = n_keys if device_type != "cpu" else min(n_keys, BLOCK_ROWS)
    heads = budget // (4 * rows * n_keys)
    if heads == 0:
        rows = max(MIN_BLOCK_ROWS, min(rows, budget // (4 * n_keys)))
    return max(1, min(batch_heads, heads)), rows


def _block_scores(q_blk, key_t, out: Optional[torch.Tensor], m: Optional[torch.Tensor] = None):
    """y = q_blk key^T - row max (written into ``out`` if given), (G, Bq, N); returns (y, m). q_blk is scaled."""
    s = torch.matmul(q_blk, key_t) if out is None else torch.matmul(q_blk, key_t, out=out)
    if m is None:
        m = s.amax(dim=-1, keepdim=True)  # (G, Bq, 1)
    return s.sub_(m), m


def forward_block(q_blk, key_t, key_mean, value, alpha_blk, y_buf, e_buf, transform: str,
                  scalar_alpha: Optional[float], newton_steps: Optional[int] = None,
                  check_every: int = BISECT_CHECK_EVERY):
    """One block of the forward: P V and the per-row state (m, t, z). q_blk (G, Bq, d) scaled; key_t (G, d, N);
    key_mean (G, d, 1); value (G, N, e); alpha_blk (G, Bq, 1) or None; y_buf, e_buf: (G, Bq, N) or None."""
    y, m = _block_scores(q_blk, key_t, y_buf)  # (G, Bq, N), (G, Bq, 1)
    mean = torch.matmul(q_blk, key_mean) - m  # (G, Bq, 1), row mean of y
    t, w, z = block_probabilities(y, e_buf, mean, transform, alpha_blk, scalar_alpha,
                                  lambda: torch.matmul(q_blk, key_t) - m, newton_steps, check_every)
    return torch.matmul(w, value).div_(z), m, t, z


def backward_block(q_blk, do_blk, key, key_t, value_t, m_blk, t_blk, z_blk, alpha_blk, dk, dv, y_buf, dp_buf,
                   transform: str, scalar_alpha: Optional[float], need_alpha: bool, scaling: float):
    """One block of the backward: adds its share to ``dk``, ``dv`` (G, N, d); returns (dq_blk, dalpha_blk)."""
    y, _ = _block_scores(q_blk, key_t, y_buf, m_blk)  # the forward's arithmetic: bit-identical probabilities
    dp = torch.matmul(do_blk, value_t) if dp_buf is None else torch.matmul(do_blk, value_t, out=dp_buf)  # dL/dP
    dalpha = None
    if transform == "entmax15":
        g = y.sub_(t_blk).clamp_min_(0).mul_(0.5)  # g = sqrt(p) = (y - t)_+ / 2
        ds = jacobian_product(g, dp, inplace=True)
        dv.baddbmm_(g.mul_(g).transpose(-2, -1), do_blk)  # p = g^2
    elif transform == "sparsemax":
        p = y.sub_(t_blk).clamp_min_(0)
        dv.baddbmm_(p.transpose(-2, -1), do_blk)
        ds = jacobian_product(p.sign_(), dp, inplace=True)  # g = 1 on the support
    else:
        am1 = alpha_blk - 1
        exponent = 1.0 / (scalar_alpha - 1.0) if scalar_alpha is not None else 1.0 / am1
        p = torch.clamp(y.mul_(am1) - t_blk, min=0) ** exponent / z_blk
        g = jacobian_weights(p, transform, scalar_alpha if scalar_alpha is not None else alpha_blk)
        if need_alpha:
            dalpha = alpha_gradient(p, g, dp, am1)
        ds = jacobian_product(g, dp, inplace=True)
        dv.baddbmm_(p.transpose(-2, -1), do_blk)
    dk.baddbmm_(ds.transpose(-2, -1), q_blk)  # q_blk carries the scaling
    return torch.matmul(ds, key).mul_(scaling), dalpha


def _blocks(batch_heads: int, n: int, heads: int, rows: int):
    row_slices = [slice(r, r + rows) for r in range(0, n, rows)]
    return [(slice(g, g + heads), row_slices) for g in range(0, batch_heads, heads)]


def _cat_blocks(results: list[list[tuple]], item: int) -> torch.Tensor:
    return torch.cat([torch.cat([r[item] for r in group], dim=1) for group in results], dim=0)


def _work_buffers(like: torch.Tensor, block: tuple[int, int], n: int):
    """``views(q_blk)``: two (G, Bq, N) work buffers reused by every block of one call (views for edge blocks)."""
    size = min(block[0], like.shape[0]) * min(block[1], like.shape[1]) * n
    flat = [like.new_empty(size), like.new_empty(size)]
    return lambda q_blk: [buf[: q_blk.shape[0] * q_blk.shape[1] * n].view(*q_blk.shape[:2], n) for buf in flat]


class _TiledEntmax(torch.autograd.Function):
    """out = P V over (B*H, N, d) tensors in (heads, rows) blocks; saves Q, K, V and the per-row (m, t[, z])."""

    @staticmethod
    def forward(ctx, query, key, value, alpha_rows, transform: str, scaling: float, block: tuple[int, int],
                scalar_alpha: Optional[float]):
        n, bisect = key.shape[1], transform == "entmax_bisect"
        key_t = key.transpose(-2, -1)  # (BH, d, N)
        key_mean = key.mean(dim=-2).unsqueeze(-1)  # (BH, d, 1): a row mean of the scores is q . mean(k)
        views = _work_buffers(query, block, n)

        def run(heads: slice, rows: slice) -> tuple:  # (out, m, t, z) of one block
            q_blk = query[heads, rows] * scaling  # (G, Bq, d)
            return forward_block(q_blk, key_t[heads], key_mean[heads], value[heads],
                                 alpha_rows[heads, rows] if bisect else None, *views(q_blk), transform,
                                 scalar_alpha)

        # unrolled when captured
        results = [[run(heads, rows) for rows in row_slices] for heads, row_slices in _blocks(*query.shape[:2], *block)]
        state = [_cat_blocks(results, i) for i in ((1, 2, 3) if bisect else (1, 2))]  # m, t[, z]
        ctx.save_for_backward(query, key, value, alpha_rows, *state)
        ctx.transform, ctx.scaling, ctx.block, ctx.scalar_alpha = transform, scaling, block, scalar_alpha
        return _cat_blocks(results, 0)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, alpha_rows, m, t, *z = ctx.saved_tensors
        bisect, need_alpha = ctx.transform == "entmax_bisect", ctx.needs_input_grad[3]
        n = key.shape[1]
        grad_out = grad_out.contiguous()
        key_t, value_t = key.transpose(-2, -1), value.transpose(-2, -1)
        views = _work_buffers(query, ctx.block, n)

        def run(heads: slice, rows: slice, dk: torch.Tensor, dv: torch.Tensor) -> tuple:  # (dq, dalpha) of one block
            q_blk = query[heads, rows] * ctx.scaling  # (G, Bq, d)
            return backward_block(
                q_blk, grad_out[heads, rows], key[heads], key_t[heads], value_t[heads], m[heads, rows],
                t[heads, rows], z[0][heads, rows] if bisect else None, alpha_rows[heads, rows] if bisect else None,
                dk, dv, *views(q_blk), ctx.transform, ctx.scalar_alpha, need_alpha, ctx.scaling)

        results, dks, dvs = [], [], []
        with torch.autocast(grad_out.device.type, enabled=False):  # float32 matmuls, as the forward
            for heads, row_slices in _blocks(*query.shape[:2], *ctx.block):
                dk, dv = torch.zeros_like(key[heads]), torch.zeros_like(value[heads])  # (G, N, d), summed over blocks
                results.append([run(heads, rows, dk, dv) for rows in row_slices])
                dks.append(dk)
                dvs.append(dv)
        dalpha = _cat_blocks(results, 1) if need_alpha else None
        return _cat_blocks(results, 0), torch.cat(dks), torch.cat(dvs), dalpha, None, None, None, None


def tiled_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, transform: str, scaling: float,
                    alpha=None, block: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Exact sparse attention ``transform(scaling q k^T) v`` in blocks, half precision computed in float32.
    ``alpha`` (entmax_bisect): None (1.5), a float, or a tensor broadcastable to (B, H, N, 1), e.g. (H, 1, 1) per
    head; gradients flow to it. ``block``: (heads, rows), default ``block_shape``."""
    if transform not in SPARSE_TRANSFORMS:
        raise ValueError(f"tiled_attention supports {SPARSE_TRANSFORMS}, not {transform!r}")
    if (query.ndim != 4 or key.shape[:-1] != value.shape[:-1]
            or query.shape[:2] + query.shape[3:] != key.shape[:2] + key.shape[3:]):
        raise ValueError(f"expected query (B, H, N, d), key (B, H, M, d), value (B, H, M, e); got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    dtype = query.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    batch, heads, n_q, _ = query.shape
    block = block or block_shape(batch * heads, key.shape[-2], query.device.type)
    alpha_rows, scalar_alpha = query.new_empty(0, dtype=compute), None  # placeholder for fixed-alpha transforms
    if transform == "entmax_bisect":
        alpha_rows, scalar_alpha = alpha_per_row(alpha, (batch, heads, n_q), query.device, compute)
        alpha_rows = alpha_rows.reshape(batch * heads, n_q, 1)

    def rows(x: torch.Tensor) -> torch.Tensor:  # (B, H, N, d) -> (B*H, N, d) in the compute dtype
        return x.to(compute).reshape(batch * heads, *x.shape[-2:])

    with torch.autocast(query.device.type, enabled=False):  # the kernel's matmuls stay in float32
        out = _TiledEntmax.apply(rows(query), rows(key), rows(value), alpha_rows, transform, scaling, block,
                                 scalar_alpha)
    return out.view(batch, heads, n_q, value.shape[-1]).to(dtype)
