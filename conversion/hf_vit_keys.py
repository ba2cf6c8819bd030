"""Key mapping for transformers ``ViTModel`` / ``ViTForImageClassification`` state dicts to EntmaxViT names,
in both namings transformers has used:

    older files (facebook/dino-vits16, and what v5 save_pretrained still writes):
        encoder.layer.N.attention.attention.{query,key,value}.*   -> fused into encoder.layer.N.attention.qkv.*
        encoder.layer.N.attention.output.dense.*                  -> encoder.layer.N.attention.proj.*
        encoder.layer.N.intermediate.dense.* / output.dense.*     -> encoder.layer.N.mlp.fc1.* / fc2.*
    transformers v5 modules (ViTModel.state_dict() in memory):
        layers.N.attention.{q_proj,k_proj,v_proj}.*                -> fused into encoder.layer.N.attention.qkv.*
        layers.N.attention.o_proj.*                                -> encoder.layer.N.attention.proj.*
        layers.N.mlp.fc1.* / fc2.*                                 -> encoder.layer.N.mlp.fc1.* / fc2.*
    both: layernorm_before/after -> norm1/norm2, embeddings.* -> embeddings.*, layernorm.* -> layernorm.*

Dropped (logged): the pooler (dense + tanh: random for DINO weights, our pooler_output is the normed [CLS]
as in DINO), the classifier of ViTForImageClassification and the masked-image-modeling mask token.
"""

from __future__ import annotations

import re

import torch

from .converted_state import ConvertedState, Rules

_BLOCK = r"^(?:encoder\.layer|layers)\.(\d+)\."
_QKV = re.compile(_BLOCK + r"attention\.(?:attention\.(query|key|value)|(q_proj|k_proj|v_proj))\.(weight|bias)$")
_QKV_INDEX = {"query": 0, "key": 1, "value": 2, "q_proj": 0, "k_proj": 1, "v_proj": 2}
_RENAMES: Rules = [
    (re.compile(r"^embeddings\.(cls_token|position_embeddings)$"), r"embeddings.\1"),
    (re.compile(r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$"),
     r"embeddings.patch_embeddings.projection.\1"),
    (re.compile(_BLOCK + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)$"), r"encoder.layer.\1.attention.proj.\2"),
    (re.compile(_BLOCK + r"layernorm_before\.(weight|bias)$"), r"encoder.layer.\1.norm1.\2"),
    (re.compile(_BLOCK + r"layernorm_after\.(weight|bias)$"), r"encoder.layer.\1.norm2.\2"),
    (re.compile(_BLOCK + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)$"), r"encoder.layer.\1.mlp.fc1.\2"),
    (re.compile(_BLOCK + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)$"), r"encoder.layer.\1.mlp.fc2.\2"),
    (re.compile(r"^layernorm\.(weight|bias)$"), r"layernorm.\1"),
]
_DROPPED: Rules = [
    (re.compile(r"^pooler\."), "HF pooler (dense + tanh; EntmaxViT's pooler_output is the normed [CLS] as DINO)"),
    (re.compile(r"^classifier\."), "ViTForImageClassification classifier (not part of the backbone)"),
    (re.compile(r"^embeddings\.mask_token$"), "masked-image-modeling mask token (unused by the encoder)"),
]

def convert_hf_vit_keys(state: dict[str, torch.Tensor]) -> ConvertedState:
    """Rename (and fuse q/k/v of) a transformers ViT state dict (``vit.`` prefix already stripped)."""
    out = ConvertedState()
    # Per (layer, weight|bias): [q, k, v] tensors and their source keys, fused after the pass.
    parts: dict[tuple[int, str], list] = {}
    for key, tensor in state.items():
        match = _QKV.match(key)
        if match:
            layer, old, new, kind = match.groups()
            slot = parts.setdefault((int(layer), kind), [None, None, None, [None, None, None]])
            index = _QKV_INDEX[old or new]
            slot[index] = tensor
            slot[3][index] = key
            continue
        out.add_by_rules(key, tensor, _RENAMES, _DROPPED, [], "unexpected key for a transformers ViT")
    for (layer, kind), (q, k, v, keys) in sorted(parts.items()):
        if q is None or k is None or v is None:
            present = [name for name in keys if name is not None]
            missing = [n for n, t in zip(("query/q_proj", "key/k_proj", "value/v_proj"), (q, k, v)) if t is None]
            raise ValueError(f"Layer {layer}: {kind} of {missing} missing next to {present}; cannot fuse q/k/v")
        if not (q.shape == k.shape == v.shape):
            raise ValueError(f"Layer {layer}: q/k/v {kind} shapes differ: {[tuple(t.shape) for t in (q, k, v)]} ({keys})")
        # DINO's fused layout: output rows [q (D); k (D); v (D)], each split into heads contiguously, which is
        # exactly how HF splits its separate projections.
        out.put(f"encoder.layer.{layer}.attention.qkv.{kind}", torch.cat([q, k, v], dim=0), *keys)
    return out

__all__ = ["convert_hf_vit_keys"]
