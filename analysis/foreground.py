"""How well [CLS] attention picks out the foreground: DINO's "keep a share of the attention mass" maps, then
Jaccard (IoU) with a foreground mask (B, H, W): 0 = background, ``ignore_index`` (255) = unlabelled, counted in
neither the intersection nor the union, anything else = foreground."""

import torch
import torch.nn.functional as F

from .attention_metrics import Stats

# DINO's visualize_attention keeps the patches holding 60% of the [CLS] attention mass.
DINO_MASS_THRESHOLD = 0.6


def mass_threshold_mask(weights: torch.Tensor, mass: float = DINO_MASS_THRESHOLD) -> torch.Tensor:
    """Smallest set of largest entries holding at least ``mass`` of the total, over the last dim, as DINO's
    visualize_attention: an entry is kept while the sorted mass before it is below ``mass``; exact zeros never are.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass threshold must be in (0, 1], got {mass}")
    w = weights.float()
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
    sorted_w, order = torch.sort(w, dim=-1, descending=True)
    before = torch.cumsum(sorted_w, -1) - sorted_w  # mass of strictly larger-ranked entries
    keep_sorted = (before < mass) & (sorted_w > 0)
    keep = torch.zeros_like(keep_sorted)
    return keep.scatter(-1, order, keep_sorted)


def jaccard(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """IoU of boolean maps over the last two dims: (..., H, W) -> (...); NaN where the union is empty."""
    if valid is not None:
        pred, target = pred & valid, target & valid
    inter = (pred & target).flatten(-2).sum(-1).float()
    union = (pred | target).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))


def cls_attention_maps(attn: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """[CLS] query attention to the patches as maps: (B, H, T, T) -> (B, heads, h, w)."""
    h, w = grid
    return attn[:, :, 0, prefix:].reshape(attn.shape[0], attn.shape[1], h, w)


def upsample_to(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of (B, C, h, w) maps (bool or float) to ``size`` = (H, W)."""
    out = F.interpolate(maps.float(), size=size, mode="nearest")
    return out.bool() if maps.dtype == torch.bool else out


def foreground_statistics(attn: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int], prefix: int = 1,
                          mass: float = DINO_MASS_THRESHOLD, ignore_index: int = 255) -> Stats:
    """Running sums of ``fg_jaccard_head_<i>`` and ``fg_jaccard_head_avg_map`` (the head-averaged map, thresholded):
    Jaccard of thresholded [CLS] attention with the foreground of ``masks``; images without foreground are skipped."""
    if masks.ndim != 3 or masks.shape[0] != attn.shape[0]:
        raise ValueError(f"masks must be (batch={attn.shape[0]}, H, W), got shape {tuple(masks.shape)}")
    maps = cls_attention_maps(attn.float(), grid, prefix)  # (B, heads, h, w)
    heads = maps.shape[1]
    size = tuple(masks.shape[-2:])
    fg = (masks != 0) & (masks != ignore_index)  # (B, H, W)
    valid = masks != ignore_index
    keep = mass_threshold_mask(maps.flatten(2), mass).reshape(maps.shape)  # (B, heads, h, w)
    keep_avg = mass_threshold_mask(maps.mean(1).flatten(1), mass).reshape(maps.shape[0], 1, *grid)
    per_head = jaccard(upsample_to(keep, size), fg[:, None], valid[:, None])  # (B, heads)
    avg = jaccard(upsample_to(keep_avg, size), fg[:, None], valid[:, None])[:, 0]  # (B,)
    has_fg = fg.flatten(1).any(1)  # (B,)
    stats: Stats = {}
    for i in range(heads):
        v = per_head[:, i][has_fg]
        stats[f"fg_jaccard_head_{i}"] = (float(v.nansum()), float((~v.isnan()).sum()))
    v = avg[has_fg]
    stats["fg_jaccard_head_avg_map"] = (float(v.nansum()), float((~v.isnan()).sum()))
    return stats


def summarize_heads(metrics: dict[str, float]) -> dict[str, float]:
    """``fg_jaccard_best_head`` (DINO reports the best head), its index, and ``fg_jaccard_mean_head``."""
    per_head = {int(k.rsplit("_", 1)[1]): v for k, v in metrics.items() if k.startswith("fg_jaccard_head_") and k[-1].isdigit()}
    if not per_head:
        return {}
    best = max(per_head, key=per_head.get)
    return {
        "fg_jaccard_best_head": per_head[best],
        "fg_jaccard_best_head_index": float(best),
        "fg_jaccard_mean_head": sum(per_head.values()) / len(per_head),
    }
