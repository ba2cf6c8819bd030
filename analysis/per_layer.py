"""``analyze_model``: every semantic-diffusion metric, per layer, for a ViT (EntmaxViT, a model wrapping one, or any
ViT with ``output_attentions`` / ``output_hidden_states`` and ``config.patch_size``) on a set of images. Norms are
taken on the raw residual stream (LayerNorm would hide high-norm artefacts), cosines on what a probe sees."""

from collections import defaultdict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .attention_metrics import attention_statistics, finalize, median_from_histogram
from .foreground import DINO_MASS_THRESHOLD, foreground_statistics, summarize_heads
from .token_metrics import DEFAULT_OUTLIER_K, norm_metrics, similarity_statistics

PerLayerMetrics = dict[int, dict[str, float]]


def resolve_backbone(model: nn.Module) -> nn.Module:
    """The bare encoder of ``model``: itself, or its ``base_model_prefix`` attribute (e.g. ``.entmax_vit``)."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    base = inner if isinstance(inner, nn.Module) else model
    if not hasattr(base, "config") or not hasattr(base.config, "patch_size"):
        raise ValueError(f"{type(model).__name__} is not a ViT with config.patch_size; pass an EntmaxViT model")
    return base


def token_layout(model: nn.Module, pixel_values: torch.Tensor) -> tuple[int, tuple[int, int]]:
    """``(prefix, (h, w))``: number of [CLS] + register tokens and the patch grid for (B, C, H, W) inputs."""
    cfg = resolve_backbone(model).config
    p = cfg.patch_size
    prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
    return prefix, (pixel_values.shape[-2] // p, pixel_values.shape[-1] // p)


@torch.no_grad()
def forward_with_internals(model: nn.Module, pixel_values: torch.Tensor) -> tuple[tuple, tuple, nn.Module]:
    """The encoder's ``(attentions, block_outputs, final_norm)``: attentions[i] (B, H, T, T), block_outputs[i]
    (B, T, D) the raw output of block i, and its final LayerNorm (identity if it has none)."""
    base = resolve_backbone(model)
    device = next(base.parameters()).device
    out = base(pixel_values=pixel_values.to(device), output_attentions=True, output_hidden_states=True, return_dict=True)
    attentions, hidden = out.attentions, out.hidden_states
    if not attentions or any(a is None for a in attentions):
        raise ValueError(f"{type(base).__name__} returned no attention weights; load it with "
                         "attn_implementation='eager'")
    if hidden is None or len(hidden) != len(attentions) + 1:
        raise ValueError("expected hidden_states = embeddings + one output per block")
    norms = (getattr(base, "layernorm", None), getattr(base, "norm", None))
    norm = next((m for m in norms if isinstance(m, nn.Module)), nn.Identity())
    return tuple(attentions), tuple(hidden[1:]), norm


@torch.no_grad()
def analyze_model(model: nn.Module, pixel_values: torch.Tensor, masks: Optional[torch.Tensor] = None, *,
                  batch_size: int = 8, outlier_k: float = DEFAULT_OUTLIER_K,
                  mass_threshold: float = DINO_MASS_THRESHOLD, feature_norm: bool = True,
                  progress: bool = False) -> PerLayerMetrics:
    """``{layer: {metric: value}}`` (layer 0 = the first block; metrics: docs/analysis.md) of ``model`` on normalised
    ``pixel_values`` (B, 3, H, W), with optional ``masks`` (B, H, W; 0 background, 255 ignored) for the foreground
    Jaccard; each the exact mean over all images (batching does not change the numbers)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pixel_values.ndim != 4 or pixel_values.shape[0] == 0:
        raise ValueError(f"pixel_values must be a non-empty (batch, 3, H, W) tensor, got {tuple(pixel_values.shape)}")
    if masks is not None and (masks.ndim != 3 or masks.shape[0] != pixel_values.shape[0]):
        raise ValueError(f"masks must be (batch={pixel_values.shape[0]}, H, W), got {tuple(masks.shape)}")
    prefix, grid = token_layout(model, pixel_values)
    sums: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    hists: dict[int, torch.Tensor] = {}
    patch_norms: dict[int, list[torch.Tensor]] = defaultdict(list)
    cls_norms: dict[int, list[torch.Tensor]] = defaultdict(list)

    def add(layer: int, stats: dict[str, tuple[float, float]]) -> None:
        for k, (s, c) in stats.items():
            sums[layer][k][0] += s
            sums[layer][k][1] += c

    was_training = model.training
    model.eval()
    try:
        starts = range(0, pixel_values.shape[0], batch_size)
        for start in tqdm(starts, desc="analysis", disable=not progress, unit="batch"):
            x = pixel_values[start:start + batch_size]
            attentions, blocks, final_norm = forward_with_internals(model, x)
            batch_masks = masks[start:start + batch_size] if masks is not None else None
            for layer, (attn, hidden) in enumerate(zip(attentions, blocks)):
                stats, hist = attention_statistics(attn, grid, prefix)
                add(layer, stats)
                hists[layer] = hists[layer] + hist if layer in hists else hist
                norms = hidden.float().norm(dim=-1)  # (B, T)
                patch_norms[layer].append(norms[:, prefix:].cpu())
                cls_norms[layer].append(norms[:, 0].cpu())
                feats = final_norm(hidden) if feature_norm else hidden  # the model's dtype, then float
                add(layer, similarity_statistics(feats.float(), grid, prefix))
                if batch_masks is not None:
                    m = batch_masks.to(attn.device)
                    if m.shape[-2:] != x.shape[-2:]:
                        m = F.interpolate(m[:, None].float(), size=x.shape[-2:], mode="nearest")[:, 0].long()
                    add(layer, foreground_statistics(attn, m, grid, prefix, mass_threshold))
    finally:
        model.train(was_training)

    result: PerLayerMetrics = {}
    for layer in sorted(sums):
        metrics = finalize(sums[layer])
        metrics["support_median"] = median_from_histogram(hists[layer])
        metrics.update(norm_metrics(torch.cat(patch_norms[layer]), torch.cat(cls_norms[layer]), outlier_k))
        metrics.update(summarize_heads(metrics))
        result[layer] = dict(sorted(metrics.items()))
    return result


def flatten_metrics(per_layer: PerLayerMetrics) -> dict[str, float]:
    """``{layer: {name: v}}`` -> ``{"layer_<i>/<name>": v}`` as the results JSON stores them."""
    return {f"layer_{layer}/{name}": value for layer, metrics in per_layer.items() for name, value in metrics.items()}


def unflatten_metrics(flat: dict[str, float]) -> PerLayerMetrics:
    """Inverse of ``flatten_metrics`` (keys not of the form ``layer_<i>/<name>`` are ignored)."""
    out: PerLayerMetrics = defaultdict(dict)
    for key, value in flat.items():
        head, _, name = key.partition("/")
        if head.startswith("layer_") and head[6:].isdigit() and name:
            out[int(head[6:])][name] = value
    return dict(sorted(out.items()))
