"""Decoding dataset cells, and the one policy for a row that cannot be decoded (docs/data.md, "Unreadable rows"):
never lost silently (:class:`SkipCounter`), never fatal for one file (``None``).
"""

import logging
import os
from collections import namedtuple
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image

from entmax_vit.data.datasets import undecoded_images
from entmax_vit.modeling.image_decoding import ImageDecodeError, decode_image, open_image

logger = logging.getLogger(__name__)


def decode_mask(value: Any) -> np.ndarray:
    """A mask cell -> (H, W) int64 class ids: the decoder's file checks but no orientation or colour conversion. A
    3-channel mask must have equal channels: one channel of a colour-coded mask would be wrong class ids."""
    if isinstance(value, (Image.Image, dict, str, bytes, bytearray, os.PathLike)):
        value = open_image(value)  # a datasets Image(decode=False) dict: bytes win over path
    elif not isinstance(value, np.ndarray):
        raise ImageDecodeError(f"unsupported mask value {type(value).__name__}")
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and (arr[..., :3] == arr[..., :1]).all():
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ImageDecodeError(f"a segmentation mask must be one-channel class ids (H, W), got shape {arr.shape}")
    return arr.astype(np.int64)


class SkipCounter:
    """The one count and log of unreadable rows: the first ``verbose_first`` with their reason, then one line every
    ``every``. Per process: totals across workers or ranks count the ``None`` / ``valid=False`` results instead."""

    def __init__(self, what: str = "image", verbose_first: int = 10, every: int = 100) -> None:
        self.what, self.verbose_first, self.every = what, verbose_first, every
        self.count = 0

    def record(self, where: Any, error: BaseException) -> None:
        self.count += 1
        if self.count <= self.verbose_first:
            logger.warning("skipping unreadable %s %s: %s", self.what, where, error)
        elif self.count % self.every == 0:
            logger.warning("skipped %d unreadable %ss so far (latest %s: %s)", self.count, self.what, where, error)


def describe_cell(cell: Any, where: str) -> str:
    """``where`` plus the cell's file when it has one: what a user needs to find and fix the file."""
    path = cell.get("path") if isinstance(cell, dict) else cell if isinstance(cell, (str, os.PathLike)) else None
    return f"{where} ({path})" if path else where


# One readable row: RGB image, mask (H, W) int64 class ids or None, and the raw row (labels, ...).
Decoded = namedtuple("Decoded", "image mask row")


class ImageRows:
    """A split's image (and mask) columns read raw and decoded here. ``keep`` (None: all) lists the other columns
    a caller needs; with ``mask_required=False`` a row without a mask reads with ``mask=None``, not as unreadable."""

    def __init__(self, ds: Any, image_column: str, mask_column: Optional[str] = None,
                 keep: Optional[tuple[str, ...]] = None, mask_required: bool = True) -> None:
        columns = (image_column,) + ((mask_column,) if mask_column else ())
        self.ds = undecoded_images(ds, *columns, keep=keep)
        self.image_column, self.mask_column, self.mask_required = image_column, mask_column, mask_required
        self.skips = SkipCounter("image")

    @property
    def skipped(self) -> int:  # by THIS process
        return self.skips.count

    def __len__(self) -> int:
        return len(self.ds)

    def decode(self, row: dict, where: str) -> Optional[Decoded]:
        try:
            image = decode_image(row[self.image_column])
            cell = row[self.mask_column] if self.mask_column else None
            mask = decode_mask(cell) if cell is not None or (self.mask_column and self.mask_required) else None
            if mask is not None and mask.shape != (image.height, image.width):
                raise ImageDecodeError(f"mask {mask.shape} does not match its image {image.height}x{image.width}")
        except ImageDecodeError as err:
            self.skips.record(where, err)  # the error names the file when there is one
            return None
        return Decoded(image, mask, row)

    def read(self, index: int) -> Optional[Decoded]:
        return self.decode(self.ds[int(index)], f"#{index}")

    def describe(self, index: int) -> str:
        return describe_cell(self.ds[int(index)][self.image_column], f"#{index}")

    def stream(self) -> Iterator[tuple[int, Optional[Decoded], str]]:
        """(position, decoded row or None, description naming the item and its file)."""
        for i, row in enumerate(self.ds):
            where = f"stream item {i}"
            yield i, self.decode(row, where), describe_cell(row[self.image_column], where)

