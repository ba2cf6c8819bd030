"""Image + mask rows for the linear segmentation probe; label conventions and transforms: docs/evaluation.md. dinov2
pads its train crops with image 0, mask ignore; its eval keeps the mask at its original size, one image per batch."""

import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

from entmax_vit.data.datasets import undecoded_images
from entmax_vit.data.images import ImageDecodeError, ImageRows, decode_mask

from .image_data import normalize
from .metrics import reduce_zero_label

# Cityscapes labelId -> trainId (the 19 evaluated classes); every other id, incl. -1, is ignored.
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                            25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def convert_labels(mask: np.ndarray, *, label_mapping: str = "none", reduce_zero: bool = False,
                   ignore_index: int = 255) -> torch.Tensor:
    """Raw mask (H, W) -> training labels (H, W) int64 following the dataset's convention."""
    labels = torch.from_numpy(np.ascontiguousarray(mask)).long()
    if label_mapping == "cityscapes_ids":
        lut = torch.full((256,), ignore_index, dtype=torch.long)
        lut[list(CITYSCAPES_ID_TO_TRAINID)] = torch.tensor(list(CITYSCAPES_ID_TO_TRAINID.values()))
        labels = lut[labels.clamp(0, 255)]
    elif label_mapping != "none":
        raise ValueError(f"label_mapping must be 'none' or 'cityscapes_ids', got {label_mapping!r}")
    if reduce_zero:
        labels = reduce_zero_label(labels, ignore_index)
    return labels


class SegmentationRows(torch.utils.data.Dataset):
    """Rows -> {"pixel_values": (3, h, w), "labels": (h', w') int64, "valid": bool}."""

    def __init__(self, ds: Any, image_column: str, mask_column: str, *, protocol: str, train: bool,
                 input_size: int, mask_size: int, hflip: bool, scale_range: tuple[float, float],
                 label_mapping: str = "none", reduce_zero: bool = False, ignore_index: int = 255) -> None:
        if protocol not in ("neco", "dinov2"):
            raise ValueError(f"protocol must be 'neco' or 'dinov2', got {protocol!r}")
        self.rows = ImageRows(ds, image_column, mask_column)  # a mask must match its image, or the row is invalid
        self.protocol, self.train, self.input_size, self.mask_size = protocol, train, input_size, mask_size
        self.hflip, self.scale_range = hflip, scale_range
        self.label_kwargs = dict(label_mapping=label_mapping, reduce_zero=reduce_zero, ignore_index=ignore_index)
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict:
        decoded = self.rows.read(idx)
        if decoded is None:  # the data layer's policy: kept, marked invalid, counted by the loops
            s, m = self.input_size, (self.mask_size if self.protocol == "neco" else self.input_size)
            return {"pixel_values": torch.zeros(3, s, s), "labels": torch.full((m, m), self.ignore_index),
                    "valid": False}
        image, mask = decoded.image, decoded.mask
        labels = convert_labels(mask, **self.label_kwargs)  # (H, W)
        pixels = TF.to_tensor(image)  # (3, H, W) in [0, 1]
        if self.protocol == "neco":
            pixels = F.interpolate(pixels[None], size=(self.input_size,) * 2, mode="bilinear", align_corners=False,
                                   antialias=True)[0]
            labels = F.interpolate(labels[None, None].float(), size=(self.mask_size,) * 2, mode="nearest")[0, 0].long()
        elif self.train:
            pixels, labels = self._scale_crop(pixels, labels)
        else:
            h, w = pixels.shape[-2:]
            scale = self.input_size / min(h, w)
            pixels = F.interpolate(pixels[None], size=(round(h * scale), round(w * scale)), mode="bilinear",
                                   align_corners=False, antialias=True)[0]
        if self.train and self.hflip and random.random() < 0.5:
            pixels, labels = pixels.flip(-1), labels.flip(-1)
        return {"pixel_values": normalize(pixels), "labels": labels, "valid": True}

    def _scale_crop(self, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DINOv2/mmseg training augmentation: random rescale, random crop with padding."""
        s = self.input_size
        h, w = pixels.shape[-2:]
        scale = s * random.uniform(*self.scale_range) / min(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        pixels = F.interpolate(pixels[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        labels = F.interpolate(labels[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
        ph, pw = max(0, s - nh), max(0, s - nw)
        if ph or pw:
            pixels = F.pad(pixels, (0, pw, 0, ph), value=0.0)
            labels = F.pad(labels, (0, pw, 0, ph), value=self.ignore_index)
        top = random.randint(0, pixels.shape[-2] - s)
        left = random.randint(0, pixels.shape[-1] - s)
        return pixels[:, top : top + s, left : left + s], labels[top : top + s, left : left + s]


def _masks(ds: Any, mask_column: str, limit: int):
    """The first ``limit`` readable masks, without decoding (or tripping over) the images."""
    ds = undecoded_images(ds, mask_column, keep=())
    for i in range(min(limit, len(ds))):
        try:
            yield decode_mask(ds[i][mask_column])
        except ImageDecodeError:
            continue


def has_raw_cityscapes_ids(ds: Any, mask_column: str, limit: int = 20) -> bool:
    """True if any of the first masks holds a value in 19..33: a raw labelId, never a trainId (0..18, 255)."""
    return any(((mask >= 19) & (mask <= 33)).any() for mask in _masks(ds, mask_column, limit))


def infer_num_classes(ds: Any, mask_column: str, ignore_index: int, label_kwargs: dict, limit: int = 200) -> int:
    """1 + the largest label in the first ``limit`` masks (used when a preset gives no class count)."""
    top = -1
    for mask in _masks(ds, mask_column, limit):
        labels = convert_labels(mask, **label_kwargs)
        labels = labels[labels != ignore_index]
        if labels.numel():
            top = max(top, int(labels.max()))
    if top < 0:
        raise ValueError("could not infer the number of classes: no labelled pixels in the first masks")
    return top + 1
