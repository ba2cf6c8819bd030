"""Images (and masks, where present) for the analysis, as tensors, from a ``load_image_dataset`` source or a plain
folder of images (masks from ``mask_dir``, named like the images). As DINO's visualize_attention, whole images:
shorter side resized (bicubic; masks nearest), centre-cropped, ImageNet-normalised (evaluation's eval transform)."""

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from entmax_vit.data.datasets import find_column, load_image_dataset
from entmax_vit.data.images import ImageRows, decode_mask
from entmax_vit.evaluation.image_data import ClassificationTransform

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class AnalysisImages:
    """``pixel_values`` (B, 3, S, S) normalised; ``masks`` (B, S, S) long or None; ``names`` per image."""

    pixel_values: torch.Tensor
    masks: Optional[torch.Tensor]
    names: list[str] = field(default_factory=list)
    skipped: int = 0


def preprocess_mask(mask: Any, size: int) -> torch.Tensor:
    """Mask -> (size, size) long tensor with the image's geometry (nearest resampling keeps class ids)."""
    img = Image.fromarray(decode_mask(mask).astype(np.int32), mode="I")
    img = TF.center_crop(TF.resize(img, size, InterpolationMode.NEAREST), size)
    return torch.from_numpy(np.asarray(img).astype(np.int64))


def _find_mask(mask_dir: Path, stem: str) -> Optional[Path]:
    return next((p for p in sorted(mask_dir.glob(f"{stem}.*")) if p.suffix.lower() in IMAGE_SUFFIXES), None)


def _collect(rows: ImageRows, items, num_images: int, size: int, with_masks: bool) -> AnalysisImages:
    """The first ``num_images`` readable rows of ``items``; unreadable ones are skipped and counted."""
    transform = ClassificationTransform(resize=size, crop=size)
    pixels, masks, names = [], [], []
    for name, row in items:
        if len(pixels) >= num_images:
            break
        decoded = rows.decode(row, name)
        if decoded is None:
            continue
        pixels.append(transform(decoded.image))
        names.append(str(name))
        if with_masks:  # no mask for this image: every pixel ignored (255)
            mask = decoded.mask
            masks.append(preprocess_mask(mask, size) if mask is not None else torch.full((size, size), 255))
    if not pixels:
        raise ValueError(f"no readable images found ({rows.skipped} skipped)")
    stacked_masks = torch.stack(masks).long() if with_masks and masks else None
    return AnalysisImages(torch.stack(pixels), stacked_masks, names, rows.skipped)


def load_analysis_images(source: str, *, split: str = "validation", num_images: int = 16, image_size: int = 224,
                         mask_dir: Optional[str] = None, image_column: Optional[str] = None,
                         mask_column: Optional[str] = None, use_masks: bool = True,
                         streaming: bool = False) -> AnalysisImages:
    """The first ``num_images`` readable images of ``source`` (and their masks where the source has them)."""
    path = Path(source).expanduser()
    listing = path.iterdir() if path.is_dir() else ()
    files = sorted(p for p in listing if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if files:  # a plain folder of images
        mdir = Path(mask_dir).expanduser() if (mask_dir and use_masks) else None
        if mdir is not None and not mdir.is_dir():
            raise ValueError(f"mask_dir {mdir} is not a directory")
        rows = ImageRows(None, "image", "mask", mask_required=False)  # a plain folder: rows made here
        items = ((f.name, {"image": f, "mask": _find_mask(mdir, f.stem) if mdir else None}) for f in files)
        return _collect(rows, items, num_images, image_size, mdir is not None)
    if mask_dir:
        raise ValueError("mask_dir applies only to a plain folder of images; datasets carry their own mask column")
    ds = load_image_dataset(source, split=split, streaming=streaming)
    image_col = find_column(ds, "image", image_column)
    mask_col = None
    if use_masks:
        try:
            mask_col = find_column(ds, "mask", mask_column)
        except ValueError:
            if mask_column is not None:
                raise
            logger.info("dataset %s has no mask column: foreground metrics are skipped", source)
    rows = ImageRows(ds, image_col, mask_col, keep=(), mask_required=False)
    items = ((f"{source}[{i}]", row) for i, row in enumerate(itertools.islice(iter(rows.ds), num_images * 2 + 8)))
    return _collect(rows, items, num_images, image_size, mask_col is not None)  # slack above for unreadable rows
