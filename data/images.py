"""Image decoding for training and evaluation: a thin layer over the project's one decoder.

    img = to_rgb(row["image"])          # PIL image, {"bytes", "path"} dict, bytes, path, numpy array, tensor

The decoding itself lives in ``entmax_vit.modeling.image_decoding`` (Hub code: the image processor and the
pipelines use the same function, so a model sees the same pixels in training, evaluation and on the Hub); its
docstring states every rule (truncation, decompression bombs, EXIF, transparency on white, 16-bit as x / 257,
float clipped to [0, 1], 32-bit integer). This module adds what the data path needs on top: the
:class:`SkipCounter` that turns :class:`ImageDecodeError` into logged, counted skips.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from PIL import Image

from entmax_vit.modeling.image_decoding import WHITE, Color, ImageDecodeError, decode_image
from entmax_vit.modeling.image_decoding import _warn_truncated_allowed  # noqa: F401 - re-exported for tests

logger = logging.getLogger(__name__)


def to_rgb(value: Any, *, background: Color = WHITE, max_pixels: Optional[int] = None) -> Image.Image:
    """Decode ``value`` into a fully loaded 8-bit RGB PIL image (see
    :func:`entmax_vit.modeling.image_decoding.decode_image`); raises :class:`ImageDecodeError`."""
    return decode_image(value, background=background, max_pixels=max_pixels)


class SkipCounter:
    """Counts skipped samples and logs them without flooding the log.

    The first ``verbose_first`` skips are logged with their reason, then one line every ``every`` skips.
    With DataLoader workers each worker holds its own counter; the authoritative total is the per-batch
    count returned by ``multicrop_collate``.
    """

    def __init__(self, what: str = "image", verbose_first: int = 10, every: int = 100) -> None:
        self.what, self.verbose_first, self.every = what, verbose_first, every
        self.count = 0

    def record(self, where: Any, error: BaseException) -> None:
        self.count += 1
        if self.count <= self.verbose_first:
            logger.warning("skipping unreadable %s %s: %s", self.what, where, error)
        elif self.count % self.every == 0:
            logger.warning("skipped %d unreadable %ss so far (latest %s: %s)", self.count, self.what, where, error)


__all__ = ["ImageDecodeError", "SkipCounter", "WHITE", "to_rgb"]
