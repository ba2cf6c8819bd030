"""Student and teacher networks of DINO: EntmaxViT backbone + DINO head, run over the crops by a multi-crop wrapper.

    head: (B, D) --Linear/GELU--> (B, hidden) x2 --Linear--> (B, bottleneck) --L2 normalise--> --WeightNormLinear-->
          (B, out_dim). The last layer's ``weight_v`` / ``weight_g`` are plain parameters (no torch weight_norm), so
          the EMA, optimizer groups, freezing and checkpoints treat them like any weight; ``norm_last_layer`` fixes g.
    wrapper: crops [(B,3,G,G) x 2, (B,3,L,L) x N] -> backbone once per resolution -> [CLS] (2B + N*B, D) -> head,
          crop-major (crop 0 of all images first), as official DINO's MultiCropWrapper.
"""

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from entmax_vit.modeling import EntmaxViTModel
from entmax_vit.training.config import DinoConfig, attention_kernel, backbone_config


class WeightNormLinear(nn.Module):
    """``y = x @ (g * v / ||v||_row)^T``, bias-free; ``g`` is (out, 1), ``v`` is (out, in)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        reference = nn.Linear(in_features, out_features, bias=False)  # PyTorch's default init, as official
        self.weight_v = nn.Parameter(reference.weight.detach().clone())  # (out, in)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))  # (out, 1); official fills g with 1

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """Official DINO head (``use_bn=False`` variant, the default)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if num_layers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(num_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # (B, bottleneck)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)  # (B, out_dim)


class MultiCropWrapper(nn.Module):
    """``forward(list of crops) -> head outputs``; the backbone is an EntmaxViTModel (its ``pooler_output`` is
    the final-normed [CLS], DINO's feature)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features = []
        for _, group in itertools.groupby(crops, key=lambda crop: crop.shape[-2:]):  # consecutive crops of one size
            batch = torch.cat(list(group))  # (crops of the group * B, 3, H, W)
            features.append(self.backbone(pixel_values=batch).pooler_output)  # (crops of the group * B, D)
        return self.head(torch.cat(features))  # (num_crops*B, out_dim)


def build_networks(cfg: DinoConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """(student, teacher) with identical weights; the teacher has no drop path, is frozen and in eval mode (no
    dropout/BN in it): only the training loop's EMA updates it."""
    def make(drop_path_rate: float) -> MultiCropWrapper:
        backbone = EntmaxViTModel._from_config(backbone_config(cfg, drop_path_rate),
                                               attn_implementation=attention_kernel(cfg))
        m = cfg.model
        return MultiCropWrapper(backbone, DINOHead(backbone.config.hidden_size, m.out_dim, m.head_hidden_dim,
                                                   m.head_bottleneck_dim, m.head_num_layers, m.norm_last_layer))

    student, teacher = make(cfg.model.drop_path_rate), make(0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False).eval()
    return student, teacher

