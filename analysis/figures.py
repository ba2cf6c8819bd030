"""PNG figures of the analysis, drawn on bare matplotlib Figures, never pyplot: a Figure renders with Agg whatever
backend pyplot would pick (on a desktop pyplot starts a GUI toolkit, which fails off the main thread) and joins no
global figure list."""

import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn

from entmax_vit.modeling import IMAGENET_MEAN, IMAGENET_STD

from .foreground import DINO_MASS_THRESHOLD, cls_attention_maps, mass_threshold_mask, upsample_to
from .per_layer import PerLayerMetrics, forward_with_internals, resolve_backbone, token_layout

def to_display(pixel_values: torch.Tensor) -> np.ndarray:
    """Undo normalisation: (3, H, W) tensor -> (H, W, 3) float array in [0, 1]."""
    x = pixel_values.detach().float().cpu()
    x = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def _as_batch(image: torch.Tensor) -> torch.Tensor:
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected an image tensor (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
    return image


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


@torch.no_grad()
def save_attention_maps(model: nn.Module, image_tensor: torch.Tensor, path: str | os.PathLike, *, layer: int = -1,
                        mass: Optional[float] = DINO_MASS_THRESHOLD) -> Path:
    """PNG of one image's (3, H, W) per-head [CLS] attention: row 1 the image, each head's map (nearest-upsampled,
    own colour scale) and the head mean; row 2 (``mass`` set) the image masked to the patches holding ``mass`` of
    each map (DINO's thresholded maps)."""
    x = _as_batch(image_tensor)[:1]
    prefix, grid = token_layout(model, x)
    attentions, _, _ = forward_with_internals(model, x)
    attn = attentions[layer].float().cpu()  # (1, heads, T, T)
    maps = cls_attention_maps(attn, grid, prefix)[0]  # (heads, h, w)
    maps = torch.cat([maps, maps.mean(0, keepdim=True)])  # (heads + 1, h, w)
    size = tuple(x.shape[-2:])
    up = upsample_to(maps[None], size)[0].numpy()  # (heads + 1, H, W)
    image = to_display(x[0])
    heads = maps.shape[0] - 1
    rows = 2 if mass is not None else 1
    cols = heads + 2
    fig = Figure(figsize=(2.2 * cols, 2.3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    layer_name = len(attentions) - 1 if layer == -1 else layer
    titles = ["image"] + [f"head {i}" for i in range(heads)] + ["mean"]
    axes[0, 0].imshow(image)
    for j in range(heads + 1):
        axes[0, j + 1].imshow(up[j], cmap="inferno", interpolation="nearest")
    if mass is not None:
        keep = mass_threshold_mask(maps.flatten(1), mass).reshape(maps.shape)
        keep_up = upsample_to(keep[None], size)[0].numpy()  # (heads + 1, H, W) bool
        axes[1, 0].imshow(image)
        axes[1, 0].set_title(f"keep {mass:.0%} mass", fontsize=8)
        for j in range(heads + 1):
            axes[1, j + 1].imshow(image * keep_up[j][..., None] * 0.85 + 0.15 * image)
    for j, ax in enumerate(axes[0]):
        ax.set_title(titles[j], fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"[CLS] attention, layer {layer_name}", fontsize=9)
    return _save(fig, path)


def _pca_basis(features: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and top-k principal directions (D, k) of (M, D) features; signs fixed (largest loading positive)."""
    mu = features.mean(0)
    xc = features - mu
    cov = xc.T @ xc / max(features.shape[0] - 1, 1)  # (D, D)
    _, vecs = torch.linalg.eigh(cov.double())  # ascending eigenvalues
    basis = vecs[:, -k:].flip(-1).float()  # (D, k), largest first
    idx = basis.abs().argmax(0)
    signs = torch.sign(basis[idx, torch.arange(basis.shape[1])])
    signs[signs == 0] = 1
    return mu, basis * signs


@torch.no_grad()
def pca_rgb(model: nn.Module, images: torch.Tensor, *, layer: int = -1, foreground_only: bool = False,
            masks: Optional[torch.Tensor] = None, mass: float = DINO_MASS_THRESHOLD,
            feature_norm: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """PCA of patch features as RGB: ``(rgb (B, h, w, 3) in [0, 1], foreground (B, h, w) bool)``, fitted on the
    patches of all ``images`` (B, 3, H, W), with ``foreground_only`` on foreground patches only: from ``masks``
    (most pixels non-zero, non-255) or else the last layer's head-averaged [CLS] attention keeping ``mass``;
    background drawn black. Each component scaled by its 1st-99th percentile over the fitted patches."""
    images = _as_batch(images)
    prefix, (h, w) = token_layout(model, images)
    attentions, blocks, final_norm = forward_with_internals(model, images)
    feats = (final_norm(blocks[layer]) if feature_norm else blocks[layer]).float()[:, prefix:].cpu()  # (B, N, D)
    batch = feats.shape[0]
    if foreground_only:
        if masks is not None:
            m = masks.float()
            if m.ndim != 3 or m.shape[0] != batch:
                raise ValueError(f"masks must be (batch={batch}, H, W), got {tuple(masks.shape)}")
            fg = ((m != 0) & (m != 255)).float()[:, None]
            fg = torch.nn.functional.adaptive_avg_pool2d(fg, (h, w))[:, 0] > 0.5  # (B, h, w)
        else:
            maps = cls_attention_maps(attentions[-1].float().cpu(), (h, w), prefix).mean(1)  # (B, h, w)
            fg = mass_threshold_mask(maps.flatten(1), mass).reshape(batch, h, w)
        fg = fg.cpu()
        if not fg.any():
            raise ValueError("no foreground patches to fit the PCA on; use foreground_only=False")
    else:
        fg = torch.ones(batch, h, w, dtype=torch.bool)
    fit = feats[fg.reshape(batch, -1)]  # (M, D)
    if fit.shape[0] < 3:
        raise ValueError(f"need at least 3 patches to fit a 3-component PCA, got {fit.shape[0]}")
    mu, basis = _pca_basis(fit, 3)
    proj = (feats - mu) @ basis  # (B, N, 3)
    fitted = (fit - mu) @ basis
    lo = torch.quantile(fitted, 0.01, dim=0)
    hi = torch.quantile(fitted, 0.99, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    rgb = rgb * fg.reshape(batch, -1, 1)
    return rgb.reshape(batch, h, w, 3).numpy(), fg.numpy()


def save_pca_image(model: nn.Module, images: torch.Tensor, path: str | os.PathLike, **options) -> Path:
    """PNG of the images (top row) and their ``pca_rgb(model, images, **options)`` maps (bottom row)."""
    images = _as_batch(images)
    rgb, _ = pca_rgb(model, images, **options)
    layer = options.get("layer", -1)
    batch = images.shape[0]
    fig = Figure(figsize=(2.2 * batch, 4.6))
    axes = fig.subplots(2, batch, squeeze=False)
    for i in range(batch):
        axes[0, i].imshow(to_display(images[i]))
        axes[1, i].imshow(rgb[i], interpolation="nearest", extent=(0, images.shape[-1], images.shape[-2], 0))
    for ax in axes.flat:
        ax.axis("off")
    n_layers = resolve_backbone(model).config.num_hidden_layers
    name = n_layers - 1 if layer == -1 else layer
    where = ", foreground" if options.get("foreground_only") else ""
    fig.suptitle(f"PCA of patch features (layer {name}{where})", fontsize=9)
    return _save(fig, path)


def plot_layer_curves(runs: Mapping[str, PerLayerMetrics], out_dir: str | os.PathLike,
                      metrics: Optional[Iterable[str]] = None, separate: bool = False) -> list[Path]:
    """``layer_curves.png`` (one line per model), with ``separate`` also ``curve_<metric>.png``; overview first."""
    if not runs:
        raise ValueError("plot_layer_curves needs at least one {name: per_layer_metrics} entry")
    out = Path(out_dir)
    if metrics is None:  # every metric of any run except per-head entries and bookkeeping indices
        found = {name for per_layer in runs.values() for values in per_layer.values() for name in values}
        skip = ("_head_", "best_head_index", "outlier_threshold")
        metrics = sorted(n for n in found if not any(s in n for s in skip) or n.endswith("_head_avg_map"))
    names = list(metrics)
    if not names:
        raise ValueError("no metrics to plot")

    def draw(ax: Axes, metric: str) -> None:
        for label, per_layer in runs.items():
            layers = [l for l in sorted(per_layer) if metric in per_layer[l]]
            if layers:
                ax.plot(layers, [per_layer[l][metric] for l in layers], marker="o", ms=3, label=label)
        ax.set_title(metric, fontsize=8)
        ax.set_xlabel("layer", fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)

    cols = 4
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, metric in zip(axes.flat, names):
        draw(ax, metric)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=max(len(labels), 1), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / rows))
    paths = [_save(fig, out / "layer_curves.png")]
    for metric in names if separate else []:
        fig = Figure(figsize=(4.5, 3.2))
        ax = fig.subplots()
        draw(ax, metric)
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / f"curve_{metric.replace('/', '_')}.png"))
    return paths


def plot_head_distances(runs: Mapping[str, PerLayerMetrics], path: str | os.PathLike) -> Path:
    """Mean attention distance of every head over layers, one colour per model (the ViT paper's figure)."""
    if not runs:
        raise ValueError("plot_head_distances needs at least one {name: per_layer_metrics} entry")
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    offsets = np.linspace(-0.15, 0.15, len(runs)) if len(runs) > 1 else [0.0]
    for (label, per_layer), dx in zip(runs.items(), offsets):
        xs, ys = [], []
        for layer in sorted(per_layer):
            heads = [v for k, v in per_layer[layer].items() if k.startswith("attention_distance_head_")]
            xs += [layer + dx] * len(heads)
            ys += heads
        if xs:
            ax.scatter(xs, ys, s=12, alpha=0.8, label=label)
    if not ax.collections:  # no model had per-head distances
        raise ValueError("no attention_distance_head_<i> metrics to plot")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean attention distance (patches)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
