"""Per-layer token statistics: norms with high-norm outliers, and cosine similarities of patch tokens to [CLS], to
their 4-connected neighbours and to each other ("semantic diffusion": global semantics spread through every patch
make patches alike far beyond their neighbourhood). Features (B, T, D), ``prefix`` tokens then h * w patches."""

import torch
import torch.nn.functional as F

from .attention_metrics import Stats

# 1.4826 * MAD estimates the standard deviation of normally distributed values, so ``k`` reads as "robust
# standard deviations above the median".
MAD_TO_STD = 1.4826
# Robust standard deviations above the median that make a token "high-norm": far in the tail for the bulk of
# patch tokens, while the artefact tokens of long-trained ViTs sit well beyond it.
DEFAULT_OUTLIER_K = 6.0


def high_norm_threshold(norms: torch.Tensor, k: float = DEFAULT_OUTLIER_K) -> float:
    """Outlier threshold ``median + k * 1.4826 * MAD`` of a set of token norms (any shape): a robust form of the
    criterion of "Vision Transformers Need Registers" (Darcet et al. 2024), scale-free, so it works for any model
    width without a hand-set absolute norm."""
    if k <= 0:
        raise ValueError(f"outlier k must be > 0, got {k}")
    flat = norms.detach().float().flatten()
    if flat.numel() == 0:
        raise ValueError("no token norms to threshold")
    median = flat.median()
    mad = (flat - median).abs().median()
    return float(median + k * MAD_TO_STD * mad)


def similarity_statistics(features: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> Stats:
    """Running sums of ``cos_to_cls``, ``cos_neighbors``, ``cos_pairwise`` and ``locality_contrast`` (per image)
    of (B, T, D) features (definitions: docs/analysis.md, "Metrics")."""
    h, w = grid
    if features.ndim != 3 or features.shape[1] != prefix + h * w:
        raise ValueError(f"features must be (batch, {prefix} + {h}*{w} tokens, dim), got shape {tuple(features.shape)}")
    batch = features.shape[0]
    x = F.normalize(features.float(), dim=-1)
    cls, patches = x[:, 0], x[:, prefix:]  # (B, D), (B, N, D)
    n = patches.shape[1]
    to_cls = (patches * cls[:, None]).sum(-1)  # (B, N)
    stats: Stats = {"cos_to_cls": (float(to_cls.sum()), float(to_cls.numel()))}
    grid_x = patches.reshape(batch, h, w, -1)
    horiz = (grid_x[:, :, 1:] * grid_x[:, :, :-1]).sum(-1).flatten(1)  # (B, h*(w-1))
    vert = (grid_x[:, 1:] * grid_x[:, :-1]).sum(-1).flatten(1)  # (B, (h-1)*w)
    neigh = torch.cat([horiz, vert], dim=1)  # (B, pairs)
    if neigh.shape[1] > 0:
        stats["cos_neighbors"] = (float(neigh.sum()), float(neigh.numel()))
    if n > 1:
        gram = patches @ patches.transpose(1, 2)  # (B, N, N)
        off_diag = (gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)) / (n * (n - 1))  # (B,)
        stats["cos_pairwise"] = (float(off_diag.sum()), float(batch))
        if neigh.shape[1] > 0:
            contrast = neigh.mean(1) - off_diag
            stats["locality_contrast"] = (float(contrast.sum()), float(batch))
    return stats


def norm_metrics(patch_norms: torch.Tensor, cls_norms: torch.Tensor, k: float = DEFAULT_OUTLIER_K) -> dict[str, float]:
    """The ``norm_*`` and ``outlier_*`` metrics of one layer (docs/analysis.md) from pooled norms: ``patch_norms``
    (num_images, N), ``cls_norms`` (num_images,). ``outlier_norm_ratio`` is 0 when there is no outlier."""
    patch_norms = patch_norms.float()
    threshold = high_norm_threshold(patch_norms, k)
    outliers = patch_norms > threshold  # (I, N)
    median = float(patch_norms.median())
    ratio = float(patch_norms[outliers].mean() / median) if outliers.any() and median > 0 else 0.0
    return {
        "norm_patch_mean": float(patch_norms.mean()),
        "norm_patch_median": median,
        "norm_cls_mean": float(cls_norms.float().mean()),
        "outlier_threshold": threshold,
        "outlier_count": float(outliers.sum(1).float().mean()),
        "outlier_share": float(outliers.float().mean()),
        "outlier_norm_ratio": ratio,
    }
