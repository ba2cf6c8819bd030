"""Backbone + head over a list of crops of mixed resolutions, as official DINO's MultiCropWrapper.

Crops of the same resolution are consecutive (2 global, then N local) and run through the backbone in one
batch each; the [CLS] features are concatenated and go through the head together:

    crops: [ (B,3,G,G), (B,3,G,G), (B,3,L,L) x N ]  ->  backbone on (2B,3,G,G) and (N*B,3,L,L)
    -> [CLS] (2B + N*B, D)  ->  head  ->  (2B + N*B, out_dim), crop-major (crop 0 of all images first).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def resolution_groups(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """[(start, end)) index ranges of consecutive crops sharing a resolution, e.g. [(0, 2), (2, 10)]."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


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
        for start, end in resolution_groups(crops):
            batch = torch.cat(list(crops[start:end]))  # ((end-start)*B, 3, H, W)
            features.append(self.backbone(pixel_values=batch).pooler_output)  # ((end-start)*B, D)
        return self.head(torch.cat(features))  # (num_crops*B, out_dim)

