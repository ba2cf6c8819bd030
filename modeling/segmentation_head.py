"""Linear semantic-segmentation probe on frozen EntmaxViT patch features.

Shared by the evaluation code (which trains it) and the Hub segmentation pipeline (which runs it), so it
lives with the Hub code: imports only the standard library and torch. The head is saved as
``segmentation_head.safetensors`` (weights) + ``segmentation_head.json`` (everything needed to rebuild it
and to run it the way it was trained). The safetensors file is read and written by the small codec below,
so the Hub copy needs no extra package; tests check it against the `safetensors` library.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

HEAD_WEIGHTS = "segmentation_head.safetensors"
HEAD_CONFIG = "segmentation_head.json"

# ----------------------------------------------------------------------------------------------------------
# Minimal safetensors codec (format: u64 little-endian header size, JSON header, raw little-endian data)
# ----------------------------------------------------------------------------------------------------------
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: Optional[dict] = None) -> None:
    """Write tensors to a .safetensors file (atomically: temporary file, then rename)."""
    header: dict[str, Any] = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data section to 8 bytes
    folder, name = os.path.split(os.fspath(path))
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for raw in blobs:
            f.write(raw)
    os.replace(tmp, path)


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors file into CPU tensors; malformed files raise ValueError."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    size = int.from_bytes(data[:8], "little")
    if 8 + size > len(data):
        raise ValueError(f"{path}: corrupt safetensors header")
    header = json.loads(data[8 : 8 + size])
    body = memoryview(data)[8 + size :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        if end > len(body):
            raise ValueError(f"{path}: tensor {name!r} runs past the end of the file")
        flat = torch.frombuffer(bytearray(body[start:end]), dtype=torch.uint8) if end > start else torch.empty(0, dtype=torch.uint8)
        out[name] = flat.view(dtype).reshape(info["shape"]).clone()
    return out


# ----------------------------------------------------------------------------------------------------------
# The probe
# ----------------------------------------------------------------------------------------------------------
@dataclass
class SegmentationHeadConfig:
    """How the probe reads the backbone and what it predicts."""

    num_labels: int
    hidden_size: int
    layers: list[int] = field(default_factory=lambda: [-1])  # 0-based block indices (negative from the end)
    use_cls_token: bool = False      # concatenate [CLS] to every patch feature (the paper: [CLS] complements)
    backbone_norm: bool = True       # apply the backbone's final LayerNorm to each block output
    batch_norm: bool = False         # BatchNorm before the 1x1 conv (DINOv2 linear protocol)
    input_size: int = 448            # side of the (square) input the probe was trained on
    ignore_index: int = 255
    id2label: dict[int, str] = field(default_factory=dict)
    protocol: str = "neco"

    @property
    def in_channels(self) -> int:
        return self.hidden_size * len(self.layers) * (2 if self.use_cls_token else 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SegmentationHeadConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["id2label"] = {int(k): v for k, v in known.get("id2label", {}).items()}
        return cls(**known)


class LinearSegmentationHead(nn.Module):
    """(Optional BatchNorm +) 1x1 convolution over patch feature maps: (B, C, h, w) -> (B, K, h, w)."""

    def __init__(self, config: SegmentationHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.bn = nn.BatchNorm2d(config.in_channels) if config.batch_norm else nn.Identity()
        self.conv = nn.Conv2d(config.in_channels, config.num_labels, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(features))

    # -- reading the backbone ------------------------------------------------------------------------------
    def extract_features(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen features (B, C, H/p, W/p) from an EntmaxViTModel as configured (layers, norm, [CLS])."""
        cfg = self.config
        outputs = model.get_intermediate_layers(
            pixel_values, n=cfg.layers, reshape=True, return_class_token=cfg.use_cls_token, norm=cfg.backbone_norm
        )
        maps = []
        for out in outputs:
            if cfg.use_cls_token:
                patches, cls = out
                maps += [patches, cls[:, :, None, None].expand_as(patches)]
            else:
                maps.append(out)
        return torch.cat(maps, dim=1)

    def predict(self, model: nn.Module, pixel_values: torch.Tensor, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Logits (B, K, H, W), bilinearly upsampled to ``size`` (default: the input's size)."""
        logits = self(self.extract_features(model, pixel_values))
        size = size or tuple(pixel_values.shape[-2:])
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> str | os.PathLike:
        """Write the head folder; returns ``directory`` as given."""
        os.makedirs(directory, exist_ok=True)
        save_safetensors(self.state_dict(), os.path.join(directory, HEAD_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(directory, HEAD_CONFIG), "w") as f:
            f.write(json.dumps(self.config.to_dict(), indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "LinearSegmentationHead":
        for name in (HEAD_WEIGHTS, HEAD_CONFIG):
            if not os.path.isfile(os.path.join(directory, name)):
                raise FileNotFoundError(f"{directory} has no {name}: not a segmentation-head folder")
        with open(os.path.join(directory, HEAD_CONFIG)) as f:
            config = SegmentationHeadConfig.from_dict(json.load(f))
        head = cls(config)
        state = load_safetensors(os.path.join(directory, HEAD_WEIGHTS))
        missing, unexpected = head.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"Segmentation head weights do not match its config: missing {missing}, unexpected {unexpected}")
        return head.to(map_location)


__all__ = [
    "HEAD_CONFIG",
    "HEAD_WEIGHTS",
    "LinearSegmentationHead",
    "SegmentationHeadConfig",
    "load_safetensors",
    "save_safetensors",
]
