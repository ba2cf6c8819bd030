"""decode_image (the one decoder, as the data layer re-exports it): every input kind and every malformed case, with images made here."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from entmax_vit.data.images import ImageDecodeError, ImageRows, SkipCounter, decode_image, decode_mask


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise_rgb(h: int = 48, w: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_decode_error_is_value_error():
    assert issubclass(ImageDecodeError, ValueError)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_raise_and_global_flag_untouched(fmt, tmp_path):
    data = encode(noise_rgb(), fmt)
    assert np.asarray(decode_image(data)).shape == (48, 64, 3)  # the complete file decodes
    cut = data[: len(data) // 2]
    with pytest.raises(ImageDecodeError, match="cannot decode|corrupt"):
        decode_image(cut)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(cut)
    with pytest.raises(ImageDecodeError, match=str(path.name)):
        decode_image(str(path))
    with pytest.raises(ImageDecodeError):  # a lazily opened PIL image fails on load, inside to_rgb
        decode_image(Image.open(io.BytesIO(cut)))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_empty_non_image_missing_and_none(tmp_path):
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(empty)
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        decode_image(b"this is a text file, not a picture" * 4)
    with pytest.raises(ImageDecodeError, match="cannot read"):
        decode_image(tmp_path / "missing.png")
    with pytest.raises(ImageDecodeError, match="None"):
        decode_image(None)
    with pytest.raises(ImageDecodeError, match="neither"):
        decode_image({"bytes": None, "path": None})
    with pytest.raises(ImageDecodeError, match="cannot make an image"):
        decode_image(3.5)


def test_datasets_dict_prefers_bytes_then_path(tmp_path):
    img = noise_rgb()
    path = tmp_path / "a.png"
    img.save(path)
    from_path = decode_image({"bytes": None, "path": str(path)})
    from_bytes = decode_image({"bytes": encode(img, "PNG"), "path": "does/not/exist.png"})
    assert np.array_equal(np.asarray(from_path), np.asarray(img))
    assert np.array_equal(np.asarray(from_bytes), np.asarray(img))


def test_grayscale_and_one_bit():
    gray = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    out = np.asarray(decode_image(encode(gray, "PNG")))
    assert out.shape == (16, 16, 3)
    assert np.array_equal(out[..., 0], np.asarray(gray)) and np.array_equal(out[..., 0], out[..., 2])
    bits = Image.fromarray(np.eye(8, dtype=bool))
    assert bits.mode == "1"
    out = np.asarray(decode_image(encode(bits, "PNG")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 0]


def test_cmyk_jpeg_and_in_memory():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan/key, full magenta+yellow = red
    assert decode_image(cmyk).getpixel((0, 0)) == (255, 0, 0)
    out = np.asarray(decode_image(encode(cmyk, "JPEG", quality=95))).astype(int)
    assert np.abs(out - np.array([255, 0, 0])).max() <= 8  # through a lossy CMYK JPEG


def test_rgba_and_la_composite_on_white_by_default():
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0, 0)  # fully transparent red -> background
    arr[0, 1] = (255, 0, 0, 255)  # opaque red stays red
    arr[1, 0] = (0, 0, 0, 128)  # half-transparent black over white -> mid grey
    rgba = Image.fromarray(arr)
    out = np.asarray(decode_image(encode(rgba, "PNG"))).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0]
    assert abs(out[1, 0, 0] - 127) <= 1
    black = np.asarray(decode_image(rgba, background=(0, 0, 0)))
    assert black[0, 0].tolist() == [0, 0, 0] and black[0, 1].tolist() == [255, 0, 0]
    la = Image.fromarray(np.array([[[10, 0], [10, 255]]], dtype=np.uint8), mode="LA")
    assert np.asarray(decode_image(la))[0].tolist() == [[255, 255, 255], [10, 10, 10]]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt):
    pal = Image.new("P", (4, 1))
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)  # index 0 blue, index 1 green
    pal.putdata([0, 1, 0, 1])
    opaque = np.asarray(decode_image(encode(pal, fmt)))
    assert opaque[0, 0].tolist() == [0, 0, 255] and opaque[0, 1].tolist() == [0, 255, 0]
    out = np.asarray(decode_image(encode(pal, fmt, transparency=0)))  # index 0 (blue) is transparent
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 255, 0]


def test_sixteen_bit_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535, 32896]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode.startswith("I;16")
    for source in (img, encode(img, "PNG"), values):
        out = np.asarray(decode_image(source))
        assert out[0, :, 0].tolist() == [0, 100, 255, 128], source.__class__
    big_endian = values.astype(">u2")
    assert np.asarray(decode_image(big_endian))[0, :, 0].tolist() == [0, 100, 255, 128]


def test_int32_and_float_modes():
    as_i = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))  # 16-bit data held in mode "I"
    assert as_i.mode == "I" and np.asarray(decode_image(as_i))[0, :, 0].tolist() == [0, 255]
    small_i = Image.fromarray(np.array([[0, 200]], dtype=np.int32))  # 8-bit data in mode "I" is kept
    assert np.asarray(decode_image(small_i))[0, :, 0].tolist() == [0, 200]
    as_f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert as_f.mode == "F" and np.asarray(decode_image(as_f))[0, :, 0].tolist() == [0, 128, 255]


def test_one_pixel_image():
    out = decode_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"))
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (1, 2, 3)


def test_exif_orientation_applied():
    arr = np.zeros((2, 4, 3), dtype=np.uint8)  # stored 4 wide x 2 high: left half red, right half blue
    arr[:, :2] = (255, 0, 0)
    arr[:, 2:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = decode_image(encode(img, "PNG", exif=exif.tobytes()))
    assert out.size == (2, 4)  # upright: 2 wide x 4 high
    px = np.asarray(out)
    assert px[0, 0].tolist() == [255, 0, 0] and px[-1, 0].tolist() == [0, 0, 255]  # left edge turned to the top
    plain = decode_image(encode(img, "PNG"))
    assert plain.size == (4, 2)


def test_decompression_bomb_is_an_error_in_warning_range_too(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warn_range = encode(Image.new("RGB", (40, 40)), "PNG")  # 1600 px: PIL alone would only warn
    error_range = encode(Image.new("RGB", (50, 50)), "PNG")  # 2500 px > 2x limit: PIL raises
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(warn_range)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(error_range)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(Image.new("RGB", (40, 40)))  # an already-open image is checked as well
    assert decode_image(encode(Image.new("RGB", (30, 30)), "PNG")).size == (30, 30)
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        decode_image(encode(Image.new("RGB", (30, 30)), "PNG"), max_pixels=100)


def test_arrays_and_tensors():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(decode_image(hwc)), hwc)
    chw_float = torch.from_numpy(hwc).permute(2, 0, 1).float() / 255.0
    assert np.array_equal(np.asarray(decode_image(chw_float)), hwc)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    assert np.array_equal(np.asarray(decode_image(gray[..., None]))[..., 1], gray)
    assert np.asarray(decode_image(np.array([[True, False]])))[0, :, 0].tolist() == [255, 0]
    rgba = np.dstack([hwc, np.full((5, 7), 255, np.uint8)])
    assert np.array_equal(np.asarray(decode_image(rgba)), hwc)
    for bad in (np.zeros((5, 7, 2), np.uint8), np.zeros((0, 4), np.uint8), np.zeros((2, 2, 2, 3), np.uint8),
                np.array([["a"]])):
        with pytest.raises(ImageDecodeError):
            decode_image(bad)


def test_skip_counter_counts_and_rate_limits_logs(caplog):
    counter = SkipCounter("image", verbose_first=2, every=5)
    with caplog.at_level("WARNING"):
        for i in range(10):
            counter.record(f"#{i}", ImageDecodeError("broken"))
    assert counter.count == 10
    assert len(caplog.records) == 2 + 2  # first two, then at 5 and 10


def test_warns_once_if_someone_allows_truncated_images(monkeypatch, caplog):
    from entmax_vit.modeling import image_decoding as images

    images._warn_truncated_allowed.cache_clear()
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with caplog.at_level("WARNING"):
        decode_image(encode(noise_rgb(), "PNG"))
        decode_image(encode(noise_rgb(), "PNG"))
    assert sum("LOAD_TRUNCATED_IMAGES" in r.getMessage() for r in caplog.records) == 1
    images._warn_truncated_allowed.cache_clear()


# ----------------------------------------------------------------------------------------------------------
# The one decoder (entmax_vit.modeling.image_decoding) against the generated corpus of odd images
# ----------------------------------------------------------------------------------------------------------
import base64  # noqa: E402

from odd_images import bad_images, odd_images  # noqa: E402

from entmax_vit.modeling import image_decoding  # noqa: E402


def row_decode(data: bytes):
    """What training, every evaluation and the analysis get for a row: ImageRows.decode (None = a counted skip)."""
    decoded = ImageRows(None, "image").decode({"image": {"bytes": data, "path": None}}, "row 0")
    return None if decoded is None else decoded.image

ODD = odd_images()
BAD = bad_images()


def test_training_and_modeling_share_one_decoder_and_error():
    assert ImageDecodeError is image_decoding.ImageDecodeError
    from entmax_vit.modeling import pipeline_entmax_vit

    assert pipeline_entmax_vit.ImageDecodeError is ImageDecodeError  # the pipelines raise the decoder's error


@pytest.mark.parametrize("case", ODD, ids=lambda c: c.name)
def test_odd_image_decodes_to_its_reference_from_every_input_kind(case, tmp_path):
    path = tmp_path / f"{case.name}{case.suffix}"
    path.write_bytes(case.data)
    inputs = {
        "bytes": case.data,
        "path": path,
        "str path": str(path),
        "PIL lazily opened": Image.open(path),
        "datasets dict": {"bytes": case.data, "path": None},
        "datasets dict by path": {"bytes": None, "path": str(path)},
        "base64": base64.b64encode(case.data).decode(),
        "data URL": "data:image/png;base64," + base64.b64encode(case.data).decode(),
    }
    for kind, value in inputs.items():
        out = np.asarray(decode_image(value))
        assert out.shape == case.reference.shape, (kind, out.shape)
        assert np.array_equal(out, case.reference), (kind, int(np.abs(out.astype(int) - case.reference).max()))
    assert np.array_equal(np.asarray(row_decode(case.data)), case.reference)  # every dataset row decodes the same


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.name)
def test_bad_data_is_a_clear_error_naming_the_file(case, tmp_path):
    path = tmp_path / f"{case.name}{case.suffix}"
    path.write_bytes(case.data)
    for value in (case.data, path, str(path), {"bytes": None, "path": str(path)}):
        with pytest.raises(ImageDecodeError, match=case.match) as info:
            decode_image(value)
        if not isinstance(value, bytes):
            assert path.name in str(info.value)
    assert row_decode(case.data) is None  # a dataset row: a logged, counted skip
    good, bad = {"bytes": ODD[0].data, "path": None}, {"bytes": case.data, "path": None}
    assert ImageRows(None, "image", "mask").decode({"image": good, "mask": bad}, "row 0") is None  # its mask too
    for value in (case.data, path, str(path), {"bytes": case.data, "path": None}):  # masks get the same checks
        with pytest.raises(ImageDecodeError, match=case.match):
            decode_mask(value)


def test_bombs_are_refused_before_any_pixel_is_decoded(monkeypatch, tmp_path):
    bomb = next(c for c in BAD if c.name.startswith("bomb"))
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb.data)

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    with pytest.warns(Image.DecompressionBombWarning):
        lazy = Image.open(path)  # PIL alone only warns in this range
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for value in (bomb.data, path, lazy):
        with pytest.raises(ImageDecodeError, match="decompression bomb"):
            decode_image(value)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(np.zeros((10000, 10000), np.uint8))


def test_truncated_png_is_refused_even_if_someone_allows_truncated_images(monkeypatch):
    truncated = next(c for c in BAD if c.name.startswith("png_stream_ends"))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageDecodeError, match="8 of 32 rows"):
        decode_image(truncated.data)


def test_float_values_outside_unit_range_are_clipped_and_non_finite_become_zero():
    values = np.array([[-1.0, -0.25, 0.0, 0.5, 1.0, 1.75, 255.0, np.nan, np.inf, -np.inf]], np.float32)
    expected = [0, 0, 0, 128, 255, 255, 255, 0, 0, 0]
    for source in (Image.fromarray(values, "F"), encode(Image.fromarray(values, "F"), "TIFF"), values,
                   torch.from_numpy(values)):
        assert np.asarray(decode_image(source))[0, :, 0].tolist() == expected, type(source)


def test_sixteen_bit_scaling_never_depends_on_content():
    low = np.array([[0, 100, 200, 255]], np.uint16)
    with_300 = np.array([[0, 100, 200, 300]], np.uint16)
    assert np.asarray(decode_image(encode(Image.fromarray(low), "PNG")))[0, :, 0].tolist() == [0, 0, 1, 1]
    assert np.asarray(decode_image(encode(Image.fromarray(with_300), "PNG")))[0, :, 0].tolist() == [0, 0, 1, 1]


def test_int32_rule_by_range():
    def decode(values):
        return np.asarray(decode_image(Image.fromarray(np.array([values], np.int32), "I")))[0, :, 0].tolist()

    assert decode([0, 7, 255]) == [0, 7, 255]                  # 8-bit values: kept
    assert decode([0, 257, 65535]) == [0, 1, 255]              # 16-bit values: x / 257
    assert decode([-10, 0, 10]) == [0, 128, 255]               # anything else: min-max stretched
    assert decode([70000, 70000]) == [0, 0]                    # a constant out-of-range image: 0


def test_decoder_bad_strings_and_types():
    with pytest.raises(ImageDecodeError, match="neither an existing file nor base64"):
        decode_image("/no/such/file.png")
    with pytest.raises(ImageDecodeError, match="Unsupported image input"):
        decode_image(12345)
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        decode_image(base64.b64encode(b"hello, not an image").decode())
