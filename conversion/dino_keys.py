"""Key mapping for official DINO and timm ``VisionTransformer`` state dicts (the same naming: timm's ViT
descends from the DINO/DeiT code) to EntmaxViT names.

    cls_token                    -> embeddings.cls_token
    pos_embed                    -> embeddings.position_embeddings
    patch_embed.proj.*           -> embeddings.patch_embeddings.projection.*
    blocks.N.norm1/norm2.*       -> encoder.layer.N.norm1/norm2.*
    blocks.N.attn.qkv/proj.*     -> encoder.layer.N.attention.qkv/proj.*
    blocks.N.mlp.fc1/fc2.*       -> encoder.layer.N.mlp.fc1/fc2.*
    norm.*                       -> layernorm.*
    head.*                       dropped (DINO projection head / timm classifier; logged)

timm variants whose extra parameters change the computation (LayerScale, registers, a pre-norm, a pooled
fc_norm, q/k norms, distillation tokens) are rejected by name rather than silently mis-converted.
"""

from __future__ import annotations

import re

import torch

from .converted_state import ConvertedState, Rules

_RENAMES: Rules = [
    (re.compile(r"^cls_token$"), "embeddings.cls_token"),
    (re.compile(r"^pos_embed$"), "embeddings.position_embeddings"),
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"embeddings.patch_embeddings.projection.\1"),
    (re.compile(r"^blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)$"), r"encoder.layer.\1.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)$"), r"encoder.layer.\1.attention.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"encoder.layer.\1.mlp.\2.\3"),
    (re.compile(r"^norm\.(weight|bias)$"), r"layernorm.\1"),
]
_DROPPED: Rules = [
    (re.compile(r"^head\."), "projection/classification head (not part of the backbone)"),
]
_REJECTED: Rules = [
    (re.compile(r"^blocks\.\d+\.ls[12]\."), "LayerScale (timm init_values / DINOv2-style blocks) is not supported"),
    (re.compile(r"^reg_token$"), "register tokens in timm's layout are not supported"),
    (re.compile(r"^(dist_token|head_dist\.)"), "DeiT distillation token/head is not supported"),
    (re.compile(r"^norm_pre\."), "a pre-transformer LayerNorm (norm_pre, e.g. CLIP) is not part of DINO's ViT"),
    (re.compile(r"^fc_norm\."), "fc_norm (global-average-pool head norm) is not part of DINO's ViT"),
    (re.compile(r"^blocks\.\d+\.attn\.(q_norm|k_norm|norm)\."), "q/k normalisation is not part of DINO's ViT"),
    (re.compile(r"^blocks\.\d+\.attn\.(q_bias|v_bias)$"), "separate q/v biases (BEiT style) are not supported"),
    (re.compile(r"^blocks\.\d+\.mlp\.(norm|fc1_g|fc1_x)\."), "gated or normed MLPs are not part of DINO's ViT"),
    (re.compile(r"^patch_embed\.norm\."), "a patch-embedding norm is not part of DINO's ViT"),
    (re.compile(r"^(attn_pool|global_pool)\."), "attention pooling heads are not supported"),
]

def convert_dino_keys(state: dict[str, torch.Tensor]) -> ConvertedState:
    """Rename a DINO/timm ViT state dict (prefixes such as ``module.``/``backbone.`` already stripped)."""
    out = ConvertedState()
    for key, tensor in state.items():
        out.add_by_rules(key, tensor, _RENAMES, _DROPPED, _REJECTED, "unexpected key for a DINO/timm ViT")
    return out

__all__ = ["convert_dino_keys"]
