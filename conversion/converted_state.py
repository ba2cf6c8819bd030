"""Renaming source state dicts to EntmaxViT names (key mapping, dropped and rejected keys: docs/conversion.md),
architecture inference from tensor shapes, and a strict load that names every offending key by its source name."""

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Head count by width for the DINO/timm ViT family, all with head_dim 64 (tiny, small, base, large, huge).
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
_MAX_LISTED = 12
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")
Rules = list[tuple[re.Pattern, str]]  # (pattern on a source key, replacement name or reason)


@dataclass
class ConvertedState:
    """A state dict renamed to EntmaxViT names; ``origin``: new name -> source key(s) (for messages); ``dropped``
    / ``rejected``: source keys left out on purpose (logged) / that do not fit (conversion fails), with reasons."""

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, list[str]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    def put(self, name: str, tensor: torch.Tensor, *source_keys: str) -> None:
        if name in self.state:
            raise ValueError(f"Two source keys map to {name!r}: {self.origin[name]} and {list(source_keys)}")
        self.state[name] = tensor
        self.origin[name] = list(source_keys)

    def sources(self, name: str) -> str:
        return "/".join(self.origin.get(name, [name]))

    def add_by_rules(self, key: str, tensor: torch.Tensor, renames: Rules, dropped: Rules, rejected: Rules,
                     unexpected: str) -> None:
        """The first matching rename, else dropped or rejected with the first matching rule's reason."""
        for pattern, target in renames:
            if pattern.match(key):
                self.put(pattern.sub(target, key), tensor, key)
                return
        reason = next((r for p, r in dropped if p.match(key)), None)
        if reason is not None:
            self.dropped[key] = reason
            return
        self.rejected[key] = next((r for p, r in rejected if p.match(key)), unexpected)


def _listing(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def raise_on_rejected(converted: ConvertedState, source: str) -> None:
    """Fail naming the rejected keys, and the --source they look like."""
    if not converted.rejected:
        return
    by_reason: dict[str, list[str]] = {}
    for key, reason in converted.rejected.items():
        by_reason.setdefault(reason, []).append(key)
    lines = [f"  {reason}: {_listing(keys)}" for reason, keys in by_reason.items()]
    hint = "" if converted.state else " (no key looked like a ViT parameter: is this another architecture?)"
    keys = converted.rejected
    if source != "hf-vit" and any(k.startswith(("encoder.layer.", "layers.", "embeddings.", "vit.")) for k in keys):
        lines.append("These look like transformers ViT keys: use --source hf-vit.")
    elif source == "hf-vit" and any(k.startswith(("blocks.", "patch_embed.")) for k in keys):
        lines.append("These look like DINO/timm keys: use --source dino or --source timm.")
    raise ValueError(f"The checkpoint does not fit a {source} ViT{hint}; offending keys:\n" + "\n".join(lines))


def infer_architecture(converted: ConvertedState) -> dict:
    """Architecture sizes from tensor shapes; a ValueError names missing or inconsistent keys."""
    state = converted.state
    required = ["embeddings.cls_token", "embeddings.position_embeddings",
                "embeddings.patch_embeddings.projection.weight", "layernorm.weight"]
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"Cannot infer the architecture: the checkpoint has no {_listing(missing)} "
                         "(EntmaxViT names; see the key mapping of the chosen --source)")
    cls = state["embeddings.cls_token"]
    if cls.ndim != 3 or cls.shape[:2] != (1, 1):
        raise ValueError(f"{converted.sources('embeddings.cls_token')} has shape {tuple(cls.shape)}, expected (1, 1, D)")
    hidden = cls.shape[-1]
    conv = state["embeddings.patch_embeddings.projection.weight"]  # (D, C, p, p)
    if conv.ndim != 4 or conv.shape[2] != conv.shape[3] or conv.shape[0] != hidden:
        raise ValueError(f"{converted.sources('embeddings.patch_embeddings.projection.weight')} has shape "
                         f"{tuple(conv.shape)}, expected a square kernel (D={hidden}, C, p, p)")
    patch, channels = conv.shape[2], conv.shape[1]
    pos = state["embeddings.position_embeddings"]  # (1, 1 + N, D)
    side = math.isqrt(max(pos.shape[1] - 1, 0)) if pos.ndim == 3 else 0
    if pos.ndim != 3 or side * side != pos.shape[1] - 1 or side == 0:
        raise ValueError(
            f"{converted.sources('embeddings.position_embeddings')} has shape {tuple(pos.shape)}: expected "
            "(1, 1 + side^2, D) ([CLS] + a square patch grid; extra tokens such as distillation are not supported)"
        )
    layers = sorted({int(m.group(1)) for k in state if (m := _LAYER.match(k))})
    if not layers:
        raise ValueError("The checkpoint has no transformer blocks (no keys mapping to encoder.layer.N.*)")
    if layers != list(range(len(layers))):
        raise ValueError(f"Transformer block indices are not contiguous from 0: {layers}")
    fc1 = state.get("encoder.layer.0.mlp.fc1.weight")
    if fc1 is None:
        raise ValueError("Cannot infer the MLP width: no key maps to encoder.layer.0.mlp.fc1.weight")
    return dict(hidden_size=hidden, num_hidden_layers=len(layers), patch_size=patch, num_channels=channels,
                image_size=side * patch, intermediate_size=fc1.shape[0],
                qkv_bias="encoder.layer.0.attention.qkv.bias" in state)


def resolve_num_heads(hidden_size: int, explicit: Optional[int], from_source: Optional[int], source_name: str) -> int:
    """Heads cannot be read off a fused qkv weight: --num-heads, else the source's config, else head_dim 64."""
    if explicit is not None:
        if from_source is not None and explicit != from_source:
            raise ValueError(f"--num-heads {explicit} contradicts the {source_name} config ({from_source} heads)")
        heads = explicit
    elif from_source is not None:
        heads = from_source
    elif hidden_size in STANDARD_HEADS:
        heads = STANDARD_HEADS[hidden_size]
        logger.warning("Assuming %d attention heads for width %d (head_dim 64, the DINO/timm convention); "
                       "pass --num-heads if the source used another count", heads, hidden_size)
    else:
        raise ValueError(f"Cannot infer the number of attention heads for width {hidden_size} from a fused qkv "
                         "weight; pass --num-heads N")
    if heads <= 0 or hidden_size % heads:
        raise ValueError(f"num_heads {heads} does not divide the width {hidden_size}")
    return heads


def load_strict(model: nn.Module, converted: ConvertedState) -> None:
    """Copy ``converted.state`` into ``model``; one ValueError names every missing/unexpected/mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in converted.state]
    unexpected = [converted.sources(k) for k in converted.state if k not in expected]
    mismatched = [f"{converted.sources(k)} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
                  for k, v in converted.state.items() if k in expected and v.shape != expected[k].shape]
    problems = [f"{what}: {_listing(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
    if problems:
        raise ValueError("The checkpoint does not match the inferred EntmaxViT architecture; " + "; ".join(problems))
    state = {k: v.to(expected[k].dtype) for k, v in converted.state.items()}
    model.load_state_dict(state, strict=True)


# --- DINO / timm
_DINO_RENAMES: Rules = [
    (re.compile(r"^cls_token$"), "embeddings.cls_token"),
    (re.compile(r"^pos_embed$"), "embeddings.position_embeddings"),
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"embeddings.patch_embeddings.projection.\1"),
    (re.compile(r"^blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)$"), r"encoder.layer.\1.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)$"), r"encoder.layer.\1.attention.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"encoder.layer.\1.mlp.\2.\3"),
    (re.compile(r"^norm\.(weight|bias)$"), r"layernorm.\1"),
]
_DINO_DROPPED: Rules = [
    (re.compile(r"^head\."), "projection/classification head (not part of the backbone)"),
]
_DINO_REJECTED: Rules = [
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
        out.add_by_rules(key, tensor, _DINO_RENAMES, _DINO_DROPPED, _DINO_REJECTED,
                         "unexpected key for a DINO/timm ViT")
    return out


# --- transformers ViT
_BLOCK = r"^(?:encoder\.layer|layers)\.(\d+)\."
_QKV = re.compile(_BLOCK + r"attention\.(?:attention\.(query|key|value)|(q_proj|k_proj|v_proj))\.(weight|bias)$")
_QKV_INDEX = {"query": 0, "key": 1, "value": 2, "q_proj": 0, "k_proj": 1, "v_proj": 2}
_HF_RENAMES: Rules = [
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
_HF_DROPPED: Rules = [
    (re.compile(r"^pooler\."), "HF pooler (dense + tanh; EntmaxViT's pooler_output is the normed [CLS] as DINO)"),
    (re.compile(r"^classifier\."), "ViTForImageClassification classifier (not part of the backbone)"),
    (re.compile(r"^embeddings\.mask_token$"), "masked-image-modeling mask token (unused by the encoder)"),
]


def convert_hf_vit_keys(state: dict[str, torch.Tensor]) -> ConvertedState:
    """Rename (and fuse q/k/v of) a transformers ViT state dict (``vit.`` prefix already stripped)."""
    out = ConvertedState()
    parts: dict[tuple[int, str], dict[int, tuple[torch.Tensor, str]]] = {}  # (layer, weight|bias) -> q/k/v
    for key, tensor in state.items():
        match = _QKV.match(key)
        if match:
            layer, old, new, kind = match.groups()
            parts.setdefault((int(layer), kind), {})[_QKV_INDEX[old or new]] = (tensor, key)
        else:
            out.add_by_rules(key, tensor, _HF_RENAMES, _HF_DROPPED, [], "unexpected key for a transformers ViT")
    for (layer, kind), slot in sorted(parts.items()):
        if len(slot) < 3:
            present = [slot[i][1] for i in sorted(slot)]
            missing = [n for i, n in enumerate(("query/q_proj", "key/k_proj", "value/v_proj")) if i not in slot]
            raise ValueError(f"Layer {layer}: {kind} of {missing} missing next to {present}; cannot fuse q/k/v")
        (q, *_), (k, *_), (v, *_) = slot[0], slot[1], slot[2]
        keys = [slot[i][1] for i in range(3)]
        if not (q.shape == k.shape == v.shape):
            shapes = [tuple(t.shape) for t in (q, k, v)]
            raise ValueError(f"Layer {layer}: q/k/v {kind} shapes differ: {shapes} ({keys})")
        # DINO's fused rows [q (D); k (D); v (D)], heads contiguous in each: how HF splits its projections.
        out.put(f"encoder.layer.{layer}.attention.qkv.{kind}", torch.cat([q, k, v], dim=0), *keys)
    return out
