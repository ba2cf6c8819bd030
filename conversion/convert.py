"""Convert a DINO, transformers-ViT or timm checkpoint into an EntmaxViT save_pretrained folder (docs/conversion.md):
``save_converted(convert(cfg), cfg)``. The check runs the source library's own model: timm's ``VisionTransformer``
(DINO's block) for DINO/timm, ``ViTModel.from_pretrained`` for transformers."""

import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from torch import nn

from entmax_vit.data.config_io import save_config, to_dict
from entmax_vit.modeling import (EntmaxViTConfig, EntmaxViTModel, get_attention_transform, make_image_processor,
                                 resolve_kernel)

from .checkpoint_io import load_input, strip_prefixes, unwrap_state_dict
from .converted_state import (convert_dino_keys, convert_hf_vit_keys, infer_architecture, load_strict,
                              raise_on_rejected, resolve_num_heads)

logger = logging.getLogger(__name__)

SOURCES = ("dino", "hf-vit", "timm")  # ConvertConfig.source's Literal, checked for Python callers too
# Official DINO --arch names -> heads (vision_transformer.py: head_dim 64); early releases said deit_*.
DINO_ARCH_HEADS = {"vit_tiny": 3, "vit_small": 6, "vit_base": 12, "deit_tiny": 3, "deit_small": 6, "deit_base": 12}
DINO_LAYER_NORM_EPS = 1e-6  # DINO and timm ViTs
HF_VIT_DEFAULT_LAYER_NORM_EPS = 1e-12  # transformers ViTConfig default, used when there is no config.json
# config.json fields of a transformers ViT that must agree with the weights.
_HF_SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "patch_size", "image_size",
                   "num_channels", "qkv_bias")

SequenceFn = Callable[[torch.Tensor], torch.Tensor]  # pixel_values (B, C, H, W) -> tokens (B, 1 + N, D)


def timm_vit_from_state(state: dict[str, torch.Tensor], arch: dict, num_heads: int, eps: float) -> SequenceFn:
    """A timm VisionTransformer (DINO's block) loaded strictly from a DINO/timm-named backbone state dict."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=arch["image_size"], patch_size=arch["patch_size"], in_chans=arch["num_channels"],
        embed_dim=arch["hidden_size"], depth=arch["num_hidden_layers"], num_heads=num_heads,
        mlp_ratio=arch["intermediate_size"] / arch["hidden_size"], qkv_bias=arch["qkv_bias"],
        num_classes=0, global_pool="token", norm_layer=partial(nn.LayerNorm, eps=eps),
    )
    model.load_state_dict(state, strict=True)
    return model.eval().forward_features


def timm_architecture(name: str, model_args: Optional[dict] = None) -> dict:
    """Head count and LayerNorm eps of a registered timm architecture (with the ``model_args`` a timm Hub
    config.json may add), read from a meta-device instance (no weights allocated, no download)."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **{**(model_args or {}), "num_classes": 0})
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise ValueError(f"timm architecture {name!r}: {err}") from None
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(blocks[0], "attn"):
        raise ValueError(f"timm architecture {name!r} is not a plain VisionTransformer")
    return dict(num_heads=blocks[0].attn.num_heads, layer_norm_eps=float(model.norm.eps))


def hf_vit_from_state(state: dict[str, torch.Tensor], hf_config: dict) -> SequenceFn:
    """transformers' ViTModel (no pooler), loaded through from_pretrained's own key mapping (either naming)."""
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTModel

    with tempfile.TemporaryDirectory() as tmp:
        config = {k: v for k, v in hf_config.items() if k not in ("architectures", "auto_map")}
        ViTConfig(**config).save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(tmp) / "model.safetensors"))
        model = ViTModel.from_pretrained(tmp, add_pooling_layer=False, attn_implementation="eager").eval()
    return lambda pixel_values: model(pixel_values).last_hidden_state


@dataclass
class ConvertConfig:
    """Checkpoint conversion (scripts/convert_checkpoint.py)."""

    source: Literal["dino", "hf-vit", "timm"] = "dino"  # checkpoint family: official DINO, transformers ViT, timm
    input: str = ""  # .pth/.pt/.bin/.safetensors file or URL, save_pretrained folder, or Hub repo id (owner/name)
    output_dir: str = ""  # folder to write the EntmaxViT model into
    attention: str = "softmax"  # transform of the converted model; softmax reproduces the source exactly
    which: Literal["teacher", "student"] = "teacher"  # network taken from a DINO full training checkpoint
    num_heads: Optional[int] = None  # heads, when neither a config nor the width (head_dim 64) tells them
    timm_arch: Optional[str] = None  # timm architecture (vit_small_patch16_224) for heads/eps; else config.json
    verify: bool = True  # run the source library's model on random input and compare (softmax weights)
    tolerance: float = 1e-4  # max |difference| of the final-normed tokens accepted by verify
    overwrite: bool = False  # allow writing into an output_dir that already holds a model
    cache_dir: Optional[str] = None  # download cache for Hub ids (HF cache) and URLs (torch hub dir)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {list(SOURCES)}, got {self.source!r}")
        get_attention_transform(self.attention)  # unknown names raise, listing the choices


@dataclass
class ConversionResult:
    model: EntmaxViTModel
    report: dict = field(default_factory=dict)


def convert(cfg: ConvertConfig) -> ConversionResult:
    """Load, rename, infer the architecture, build and fill an EntmaxViTModel, and (``cfg.verify``) check it."""
    if not cfg.input:
        raise ValueError("No input given: pass a checkpoint file, folder or Hub repo id")
    loaded = load_input(cfg.input, cfg.cache_dir)
    state, notes, args = unwrap_state_dict(loaded.obj, cfg.which)
    for note in notes:
        logger.info(note)
    hf = cfg.source == "hf-vit"
    # "module." from DDP (DINO's student); "vit." of ViTForImageClassification; "backbone." of DINO's MultiCropWrapper
    state = strip_prefixes(state, ("module.", "vit." if hf else "backbone."))
    converted = (convert_hf_vit_keys if hf else convert_dino_keys)(state)
    raise_on_rejected(converted, cfg.source)
    for reason, count in Counter(converted.dropped.values()).items():
        logger.info("Dropped %d tensor(s): %s", count, reason)
    arch = infer_architecture(converted)

    hidden_act, heads_from_source, eps = "gelu", None, DINO_LAYER_NORM_EPS
    source_config = loaded.config or {}
    if cfg.source == "dino" and args is not None:
        heads_from_source = DINO_ARCH_HEADS.get(getattr(args, "arch", None))
        patch = getattr(args, "patch_size", arch["patch_size"])
        if patch != arch["patch_size"]:
            raise ValueError(f"Training args say patch_size {patch}, the weights have {arch['patch_size']}")
    elif cfg.source == "timm" and (name := cfg.timm_arch or source_config.get("architecture")):
        info = timm_architecture(name, source_config.get("model_args") or {})
        heads_from_source, eps = info["num_heads"], info["layer_norm_eps"]
        logger.info("timm architecture %s: %d heads, LayerNorm eps %g", name, heads_from_source, eps)
    elif hf:
        if loaded.config is None:
            logger.warning("No config.json: using transformers' ViT default LayerNorm eps %g",
                           HF_VIT_DEFAULT_LAYER_NORM_EPS)
        if source_config.get("model_type", "vit") != "vit":
            raise ValueError(f"config.json has model_type {source_config['model_type']!r}; --source hf-vit converts "
                             "'vit' models only")
        wrong = [f"{k}: {source_config[k]} vs {arch[k]}" for k in _HF_SIZE_FIELDS
                 if k in source_config and source_config[k] != arch[k]]
        if wrong:
            raise ValueError("config.json disagrees with the weights (config vs weights): " + ", ".join(wrong))
        heads_from_source = source_config.get("num_attention_heads")
        eps = float(source_config.get("layer_norm_eps", HF_VIT_DEFAULT_LAYER_NORM_EPS))
        hidden_act = source_config.get("hidden_act", "gelu")
    heads = resolve_num_heads(arch["hidden_size"], cfg.num_heads, heads_from_source, cfg.source)

    # Built with softmax so the check compares like with like; the requested transform is set afterwards.
    config = EntmaxViTConfig(**arch, num_attention_heads=heads, layer_norm_eps=eps, hidden_act=hidden_act,
                             attention="softmax", drop_path_rate=0.0)
    model = EntmaxViTModel(config)
    load_strict(model, converted)
    model.eval()
    logger.info("Converted %s: width %d, depth %d, heads %d, patch %d, image %d, eps %g",
                loaded.origin, arch["hidden_size"], arch["num_hidden_layers"], heads, arch["patch_size"],
                arch["image_size"], eps)

    max_diff = None
    if cfg.verify:
        source_state = {k: v for k, v in state.items() if k not in converted.dropped}
        if hf:
            # config.json when there is one, else transformers' ViT with the sizes found here
            hf_config = source_config or dict(
                model_type="vit", num_attention_heads=heads, layer_norm_eps=eps, hidden_act=hidden_act,
                **{k: arch[k] for k in _HF_SIZE_FIELDS})
            reference = hf_vit_from_state(source_state, hf_config)
        else:
            reference = timm_vit_from_state(source_state, arch, heads, eps)
        max_diff = verify_against(model, reference, cfg.tolerance)
        logger.info("Verified against the source model: max |difference| %.2e (tolerance %.0e)", max_diff, cfg.tolerance)

    if cfg.attention != "softmax":
        model.config.attention = cfg.attention
        # the softmax default kernel (sdpa) cannot run a sparse transform: take the new transform's default
        model.set_attn_implementation(resolve_kernel(cfg.attention))
        model.config.validate()
        logger.info("Attention transform set to %s (the weights were trained with softmax)", cfg.attention)

    report = dict(source=cfg.source, input=loaded.origin,
                  which=cfg.which if notes and "training checkpoint" in notes[0] else None, notes=notes,
                  architecture=dict(arch, num_attention_heads=heads, layer_norm_eps=eps, hidden_act=hidden_act),
                  attention=cfg.attention, dropped_keys=converted.dropped, verified_max_abs_diff=max_diff)
    return ConversionResult(model=model, report=report)


@torch.no_grad()
def verify_against(model: EntmaxViTModel, reference, tolerance: float, batch: int = 2, seed: int = 0) -> float:
    """Max |difference| of the final-normed tokens on random input at the native resolution (<= ``tolerance``)."""
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=generator)
    ours = model(pixels).last_hidden_state  # (B, 1 + N, D)
    theirs = reference(pixels)
    if ours.shape != theirs.shape:
        raise ValueError(f"Converted model gives {tuple(ours.shape)}, the source {tuple(theirs.shape)}")
    diff = (ours - theirs).abs().max().item()
    if not diff <= tolerance:
        raise ValueError(f"Converted model differs from the source by {diff:.3e} (> tolerance {tolerance:.0e})")
    return diff


def check_output_dir(cfg: ConvertConfig) -> Path:
    """``cfg.output_dir``, refused when missing or holding a model (unless ``overwrite``)."""
    if not cfg.output_dir:
        raise ValueError("No output_dir given")
    out = Path(cfg.output_dir)
    if (out / "config.json").exists() and not cfg.overwrite:
        raise ValueError(f"{out} already holds a model (config.json); pass --overwrite to replace it")
    return out


def save_converted(result: ConversionResult, cfg: ConvertConfig) -> Path:
    """Write the model, DINO's eval image processor, the resolved conversion config and a report."""
    out = check_output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(out)
    # DINO's eval preprocessing at the model's own resolution (resize at DINO's 256/224 ratio).
    make_image_processor(crop=result.model.config.image_size).save_pretrained(out)
    save_config(cfg, out / "conversion_config.yaml")
    tmp = out / ".conversion_report.json.tmp"
    tmp.write_text(json.dumps(dict(result.report, config=to_dict(cfg)), indent=2, default=str))
    os.replace(tmp, out / "conversion_report.json")
    logger.info("Wrote %s", out)
    return out


def main(cfg: ConvertConfig) -> Path:
    """Convert and write; a missing or occupied output folder is refused before the input is read."""
    check_output_dir(cfg)
    return save_converted(convert(cfg), cfg)
