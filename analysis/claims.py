"""The paper's two analysis claims, measured on one trained model with the project's own probes (the metric names
and their definitions: docs/analysis.md, "The paper's two analysis claims"); mIoU and Jaccard in percent.

Every probe is ``scripts/eval_segmentation.py``'s (same preset, transforms, optimiser, mIoU) on the same data; one
model and seed cannot separate small differences from noise: compare across seeds (``scripts/reproduce_mini.py``)."""

import contextlib
import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

from accelerate.utils import set_seed
from torch import nn

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ClaimsConfig:
    """What ``measure`` reads and how it probes."""

    dataset: str = "embedded"           # load_image_dataset source with image + mask columns
    train_split: str = "train"
    eval_split: str = "validation"
    max_train_samples: Optional[int] = None  # subsample (e.g. for checkpoints along a long run)
    max_eval_samples: Optional[int] = None
    foreground_images: int = 64         # validation images for the [CLS]-attention foreground Jaccard
    probe_preset: str = "embedded"      # evaluation/configs/<name>.yaml: the segmentation probe's protocol
    epochs: Optional[int] = None        # override the preset's probe epochs
    blocks: Optional[list[int]] = None  # blocks probed one by one (0-based; default: all)
    seed: int = 0
    progress: bool = False


def probe_config(cfg: ClaimsConfig, **overrides: Any):
    """``cfg.probe_preset``'s segmentation probe config with the claims' data, seed and epochs, and ``overrides``."""
    from entmax_vit.data.config_io import ConfigError, load_preset
    from entmax_vit.evaluation.entry_point import PRESET_DIR
    from entmax_vit.evaluation.segmentation_probe import SegmentationEvalConfig

    try:
        base = load_preset(SegmentationEvalConfig, cfg.probe_preset, PRESET_DIR)
    except ConfigError as err:
        raise ValueError(f"probe_preset {cfg.probe_preset!r}: {err}") from None
    if cfg.epochs is not None:
        overrides = dict(epochs=cfg.epochs, step_epochs=[s for s in base.step_epochs if s < cfg.epochs], **overrides)
    return dataclasses.replace(base, **{**dict(
        dataset=cfg.dataset, train_split=cfg.train_split, eval_split=cfg.eval_split,
        max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples, seed=cfg.seed), **overrides})


def _backbone(model: Union[nn.Module, str]) -> nn.Module:
    if isinstance(model, str):
        from entmax_vit.evaluation.features import load_backbone

        return load_backbone(model)
    from .per_layer import resolve_backbone

    base = resolve_backbone(model)
    if not hasattr(base, "get_intermediate_layers"):
        raise ValueError(f"{type(base).__name__}: the claims need an EntmaxViT backbone (get_intermediate_layers)")
    return base


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """The backbone runs its eager kernel (which returns attention probabilities), then the one it had."""
    before = getattr(model.config, "_attn_implementation", None)
    if before != "eager":
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if before not in (None, "eager"):
            model.set_attn_implementation(before)


def foreground_alignment(model: nn.Module, cfg: ClaimsConfig, image_size: int) -> dict[str, float]:
    """``block_<i>/fg_jaccard`` (best head) and ``block_<i>/fg_jaccard_avg_map`` of the [CLS] attention on the first
    ``cfg.foreground_images`` validation images (``analysis.per_layer.analyze_model``), in percent."""
    from .inputs import load_analysis_images
    from .per_layer import analyze_model

    images = load_analysis_images(cfg.dataset, split=cfg.eval_split, num_images=cfg.foreground_images,
                                  image_size=image_size)
    if images.masks is None:
        raise ValueError(f"{cfg.dataset} split {cfg.eval_split!r} has no mask column: no foreground to align with")
    with _eager_attention(model):
        per_layer = analyze_model(model, images.pixel_values, images.masks, progress=cfg.progress)
    names = (("fg_jaccard", "fg_jaccard_best_head"), ("fg_jaccard_avg_map", "fg_jaccard_head_avg_map"))
    return {f"block_{layer}/{name}": 100.0 * m[key]
            for layer, m in per_layer.items() if "fg_jaccard_best_head" in m for name, key in names}


def measure(model: Union[nn.Module, str], cfg: Optional[ClaimsConfig] = None) -> dict[str, float]:
    """Both claims on ``model`` (an in-memory EntmaxViT model or a model wrapping one, or a folder / Hub id):
    a flat ``{name: float}`` (names in docs/analysis.md). The model is used in eval mode and left as it was."""
    from entmax_vit.evaluation.segmentation_probe import probe_datasets, probe_grid_miou

    cfg = cfg or ClaimsConfig()
    backbone = _backbone(model)
    was_training = backbone.training
    backbone.eval()
    depth = backbone.config.num_hidden_layers
    blocks = list(range(depth)) if cfg.blocks is None else [b % depth for b in cfg.blocks]
    if not blocks:
        raise ValueError("blocks must name at least one block")
    base = probe_config(cfg)
    if base.input_size is None:  # a preset without input_size: the model's own resolution, as eval_segmentation
        base = dataclasses.replace(base, input_size=backbone.config.image_size)
    try:
        data = probe_datasets(base)
        numbers = foreground_alignment(backbone, cfg, base.input_size)
        runs = [(f"block_{b}/seg_miou", dict(layers=[b], use_cls_token=False)) for b in blocks]
        if depth - 1 not in blocks:
            runs.append((f"block_{depth - 1}/seg_miou", dict(layers=[depth - 1], use_cls_token=False)))
        runs.append(("seg_miou_patch_cls", dict(layers=[depth - 1], use_cls_token=True)))
        # Python's random too (as the eval_segmentation entry point's start_run does): the probes' horizontal flips
        # draw from it, and with torch's generator alone the claims changed from one process to the next.
        set_seed(cfg.seed)
        # one backbone pass per split feeds every probe (they differ only in the block and the [CLS] option)
        mious = probe_grid_miou(backbone, data, [dataclasses.replace(base, **change) for _, change in runs])
        for (name, _), miou in zip(runs, mious):
            numbers[name] = miou
            logger.info("claims: %s = %.2f", name, miou)
    finally:
        backbone.train(was_training)
    numbers.update(summarize(numbers, depth))
    return dict(sorted(numbers.items()))


# The summary numbers a job's report shows next to its own probes (the rest are per block, or repeat those probes).
HEADLINE_KEYS = ("fg_shallow_minus_deep", "miou_deep_minus_shallow", "cls_gain_miou",
                 "claim_shallow_aligns_probes_worse", "claim_cls_complementary")


def summarize(numbers: Mapping[str, float], depth: int) -> dict[str, float]:
    """The claims' summary numbers from the per-block ones (definitions: docs/analysis.md)."""
    last = depth - 1
    out: dict[str, float] = {}
    patch = numbers.get(f"block_{last}/seg_miou")
    if patch is not None:
        out["seg_miou_patch"] = patch
        if "seg_miou_patch_cls" in numbers:
            out["cls_gain_miou"] = numbers["seg_miou_patch_cls"] - patch
            out["claim_cls_complementary"] = float(out["cls_gain_miou"] > 0)
    shallow = range(max(1, depth // 2))
    fg = {b: numbers[f"block_{b}/fg_jaccard"] for b in range(depth) if f"block_{b}/fg_jaccard" in numbers}
    miou = {b: numbers[f"block_{b}/seg_miou"] for b in range(depth) if f"block_{b}/seg_miou" in numbers}
    if fg:
        out["fg_best_block"] = float(max(fg, key=fg.get))
    if miou:
        out["miou_best_block"] = float(max(miou, key=miou.get))
    if last in fg and all(b in fg for b in shallow) and depth > 1:
        out["fg_shallow_minus_deep"] = sum(fg[b] for b in shallow) / len(shallow) - fg[last]
    if last in miou and all(b in miou for b in shallow) and depth > 1:
        out["miou_deep_minus_shallow"] = miou[last] - sum(miou[b] for b in shallow) / len(shallow)
    if "fg_shallow_minus_deep" in out and "miou_deep_minus_shallow" in out:
        out["claim_shallow_aligns_probes_worse"] = float(out["fg_shallow_minus_deep"] > 0 and out["miou_deep_minus_shallow"] > 0)
    return out


def write_claims(numbers: Mapping[str, float], path: Union[str, os.PathLike], *, model: Union[nn.Module, str],
                 cfg: Optional[ClaimsConfig] = None) -> Path:
    """``numbers`` as a results JSON (schema entmax_vit.results/v1, task "analysis", protocol "paper_claims")."""
    from entmax_vit.evaluation.results import make_results, weights_fingerprint, write_results

    cfg = cfg or ClaimsConfig()
    backbone = _backbone(model) if not isinstance(model, str) else None
    config = backbone.config.to_dict() if backbone is not None else {}
    source = model if isinstance(model, str) else config.get("_name_or_path", "") or "in_memory"
    probe = probe_config(cfg)
    record = make_results(
        task="analysis", model_name_or_path=str(source), model_config=config,
        dataset={"name": cfg.dataset, "split": cfg.eval_split, "train_split": cfg.train_split,
                 "num_samples": cfg.max_eval_samples, "num_classes": None},
        protocol={"name": "paper_claims", "probe": f"{probe.protocol}_linear", "probe_preset": cfg.probe_preset,
                  "probe_epochs": probe.epochs, "foreground": "cls_attention_mass_0.6_best_head",
                  "foreground_images": cfg.foreground_images, "shallow": "mean of the first half of the blocks",
                  "deep": "last block"},
        metrics={k: v for k, v in numbers.items() if math.isfinite(v)},
        config=dataclasses.asdict(cfg),
        weights_sha256=weights_fingerprint(backbone) if backbone is not None else None,
    )
    return write_results(record, path)
