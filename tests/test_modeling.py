"""EntmaxViT model behaviour: outputs, gradients, checkpointing, resolutions, registers, heads, save/load."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from entmax_vit.modeling import (
    EntmaxViTBackbone,
    EntmaxViTConfig,
    EntmaxViTForImageClassification,
    EntmaxViTModel,
    make_image_processor,
)

TRANSFORMS = ["softmax", "entmax15", "sparsemax", "entmax_bisect"]


def tiny(**kw) -> EntmaxViTConfig:
    base = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64)
    base.update(kw)
    return EntmaxViTConfig(**base)


# ---------------------------------------------------------------------------------------------- config
def test_presets_match_dino_sizes() -> None:
    s16 = EntmaxViTConfig.from_preset("vit_small_patch16")
    assert (s16.hidden_size, s16.num_hidden_layers, s16.num_attention_heads, s16.patch_size) == (384, 12, 6, 16)
    assert s16.intermediate_size == 4 * 384 and s16.layer_norm_eps == 1e-6 and s16.qkv_bias
    assert EntmaxViTConfig.from_preset("vitb8").hidden_size == 768
    assert EntmaxViTConfig.from_preset("vit_tiny_patch8").patch_size == 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attention="entmax2"), "choose one of"),
        (dict(num_attention_heads=5), "divisible by num_attention_heads"),
        (dict(image_size=30), "divisible by patch_size"),
        (dict(attention="entmax_bisect", attention_alpha=1.0), "attention_alpha must be > 1"),
        (dict(attention="softmax", attention_alpha=2.0), "only applies"),
        (dict(attention="entmax15", attention_alpha_learnable=True), "requires attention='entmax_bisect'"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(out_indices=[5]), "out_indices"),
    ],
)
def test_config_rejects_bad_values(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_unknown_preset_and_kernel() -> None:
    with pytest.raises(ValueError, match="Unknown preset"):
        EntmaxViTConfig.from_preset("vit_huge_patch14")
    with pytest.raises(ValueError, match="choose one of"):
        EntmaxViTModel._from_config(tiny(), attn_implementation="flash_attention_2")


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("attention", TRANSFORMS)
def test_outputs_and_attention_probabilities(attention: str) -> None:
    model = EntmaxViTModel(tiny(attention=attention, num_register_tokens=2)).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x, output_attentions=True, output_hidden_states=True)
    n = 1 + 2 + 16
    assert out.last_hidden_state.shape == (2, n, 32)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2
    # last_hidden_state is the final LayerNorm of the last block output
    ln = model.layernorm
    torch.testing.assert_close(out.last_hidden_state, ln(out.hidden_states[-1]))
    for probs in out.attentions:
        assert probs.shape == (2, 4, n, n)
        assert (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, n), atol=1e-5, rtol=0)
    assert torch.isfinite(out.last_hidden_state).all()


def test_sparse_transforms_give_exact_zeros_on_peaked_scores() -> None:
    """Scale up the qkv weights so scores are peaked: sparse transforms must produce exact zeros, softmax none."""
    zeros = {}
    for attention in ["softmax", "entmax15", "sparsemax"]:
        torch.manual_seed(0)
        model = EntmaxViTModel(tiny(attention=attention)).eval()
        with torch.no_grad():
            for layer in model.encoder.layer:
                layer.attention.qkv.weight.mul_(20)
        probs = model(torch.randn(1, 3, 32, 32), output_attentions=True).attentions[-1]
        zeros[attention] = (probs == 0).float().mean().item()
    assert zeros["softmax"] == 0.0
    assert zeros["entmax15"] > 0.2 and zeros["sparsemax"] >= zeros["entmax15"]


def test_softmax_sdpa_equals_eager_and_weights_come_from_eager_path() -> None:
    config = tiny(attention="softmax")
    torch.manual_seed(0)
    sdpa = EntmaxViTModel._from_config(config, attn_implementation="sdpa").eval()
    eager = EntmaxViTModel._from_config(config, attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 3, 32, 32)
    a = sdpa(x)
    b = eager(x, output_attentions=True)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=1e-5, rtol=1e-5)
    # output_attentions on the sdpa model still returns real probabilities
    c = sdpa(x, output_attentions=True)
    torch.testing.assert_close(c.attentions[0], b.attentions[0])


@pytest.mark.parametrize("attention", TRANSFORMS)
def test_every_parameter_receives_a_gradient(attention: str) -> None:
    learn = attention == "entmax_bisect"
    model = EntmaxViTForImageClassification(
        tiny(attention=attention, num_register_tokens=1, num_labels=3, attention_alpha_learnable=learn)
    ).train()
    out = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2]))
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without finite gradient: {missing}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters with an all-zero gradient: {zero}"
    if learn:
        assert model.entmax_vit.encoder.layer[0].attention.alpha_raw.shape == (4,)


@pytest.mark.parametrize("attention", ["softmax", "entmax15"])
def test_gradient_checkpointing_leaves_outputs_and_grads_unchanged(attention: str) -> None:
    torch.manual_seed(0)
    model = EntmaxViTModel(tiny(attention=attention)).train()
    x = torch.randn(2, 3, 32, 32)
    out_a = model(x).last_hidden_state
    out_a.square().mean().backward()
    grads_a = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    out_b = model(x).last_hidden_state
    out_b.square().mean().backward()
    torch.testing.assert_close(out_a, out_b)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_a[n], msg=n)


def test_drop_path_is_stochastic_in_training_only() -> None:
    model = EntmaxViTModel(tiny(drop_path_rate=0.5, num_hidden_layers=4))
    rates = [layer.drop_path.drop_prob for layer in model.encoder.layer]
    assert rates[0] == 0.0 and math.isclose(rates[-1], 0.5) and rates == sorted(rates)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    torch.manual_seed(1)
    a = model(x).last_hidden_state
    torch.manual_seed(2)
    b = model(x).last_hidden_state
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(x).last_hidden_state, model(x).last_hidden_state)


# ---------------------------------------------------------------------------------------------- resolution
def _dino_interpolate(pos_embed: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Official DINO v1 VisionTransformer.interpolate_pos_encoding, written out independently for the test."""
    n = pos_embed.shape[1] - 1
    if (height // patch) * (width // patch) == n and height == width:
        return pos_embed
    cls, grid = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = height // patch + 0.1, width // patch + 0.1  # DINO calls the first spatial dim "w"
    side = math.sqrt(n)
    grid = F.interpolate(grid.reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2),
                         scale_factor=(w0 / side, h0 / side), mode="bicubic")
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((cls.unsqueeze(0), grid), dim=1)


@pytest.mark.parametrize("size", [(32, 32), (40, 56), (24, 64), (48, 48)])
def test_position_embedding_interpolation_matches_official_dino(size) -> None:
    model = EntmaxViTModel(tiny()).eval()
    h, w = size
    ours = model.embeddings.interpolate_pos_encoding((h // 8) * (w // 8), h, w)
    ref = _dino_interpolate(model.embeddings.position_embeddings.detach(), h, w, 8)
    torch.testing.assert_close(ours, ref)
    out = model(torch.randn(1, 3, h, w))
    assert out.last_hidden_state.shape == (1, 1 + (h // 8) * (w // 8), 32)


def test_bad_input_sizes_raise_clear_errors() -> None:
    model = EntmaxViTModel(tiny()).eval()
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="batch, channels, height, width"):
        model(torch.randn(3, 32, 32))


def test_get_intermediate_layers_matches_hidden_states() -> None:
    model = EntmaxViTModel(tiny(num_hidden_layers=3, num_register_tokens=2)).eval()
    x = torch.randn(2, 3, 32, 40)
    out = model(x, output_hidden_states=True)
    layers = model.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True, return_register_tokens=True)
    assert len(layers) == 2
    for (patches, cls, regs), hidden in zip(layers, out.hidden_states[-2:]):
        normed = model.layernorm(hidden)
        assert patches.shape == (2, 32, 4, 5)
        torch.testing.assert_close(cls, normed[:, 0])
        torch.testing.assert_close(regs, normed[:, 1:3])
        torch.testing.assert_close(patches.flatten(2).transpose(1, 2), normed[:, 3:])
    raw = model.get_intermediate_layers(x, n=[0], norm=False)[0]
    torch.testing.assert_close(raw, out.hidden_states[1][:, 3:])


def test_backbone_feature_maps() -> None:
    config = tiny(num_hidden_layers=3, out_indices=[1, 3], num_register_tokens=1)
    backbone = EntmaxViTBackbone(config).eval()
    model = EntmaxViTModel(config).eval()
    model.load_state_dict({k: v for k, v in backbone.state_dict().items()})
    x = torch.randn(2, 3, 32, 48)
    maps = backbone(x).feature_maps
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 6), (2, 32, 4, 6)]
    assert backbone.channels == [32, 32] and backbone.out_features == ["stage1", "stage3"]
    ref = model.get_intermediate_layers(x, n=[0, 2], reshape=True)
    for got, want in zip(maps, ref):
        torch.testing.assert_close(got, want)


def test_image_processor_reproduces_dino_eval_transform() -> None:
    from PIL import Image
    import numpy as np

    processor = make_image_processor()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, size=(300, 400, 3), dtype=np.uint8))
    pixel = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixel.shape == (1, 3, 224, 224)
    # reference: shorter side to 256 (bicubic), center crop 224, ImageNet normalisation
    resized = image.resize((341, 256), Image.BICUBIC)
    left, top = (341 - 224) // 2, (256 - 224) // 2
    crop = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255
    ref = (crop - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    ref = torch.from_numpy(ref.transpose(2, 0, 1)).float()
    assert (pixel[0] - ref).abs().max() < 0.05  # rounding of the crop offset / resize kernels
    # grayscale and RGBA are converted to RGB
    for mode in ("L", "RGBA"):
        assert processor(images=image.convert(mode), return_tensors="pt")["pixel_values"].shape == (1, 3, 224, 224)


# ---------------------------------------------------------------------------------------------- save / load
_LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoConfig, AutoModel, AutoImageProcessor, AutoModelForImageClassification, AutoBackbone
    folder, x_path, out_path = sys.argv[1:4]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    x = torch.load(x_path, weights_only=True)
    with torch.no_grad():
        out = model(x, output_attentions=True)
    leaked = sorted(m for m in sys.modules if m.startswith("entmax_vit"))
    torch.save({"hidden": out.last_hidden_state, "attn": out.attentions[-1]}, out_path)
    print(json.dumps({"leaked": leaked, "attention": config.attention, "cls": type(model).__module__}))
    """
)


def _fresh_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


@pytest.mark.parametrize("attention", ["entmax15", "entmax_bisect"])
def test_save_pretrained_reloads_in_fresh_process_without_the_project(tmp_path: Path, attention: str) -> None:
    learn = attention == "entmax_bisect"
    model = EntmaxViTModel(tiny(attention=attention, num_register_tokens=1, attention_alpha_learnable=learn)).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    files = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    py_files = [f for f in files if f.endswith(".py")]
    # attention.py imports thresholds.py and tiled_attention.py, and triton_attention.py lazily (CUDA only)
    expected = ["attention.py", "configuration_entmax_vit.py", "modeling_entmax_vit.py", "thresholds.py",
                "tiled_attention.py", "triton_attention.py"]
    assert sorted(py_files) == sorted(expected)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_entmax_vit.EntmaxViTModel"
    x = torch.randn(2, 3, 32, 40)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        ref = model(x, output_attentions=True)
    script = tmp_path / "load.py"
    script.write_text(_LOADER)
    run = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=_fresh_env(), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout.strip().splitlines()[-1])
    assert info["leaked"] == [] and info["attention"] == attention
    assert info["cls"].startswith("transformers_modules")
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(got["hidden"], ref.last_hidden_state, atol=0, rtol=0)
    torch.testing.assert_close(got["attn"], ref.attentions[-1], atol=0, rtol=0)


def test_classification_and_backbone_save_auto_map(tmp_path: Path) -> None:
    clf = EntmaxViTForImageClassification(tiny(num_labels=3))
    clf.save_pretrained(tmp_path / "clf")
    auto_map = json.loads((tmp_path / "clf" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageClassification"] == "modeling_entmax_vit.EntmaxViTForImageClassification"
    reloaded = EntmaxViTForImageClassification.from_pretrained(tmp_path / "clf")
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(reloaded.eval()(x).logits, clf.eval()(x).logits)


def test_loading_mismatched_checkpoint_names_the_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """transformers' own semantics: a shape mismatch raises its error (the load report names the keys), and
    ignore_mismatched_sizes=True loads what fits and initialises the rest."""
    small = EntmaxViTModel(tiny())
    small.save_pretrained(tmp_path / "small")
    bigger = dict(hidden_size=64, num_attention_heads=4, intermediate_size=64)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        EntmaxViTModel.from_pretrained(tmp_path / "small", **bigger)
    report = caplog.text  # transformers' load report, logged
    assert "attention.qkv.weight" in report and "MISMATCH" in report and "size mismatch" in report
    model, info = EntmaxViTModel.from_pretrained(tmp_path / "small", ignore_mismatched_sizes=True,
                                                 output_loading_info=True, **bigger)
    assert model.config.hidden_size == 64 and info["mismatched_keys"]
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32)).last_hidden_state).all()


def test_missing_weights_are_initialised_with_a_warning(tmp_path: Path) -> None:
    """As transformers: weights absent from the checkpoint (here a new classifier) are initialised, reported."""
    EntmaxViTModel(tiny()).save_pretrained(tmp_path / "base")
    clf, info = EntmaxViTForImageClassification.from_pretrained(tmp_path / "base", num_labels=3,
                                                                output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert torch.isfinite(clf.classifier.weight).all() and clf.classifier.weight.std() > 0


@pytest.mark.parametrize("layout", ["dino", "hf-vit"])
def test_unconverted_foreign_checkpoint_names_the_converter(tmp_path: Path, layout: str) -> None:
    """An official DINO/timm or transformers ViT checkpoint would load as a random model: it raises instead,
    naming the converter of the installed package (not a script of this repository)."""
    from safetensors.torch import save_file

    folder = tmp_path / layout
    EntmaxViTModel(tiny()).config.save_pretrained(folder)
    if layout == "dino":
        state = {"cls_token": torch.zeros(1, 1, 32), "pos_embed": torch.zeros(1, 17, 32),
                 "patch_embed.proj.weight": torch.zeros(32, 3, 8, 8), "blocks.0.attn.qkv.weight": torch.zeros(96, 32)}
    else:
        state = {"embeddings.cls_token": torch.zeros(1, 1, 32),
                 "encoder.layer.0.attention.attention.query.weight": torch.zeros(32, 32),
                 "encoder.layer.0.layernorm_before.weight": torch.zeros(32)}
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"python -m entmax_vit.conversion --source {layout.split('-')[0]}"):
        EntmaxViTModel.from_pretrained(folder)


def test_image_processor_converts_odd_images_as_users_expect(tmp_path: Path) -> None:
    """16-bit, float, RGBA, palette, CMYK, grayscale, 1x1 and EXIF-rotated images become the RGB image a user
    sees (no clipping of 16-bit to white, orientation applied, transparency on white)."""
    import numpy as np
    from PIL import Image

    processor = make_image_processor(resize=32, crop=32)
    rng = np.random.default_rng(0)
    gray8 = rng.integers(0, 256, size=(40, 48), dtype=np.uint8)

    def pix(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    ref = pix(Image.fromarray(gray8, "L"))
    torch.testing.assert_close(pix(Image.fromarray(gray8.astype(np.uint16) * 257)), ref)  # I;16
    torch.testing.assert_close(pix(Image.fromarray(gray8.astype(np.float32) / 255.0, "F")), ref, atol=0.02, rtol=0)
    rgb = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    ref_rgb = pix(Image.fromarray(rgb))
    opaque = Image.fromarray(np.dstack([rgb, np.full((40, 48), 255, np.uint8)]), "RGBA")
    torch.testing.assert_close(pix(opaque), ref_rgb)
    clear = Image.fromarray(np.dstack([rgb, np.zeros((40, 48), np.uint8)]), "RGBA")
    white = pix(Image.new("RGB", (48, 40), (255, 255, 255)))
    torch.testing.assert_close(pix(clear), white)
    for mode in ("P", "CMYK", "LA"):
        assert pix(Image.fromarray(rgb).convert(mode)).shape == (3, 32, 32)
    assert pix(Image.new("RGB", (1, 1), (10, 20, 30))).shape == (3, 32, 32)
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): the processor sees the upright image
    upright = Image.fromarray(rgb)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    upright.save(tmp_path / "upright.jpg", quality=100)
    got = pix(Image.open(tmp_path / "rotated.jpg"))
    want = pix(Image.open(tmp_path / "upright.jpg"))
    assert (got - want).abs().mean() < 0.1
    # the processor round-trips through save_pretrained with its remote code
    processor.save_pretrained(tmp_path / "proc")
    assert (tmp_path / "proc" / "image_processing_entmax_vit.py").is_file()
