"""DINO projection head: 3-layer MLP -> L2 normalisation -> weight-normalised, bias-free last layer.

    (B, D) --Linear/GELU--> (B, hidden) --Linear/GELU--> (B, hidden) --Linear--> (B, bottleneck)
           --L2 normalise--> (B, bottleneck) --WeightNormLinear--> (B, out_dim)

The last layer is written out explicitly (``weight_v`` direction, ``weight_g`` per-row magnitude) instead of
``torch.nn.utils.weight_norm``: both are ordinary parameters, so the teacher EMA, optimizer groups, gradient
freezing and safetensors checkpoints treat them like any other weight. With ``norm_last_layer`` the magnitude
stays fixed at 1 (``weight_g.requires_grad = False``), as official DINO, which stabilises training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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

