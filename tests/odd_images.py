"""A corpus of odd images, generated (no committed binaries), each with the RGB pixels it must decode to.

    from odd_images import odd_images, bad_images   # tests/ is on sys.path under pytest
    for case in odd_images():   # case.name, case.data (encoded file), case.suffix, case.reference (H, W, 3) uint8
        ...
    for case in bad_images():   # case.name, case.data, case.suffix, case.match (regex the error must match)

Every ``reference`` is computed here with numpy from the raw values the file was made of, following the rules of
``entmax_vit.modeling.image_decoding`` as documented (never by calling the decoder), so a test comparing decoded
pixels with it checks the decoder against its specification:
- 16-bit: round(x / 257); float: non-finite -> 0, clip to [0, 1], round(x * 255); 32-bit integer: kept if all
  in [0, 255], round(x / 257) if all in [0, 65535], else min-max stretched;
- alpha on white: round((c * a + 255 * (255 - a)) / 255); CMYK: (255 - k) - round(c * (255 - k) / 255);
- EXIF orientation 2-8 as the EXIF specification defines them.
PNG files with features Pillow cannot write (16-bit colour, a data stream that ends early, 10^8 pixels in a
small file) are assembled chunk by chunk with zlib.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


@dataclass
class OddImage:
    name: str
    data: bytes
    suffix: str
    reference: np.ndarray  # (H, W, 3) uint8: what the model must be fed (before resizing)


@dataclass
class BadImage:
    name: str
    data: bytes
    suffix: str
    match: str  # regex the ImageDecodeError message must match


# ---------------------------------------------------------------------------------------------- helpers
def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_from_rows(width: int, height: int, depth: int, colour: int, rows: list[bytes]) -> bytes:
    """A PNG whose IDAT holds ``rows`` (already packed samples; filter type 0). Fewer rows than ``height``
    makes a PNG whose data stream ends early."""
    raw = b"".join(b"\x00" + row for row in rows)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


def _gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=-1)


def _on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    c, a = colour.astype(np.int64), alpha.astype(np.int64)[..., None]
    return np.rint((c * a + 255 * (255 - a)) / 255.0).astype(np.uint8)


def _float_rule(x: np.ndarray) -> np.ndarray:
    x = np.where(np.isfinite(x), x, 0.0)
    return np.rint(np.clip(x.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def _exif_upright(stored: np.ndarray, orientation: int) -> np.ndarray:
    """The displayed image for an EXIF orientation (rows of ``stored`` are the file's rows)."""
    return {
        2: lambda a: a[:, ::-1],                   # mirrored left-right
        3: lambda a: a[::-1, ::-1],                # rotated 180
        4: lambda a: a[::-1, :],                   # mirrored top-bottom
        5: lambda a: a.transpose(1, 0, 2),         # mirrored along the main diagonal
        6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # needs a 90 degree clockwise turn
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the anti-diagonal
        8: lambda a: a.transpose(1, 0, 2)[::-1, :],  # needs a 90 degree counter-clockwise turn
    }[orientation](stored)


# ----------------------------------------------------------------------------------------------- corpus
def odd_images(seed: int = 0) -> list[OddImage]:
    """Odd but valid images (about 20 small files)."""
    rng = np.random.default_rng(seed)
    h, w = 12, 16
    cases: list[OddImage] = []

    floats = rng.random((h, w)).astype(np.float32)
    floats[0, 0], floats[0, 1], floats[0, 2] = np.nan, np.inf, -np.inf
    floats[1, 0], floats[1, 1] = -0.25, 1.75  # outside [0, 1]: clipped
    cases.append(OddImage("float_F_nan_inf_tiff", encode(Image.fromarray(floats, "F"), "TIFF"), ".tiff",
                          _gray(_float_rule(floats))))

    small16 = rng.integers(0, 256, (h, w)).astype(np.uint16)
    cases.append(OddImage("I16_all_le_255_png", encode(Image.fromarray(small16), "PNG"), ".png",
                          _gray(np.rint(small16 / 257.0))))
    one300 = small16.copy()
    one300[3, 4] = 300
    cases.append(OddImage("I16_one_at_300_png", encode(Image.fromarray(one300), "PNG"), ".png",
                          _gray(np.rint(one300 / 257.0))))
    full16 = rng.integers(0, 65536, (h, w)).astype(np.uint16)
    cases.append(OddImage("I16_full_range_png", encode(Image.fromarray(full16), "PNG"), ".png",
                          _gray(np.rint(full16 / 257.0))))

    int16_in_i = rng.integers(0, 65536, (h, w)).astype(np.int32)
    cases.append(OddImage("int32_I_16bit_values_tiff", encode(Image.fromarray(int16_in_i, "I"), "TIFF"), ".tiff",
                          _gray(np.rint(int16_in_i / 257.0))))
    int8_in_i = rng.integers(0, 256, (h, w)).astype(np.int32)
    cases.append(OddImage("int32_I_8bit_values_tiff", encode(Image.fromarray(int8_in_i, "I"), "TIFF"), ".tiff",
                          _gray(int8_in_i)))
    signed = rng.integers(-100000, 100000, (h, w)).astype(np.int32)
    stretched = np.rint((signed - signed.min()) / float(signed.max() - signed.min()) * 255.0)
    cases.append(OddImage("int32_I_signed_tiff", encode(Image.fromarray(signed, "I"), "TIFF"), ".tiff",
                          _gray(stretched)))

    rgb16 = rng.integers(0, 65536, (h, w, 3)).astype(np.uint16)
    rows = [rgb16[i].astype(">u2").tobytes() for i in range(h)]
    cases.append(OddImage("rgb_16bit_png", png_from_rows(w, h, 16, 2, rows), ".png",
                          np.rint(rgb16 / 257.0).astype(np.uint8)))

    rgba = rng.integers(0, 256, (h, w, 4)).astype(np.uint8)
    rgba[0, :, 3] = 0      # fully transparent row: white, whatever colour is underneath
    rgba[1, :, 3] = 255    # opaque row: the colour
    cases.append(OddImage("rgba_png", encode(Image.fromarray(rgba, "RGBA"), "PNG"), ".png",
                          _on_white(rgba[..., :3], rgba[..., 3])))

    la = rng.integers(0, 256, (h, w, 2)).astype(np.uint8)
    la[0, :, 1] = 0
    cases.append(OddImage("LA_png", encode(Image.fromarray(la, "LA"), "PNG"), ".png",
                          _on_white(_gray(la[..., 0]), la[..., 1])))

    palette = rng.integers(0, 256, (8, 3)).astype(np.uint8)
    alphas = np.array([0, 255, 128, 64, 255, 10, 200, 255], np.uint8)
    index = rng.integers(0, 8, (h, w)).astype(np.uint8)
    pal_img = Image.fromarray(index, "P")
    pal_img.putpalette(palette.reshape(-1).tolist())
    cases.append(OddImage("palette_transparency_png", encode(pal_img, "PNG", transparency=alphas.tobytes()), ".png",
                          _on_white(palette[index], alphas[index])))
    cases.append(OddImage("palette_opaque_png", encode(pal_img, "PNG"), ".png", palette[index]))

    cmyk = rng.integers(0, 256, (h, w, 4)).astype(np.uint8)
    nk = 255 - cmyk[..., 3:].astype(np.int64)
    cmyk_rgb = nk - np.rint(cmyk[..., :3].astype(np.int64) * nk / 255.0)
    cases.append(OddImage("cmyk_tiff", encode(Image.fromarray(cmyk, "CMYK"), "TIFF"), ".tiff",
                          cmyk_rgb.astype(np.uint8)))

    bits = rng.random((h, w)) < 0.5
    cases.append(OddImage("one_bit_png", encode(Image.fromarray(bits), "PNG"), ".png",
                          _gray(bits.astype(np.uint8) * 255)))
    gray = rng.integers(0, 256, (h, w)).astype(np.uint8)
    cases.append(OddImage("L_png", encode(Image.fromarray(gray, "L"), "PNG"), ".png", _gray(gray)))

    stored = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    for orientation in range(2, 9):
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        data = encode(Image.fromarray(stored), "PNG", exif=exif.tobytes())
        cases.append(OddImage(f"exif_orientation_{orientation}_png", data, ".png", _exif_upright(stored, orientation)))
    return cases


def bad_images() -> list[BadImage]:
    """Inputs that must be refused with ImageDecodeError."""
    # 10000 x 10000 1-bit pixels (between 1x and 2x PIL's default MAX_IMAGE_PIXELS of 89,478,485) in ~15 KB.
    side = 10000
    row = bytes((side + 7) // 8)
    bomb = png_from_rows(side, side, 1, 0, [row] * side)
    assert side * side > Image.MAX_IMAGE_PIXELS and side * side < 2 * Image.MAX_IMAGE_PIXELS
    gray = np.random.default_rng(1).integers(0, 256, (32, 16)).astype(np.uint8)
    truncated_stream = png_from_rows(16, 32, 8, 0, [gray[i].tobytes() for i in range(8)])  # 8 of 32 rows
    full = encode(Image.fromarray(gray), "PNG")
    return [
        BadImage("bomb_10000x10000_png", bomb, ".png", "decompression bomb"),
        BadImage("png_stream_ends_after_8_of_32_rows", truncated_stream, ".png", "truncated"),
        BadImage("png_file_cut_in_half", full[: len(full) // 2], ".png", "truncated|cannot decode"),
        BadImage("not_an_image", b"this is a text file, not a picture\n" * 8, ".png", "not a readable image"),
        BadImage("png_signature_then_garbage", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, ".png",
                 "not a readable image|cannot decode"),
    ]


__all__ = ["BadImage", "OddImage", "bad_images", "encode", "odd_images", "png_from_rows"]
