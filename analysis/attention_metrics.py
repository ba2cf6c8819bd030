"""Per-layer statistics of attention probabilities ``attn`` (B, H, T, T), T = prefix ([CLS] + registers) + h * w
patches row-major: sparsity, support size, entropy, mean attention distance. Returned as running sums ``{name: (sum,
count)}`` so that batches accumulate exactly (``finalize`` turns them into means)."""

import math
from typing import Optional

import torch

from entmax_vit.modeling.attention import support_size

Stats = dict[str, tuple[float, float]]  # name -> (sum, count)


def patch_distance_matrix(h: int, w: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Euclidean distances between patch centres in patch units, (h*w, h*w), row-major patch order."""
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)  # (N,)
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)  # (N,)
    pos = torch.stack([rows, cols], dim=-1)  # (N, 2)
    return torch.cdist(pos, pos)  # (N, N)


def row_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of each attention row (0 log 0 = 0): (..., T) -> (...)."""
    plogp = torch.where(attn > 0, attn * torch.log(attn.clamp_min(1e-30)), torch.zeros_like(attn))
    return -plogp.sum(-1)


def attention_statistics(attn: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> tuple[Stats, torch.Tensor]:
    """Running sums of the attention metrics of one layer (defined in docs/analysis.md, "Metrics"; an
    attention_distance row with no mass on patch keys is skipped), and ``support_hist`` (T + 1,): rows (all heads,
    all queries) with exactly ``k`` non-zero entries, from which the median support is read exactly."""
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be (batch, heads, tokens, tokens), got shape {tuple(attn.shape)}")
    h, w = grid
    if attn.shape[-1] != prefix + h * w:
        raise ValueError(f"attention has {attn.shape[-1]} tokens but prefix {prefix} + grid {h}x{w} = {prefix + h * w}")
    attn = attn.float()
    batch, heads, tokens, _ = attn.shape
    nonzero = attn > 0  # (B, H, T, T)
    support = support_size(attn)  # (B, H, T): the project's one definition (modeling/attention.py)
    entropy = row_entropy(attn)  # (B, H, T)
    stats: Stats = {
        "attention_zero_share": (float((~nonzero).sum()), float(attn.numel())),
        "support_mean": (float(support.sum()), float(support.numel())),
        "cls_support_mean": (float(support[:, :, 0].sum()), float(batch * heads)),
        "cls_zero_share": (float((~nonzero[:, :, 0]).sum()), float(batch * heads * tokens)),
        "entropy": (float(entropy.sum()), float(entropy.numel())),
        "cls_entropy": (float(entropy[:, :, 0].sum()), float(batch * heads)),
    }
    patch_rows = attn[:, :, prefix:]  # (B, H, N, T)
    if patch_rows.shape[2] > 0:
        stats["patch_entropy"] = (float(entropy[:, :, prefix:].sum()), float(entropy[:, :, prefix:].numel()))
        to_prefix = patch_rows[..., :prefix].sum(-1)  # (B, H, N)
        stats["patch_to_prefix_mass"] = (float(to_prefix.sum()), float(to_prefix.numel()))
        dist = patch_distance_matrix(*grid, device=attn.device)  # (N, N)
        p2p = patch_rows[..., prefix:]  # (B, H, N, N)
        mass = p2p.sum(-1)  # (B, H, N)
        valid = mass > 0
        row_dist = torch.where(valid, (p2p * dist).sum(-1) / mass.clamp_min(1e-30), torch.zeros_like(mass))
        stats["attention_distance"] = (float(row_dist.sum()), float(valid.sum()))
        per_head_sum = row_dist.sum(dim=(0, 2))  # (H,)
        per_head_cnt = valid.sum(dim=(0, 2))  # (H,)
        for i in range(heads):
            stats[f"attention_distance_head_{i}"] = (float(per_head_sum[i]), float(per_head_cnt[i]))
    hist = torch.bincount(support.flatten().cpu(), minlength=tokens + 1)[: tokens + 1]
    return stats, hist


def median_from_histogram(hist: torch.Tensor) -> float:
    """Lower median of integer values given their histogram (``hist[k]`` = count of value k)."""
    total = int(hist.sum())
    if total == 0:
        return math.nan
    cum = torch.cumsum(hist, 0)
    return float(torch.nonzero(cum >= (total + 1) // 2)[0, 0])


def finalize(stats: Stats) -> dict[str, float]:
    """Means from running sums; metrics with no valid entries are left out."""
    return {k: s / c for k, (s, c) in stats.items() if c > 0}
