"""Figures and the ``scripts/analyze.py`` entry point on tiny saved models and tiny datasets made in tmp_path."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from entmax_vit.analysis.figures import pca_rgb, plot_head_distances, plot_layer_curves, save_attention_maps, save_pca_image
from entmax_vit.analysis.per_layer import analyze_model
from entmax_vit.analysis.run import PRESET_DIR, AnalyzeConfig, main
from entmax_vit.cli.config import parse_config
from entmax_vit.data.config_io import ConfigError
from entmax_vit.evaluation.results import load_results
from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel

from cli_helpers import usage  # tests/ is on sys.path under pytest

REPO = Path(__file__).resolve().parents[1]


def parse_analyze_config(argv):  # what scripts/analyze.py parses (analysis/ itself imports no cli)
    return parse_config(AnalyzeConfig, argv, preset_dir=PRESET_DIR)


def _png_ok(path: Path) -> tuple[int, int]:
    assert path.is_file(), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 0, f"{path} is blank"
    return im.size


def _model(tiny_config_kwargs, attention="entmax15", **kw) -> EntmaxViTModel:
    torch.manual_seed(0)
    return EntmaxViTModel(EntmaxViTConfig(**tiny_config_kwargs, attention=attention, **kw)).eval()


def _image_folder(root: Path, n: int = 3) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(n):
        arr = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(images / f"img{i}.png")
        m = np.zeros((40, 48), np.uint8)
        m[10:30, 12:36] = i + 1
        m[0, :] = 255
        Image.fromarray(m).save(masks / f"img{i}.png")
    (images / "broken.jpg").write_bytes(b"not an image")  # unreadable: skipped with a warning
    return images, masks


# ------------------------------------------------------------------------------------------- figures
def test_figures_are_valid_pngs(tmp_path, tiny_config_kwargs):
    model = _model(tiny_config_kwargs, num_register_tokens=1)
    x = torch.randn(3, 3, 32, 32)
    w, h = _png_ok(save_attention_maps(model, x[0], tmp_path / "attn.png"))
    assert w > h  # image + 4 heads + mean side by side
    _png_ok(save_attention_maps(model, x[:1], tmp_path / "attn_nomask.png", mass=None, layer=0))
    _png_ok(save_pca_image(model, x, tmp_path / "pca.png"))
    masks = torch.zeros(3, 32, 32, dtype=torch.long)
    masks[:, :16] = 1
    _png_ok(save_pca_image(model, x, tmp_path / "pca_fg.png", foreground_only=True, masks=masks))
    _png_ok(save_pca_image(model, x, tmp_path / "pca_fg_attn.png", foreground_only=True))
    runs = {"entmax15": analyze_model(model, x), "softmax": analyze_model(_model(tiny_config_kwargs, "softmax"), x)}
    paths = plot_layer_curves(runs, tmp_path / "curves")
    assert [p.name for p in paths] == ["layer_curves.png"]
    _png_ok(paths[0])
    paths = plot_layer_curves(runs, tmp_path / "curves", metrics=["entropy", "cos_neighbors"], separate=True)
    assert [p.name for p in paths] == ["layer_curves.png", "curve_entropy.png", "curve_cos_neighbors.png"]
    for p in paths:
        _png_ok(p)
    _png_ok(plot_head_distances(runs, tmp_path / "heads.png"))


def test_pca_rgb_range_and_foreground(tiny_config_kwargs):
    model = _model(tiny_config_kwargs)
    x = torch.randn(2, 3, 32, 32)
    rgb, fg = pca_rgb(model, x)
    assert rgb.shape == (2, 4, 4, 3) and fg.all()
    assert rgb.min() >= 0 and rgb.max() <= 1 and rgb.std() > 0
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[:, :, :16] = 2  # left half foreground
    rgb, fg = pca_rgb(model, x, foreground_only=True, masks=masks)
    assert fg[:, :, :2].all() and not fg[:, :, 2:].any()
    assert (rgb[:, :, 2:] == 0).all()  # background drawn black
    with pytest.raises(ValueError, match="no foreground"):
        pca_rgb(model, x, foreground_only=True, masks=torch.zeros(2, 32, 32, dtype=torch.long))


def test_plot_layer_curves_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        plot_layer_curves({}, tmp_path)
    with pytest.raises(ValueError, match="attention_distance_head"):
        plot_head_distances({"m": {0: {"entropy": 1.0}}}, tmp_path / "h.png")


# ------------------------------------------------------------------------------------------- entry point
def _check_outputs(out: Path, attentions: dict[str, str], num_images: int, figure_images: int) -> None:
    assert (out / "config.yaml").is_file()
    for name, attention in attentions.items():
        record = load_results(out / name / "analysis_results.json")
        assert record["task"] == "analysis" and record["model"]["attention"] == attention
        assert record["dataset"]["num_samples"] == num_images
        metrics = record["metrics"]
        for layer in (0, 1):
            for key in ("attention_zero_share", "support_mean", "support_median", "entropy", "attention_distance",
                        "outlier_share", "cos_to_cls", "cos_neighbors", "fg_jaccard_best_head"):
                assert f"layer_{layer}/{key}" in metrics, key
        assert 0 <= metrics["layer_1/fg_jaccard_best_head"] <= 1
        per_layer = json.loads((out / name / "per_layer.json").read_text())
        assert set(per_layer["layers"]) == {"0", "1"}
        assert per_layer["layers"]["1"]["support_mean"] == pytest.approx(metrics["layer_1/support_mean"])
        assert "| layer |" in (out / name / "per_layer.md").read_text()
        for i in range(figure_images):
            _png_ok(out / name / f"attention_maps_{i}.png")
        assert not (out / name / f"attention_maps_{figure_images}.png").exists()
        _png_ok(out / name / "pca.png")
    _png_ok(out / "curves" / "layer_curves.png")
    _png_ok(out / "curves" / "head_attention_distance.png")
    assert record["protocol"]["name"] == "semantic_diffusion" and record["protocol"]["masks"] is True
    comparison = (out / "comparison.md").read_text()
    assert all(name in comparison for name in attentions)


def test_analyze_main_compares_two_models(tmp_path, tiny_config_kwargs, caplog):
    for attention in ("entmax15", "softmax"):
        _model(tiny_config_kwargs, attention).save_pretrained(tmp_path / attention)
    images, masks = _image_folder(tmp_path / "data")
    cfg = parse_analyze_config(["--model", str(tmp_path / "entmax15"), "--compare", str(tmp_path / "softmax"),
                                "--names", "entmax", "softmax", "--dataset", str(images), "--mask_dir", str(masks),
                                "--image_size", "32", "--num_images", "5", "--num_figure_images", "2",
                                "--no_separate_curves", "--output_dir", str(tmp_path / "out")])
    runs = main(cfg)
    assert list(runs) == ["entmax", "softmax"]
    assert "skipping unreadable image" in caplog.text
    _check_outputs(tmp_path / "out", {"entmax": "entmax15", "softmax": "softmax"}, num_images=3, figure_images=2)
    assert not (tmp_path / "out" / "curves" / "curve_attention_zero_share.png").exists()


@pytest.mark.slow
def test_analyze_script_command_line(tmp_path, tiny_config_kwargs):
    """The CLI as a user runs it, in a fresh process (slow here: a second torch/transformers import)."""
    for attention in ("entmax15", "softmax"):
        _model(tiny_config_kwargs, attention).save_pretrained(tmp_path / attention)
    images, masks = _image_folder(tmp_path / "data")
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts" / "analyze.py"), "--model", str(tmp_path / "entmax15"),
           "--compare", str(tmp_path / "softmax"), "--dataset", str(images), "--mask_dir", str(masks),
           "--image_size", "32", "--num_images", "3", "--num_figure_images", "1", "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_outputs(out, {"entmax15": "entmax15", "softmax": "softmax"}, num_images=3, figure_images=1)
    _png_ok(out / "curves" / "curve_attention_zero_share.png")


def test_analyze_on_a_saved_dataset_with_mask_column(tmp_path, tiny_config_kwargs):
    from datasets import Dataset, Image as ImageFeature

    _model(tiny_config_kwargs).save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    masks = [Image.fromarray(np.pad(np.ones((16, 16), np.uint8), 8)) for _ in range(2)]
    ds = Dataset.from_dict({"image": imgs, "mask": masks}).cast_column("image", ImageFeature()).cast_column("mask", ImageFeature())
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = parse_analyze_config(["--config", "quick", "--model", str(tmp_path / "model"),
                                       "--dataset", str(tmp_path / "ds"), "--split", "train",
                                       "--image_size", "32", "--no_separate_curves",
                                       "--output_dir", str(tmp_path / "out")])
    runs = main(cfg)
    assert list(runs) == ["model"]
    assert "fg_jaccard_best_head" in runs["model"][1]
    record = load_results(tmp_path / "out" / "model" / "analysis_results.json")
    assert record["dataset"]["num_samples"] == 2  # fewer than the preset's 8: all that exist


def test_analyze_config_errors(tmp_path, tiny_config_kwargs):
    with pytest.raises(ConfigError, match="Unrecognized options: --not_a_key"):
        parse_analyze_config(["--not_a_key", "1"])
    with pytest.raises(ConfigError, match="mass_threshold"):
        parse_analyze_config(["--model", "m", "--mass_threshold", "1.5"])
    script = runpy.run_path(str(REPO / "scripts" / "analyze.py"), run_name="analyze_script")
    with pytest.raises(SystemExit) as exit_:
        script["cli"](["--help"])
    assert exit_.value.code in (0, None)
    text = usage(AnalyzeConfig, script["__doc__"], PRESET_DIR)
    assert "--mass_threshold" in text and "quick" in text
    with pytest.raises(ValueError, match="--model is required"):
        main(AnalyzeConfig(output_dir=str(tmp_path / "o")))
    _model(tiny_config_kwargs).save_pretrained(tmp_path / "m")
    images, _ = _image_folder(tmp_path / "data", n=1)
    with pytest.raises(ValueError, match="multiple of"):
        main(AnalyzeConfig(model=str(tmp_path / "m"), dataset=str(images), image_size=36,
                           output_dir=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="names"):
        main(AnalyzeConfig(model=str(tmp_path / "m"), compare=[str(tmp_path / "m")], dataset=str(images),
                           image_size=32, output_dir=str(tmp_path / "o")))


def test_images_and_masks_keep_the_same_geometry(tmp_path):
    from entmax_vit.analysis.inputs import load_analysis_images, preprocess_mask
    from entmax_vit.modeling import IMAGENET_MEAN, IMAGENET_STD

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    arr = np.zeros((60, 90, 3), np.uint8)
    arr[20:40, 50:80, 0] = 255  # a red box off-centre in a landscape image
    Image.fromarray(arr).save(images / "a.png")
    m = np.zeros((60, 90), np.uint8)
    m[20:40, 50:80] = 7
    Image.fromarray(m).save(masks / "a.png")
    Image.fromarray(arr).save(images / "b.png")  # no mask: all pixels ignored (255)
    loaded = load_analysis_images(str(images), mask_dir=str(masks), num_images=5, image_size=30)
    assert loaded.names == ["a.png", "b.png"] and loaded.pixel_values.shape == (2, 3, 30, 30)
    red = loaded.pixel_values[0, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # back to [0, 1]
    mask = loaded.masks[0]
    assert set(mask.unique().tolist()) == {0, 7}
    assert red[mask == 7].mean() > 0.9 and red[mask == 0].mean() < 0.1
    assert (loaded.masks[1] == 255).all()
    with pytest.raises(ValueError, match="one-channel"):
        preprocess_mask(Image.fromarray(arr), 30)
    with pytest.raises(ValueError, match="mask_dir"):
        load_analysis_images(str(images), mask_dir=str(tmp_path / "missing"))


def test_an_unreadable_mask_skips_its_image_instead_of_reading_as_background(tmp_path, caplog):
    """A truncated mask PNG would read as class 0 through a bare Image.open; the one decoder refuses it."""
    from odd_images import bad_images

    from entmax_vit.analysis.inputs import load_analysis_images

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(images / f"{name}.png")
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 8:24] = 3
    Image.fromarray(m).save(masks / "a.png")
    truncated = next(c for c in bad_images() if c.name == "png_stream_ends_after_8_of_32_rows")
    (masks / "b.png").write_bytes(truncated.data)
    with caplog.at_level("WARNING", logger="entmax_vit.analysis.inputs"):
        loaded = load_analysis_images(str(images), mask_dir=str(masks), num_images=5, image_size=32)
    assert loaded.names == ["a.png"] and loaded.skipped == 1
    assert set(loaded.masks[0].unique().tolist()) == {0, 3}
    assert any("b.png" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)


def test_in_memory_analyze_and_save_and_compare(tmp_path, tiny_config_kwargs):
    """The path the main job takes: models in memory, no files to load from."""
    from entmax_vit.analysis.run import AnalyzeConfig, analyze_and_save, save_comparison

    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[:, 8:24, 8:24] = 1
    runs = {}
    for attention in ("softmax", "entmax15"):
        model = _model(tiny_config_kwargs, attention)
        runs[attention] = analyze_and_save(model, x, tmp_path / attention, masks=masks, name=attention,
                                           cfg=AnalyzeConfig(num_figure_images=1))
        assert runs[attention] == analyze_model(model, x, masks)
        record = load_results(tmp_path / attention / "analysis_results.json")
        assert record["model"]["attention"] == attention and record["dataset"]["name"] == "in_memory"
        _png_ok(tmp_path / attention / "attention_maps_0.png")
        _png_ok(tmp_path / attention / "pca.png")
    paths = save_comparison(runs, tmp_path)
    assert [p.name for p in paths] == ["layer_curves.png", "head_attention_distance.png", "comparison.md"]
    for p in paths[:2]:
        _png_ok(p)
