"""The pipelines users meet: built-in image-feature-extraction with an EntmaxViT, and the segmentation-probe
pipeline (output format of transformers' image-segmentation pipelines, at the input size, agreeing with the
probe run by hand), including every kind of awkward or broken image input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers import pipeline

from entmax_vit.modeling import IMAGENET_MEAN, IMAGENET_STD, EntmaxViTConfig, EntmaxViTModel, make_image_processor
from entmax_vit.modeling.pipeline_entmax_vit import EntmaxViTSegmentationPipeline, ImageInputError, open_image, to_rgb
from entmax_vit.modeling.segmentation_head import LinearSegmentationHead, SegmentationHeadConfig

LABELS = {0: "background", 1: "circle", 2: "square", 3: "stripes"}


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    config = EntmaxViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=64)
    model = EntmaxViTModel(config).eval()
    processor = make_image_processor(resize=36, crop=32)
    head = LinearSegmentationHead(SegmentationHeadConfig(num_labels=4, hidden_size=32, layers=[-1, 0],
                                                         use_cls_token=True, input_size=32, id2label=LABELS))
    torch.nn.init.normal_(head.conv.weight, std=2.0)
    head.eval()
    segmenter = EntmaxViTSegmentationPipeline(model=model, image_processor=processor, segmentation_head=head)
    return model, processor, head, segmenter


def _photo(size=(57, 43)) -> Image.Image:
    from skimage import data as skdata

    return Image.fromarray(skdata.chelsea()).resize(size)


def _label_map(segments: list[dict], size: tuple[int, int]) -> torch.Tensor:
    """Rebuild the (H, W) label map from the masks, checking they are 0/255 and partition the image."""
    width, height = size
    names = {v: k for k, v in LABELS.items()}
    label_map = torch.full((height, width), -1)
    for s in segments:
        mask = torch.from_numpy(np.asarray(s["mask"]).copy())
        assert s["mask"].mode == "L" and s["mask"].size == size
        assert set(mask.unique().tolist()) <= {0, 255}
        assert (label_map[mask == 255] == -1).all(), "masks overlap"
        label_map[mask == 255] = names[s["label"]]
    assert (label_map >= 0).all(), "masks do not cover the image"
    return label_map


def _reference_labels(model, head, image: Image.Image) -> torch.Tensor:
    """The probe by hand: resize to input_size, ImageNet-normalise, logits upsampled to the image size."""
    side = head.config.input_size
    x = torch.from_numpy(np.asarray(image.convert("RGB").resize((side, side), Image.BICUBIC)).copy())
    x = x.permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = head.predict(model, x, size=(image.height, image.width))
    return logits.argmax(1)[0]


# ----------------------------------------------------------------------------------------------------------
# image-feature-extraction (built-in pipeline)
# ----------------------------------------------------------------------------------------------------------
def test_feature_extraction_pipeline_gives_model_tokens_and_pooled_cls(parts):
    model, processor, _, _ = parts
    extractor = pipeline("image-feature-extraction", model=model, image_processor=processor)
    image = _photo()
    with torch.no_grad():
        out = model(**processor(image, return_tensors="pt"))
    tokens = torch.tensor(extractor(image))
    pooled = torch.tensor(extractor(image, pool=True))
    assert tokens.shape == (1, 1 + (32 // 8) ** 2, 32)
    torch.testing.assert_close(tokens, out.last_hidden_state)
    torch.testing.assert_close(pooled, out.pooler_output)
    torch.testing.assert_close(pooled, tokens[:, 0])  # pooled = normed [CLS]


# ----------------------------------------------------------------------------------------------------------
# Segmentation pipeline
# ----------------------------------------------------------------------------------------------------------
def test_segmentation_output_format_and_agreement_with_the_probe(parts):
    model, _, head, segmenter = parts
    image = _photo((57, 43))
    segments = segmenter(image)
    assert isinstance(segments, list) and segments
    assert all(set(s) == {"label", "score", "mask"} for s in segments)
    assert all(0.0 < s["score"] <= 1.0 for s in segments)
    assert len({s["label"] for s in segments}) == len(segments)
    label_map = _label_map(segments, image.size)
    reference = _reference_labels(model, head, image)
    assert (label_map == reference).float().mean() == 1.0
    assert len(segments) >= 2  # the random-but-confident head really separates classes


def test_segmentation_score_is_mean_winning_probability(parts):
    model, _, head, segmenter = parts
    image = _photo((40, 40))
    side = head.config.input_size
    x = torch.from_numpy(np.asarray(image.resize((side, side), Image.BICUBIC)).copy()).permute(2, 0, 1)[None] / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = head.predict(model, x.float(), size=(40, 40)).softmax(1)[0]
    confidence, labels = probs.max(0)
    for s in segmenter(image):
        label = {v: k for k, v in LABELS.items()}[s["label"]]
        assert s["score"] == pytest.approx(float(confidence[labels == label].mean()), abs=1e-5)


def test_segmentation_batch_and_inputs_by_path_and_bytes(parts, tmp_path):
    _, _, _, segmenter = parts
    image = _photo((35, 29))
    path = tmp_path / "cat.png"
    image.save(path)
    expected = segmenter(image)
    for variant in (str(path), path, path.read_bytes()):
        got = segmenter(variant)
        assert [s["label"] for s in got] == [s["label"] for s in expected]
        assert all(np.array_equal(np.asarray(a["mask"]), np.asarray(b["mask"])) for a, b in zip(got, expected))
    batch = segmenter([image, _photo((20, 50))])
    assert len(batch) == 2 and batch[1][0]["mask"].size == (20, 50)


# ----------------------------------------------------------------------------------------------------------
# Malformed and unusual images (issue 8)
# ----------------------------------------------------------------------------------------------------------
def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("bad, message", [
    (b"", "empty"),
    (b"definitely not an image", "not a readable image"),
    ("PNG_TRUNCATED", "truncated|not a readable image|unreadable"),
    ("/no/such/file.png", "neither an existing file"),
    (12345, "Unsupported image input"),
])
def test_unreadable_input_raises_a_clear_value_error(parts, bad, message):
    _, _, _, segmenter = parts
    if bad == "PNG_TRUNCATED":
        bad = _png_bytes(_photo())[:200]
    with pytest.raises(ValueError, match=message) as info:
        segmenter(bad)
    assert isinstance(info.value, ImageInputError)


def test_sixteen_bit_and_float_images_keep_their_content():
    gradient = (np.arange(48 * 32).reshape(32, 48) * 40).astype(np.uint16)  # up to ~61k: 16-bit range
    expected = np.round(gradient / 257.0)
    for image in (Image.fromarray(gradient), Image.fromarray(gradient.astype(np.int32)),
                  Image.fromarray((gradient / 65535.0).astype(np.float32))):
        rgb = np.asarray(to_rgb(image)).astype(float)
        assert rgb.shape == (32, 48, 3)
        assert np.abs(rgb[..., 0] - expected).max() <= 1.0, image.mode  # not clipped to white
        assert (rgb[..., 0] == rgb[..., 2]).all()


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_every_mode_segments_like_its_rgb_version(parts, mode):
    _, _, _, segmenter = parts
    photo = _photo((36, 28))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257)
        reference = photo.convert("L").convert("RGB")
    elif mode in ("RGBA", "LA"):
        image = photo.convert(mode)  # fully opaque: compositing must not change colours
        reference = photo if mode == "RGBA" else photo.convert("L").convert("RGB")
    else:
        image = photo.convert(mode)
        reference = image.convert("RGB")
    assert np.abs(np.asarray(to_rgb(image)).astype(int) - np.asarray(reference).astype(int)).max() <= 1
    got = segmenter(_png_bytes(image) if mode != "CMYK" else image)
    _label_map(got, photo.size)


def test_transparent_pixels_are_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(rgba)).min() == 255


def test_exif_rotated_photo_is_segmented_upright(parts):
    _, _, _, segmenter = parts
    photo = _photo((50, 30))  # landscape pixels, EXIF says "rotate 90 degrees clockwise to display"
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    raw = buffer.getvalue()
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(raw)))
    assert upright.size == (30, 50)
    assert open_image(raw).size == (30, 50)
    segments = segmenter(raw)
    assert all(s["mask"].size == (30, 50) for s in segments)
    expected = segmenter(upright)
    assert [s["label"] for s in segments] == [s["label"] for s in expected]


def test_head_model_mismatch_is_rejected(parts):
    model, processor, _, _ = parts
    wrong = LinearSegmentationHead(SegmentationHeadConfig(num_labels=2, hidden_size=48, input_size=32))
    with pytest.raises(ValueError, match="hidden_size"):
        EntmaxViTSegmentationPipeline(model=model, image_processor=processor, segmentation_head=wrong)


def test_missing_head_names_the_files(parts, tmp_path):
    model, processor, _, _ = parts
    with pytest.raises(FileNotFoundError, match="segmentation_head"):
        EntmaxViTSegmentationPipeline(model=model, image_processor=processor, segmentation_head=tmp_path)


def test_head_is_found_for_a_hub_id_through_the_cache(parts, tmp_path, monkeypatch):
    """A Hub id resolves through transformers.utils.cached_file (here: a populated offline cache)."""
    _, _, head, _ = parts
    commit = "c" * 40
    cache = tmp_path / "hub_cache"
    repo = cache / "models--tester--entmax-seg"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    head.save(repo / "snapshots" / commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    loaded = EntmaxViTSegmentationPipeline._load_head("tester/entmax-seg")
    assert loaded.config == head.config
    for name, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    with pytest.raises(FileNotFoundError, match="no segmentation probe"):
        EntmaxViTSegmentationPipeline._load_head("tester/not-there")
