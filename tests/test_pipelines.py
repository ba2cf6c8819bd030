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
from entmax_vit.modeling.image_decoding import ImageDecodeError, decode_image
from entmax_vit.modeling.pipeline_entmax_vit import EntmaxViTSegmentationPipeline, open_image
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
    assert isinstance(info.value, ImageDecodeError)


def test_sixteen_bit_and_float_images_keep_their_content():
    gradient = (np.arange(48 * 32).reshape(32, 48) * 40).astype(np.uint16)  # up to ~61k: 16-bit range
    expected = np.round(gradient / 257.0)
    for image in (Image.fromarray(gradient), Image.fromarray(gradient.astype(np.int32)),
                  Image.fromarray((gradient / 65535.0).astype(np.float32))):
        rgb = np.asarray(decode_image(image)).astype(float)
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
    assert np.abs(np.asarray(decode_image(image)).astype(int) - np.asarray(reference).astype(int)).max() <= 1
    got = segmenter(_png_bytes(image) if mode != "CMYK" else image)
    _label_map(got, photo.size)


def test_transparent_pixels_are_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(decode_image(rgba)).min() == 255


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


# ----------------------------------------------------------------------------------------------------------
# One decoder everywhere (issue 12): the corpus of odd images through the Hub code, in a fresh process
# ----------------------------------------------------------------------------------------------------------
# Runs without the project: cwd an empty folder, PYTHONPATH empty. argv: REPO_DIR WORK_DIR. For every case file,
# records the pixel_values the model receives (a pre-hook on its embeddings) from AutoImageProcessor (PIL input)
# and from both pipelines (path, bytes and PIL input), or the error raised.
FRESH_CORPUS = r'''
import json, sys
from pathlib import Path
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoImageProcessor, pipeline
repo, work = sys.argv[1], Path(sys.argv[2])
processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
pipes = {"features": pipeline("image-feature-extraction", model=repo, trust_remote_code=True),
         "segmentation": pipeline("image-segmentation", model=repo, trust_remote_code=True)}
seen = []
for pipe in pipes.values():
    pipe.model.embeddings.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
out, errors = {}, {}
report = {"classes": {name: type(p).__name__ for name, p in pipes.items()}, "processor": type(processor).__name__,
          "errors": errors, "calls": {}, "pil_cannot_open": []}
def record(key, run):
    try:
        out[key] = run()
    except Exception as err:
        errors[key] = {"mro": [c.__name__ for c in type(err).__mro__], "message": str(err)}
def pil(path):
    try:
        return Image.open(path)  # lazily opened, as users do
    except Exception:
        report["pil_cannot_open"].append(path.name)  # undecodable data never becomes a PIL image
        return None
for path in sorted(work.glob("case_*")):
    name = path.name
    if pil(path) is not None:
        record(f"{name}|processor|pil", lambda: processor(pil(path), return_tensors="pt")["pixel_values"])
    for pname, pipe in pipes.items():
        inputs = [("path", str(path)), ("bytes", path.read_bytes())] + ([("pil", pil(path))] if pil(path) else [])
        for kind, value in inputs:
            def run():
                seen.clear()
                pipe(value)
                report["calls"][f"{name}|{pname}|{kind}"] = len(seen)
                return seen[0]
            record(f"{name}|{pname}|{kind}", run)
save_file({k: v.contiguous() for k, v in out.items()}, str(work / "pixels.safetensors"))
(work / "report.json").write_text(json.dumps(report))
'''


def _save_repository(parts, folder):
    """A model folder as the release assembles it: weights, processor, head, the pipeline code, and
    ``custom_pipelines`` serving both of our pipelines."""
    import json

    from transformers import AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY
    from transformers.utils import logging as hf_logging

    from entmax_vit.modeling.pipeline_entmax_vit import CUSTOM_PIPELINES, SEGMENTATION_TASK

    _, _, head, segmenter = parts
    previous = PIPELINE_REGISTRY.supported_tasks.get(SEGMENTATION_TASK)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        PIPELINE_REGISTRY.register_pipeline(SEGMENTATION_TASK, pipeline_class=EntmaxViTSegmentationPipeline,
                                            pt_model=AutoModel, type="image")
        segmenter.save_pretrained(folder)  # model, processor, pipeline_entmax_vit.py and its relative imports
    finally:
        hf_logging.set_verbosity(verbosity)
        if previous is not None:
            PIPELINE_REGISTRY.supported_tasks[SEGMENTATION_TASK] = previous
        else:
            PIPELINE_REGISTRY.supported_tasks.pop(SEGMENTATION_TASK, None)
    head.save(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["custom_pipelines"] = CUSTOM_PIPELINES
    config_path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def fresh_corpus_run(parts, tmp_path_factory):
    """The corpus through the Hub code in one fresh process (one interpreter start for ~300 calls)."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from odd_images import bad_images, odd_images

    root = tmp_path_factory.mktemp("corpus")
    repo, work = root / "repo", root / "work"
    work.mkdir()
    _save_repository(parts, repo)
    assert (repo / "image_decoding.py").is_file()
    cases = {f"case_{c.name}{c.suffix}": c for c in odd_images() + bad_images()}
    for file_name, case in cases.items():
        (work / file_name).write_bytes(case.data)
    (work / "fresh.py").write_text(FRESH_CORPUS)
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(work / "fresh.py"), str(repo), str(work)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cases, json.loads((work / "report.json").read_text()), load_file(str(work / "pixels.safetensors"))


def test_fresh_process_uses_our_processor_and_pipelines(fresh_corpus_run):
    _, report, _ = fresh_corpus_run
    assert report["processor"] == "EntmaxViTImageProcessor"
    assert report["classes"] == {"features": "EntmaxViTFeatureExtractionPipeline",
                                 "segmentation": "EntmaxViTSegmentationPipeline"}
    assert set(report["calls"].values()) == {1}  # one model input per call: the hook saw exactly it


def test_odd_images_feed_the_model_the_same_pixels_everywhere(parts, fresh_corpus_run):
    """Training's decode, AutoImageProcessor (PIL input) and both pipelines (path, bytes, PIL) in a fresh
    process give the model exactly the pixels of the independently computed reference image."""
    from entmax_vit.data.images import decode_image as training_decode

    _, processor, _, segmenter = parts
    cases, report, pixels = fresh_corpus_run
    checked = 0
    for file_name, case in cases.items():
        if not hasattr(case, "reference"):
            continue
        assert np.array_equal(np.asarray(training_decode(case.data)), case.reference), case.name
        reference = Image.fromarray(case.reference)
        want = {"processor": processor(reference, return_tensors="pt")["pixel_values"],
                "segmentation": segmenter.preprocess(reference)["pixel_values"]}
        want["features"] = want["processor"]
        for key in [f"{file_name}|processor|pil"] + [f"{file_name}|{p}|{k}" for p in ("features", "segmentation")
                                                    for k in ("path", "bytes", "pil")]:
            assert key not in report["errors"], (key, report["errors"].get(key))
            assert torch.equal(pixels[key], want[key.split("|")[1]]), key
            checked += 1
    assert checked == 7 * len([c for c in cases.values() if hasattr(c, "reference")])


def test_bombs_truncated_and_undecodable_data_are_reported_by_every_entry(fresh_corpus_run):
    import re

    cases, report, pixels = fresh_corpus_run
    bad = {name: case for name, case in cases.items() if not hasattr(case, "reference")}
    assert bad
    for file_name, case in bad.items():
        keys = [f"{file_name}|processor|pil"] + [f"{file_name}|{p}|{k}" for p in ("features", "segmentation")
                                                for k in ("path", "bytes", "pil")]
        if file_name in report["pil_cannot_open"]:
            assert case.match.startswith("not a readable image"), file_name  # only undecodable data
            keys = [k for k in keys if not k.endswith("|pil")]
        for key in keys:
            assert key not in pixels, f"{key}: the model was fed pixels"
            error = report["errors"][key]
            assert "ImageDecodeError" in error["mro"] and "ValueError" in error["mro"], (key, error)
            assert re.search(case.match, error["message"]), (key, error["message"])
            if key.endswith("|path"):
                assert file_name in error["message"], (key, error["message"])


def test_head_weights_are_safetensors_and_heads_saved_by_earlier_versions_load(tmp_path):
    """The head is written by the safetensors library; a file from the former hand-written writer (compact
    JSON header, names sorted, padded to 8 bytes) still loads; a malformed file is a ValueError."""
    import json
    import shutil

    from safetensors import safe_open

    from entmax_vit.modeling.segmentation_head import HEAD_CONFIG, HEAD_WEIGHTS

    torch.manual_seed(0)
    head = LinearSegmentationHead(SegmentationHeadConfig(num_labels=3, hidden_size=8, batch_norm=True))
    head.bn.running_mean.normal_()
    head.save(tmp_path / "new")
    state = head.state_dict()
    with safe_open(str(tmp_path / "new" / HEAD_WEIGHTS), "pt") as f:
        assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(state)
        for name in state:
            assert torch.equal(f.get_tensor(name), state[name])

    old = tmp_path / "old"
    old.mkdir()
    shutil.copyfile(tmp_path / "new" / HEAD_CONFIG, old / HEAD_CONFIG)
    names = {torch.float32: "F32", torch.int64: "I64"}
    header, blobs, offset = {}, [], 0
    for name in sorted(state):
        raw = state[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[state[name].dtype], "shape": list(state[name].shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    (old / HEAD_WEIGHTS).write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    loaded = LinearSegmentationHead.load(old)
    for name, value in state.items():
        assert torch.equal(loaded.state_dict()[name], value)

    (old / HEAD_WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="safetensors"):
        LinearSegmentationHead.load(old)


def test_urls_are_fetched_with_the_hub_session_and_decoded_by_the_one_decoder(parts, monkeypatch):
    import huggingface_hub

    from odd_images import bad_images, odd_images

    case = next(c for c in odd_images() if c.name.startswith("float_F"))
    truncated = next(c for c in bad_images() if c.name.startswith("png_stream_ends"))
    served = {"https://example.org/odd.tiff": case.data, "https://example.org/cut.png": truncated.data}
    calls = []

    class Response:
        def __init__(self, content):
            self.content = content

        def raise_for_status(self):
            if self.content is None:
                raise OSError("404 Not Found")

    class Session:
        def get(self, url, **kwargs):
            calls.append((url, kwargs))
            return Response(served.get(url))

    monkeypatch.setattr(huggingface_hub, "get_session", lambda: Session())
    assert np.array_equal(np.asarray(open_image("https://example.org/odd.tiff", timeout=5)), case.reference)
    assert calls[-1][1]["timeout"] == 5
    _, _, _, segmenter = parts
    with pytest.raises(ImageDecodeError, match="https://example.org/cut.png.*truncated"):
        segmenter("https://example.org/cut.png")
    with pytest.raises(ImageDecodeError, match="Could not load image from https://example.org/missing"):
        segmenter("https://example.org/missing.png")


def test_our_feature_extraction_pipeline_in_process(parts):
    """pipeline_class=EntmaxViTFeatureExtractionPipeline: same outputs as the built-in on an ordinary image, and
    the reference pixels on an image the built-in's load_image would clip (float with NaN/inf)."""
    from odd_images import odd_images

    from entmax_vit.modeling.pipeline_entmax_vit import EntmaxViTFeatureExtractionPipeline

    model, processor, _, _ = parts
    ours = pipeline("image-feature-extraction", model=model, image_processor=processor,
                    pipeline_class=EntmaxViTFeatureExtractionPipeline)
    builtin = pipeline("image-feature-extraction", model=model, image_processor=processor)
    photo = _photo()
    torch.testing.assert_close(torch.tensor(ours(photo)), torch.tensor(builtin(photo)))
    case = next(c for c in odd_images() if c.name.startswith("float_F"))
    with torch.no_grad():
        want = model(**processor(Image.fromarray(case.reference), return_tensors="pt")).pooler_output
    torch.testing.assert_close(torch.tensor(ours(case.data, pool=True)), want)
