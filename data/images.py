"""Robust image decoding: anything a dataset may hold -> an RGB ``PIL.Image.Image``, or a clear error.

    img = to_rgb(row["image"])          # PIL image, {"bytes", "path"} dict, bytes, path, numpy array, tensor

Decisions (one place, documented):
- Truncated files are an error. PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never changed: a
  half-decoded JPEG (grey bottom rows) would silently poison training. The image is fully decoded here
  (``load()``) so every decode error surfaces inside ``to_rgb``.
- Decompression bombs (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``, or ``max_pixels``) are an error,
  never only a warning.
- EXIF orientation is applied (a phone photo stored sideways comes out upright).
- Transparency (RGBA, LA, PA, P with a transparent index) is composited on WHITE by default: images with
  alpha are mostly logos, icons and cut-outs made to be shown on a light page; dropping alpha instead would
  expose whatever colour the encoder left under transparent pixels. Pass ``background=(0, 0, 0)`` for black.
- 16-bit images (I;16*, uint16 arrays) are scaled by the dtype range (x / 257, rounded), so 65535 -> 255 and
  the full tonal range is kept, never clipped at 255. 32-bit integer ("I") and float ("F") images see
  ``_scale_to_uint8`` for the rule.

Every failure raises :class:`ImageDecodeError` (a ``ValueError``) naming the source and the reason; the
training data path catches it, skips the sample and counts it (:class:`SkipCounter`).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)


class ImageDecodeError(ValueError):
    """An input that cannot be turned into an RGB image (unreadable, truncated, empty, not an image, too big)."""


# ---------------------------------------------------------------------------------------------- public API
def to_rgb(value: Any, *, background: Color = WHITE, max_pixels: Optional[int] = None) -> Image.Image:
    """Decode ``value`` into a fully loaded 8-bit RGB PIL image.

    Args:
        value: a PIL image; a ``datasets`` image dict ``{"bytes": ..., "path": ...}`` (bytes win over path);
            raw encoded ``bytes``; a file path; a numpy array (H, W), (H, W, 1|3|4) or channel-first
            (1|3|4, H, W); or a torch tensor of the same layouts.
        background: RGB colour that transparent pixels are composited on (default white, see module doc).
        max_pixels: refuse images with more pixels than this (default ``PIL.Image.MAX_IMAGE_PIXELS``).

    Raises:
        ImageDecodeError: for empty, truncated, corrupt or non-image input, unsupported array layouts and
            decompression bombs.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(value, Image.Image):
        return _pil_to_rgb(value, background, limit, source="PIL image")
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return _decode_bytes(bytes(data), background, limit, source=f"bytes of {path}" if path else "bytes")
        if path:
            return _decode_path(path, background, limit)
        raise ImageDecodeError(f"image dict has neither 'bytes' nor 'path': keys {sorted(value)}")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(value), background, limit, source="bytes")
    if isinstance(value, (str, os.PathLike)):
        return _decode_path(value, background, limit)
    if isinstance(value, np.ndarray) or type(value).__module__.startswith("torch"):
        return _array_to_rgb(value, background, limit)
    if value is None:
        raise ImageDecodeError("image is None (missing value in the dataset)")
    raise ImageDecodeError(f"cannot make an image from a {type(value).__name__}")


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


# ------------------------------------------------------------------------------------------------ decoding
def _decode_path(path: str | os.PathLike, background: Color, limit: Optional[int]) -> Image.Image:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageDecodeError(f"cannot read image file {path}: {err}") from err
    return _decode_bytes(data, background, limit, source=str(path))


def _decode_bytes(data: bytes, background: Color, limit: Optional[int], source: str) -> Image.Image:
    if len(data) == 0:
        raise ImageDecodeError(f"{source}: empty image data (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL only WARNS between MAX_IMAGE_PIXELS and 2x that; we want an error in both ranges.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(f"{source}: refused as a decompression bomb: {err}") from err
    except UnidentifiedImageError as err:
        raise ImageDecodeError(f"{source}: not a recognised image format ({len(data)} bytes)") from err
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt headers
        raise ImageDecodeError(f"{source}: corrupt image header: {type(err).__name__}: {err}") from err
    return _pil_to_rgb(img, background, limit, source=source)


def _pil_to_rgb(img: Image.Image, background: Color, limit: Optional[int], source: str) -> Image.Image:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"{source}: image has no pixels (size {img.size})")
    if limit is not None and width * height > limit:
        raise ImageDecodeError(
            f"{source}: refused as a decompression bomb: {width}x{height} = {width * height} pixels exceeds the "
            f"limit of {limit} (raise PIL.Image.MAX_IMAGE_PIXELS or pass max_pixels to allow it)"
        )
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        _warn_truncated_allowed()
    try:
        img.load()  # full decode now: truncation and corrupt data raise here, not later in a transform
    except Exception as err:  # noqa: BLE001 - OSError, SyntaxError, EOFError, zlib.error, struct.error, ...
        raise ImageDecodeError(f"{source}: cannot decode image data ({type(err).__name__}: {err})") from err
    img = _apply_exif_orientation(img, source)
    try:
        return _mode_to_rgb(img, background)
    except ImageDecodeError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ImageDecodeError(f"{source}: cannot convert mode {img.mode!r} to RGB ({err})") from err


@functools.lru_cache(maxsize=1)
def _warn_truncated_allowed() -> None:
    logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by some code in this process: truncated "
                   "images now decode with grey fill instead of being skipped")


def _apply_exif_orientation(img: Image.Image, source: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception as err:  # noqa: BLE001 - a broken EXIF block should not cost us the pixels
        logger.debug("%s: ignoring unreadable EXIF orientation (%s)", source, err)
        return img


# ----------------------------------------------------------------------------------------- mode handling
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


def _mode_to_rgb(img: Image.Image, background: Color) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        # A palette with a transparent index (GIF/PNG) must be composited, else the "hidden" colour shows.
        if "transparency" in img.info:
            return _composite(img.convert("RGBA"), background)
        return img.convert("RGB")
    if mode in _ALPHA_MODES:
        return _composite(img.convert("RGBA"), background)
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(img), mode)).convert("RGB")
    if mode in ("1", "L", "CMYK", "YCbCr", "RGBX"):
        return img.convert("RGB")
    if mode in ("LAB", "HSV"):
        return img.convert("RGB") if mode == "HSV" else _lab_to_rgb(img)
    raise ImageDecodeError(f"unsupported image mode {mode!r}")


def _lab_to_rgb(img: Image.Image) -> Image.Image:
    from PIL import ImageCms

    transform = ImageCms.buildTransformFromOpenProfiles(
        ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
    )
    return ImageCms.applyTransform(img, transform)


def _composite(rgba: Image.Image, background: Color) -> Image.Image:
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _scale_to_uint8(arr: np.ndarray, kind: str) -> np.ndarray:
    """Map a high-bit-depth single-channel or colour array to uint8.

    - 16-bit (I;16*, uint16): x / 257 rounded (dtype range, so 0 -> 0 and 65535 -> 255).
    - bool: False -> 0, True -> 255.
    - integer ("I", int32, ...): values already in [0, 255] are kept; values in [0, 65535] are treated as
      16-bit (16-bit PNGs often open as "I"); anything else is min-max stretched.
    - float ("F"): values in [0, 1] are scaled by 255; values in [0, 255] kept; anything else min-max
      stretched. NaN/inf become 0.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if kind in _SIXTEEN_BIT or (arr.dtype.kind == "u" and arr.dtype.itemsize == 2):
        return np.rint(arr.astype(np.float32) / 257.0).astype(np.uint8)
    if arr.size == 0:
        raise ImageDecodeError("image array is empty")
    x = arr.astype(np.float64)
    finite = np.isfinite(x)
    x = np.where(finite, x, 0.0)
    lo, hi = float(x.min()), float(x.max())
    if np.issubdtype(arr.dtype, np.floating):
        if lo >= 0.0 and hi <= 1.0:
            x = x * 255.0
        elif not (lo >= 0.0 and hi <= 255.0):
            x = (x - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(x)
    else:
        if lo >= 0 and hi <= 255:
            pass
        elif lo >= 0 and hi <= 65535:
            x = x / 257.0
        else:
            x = (x - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(x)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _array_to_rgb(value: Any, background: Color, limit: Optional[int]) -> Image.Image:
    if not isinstance(value, np.ndarray):  # torch tensor
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # (C, H, W) -> (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageDecodeError(f"array of shape {tuple(np.shape(value))} is not an image (H, W[, 1|3|4])")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageDecodeError(f"array of shape {arr.shape} has no pixels")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ImageDecodeError(f"array dtype {arr.dtype} is not numeric")
    arr8 = np.ascontiguousarray(_scale_to_uint8(arr, str(arr.dtype)))
    img = Image.fromarray(arr8)  # (H, W) -> L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA
    return _pil_to_rgb(img, background, limit, source=f"array {arr.shape}")


__all__ = ["ImageDecodeError", "SkipCounter", "WHITE", "to_rgb"]
