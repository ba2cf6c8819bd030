"""Linear semantic-segmentation probe on frozen EntmaxViT patch features: trained by the evaluation code, run by
the Hub segmentation pipeline (so Hub code). Saved as HEAD_WEIGHTS + HEAD_CONFIG (how to rebuild and run it)."""

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

HEAD_WEIGHTS = "segmentation_head.safetensors"
HEAD_CONFIG = "segmentation_head.json"


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

    def extract_features(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen features (B, C, H/p, W/p) from an EntmaxViTModel as configured (layers, norm, [CLS])."""
        cfg = self.config
        outputs = model.get_intermediate_layers(pixel_values, n=cfg.layers, reshape=True,
                                                return_class_token=cfg.use_cls_token, norm=cfg.backbone_norm)
        if cfg.use_cls_token:  # [CLS] (B, D) broadcast over the patch map
            outputs = [t for patches, cls in outputs for t in (patches, cls[:, :, None, None].expand_as(patches))]
        return torch.cat(list(outputs), dim=1)

    def predict(self, model: nn.Module, pixel_values: torch.Tensor, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Logits (B, K, H, W), bilinearly upsampled to ``size`` (default: the input's size)."""
        logits = self(self.extract_features(model, pixel_values))
        size = size or tuple(pixel_values.shape[-2:])
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def save(self, directory: str | os.PathLike) -> str | os.PathLike:
        os.makedirs(directory, exist_ok=True)
        # written atomically (temporary file, then rename): a crash never leaves half a head
        tmp = os.path.join(directory, f".{HEAD_WEIGHTS}.tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, tmp,
                  metadata={"format": "pt"})
        os.replace(tmp, os.path.join(directory, HEAD_WEIGHTS))
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
        path = os.path.join(directory, HEAD_WEIGHTS)
        try:
            state = load_file(path, device="cpu")
        except Exception as err:  # noqa: BLE001 - safetensors raises SafetensorError / OSError for malformed files
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
        missing, unexpected = head.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"Segmentation head weights do not match its config: missing {missing}, unexpected {unexpected}")
        return head.to(map_location)
