"""The one image decoder: training, evaluation, the image processor and the pipelines all call it, so an image
gives the model the same pixels whichever way it arrives. Rules: EntmaxViT's docs/data.md ("Robust decoding").
Hub code."""

import base64
import binascii
import functools
import io
import logging
import os
import warnings
import zlib
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)


class ImageDecodeError(ValueError):
    """An input that cannot be turned into an RGB image (unreadable, truncated, empty, not an image, too big)."""


def decode_image(value: Any, *, background: Color = WHITE, max_pixels: Optional[int] = None,
                 source: Optional[str] = None) -> Image.Image:
    """Decode ``value`` (a PIL image, ``datasets`` dict, bytes, path, file / base64 / ``data:`` str, array or
    tensor) into a fully loaded 8-bit RGB PIL image; ``source`` names encoded bytes in error messages."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    img, source = _open(value, limit, source)
    sixteen = _load(img, source, limit)
    try:
        if sixteen is not None:
            exif = img.getexif()
            img = Image.fromarray(_to_uint8(sixteen), "RGBA" if sixteen.shape[-1] == 4 else "RGB")
            if exif:
                img.info["exif"] = exif.tobytes()  # the orientation travels with the exact pixels
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as err:  # noqa: BLE001 - a broken EXIF block should not cost us the pixels
            logger.debug("%s: ignoring unreadable EXIF orientation (%s)", source, err)
        return _mode_to_rgb(img, background)
    except ImageDecodeError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ImageDecodeError(f"{source}: cannot convert mode {img.mode!r} to RGB ({err})") from err


def open_image(value: Any, *, max_pixels: Optional[int] = None) -> Image.Image:
    """The same checks as :func:`decode_image` (bombs, truncation, unreadable data) but the pixels are returned
    as stored: no EXIF orientation, no mode conversion. For label masks, whose values are class ids."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    img, source = _open(value, limit)
    _load(img, source, limit)
    return img


def _open(value: Any, limit: Optional[int], name: Optional[str] = None) -> tuple[Image.Image, str]:
    """(lazily opened PIL image, source name) of any input; arrays are converted here."""
    if isinstance(value, Image.Image):
        return value, f"PIL image {value.filename}" if getattr(value, "filename", "") else "PIL image"
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return _open_bytes(bytes(data), f"bytes of {path}" if path else "bytes")
        if path:
            return _open_bytes(_read_file(path), os.fspath(path))
        raise ImageDecodeError(f"image dict has neither 'bytes' nor 'path': keys {sorted(value)}")
    if value is None:
        raise ImageDecodeError("image is None (missing value in the dataset)")
    if isinstance(value, np.ndarray) or type(value).__module__.startswith("torch"):
        return _array_to_pil(value, limit), f"array {tuple(np.shape(value))}"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _open_bytes(bytes(value), name or "bytes")
    if isinstance(value, os.PathLike) or (isinstance(value, str) and os.path.isfile(value)):
        return _open_bytes(_read_file(value), os.fspath(value))
    if not isinstance(value, str):
        raise ImageDecodeError(f"Unsupported image input: cannot make an image from a {type(value).__name__}")
    payload = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError(f"cannot read image file {value[:120]!r}: it is neither an existing file nor "
                               "base64 / data: URL data") from None
    return _open_bytes(data, "base64 string")


def _read_file(path: Any) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ImageDecodeError(f"cannot read image file {os.fspath(path)}: {err}") from err


def _open_bytes(data: bytes, source: str) -> tuple[Image.Image, str]:
    if len(data) == 0:
        raise ImageDecodeError(f"{source}: empty image data (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x MAX_IMAGE_PIXELS PIL only warns; _load refuses that range as well.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"{source}: refused as a decompression bomb: {err}") from err
    except UnidentifiedImageError as err:
        raise ImageDecodeError(f"{source}: not a readable image: not a recognised image format ({len(data)} bytes)") from err
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt headers
        raise ImageDecodeError(f"{source}: not a readable image: corrupt image header ({type(err).__name__}: {err})") from err
    img.encoded_bytes = data  # kept for the PNG completeness check and the 16-bit second pass
    return img, source


def _encoded_bytes(img: Image.Image) -> Optional[bytes]:
    """The encoded file behind a not-yet-loaded PIL image (ours, or one a user opened from a file)."""
    data = getattr(img, "encoded_bytes", None)
    if data is not None or not getattr(img, "tile", None):
        return data
    try:  # read the whole file, then restore the position
        position = img.fp.tell()
        img.fp.seek(0)
        data = img.fp.read()
        img.fp.seek(position)
        return data
    except (OSError, ValueError, AttributeError):  # no (or a closed) file behind the image
        return None


def _load(img: Image.Image, source: str, limit: Optional[int]) -> Optional[np.ndarray]:
    """Check the size of ``img``, fully decode it; returns a 16-bit RGB(A) PNG's exact samples (H, W, C), else None."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"{source}: image has no pixels (size {img.size})")
    if limit is not None and width * height > limit:
        raise ImageDecodeError(
            f"{source}: refused as a decompression bomb: {width}x{height} = {width * height} pixels exceeds the "
            f"limit of {limit} (raise PIL.Image.MAX_IMAGE_PIXELS or pass max_pixels to allow it)")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        _warn_truncated_allowed()
    tiles = list(getattr(img, "tile", None) or [])
    data = _encoded_bytes(img) if tiles and img.format == "PNG" else None
    if data is not None:
        _check_png_complete(data, source)
    try:
        img.load()  # full decode now: truncation and corrupt data raise here, not later in a transform
        if data is not None and len(tiles) == 1 and tiles[0].args in ("RGB;16B", "RGBA;16B"):
            return _png_sixteen_bit_rgb(data, img, tiles[0])
    except Exception as err:  # noqa: BLE001 - OSError, SyntaxError, EOFError, zlib.error, struct.error, ...
        raise ImageDecodeError(f"{source}: cannot decode image data, truncated or corrupt ({type(err).__name__}: {err})") from err
    finally:
        img.__dict__.pop("encoded_bytes", None)  # do not keep the file alive with the decoded image
    return None


@functools.lru_cache(maxsize=1)
def _warn_truncated_allowed() -> None:
    logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by some code in this process: truncated "
                   "JPEG/GIF/TIFF files now decode with filled-in rows instead of raising (PNG is still checked)")


# Truncated PNGs: PIL leaves the missing rows black without an error (EntmaxViT's docs/data.md).
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def _png_chunks(data: bytes) -> tuple[dict, bytes]:
    """(IHDR fields, concatenated IDAT payload) of a PNG; stops at IEND or at the end of the data."""
    pos, header, idat = 8, {}, []
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR" and len(body) >= 13:
            header = {"width": int.from_bytes(body[0:4], "big"), "height": int.from_bytes(body[4:8], "big"),
                      "depth": body[8], "colour": body[9], "interlace": body[12]}
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    return header, b"".join(idat)


def _png_raw_size(header: dict) -> int:
    """Bytes of filtered scanlines (one filter byte per row) that the PNG header promises."""
    bits = header["depth"] * _PNG_CHANNELS.get(header["colour"], 1)
    w, h = header["width"], header["height"]
    if header["interlace"] != 1:
        return h * (1 + (w * bits + 7) // 8)
    total = 0
    for x0, y0, dx, dy in _ADAM7:
        pw, ph = max(0, (w - x0 + dx - 1) // dx), max(0, (h - y0 + dy - 1) // dy)
        if pw and ph:
            total += ph * (1 + (pw * bits + 7) // 8)
    return total


def _check_png_complete(data: bytes, source: str) -> None:
    if not data.startswith(_PNG_SIGNATURE):
        return
    header, stream = _png_chunks(data)
    if not header:
        return  # PIL reports a PNG without IHDR itself
    needed = _png_raw_size(header)
    try:
        got = len(zlib.decompressobj().decompress(stream, needed))
    except zlib.error as err:
        raise ImageDecodeError(f"{source}: cannot decode image data, corrupt PNG data stream ({err})") from err
    if got < needed:
        per_row = needed // max(header["height"], 1)
        raise ImageDecodeError(f"{source}: cannot decode image data: truncated PNG, its data stream ends after {got} "
                               f"of {needed} bytes (about {got // max(per_row, 1)} of {header['height']} rows)")


def _png_sixteen_bit_rgb(data: bytes, img: Image.Image, tile: Any) -> np.ndarray:
    """Exact 16-bit samples (H, W, 3|4): Pillow keeps the high byte, a little-endian second decode the low."""
    second = Image.open(io.BytesIO(data))
    second.tile = [tile._replace(args=tile.args.replace(";16B", ";16L"))]
    second.load()
    return np.asarray(img, dtype=np.uint16) * 256 + np.asarray(second, dtype=np.uint16)


_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def _mode_to_rgb(img: Image.Image, background: Color) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        # A palette with a transparent index (GIF/PNG) must be composited, else the "hidden" colour shows.
        return _composite(np.asarray(img.convert("RGBA")), background)
    if mode.startswith("I") or mode == "F":  # I, I;16, I;16B, ...: the rules go by the samples' dtype
        return Image.fromarray(_to_uint8(np.asarray(img)), "L").convert("RGB")
    if mode == "LAB":
        from PIL import ImageCms

        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(img, ImageCms.buildTransformFromOpenProfiles(lab, srgb, "LAB", "RGB"))
    if mode in ("1", "L", "P", "CMYK", "YCbCr", "RGBX", "HSV"):
        return img.convert("RGB")
    raise ImageDecodeError(f"unsupported image mode {mode!r}")


def _composite(rgba: np.ndarray, background: Color) -> Image.Image:
    """(H, W, 4) uint8 -> RGB on ``background`` (PIL's alpha_composite works at 7-bit precision: one level off)."""
    colour = rgba[..., :3].astype(np.int32)
    alpha = rgba[..., 3:].astype(np.int32)
    bg = np.asarray(background, dtype=np.int32)
    out = (colour * alpha + bg * (255 - alpha) + 127) // 255  # +127 then floor = round (no exact .5 exists)
    return Image.fromarray(out.astype(np.uint8), "RGB")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """High-bit-depth array -> uint8 by the module's rules (16-bit, float, 32-bit integer, bool)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        return np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        x = np.where(np.isfinite(arr), arr, 0.0).astype(np.float64)
        return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    x = arr.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0 and hi <= 255:
        return x.astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return np.rint(x / 257.0).astype(np.uint8)
    if hi == lo:  # a constant image outside [0, 65535]: nothing to stretch
        return np.zeros(x.shape, np.uint8)
    return np.rint((x - lo) / (hi - lo) * 255.0).astype(np.uint8)


def _array_to_pil(value: Any, limit: Optional[int]) -> Image.Image:
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
    if limit is not None and arr.shape[0] * arr.shape[1] > limit:
        raise ImageDecodeError(f"array {arr.shape}: refused as a decompression bomb: {arr.shape[0] * arr.shape[1]} "
                               f"pixels exceeds the limit of {limit}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ImageDecodeError(f"array dtype {arr.dtype} is not numeric")
    return Image.fromarray(np.ascontiguousarray(_to_uint8(arr)))  # (H, W) -> L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA

