"""The source libraries' own models, rebuilt from a checkpoint, to check a conversion against.

DINO and timm checkpoints run through timm's ``VisionTransformer`` (the same block as DINO's
vision_transformer.py), transformers checkpoints through ``ViTModel.from_pretrained`` (which reads both of
its namings). Both return the final-normed token sequence (B, 1 + N, D), EntmaxViT's ``last_hidden_state``.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

SequenceFn = Callable[[torch.Tensor], torch.Tensor]  # pixel_values (B, C, H, W) -> tokens (B, 1 + N, D)


def timm_vit_from_state(state: dict[str, torch.Tensor], arch: dict, num_heads: int, eps: float) -> SequenceFn:
    """A timm VisionTransformer with the given sizes, loaded strictly from a DINO/timm-named backbone state
    dict (heads already removed)."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=arch["image_size"], patch_size=arch["patch_size"], in_chans=arch["num_channels"],
        embed_dim=arch["hidden_size"], depth=arch["num_hidden_layers"], num_heads=num_heads,
        mlp_ratio=arch["intermediate_size"] / arch["hidden_size"], qkv_bias=arch["qkv_bias"],
        num_classes=0, global_pool="token", norm_layer=partial(nn.LayerNorm, eps=eps),
    )
    model.load_state_dict(state, strict=True)
    model.eval()
    return model.forward_features


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


def hf_vit_from_source(folder: Optional[str], state: dict[str, torch.Tensor], hf_config: dict) -> SequenceFn:
    """transformers' ViTModel (no pooler) loaded from a save_pretrained folder, or from a state dict in either
    naming written with ``hf_config`` into a temporary folder, through from_pretrained's own key mapping."""
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTModel

    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:
            folder = tmp
            config = ViTConfig(**{k: v for k, v in hf_config.items() if k not in ("architectures", "auto_map")})
            config.save_pretrained(tmp)
            save_file({k: v.contiguous() for k, v in state.items()}, str(Path(tmp) / "model.safetensors"))
        model = ViTModel.from_pretrained(folder, add_pooling_layer=False, attn_implementation="eager")
    model.eval()
    return lambda pixel_values: model(pixel_values).last_hidden_state


def hf_config_for(arch: dict, num_heads: int, eps: float, hidden_act: str) -> dict:
    """A transformers ViTConfig dict for the given sizes (for raw HF state dicts without config.json)."""
    return dict(
        model_type="vit", image_size=arch["image_size"], patch_size=arch["patch_size"],
        num_channels=arch["num_channels"], hidden_size=arch["hidden_size"],
        num_hidden_layers=arch["num_hidden_layers"], num_attention_heads=num_heads,
        intermediate_size=arch["intermediate_size"], qkv_bias=arch["qkv_bias"], layer_norm_eps=eps,
        hidden_act=hidden_act,
    )
