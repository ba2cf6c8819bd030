"""Feature extraction reads EntmaxViT and plain transformers ViT checkpoints alike (DINO's layout: final-normed
[CLS] of the last blocks, last block's normed patch tokens), and resolves training output folders."""

import pytest
import torch
from transformers import ViTConfig, ViTModel

from entmax_vit.evaluation.features import block_outputs, load_backbone, resolve_model_path
from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel


def test_entmax_vit_block_outputs_match_forward(tiny_config_kwargs):
    model = EntmaxViTModel(EntmaxViTConfig(attention="entmax15", num_register_tokens=2, **tiny_config_kwargs)).eval()
    x = torch.randn(2, 3, 32, 32)
    cls, patches = block_outputs(model, x, n_last_blocks=2)
    out = model(pixel_values=x)
    assert cls.shape == (2, 2, 32) and patches.shape == (2, 16, 32)  # registers excluded
    torch.testing.assert_close(cls[:, -1], out.pooler_output)
    torch.testing.assert_close(patches, out.last_hidden_state[:, 3:])


def test_transformers_vit_checkpoint(tmp_path):
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    model = load_backbone(str(tmp_path / "vit"))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    x = torch.randn(2, 3, 32, 32)
    cls, patches = block_outputs(model, x, n_last_blocks=2)
    last = model(pixel_values=x).last_hidden_state  # HF ViT: final LayerNorm applied
    torch.testing.assert_close(cls[:, -1], last[:, 0])
    torch.testing.assert_close(patches, last[:, 1:])


def test_training_output_dir_resolves_to_final_model(tmp_path, tiny_config_kwargs):
    EntmaxViTModel(EntmaxViTConfig(**tiny_config_kwargs)).save_pretrained(tmp_path / "run" / "final_model")
    assert resolve_model_path(str(tmp_path / "run")) == str(tmp_path / "run" / "final_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    assert resolve_model_path("facebook/dino-vits16") == "facebook/dino-vits16"  # Hub ids pass through
    (tmp_path / "stopped" / "checkpoints" / "step_0000002").mkdir(parents=True)  # a run stopped before its end
    with pytest.raises(ValueError, match=r"no final_model.*scripts/export_checkpoint.py .*stopped"):
        resolve_model_path(str(tmp_path / "stopped"))


@pytest.mark.parametrize("kwargs", [{}, {"attn_implementation": "eager"}])  # evaluation's / analysis' load
def test_in_process_loaders_name_a_missing_folder_and_truncated_weights(kwargs, tmp_path, tiny_config_kwargs):
    """The entry points' model-path check holds for in-process callers (the main job, the claims) too."""

    def loader(path):
        return load_backbone(path, **kwargs)

    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(FileNotFoundError, match="model folder not found") as info:
        loader(str(missing))
    assert str(missing) in str(info.value) and "Repo id" not in str(info.value)
    folder = tmp_path / "model"
    EntmaxViTModel(EntmaxViTConfig(**tiny_config_kwargs)).save_pretrained(folder)
    assert sum(p.numel() for p in loader(str(folder)).parameters()) > 0  # a good folder still loads
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated") as info:
        loader(str(folder))
    assert str(weights) in str(info.value)


@pytest.mark.parametrize("main", [True, False])
def test_main_rank_only_features_stay_on_the_main_rank(tiny_config_kwargs, main):
    """k-NN's extraction: the main rank keeps every gathered row; another rank keeps none, but counts the same
    unreadable rows (the skip count is everyone's)."""
    from types import SimpleNamespace

    from entmax_vit.evaluation.features import extract_features

    model = EntmaxViTModel(EntmaxViTConfig(attention="entmax15", **tiny_config_kwargs)).eval()
    batches = [{"pixel_values": torch.randn(3, 3, 32, 32), "labels": torch.tensor([0, 1, 2]),
                "index": torch.arange(3) + 3 * i, "valid": torch.tensor([True, i == 0, True])} for i in range(2)]
    accelerator = SimpleNamespace(device=torch.device("cpu"), is_main_process=main, is_local_main_process=main,
                                  num_processes=2, gather_for_metrics=lambda out: out)  # as if already gathered
    feats = extract_features(model, batches, n_last_blocks=1, accelerator=accelerator, main_rank_only=True)
    everyone = extract_features(model, batches, n_last_blocks=1, accelerator=accelerator)
    assert int(feats["num_skipped"][0]) == int(everyone["num_skipped"][0]) == 1
    assert len(everyone["labels"]) == 5 and everyone["index"].tolist() == [0, 1, 2, 3, 5]
    if main:
        assert all(torch.equal(feats[k], everyone[k]) for k in everyone)
    else:
        assert {k: tuple(v.shape) for k, v in feats.items()} == {
            "cls": (0, 1, 32), "patch_mean": (0, 32), "labels": (0,), "index": (0,), "num_skipped": (1,)}
