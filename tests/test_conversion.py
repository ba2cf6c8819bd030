"""Checkpoint conversion: converted softmax models reproduce DINO/timm/transformers sources to 1e-5, DINO's
position-embedding interpolation at other resolutions, full training checkpoints, key-mismatch errors, CLI
and a trust_remote_code round trip in a fresh process. Sources are built in-process with random weights."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from entmax_vit.conversion import ConvertConfig, convert, save_converted, verify_against
from entmax_vit.modeling import EntmaxViTModel

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
TINY = dict(embed_dim=64, depth=2, num_heads=4, img_size=32, patch_size=8)


def _randomise(module: torch.nn.Module) -> None:
    """Random non-trivial values everywhere (LayerNorms and biases too), so every mapping is exercised."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_scale = p.ndim == 1 and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if is_norm_scale else 0.0))


def tiny_timm(num_classes: int = 0) -> torch.nn.Module:
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=num_classes, **TINY)
    _randomise(model)
    return model.eval()


def dino_reference(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Official DINO VisionTransformer.forward (prepare_tokens + blocks + norm), written out from
    vision_transformer.py, on a timm model's weights: includes DINO's position-embedding interpolation
    (scale_factor with the +0.1 offset), which timm does not use. Returns (B, 1 + N, D)."""
    b, _, h, w = pixels.shape
    proj = model.patch_embed.proj
    x = F.conv2d(pixels, proj.weight, proj.bias, stride=proj.stride).flatten(2).transpose(1, 2)
    x = torch.cat((model.cls_token.expand(b, -1, -1), x), dim=1)
    npatch, n = x.shape[1] - 1, model.pos_embed.shape[1] - 1
    if npatch == n and w == h:
        pos = model.pos_embed
    else:
        dim = x.shape[-1]
        patch = proj.kernel_size[0]
        w0, h0 = w // patch + 0.1, h // patch + 0.1
        grid = model.pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
        assert int(w0) == grid.shape[-2] and int(h0) == grid.shape[-1]
        pos = torch.cat((model.pos_embed[:, :1], grid.permute(0, 2, 3, 1).view(1, -1, dim)), dim=1)
    x = x + pos
    for block in model.blocks:
        x = block(x)
    return model.norm(x)


def _assert_same_features(ours: EntmaxViTModel, reference_tokens: torch.Tensor, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        out = ours(pixels)
        patches = ours.get_intermediate_layers(pixels, n=1)[0]
    assert out.last_hidden_state.shape == reference_tokens.shape
    torch.testing.assert_close(out.last_hidden_state, reference_tokens, atol=TOL, rtol=0)
    torch.testing.assert_close(patches, reference_tokens[:, 1:], atol=TOL, rtol=0)  # patch tokens
    torch.testing.assert_close(out.pooler_output, reference_tokens[:, 0], atol=TOL, rtol=0)  # normed [CLS]


def _convert(tmp_path: Path, **kwargs) -> EntmaxViTModel:
    kwargs.setdefault("output_dir", str(tmp_path / "out"))
    # verify=False: these tests compare against the sources themselves, independently of the built-in check.
    kwargs.setdefault("verify", False)
    return convert(ConvertConfig(**kwargs)).model


# ----------------------------------------------------------------------------------------------------------
# timm / DINO backbone format
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_state_dict_parity_native_and_dino_interpolation(tmp_path, suffix):
    source = tiny_timm(num_classes=5)  # a classifier head, which conversion drops
    path = tmp_path / f"timm{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    model = _convert(tmp_path, source="timm", input=str(path), num_heads=4)
    assert model.config.layer_norm_eps == 1e-6 and model.config.num_attention_heads == 4
    assert (model.config.image_size, model.config.patch_size, model.config.intermediate_size) == (32, 8, 256)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _assert_same_features(model, source.forward_features(pixels), pixels)
        # Non-native (square) resolutions: position embeddings interpolated exactly as official DINO.
        for size in (48, 24):
            big = torch.randn(1, 3, size, size)
            _assert_same_features(model, dino_reference(source, big), big)


def test_official_dino_backbone_file_and_timm_arch_heads(tmp_path):
    source = tiny_timm()
    path = tmp_path / "dino_backbone.pth"
    torch.save(source.state_dict(), path)  # official *_pretrain.pth files are exactly this key set
    with pytest.raises(ValueError, match="--num-heads"):
        _convert(tmp_path, source="dino", input=str(path))  # width 64: heads cannot be inferred
    model = _convert(tmp_path, source="dino", input=str(path), num_heads=4, verify=True)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _assert_same_features(model, dino_reference(source, pixels), pixels)


def test_standard_width_heads_and_timm_architecture_config(tmp_path):
    """A timm Hub folder (config.json with "architecture") gives heads and eps; real ViT-S sizes, batch 1."""
    source = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=1).eval()
    folder = tmp_path / "timm_hub"
    folder.mkdir()
    save_file(source.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_224", "num_classes": 0}))
    model = _convert(tmp_path, source="timm", input=str(folder))
    assert model.config.num_attention_heads == 6 and model.config.image_size == 224
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).last_hidden_state, source.forward_features(pixels), atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# DINO full training checkpoints
# ----------------------------------------------------------------------------------------------------------
def _write_training_checkpoint(path: Path, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    head = {"mlp.0.weight": torch.randn(16, 64), "mlp.0.bias": torch.randn(16),
            "last_layer.weight_g": torch.ones(32, 1), "last_layer.weight_v": torch.randn(32, 8)}
    ckpt = {
        # DDP-wrapped student: "module.backbone.*", "module.head.*"; teacher without DDP: "backbone.*", "head.*"
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    **{f"module.head.{k}": v for k, v in head.items()}},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                    **{f"head.{k}": v.clone() for k, v in head.items()}},
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "epoch": 7,
        "args": argparse.Namespace(arch="vit_custom", patch_size=8, out_dim=32, lr=0.0005, data_path="/data"),
        "dino_loss": {"center": torch.zeros(1, 32)},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0},
    }
    torch.save(ckpt, path)


def test_full_training_checkpoint_teacher_and_student(tmp_path, caplog):
    student, teacher = tiny_timm(), tiny_timm()
    path = tmp_path / "checkpoint.pth"
    _write_training_checkpoint(path, student, teacher)
    pixels = torch.randn(2, 3, 32, 32)
    with caplog.at_level("INFO"):
        result = convert(ConvertConfig(source="dino", input=str(path), output_dir=str(tmp_path / "t"), num_heads=4))
    assert "using the teacher (epoch 7)" in caplog.text
    assert result.report["which"] == "teacher" and result.report["verified_max_abs_diff"] <= TOL
    assert set(result.report["dropped_keys"]) == {"head.mlp.0.weight", "head.mlp.0.bias", "head.last_layer.weight_g",
                                                  "head.last_layer.weight_v"}
    with torch.no_grad():
        _assert_same_features(result.model, teacher.forward_features(pixels), pixels)
        model = _convert(tmp_path, source="dino", input=str(path), num_heads=4, which="student")
        _assert_same_features(model, student.forward_features(pixels), pixels)


def test_training_checkpoint_patch_size_must_match_args(tmp_path):
    path = tmp_path / "checkpoint.pth"
    _write_training_checkpoint(path, tiny_timm(), tiny_timm())
    # Re-write with wrong args: the weights have patch 8.
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(path, weights_only=True)
    data["args"].patch_size = 16
    torch.save(data, path)
    with pytest.raises(ValueError, match="patch_size 16"):
        _convert(tmp_path, source="dino", input=str(path), num_heads=4)


class _NotAllowed:
    """A class a weights-only unpickler must refuse."""


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": tiny_timm().state_dict(), "extra": _NotAllowed()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        _convert(tmp_path, source="dino", input=str(path), num_heads=4)


# ----------------------------------------------------------------------------------------------------------
# transformers ViT
# ----------------------------------------------------------------------------------------------------------
def _tiny_vit_config(**overrides):
    from transformers import ViTConfig

    kwargs = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64)
    return ViTConfig(**{**kwargs, **overrides})


def _hf_tokens(model, pixels):
    with torch.no_grad():
        return model(pixels).last_hidden_state


def test_hf_vit_folder_old_naming_with_config(tmp_path, caplog):
    from safetensors.torch import load_file
    from transformers import ViTModel

    source = ViTModel(_tiny_vit_config(layer_norm_eps=1e-12)).eval()  # HF default eps, with a pooler
    _randomise(source)
    source.save_pretrained(tmp_path / "hf")
    keys = set(load_file(str(tmp_path / "hf" / "model.safetensors")))
    assert "encoder.layer.0.attention.attention.query.weight" in keys  # the older (dino-vits16) naming
    with caplog.at_level("INFO"):
        model = _convert(tmp_path, source="hf-vit", input=str(tmp_path / "hf"), verify=True)
    assert "HF pooler" in caplog.text
    assert model.config.layer_norm_eps == 1e-12  # carried exactly from config.json
    pixels = torch.randn(2, 3, 32, 32)
    _assert_same_features(model, _hf_tokens(source, pixels), pixels)


def test_hf_vit_v5_naming_state_dict_without_config(tmp_path):
    from transformers import ViTModel

    source = ViTModel(_tiny_vit_config(), add_pooling_layer=False).eval()
    _randomise(source)
    state = source.state_dict()
    assert "layers.0.attention.q_proj.weight" in state  # transformers v5 module names
    save_file(state, str(tmp_path / "vit_v5.safetensors"))
    model = _convert(tmp_path, source="hf-vit", input=str(tmp_path / "vit_v5.safetensors"), num_heads=4, verify=True)
    assert model.config.layer_norm_eps == 1e-12
    pixels = torch.randn(2, 3, 32, 32)
    _assert_same_features(model, _hf_tokens(source, pixels), pixels)


def test_hf_vit_for_image_classification_prefix_and_dino_eps(tmp_path):
    from transformers import ViTForImageClassification

    source = ViTForImageClassification(_tiny_vit_config(layer_norm_eps=1e-6, num_labels=3, qkv_bias=False)).eval()
    _randomise(source)
    source.save_pretrained(tmp_path / "cls")
    result = convert(ConvertConfig(source="hf-vit", input=str(tmp_path / "cls"), output_dir=str(tmp_path / "o")))
    model = result.model
    assert model.config.layer_norm_eps == 1e-6 and model.config.qkv_bias is False
    assert {"classifier.weight", "classifier.bias"} <= set(result.report["dropped_keys"])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _assert_same_features(model, source.vit(pixels).last_hidden_state, pixels)


def test_hf_config_that_disagrees_with_weights(tmp_path):
    from transformers import ViTModel

    ViTModel(_tiny_vit_config()).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="intermediate_size: 128 vs 64"):
        _convert(tmp_path, source="hf-vit", input=str(tmp_path / "hf"))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints that do not fit
# ----------------------------------------------------------------------------------------------------------
def _timm_file(tmp_path: Path, state: dict) -> str:
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def test_key_mismatch_errors_name_the_keys(tmp_path):
    state = tiny_timm().state_dict()
    extra = dict(state, **{"blocks.0.ls1.gamma": torch.ones(64), "blocks.1.attn.foo": torch.ones(2)})
    with pytest.raises(ValueError, match=r"LayerScale.*blocks\.0\.ls1\.gamma") as err:
        _convert(tmp_path, source="timm", input=_timm_file(tmp_path, extra), num_heads=4)
    assert "blocks.1.attn.foo" in str(err.value)

    missing = {k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing: encoder\.layer\.1\.mlp\.fc2\.bias"):
        _convert(tmp_path, source="timm", input=_timm_file(tmp_path, missing), num_heads=4)

    wrong = dict(state, **{"blocks.1.norm1.weight": torch.ones(65)})
    with pytest.raises(ValueError, match=r"shape mismatch: blocks\.1\.norm1\.weight \(65,\) \(expected \(64,\)\)"):
        _convert(tmp_path, source="timm", input=_timm_file(tmp_path, wrong), num_heads=4)


def test_other_architectures_and_wrong_source_are_rejected(tmp_path):
    resnet = timm.create_model("resnet18", pretrained=False).state_dict()
    with pytest.raises(ValueError, match=r"(?s)another architecture.*conv1\.weight"):
        _convert(tmp_path, source="dino", input=_timm_file(tmp_path, resnet), num_heads=4)
    from transformers import ViTModel

    hf = ViTModel(_tiny_vit_config()).state_dict()
    with pytest.raises(ValueError, match="use --source hf-vit"):
        _convert(tmp_path, source="dino", input=_timm_file(tmp_path, hf), num_heads=4)
    with pytest.raises(ValueError, match="does not exist"):
        _convert(tmp_path, source="dino", input=str(tmp_path / "nope.pth"))


def test_verify_against_rejects_a_different_model(tmp_path):
    source = tiny_timm()
    model = _convert(tmp_path, source="timm", input=_timm_file(tmp_path, source.state_dict()), num_heads=4)
    assert verify_against(model, source.forward_features, 1e-5) <= 1e-5
    with pytest.raises(ValueError, match="differs from the source"):
        verify_against(model, lambda x: source.forward_features(x) + 1e-3, 1e-4)


# ----------------------------------------------------------------------------------------------------------
# Output folder, other transforms, CLI, fresh-process round trip
# ----------------------------------------------------------------------------------------------------------
def _split_positionals(argv):
    """What scripts/convert_checkpoint.py makes of ``[... INPUT OUTPUT_DIR ...]`` (entry_point.run's positionals)."""
    from entmax_vit.cli.config import positionals_to_options

    return positionals_to_options(ConvertConfig, argv, ("input", "output_dir"))


def _run_script(argv):
    """scripts/convert_checkpoint.py on ``argv``, its errors raised (the script prints them)."""
    from entmax_vit.cli.config import parse_config

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import convert_checkpoint
    finally:
        sys.path.pop(0)
    convert_checkpoint.main(convert_checkpoint.checked(parse_config(ConvertConfig, _split_positionals(argv))))


def test_cli_writes_folder_and_swaps_attention(tmp_path):
    source = tiny_timm()
    path = _timm_file(tmp_path, source.state_dict())
    out = tmp_path / "entmax"
    _run_script(["--source", "timm", path, str(out), "--num-heads", "4", "--attention", "entmax15"])
    config = json.loads((out / "config.json").read_text())
    assert config["attention"] == "entmax15" and config["auto_map"]["AutoModel"].endswith("EntmaxViTModel")
    assert {"model.safetensors", "modeling_entmax_vit.py", "attention.py", "configuration_entmax_vit.py",
            "preprocessor_config.json", "conversion_config.yaml", "conversion_report.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["verified_max_abs_diff"] <= TOL  # verified with softmax before swapping the transform
    model = EntmaxViTModel.from_pretrained(out).eval()
    torch.testing.assert_close(model.embeddings.position_embeddings, source.pos_embed)
    with torch.no_grad():
        probs = model(torch.randn(1, 3, 32, 32), output_attentions=True).attentions[-1]  # (B, H, N, N)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    assert (probs == 0).any()  # entmax-1.5 gives exact zeros
    with pytest.raises(ValueError, match="already holds a model"):
        _run_script(["--source", "timm", path, str(out), "--num-heads", "4"])
    with pytest.raises(ValueError, match="attention"):
        _run_script(["--source", "timm", path, str(out), "--attention", "relu"])
    with pytest.raises(ValueError, match="source"):
        _run_script(["--source", "keras", path, str(out)])


def test_converted_folder_round_trip_in_fresh_process(tmp_path):
    source = tiny_timm()
    cfg = ConvertConfig(source="timm", input=_timm_file(tmp_path, source.state_dict()), num_heads=4,
                        output_dir=str(tmp_path / "model"))
    save_converted(convert(cfg), cfg)
    pixels = torch.randn(2, 3, 32, 32)
    torch.save(pixels, tmp_path / "pixels.pt")
    # A user without this project: only transformers + the folder's own code (trust_remote_code).
    code = (
        "import sys, torch\n"
        "from transformers import AutoModel, AutoImageProcessor\n"
        "m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        "p = AutoImageProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "assert p.crop_size == {'height': 32, 'width': 32}, p.crop_size\n"
        "x = torch.load(sys.argv[2], weights_only=True)\n"
        "with torch.no_grad():\n"
        "    torch.save(m(x).last_hidden_state, sys.argv[3])\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "model"), str(tmp_path / "pixels.pt"),
                    str(tmp_path / "tokens.pt")], check=True, cwd=tmp_path, env=env, timeout=300)
    tokens = torch.load(tmp_path / "tokens.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(tokens, source.forward_features(pixels), atol=TOL, rtol=0)


def test_url_and_hub_id_inputs(tmp_path):
    source = tiny_timm()
    path = tmp_path / "dino_deitsmall8_pretrain.pth"
    torch.save(source.state_dict(), path)
    cache = tmp_path / "cache"
    model = _convert(tmp_path, source="dino", input=path.as_uri(), num_heads=4, cache_dir=str(cache))
    assert (cache / path.name).is_file()  # downloaded once into the cache
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _assert_same_features(model, source.forward_features(pixels), pixels)
    # Offline (conftest sets HF_HUB_OFFLINE=1) an uncached Hub id fails with a clear message.
    with pytest.raises(ValueError, match="neither a local path nor a downloadable Hub repository"):
        _convert(tmp_path, source="hf-vit", input="someone/not-cached-vit", cache_dir=str(cache))


def test_heads_from_training_args_and_contradictions(tmp_path):
    path = tmp_path / "checkpoint.pth"
    _write_training_checkpoint(path, tiny_timm(), tiny_timm())
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(path, weights_only=True)
    data["args"].arch = "vit_small"  # DINO's vit_small has 6 heads: cannot split width 64
    torch.save(data, path)
    with pytest.raises(ValueError, match="num_heads 6 does not divide the width 64"):
        _convert(tmp_path, source="dino", input=str(path))
    with pytest.raises(ValueError, match="--num-heads 4 contradicts the dino config"):
        _convert(tmp_path, source="dino", input=str(path), num_heads=4)


def test_cli_argument_splitting():
    assert _split_positionals(["--source", "dino", "in.pth", "out", "--no-verify", "--num-heads", "6"]) == [
        "--source", "dino", "--no-verify", "--num-heads", "6", "--input", "in.pth", "--output_dir", "out"]
    assert _split_positionals(["--overwrite", "in.pth", "out"]) == ["--overwrite", "--input", "in.pth",
                                                                    "--output_dir", "out"]
    with pytest.raises(ValueError, match="at most INPUT and OUTPUT_DIR"):
        _split_positionals(["a", "b", "c"])


def test_sharded_save_pretrained_folder(tmp_path):
    from transformers import ViTModel

    source = ViTModel(_tiny_vit_config(), add_pooling_layer=False).eval()
    _randomise(source)
    source.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = _convert(tmp_path, source="hf-vit", input=str(tmp_path / "sharded"))
    pixels = torch.randn(1, 3, 32, 32)
    _assert_same_features(model, _hf_tokens(source, pixels), pixels)
