"""Multi-crop: official DINO values, parity with the literal official Compose, rates; the data layer's rows
(ImageRows) under it: unreadable rows counted and replaced, with workers and streams."""

import io
import random
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from entmax_vit.data.config_io import from_dict, to_dict
from entmax_vit.data.datasets import load_image_dataset
from entmax_vit.training import multicrop as mc
from entmax_vit.data.images import ImageRows
from entmax_vit.training.dino_data import SeededMultiCropDataset, StreamingMultiCropDataset, collate_indexed
from entmax_vit.training.multicrop import MultiCropConfig, MultiCropTransform, crop_specs, official_dino_transform

TINY = dict(global_size=16, local_size=8, local_crops_number=2)


def colourful(h: int = 40, w: int = 56, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_defaults_are_official_dino():
    cfg = MultiCropConfig()
    assert cfg.global_crops_scale == (0.4, 1.0) and cfg.local_crops_scale == (0.05, 0.4)
    assert (cfg.local_crops_number, cfg.global_size, cfg.local_size) == (8, 224, 96)
    assert cfg.flip_p == 0.5 and cfg.color_jitter == (0.4, 0.4, 0.2, 0.1) and cfg.color_jitter_p == 0.8
    assert cfg.grayscale_p == 0.2 and cfg.blur_radius == (0.1, 2.0) and cfg.interpolation == "bicubic"
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
    assert cfg.solarize_threshold == 128
    specs = crop_specs(cfg)
    assert [s.name for s in specs] == ["global1", "global2"] + [f"local{i}" for i in range(1, 9)]
    assert [(s.size, s.scale, s.blur_p, s.solarize_p) for s in specs[:2]] == [
        (224, (0.4, 1.0), 1.0, 0.0), (224, (0.4, 1.0), 0.1, 0.2)]
    assert all((s.size, s.scale, s.blur_p, s.solarize_p) == (96, (0.05, 0.4), 0.5, 0.0) for s in specs[2:])


def test_output_count_shapes_and_normalisation():
    crops = MultiCropTransform()(colourful())
    assert len(crops) == 10
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    lo = (0 - np.array(MultiCropConfig().mean)) / np.array(MultiCropConfig().std)
    hi = (1 - np.array(MultiCropConfig().mean)) / np.array(MultiCropConfig().std)
    for c in crops:
        assert (c.amin(dim=(1, 2)).numpy() >= lo - 1e-5).all() and (c.amax(dim=(1, 2)).numpy() <= hi + 1e-5).all()
    assert len(MultiCropTransform(MultiCropConfig(local_crops_number=0))(colourful())) == 2


@pytest.mark.parametrize("size", [(40, 56), (7, 5), (1, 1)])
def test_matches_literal_official_pipeline_under_same_seeds(size):
    """Same torch + Python seeds -> the official Compose's tensors (fused normalisation: float rounding only)."""
    img = colourful(*size)
    ours, official = MultiCropTransform(MultiCropConfig(global_size=32, local_size=16)), \
        official_dino_transform(MultiCropConfig(global_size=32, local_size=16))
    for seed in range(6):
        torch.manual_seed(seed), random.seed(seed)
        a = ours(img)
        torch.manual_seed(seed), random.seed(seed)
        b = official(img)
        assert len(a) == len(b) == 10
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_deterministic_under_seed_and_varies_without():
    tf, img = MultiCropTransform(MultiCropConfig(**TINY)), colourful()
    torch.manual_seed(3), random.seed(3)
    a = tf(img)
    torch.manual_seed(3), random.seed(3)
    b = tf(img)
    c = tf(img)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_random_resized_crop_scale_ranges(monkeypatch):
    calls = []
    original = T.RandomResizedCrop.get_params

    def recording(img, scale, ratio):
        out = original(img, scale, ratio)
        calls.append((tuple(scale), tuple(ratio), out[2] * out[3] / (img.size[0] * img.size[1])))
        return out

    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(recording))
    tf = MultiCropTransform(MultiCropConfig(**TINY))
    img = colourful(100, 100)
    for _ in range(60):
        tf(img)
    per_crop = [calls[i::4] for i in range(4)]  # 4 crops per call: g1, g2, l1, l2
    for k, (lo, hi) in enumerate([(0.4, 1.0), (0.4, 1.0), (0.05, 0.4), (0.05, 0.4)]):
        assert all(scale == (lo, hi) and ratio == pytest.approx((3 / 4, 4 / 3)) for scale, ratio, _ in per_crop[k])
        areas = [a for _, _, a in per_crop[k]]
        # integer rounding of crop sides moves the area share by at most ~2/100 per side
        assert min(areas) >= lo - 0.03 and max(areas) <= hi + 0.03
        assert max(areas) - min(areas) > (hi - lo) / 3  # really sampled across the range


def test_per_crop_probabilities_empirically(monkeypatch):
    """Rates of blur (1.0 / 0.1 / 0.5), solarize (0 / 0.2 / 0), jitter 0.8, grayscale 0.2, flip 0.5."""
    blur_radii, blurred, solarized = [], Counter(), Counter()
    current = {"crop": None}
    real_blur, real_solarize = ImageFilter.GaussianBlur, ImageOps.solarize

    def blur(radius):
        blur_radii.append(radius)
        blurred[current["crop"]] += 1
        return real_blur(radius)

    def solarize(img, threshold=128):
        assert threshold == 128
        solarized[current["crop"]] += 1
        return real_solarize(img, threshold)

    tf = MultiCropTransform(MultiCropConfig(global_size=8, local_size=8, local_crops_number=1))
    real_crop = tf._crop

    def crop(img, spec):
        current["crop"] = spec.name
        return real_crop(img, spec)

    jitter_calls, flips = [0], [0]
    real_params = T.ColorJitter.get_params

    def params(*args):
        jitter_calls[0] += 1
        assert args == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
        return real_params(*args)

    monkeypatch.setattr(ImageFilter, "GaussianBlur", blur)
    monkeypatch.setattr(ImageOps, "solarize", solarize)
    monkeypatch.setattr(T.ColorJitter, "get_params", staticmethod(params))
    monkeypatch.setattr(tf, "_crop", crop)
    random.seed(0), torch.manual_seed(0)
    n, gray = 1500, 0
    img = colourful(8, 8)
    for _ in range(n):
        for c in tf(img):
            gray += int(torch.equal(c[0] * 0.229 + 0.485, c[1] * 0.224 + 0.456) or
                        torch.allclose(c[0] * 0.229 + 0.485, c[1] * 0.224 + 0.456, atol=1e-5))
    tol = lambda p: 4 * (p * (1 - p) / n) ** 0.5 + 1e-9  # noqa: E731 - 4 sigma binomial band
    for name, p in (("global1", 1.0), ("global2", 0.1), ("local1", 0.5)):
        assert abs(blurred[name] / n - p) <= tol(p), (name, blurred[name] / n)
    assert solarized["global1"] == 0 and solarized["local1"] == 0
    assert abs(solarized["global2"] / n - 0.2) <= tol(0.2)
    assert abs(jitter_calls[0] / (3 * n) - 0.8) <= tol(0.8) / 3 ** 0.5
    assert abs(gray / (3 * n) - 0.2) <= tol(0.2) / 3 ** 0.5
    assert min(blur_radii) >= 0.1 and max(blur_radii) <= 2.0 and max(blur_radii) - min(blur_radii) > 1.5


@pytest.mark.parametrize("factor", [-0.5, -0.1, -0.037, 0.0, 0.02, 0.1, 0.5])
def test_hue_lookup_table_equals_torchvision(factor):
    img = colourful(16, 16, seed=1)
    assert np.array_equal(np.asarray(mc._adjust_hue(img, factor)), np.asarray(TF.adjust_hue(img, factor)))


def test_config_validation_and_yaml_round_trip():
    with pytest.raises(ValueError, match="global_crops_scale"):
        MultiCropConfig(global_crops_scale=(0.5, 0.4))
    with pytest.raises(ValueError, match="local_blur_p"):
        MultiCropConfig(local_blur_p=1.5)
    with pytest.raises(ValueError, match="local_crops_number"):
        MultiCropConfig(local_crops_number=-1)
    with pytest.raises(ValueError, match=r"interpolation: 'nearest' is not one of \('bicubic', 'bilinear'\)"):
        MultiCropConfig(interpolation="nearest")  # the Python API too, not only tyro's Literal check
    cfg = MultiCropConfig(local_crops_number=6, local_crops_scale=(0.05, 0.32))
    assert from_dict(MultiCropConfig, to_dict(cfg)) == cfg


def test_collate_stacks_crops_and_lists_the_replaced_rows():
    item = [torch.zeros(3, 4, 4), torch.ones(3, 2, 2)]
    crops, indices, names = collate_indexed([(0, item, ()), (5, item, ("#4 (a.png)",)), (2, item, ())])
    assert [tuple(c.shape) for c in crops] == [(3, 3, 4, 4), (3, 3, 2, 2)]
    assert indices.tolist() == [0, 5, 2] and names == ["#4 (a.png)"]


def malformed_corpus() -> tuple[list[bytes], int]:
    """Good PNG/JPEG images mixed with every kind of broken file; returns (encoded files, number broken)."""
    good = [png(colourful(20 + i, 24, seed=i)) for i in range(6)]
    jpeg = io.BytesIO()
    colourful(30, 30).save(jpeg, format="JPEG")
    good.append(jpeg.getvalue())
    bad = [jpeg.getvalue()[:200], good[0][: len(good[0]) // 2], b"", b"GIF89a but not really", b"\x00" * 64,
           b"<html>not found</html>"]
    files = []
    for i in range(max(len(good), len(bad))):
        files += good[i:i + 1] + bad[i:i + 1]
    return files, len(bad)


def seeded(hf) -> SeededMultiCropDataset:
    return SeededMultiCropDataset(ImageRows(hf, "image", keep=()), MultiCropTransform(MultiCropConfig(**TINY)), 0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_malformed_images_are_replaced_and_each_counted_once(num_workers, caplog):
    """Moved from MultiCropDataset + multicrop_collate (which dropped Nones) to the training path that replaced
    them: every row gets crops, each malformed row is named once, the reader counts and logs each once."""
    files, num_bad = malformed_corpus()
    hf = datasets.Dataset.from_dict({"image": [{"bytes": f, "path": None} for f in files],
                                     "label": list(range(len(files)))}).cast_column("image", datasets.Image())
    ds = seeded(hf)
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_indexed, num_workers=num_workers)
    with caplog.at_level("WARNING"):
        batches = list(loader)
    assert sum(len(names) for _, _, names in batches) == num_bad
    assert sum(c[0].shape[0] for c, _, _ in batches) == len(files)
    assert all(len(c) == 4 for c, _, _ in batches)
    if num_workers == 0:
        assert ds.rows.skipped == num_bad
        assert sum("skipping unreadable image" in r.getMessage() for r in caplog.records) == num_bad


def test_malformed_imagefolder_through_the_training_path(tmp_path, monkeypatch):
    """Issue 8: a folder of malformed images read the way training reads it never crashes; skips counted."""
    files, num_bad = malformed_corpus()
    folder = tmp_path / "train" / "things"
    folder.mkdir(parents=True)
    for i, data in enumerate(files):
        (folder / f"{i:02d}.png").write_bytes(data)
    (folder / "bomb.png").write_bytes(png(Image.new("RGB", (60, 60))))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 3600 px: only a warning for PIL, an error for us
    hf = load_image_dataset(f"imagefolder:{tmp_path}", split="train", cache_dir=tmp_path / "cache")
    ds = seeded(hf)
    batches = list(DataLoader(ds, batch_size=5, shuffle=True, collate_fn=collate_indexed))
    assert sum(len(names) for _, _, names in batches) == ds.rows.skipped == num_bad + 1
    assert sum(c[0].shape[0] for c, _, _ in batches) == len(files) + 1


def test_stream_sees_each_sample_once_across_workers():
    files, num_bad = malformed_corpus()
    hf = datasets.Dataset.from_dict({"image": [{"bytes": f, "path": None} for f in files]}).cast_column(
        "image", datasets.Image())
    rows = ImageRows(hf.to_iterable_dataset(num_shards=4), "image", keep=())
    assert sum(decoded is None for _, decoded, _ in rows.stream()) == rows.skipped == num_bad
    ds = StreamingMultiCropDataset(hf.to_iterable_dataset(num_shards=4), "image",
                                   MultiCropTransform(MultiCropConfig(**TINY)), seed=0, rank=0, world_size=1,
                                   shuffle_buffer=1)
    batches = list(DataLoader(ds, batch_size=3, collate_fn=collate_indexed, num_workers=2))
    assert sum(c[0].shape[0] for c, _, _ in batches) == len(files) - num_bad
    assert sum(len(names) for _, _, names in batches) <= num_bad  # a worker's last unreadable items: no carrier


def test_rows_reject_unknown_column():
    hf = datasets.Dataset.from_dict({"img": [png(colourful())]})
    with pytest.raises(ValueError, match="img"):
        ImageRows(hf, "image")


def test_lookup_table_brightness_and_contrast_equal_pil_enhance():
    from PIL import ImageEnhance

    x = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = Image.fromarray(np.dstack([x, x[::-1], x.T]))  # every uint8 value in every channel
    rng = np.random.default_rng(0)
    for factor in [0.0, 0.6, 1.0, 1.4, 2.5] + rng.uniform(0.5, 1.5, 50).tolist():
        assert np.array_equal(np.asarray(mc._adjust_brightness(img, factor)),
                              np.asarray(ImageEnhance.Brightness(img).enhance(factor)))
        assert np.array_equal(np.asarray(mc._adjust_contrast(img, factor)),
                              np.asarray(ImageEnhance.Contrast(img).enhance(factor)))


def test_bench_script_runs_and_reports(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_data.py"
    out = subprocess.run(
        [sys.executable, str(script), "--json", "--num_images", "3", "--rounds", "2", "--warmup", "0", "--parity_checks", "2",
         "--multicrop.global_size", "32", "--multicrop.local_size", "16", "--multicrop.local_crops_number", "2",
         "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout)
    assert result["crops_per_image"] == 4 and result["images"] == 3
    assert result["parity_max_abs_diff"] < 1e-5
    assert result["official_img_per_s"] > 0 and result["ours_img_per_s"] > 0
    assert len(result["per_round_img_per_s"]["ours"]) == 2
    assert json.loads((tmp_path / "bench_data.json").read_text())["speedup"] == result["speedup"]
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "bench_data.png").stat().st_size > 1000
    assert (tmp_path / "multicrop_example.png").stat().st_size > 1000


def test_bench_script_refuses_no_images():
    from pathlib import Path

    import runpy

    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "bench_data.py"), run_name="bench")
    with pytest.raises(ValueError, match=r"num_images: 0 is out of range \(must be >= 1\)"):
        bench["BenchConfig"](num_images=0)


def test_stream_resumes_from_state_dict():
    """Stop mid-stream, save the dataset's state, continue in fresh rows: the samples equal one uninterrupted pass."""
    imgs = [png(Image.new("RGB", (8, 8), (i * 20, 0, 0))) for i in range(8)]
    hf = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in imgs]}).cast_column(
        "image", datasets.Image())
    make = lambda: ImageRows(hf.to_iterable_dataset(num_shards=2), "image")  # noqa: E731
    red = lambda rows: (d.image.getpixel((0, 0))[0] for _, d, _ in rows.stream())  # noqa: E731
    full = list(red(make()))
    first = make()
    it = red(first)
    head = [next(it) for _ in range(3)]
    state = first.ds.state_dict()
    second = make()
    second.ds.load_state_dict(state)
    tail = list(red(second))
    assert head + tail == full and sorted(full) == [i * 20 for i in range(8)]
