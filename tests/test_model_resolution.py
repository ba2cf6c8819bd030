"""Issue 24, item 1: a model's resolution travels with it. A 64-px model (the tiny_cpu demo's size) is exported with
a processor that crops to 64 px, the evaluations and the analysis default to 64 px and warn when asked for another
size, and the card's sparsity is measured at 64 px."""

import json
import logging

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image as ImageFeature

from entmax_vit.evaluation.resolution import eval_resolution, own_resolution
from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel, make_image_processor


def _model_64() -> EntmaxViTModel:
    torch.manual_seed(0)
    return EntmaxViTModel(EntmaxViTConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=64, attention="entmax15")).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 64-px model exported as training does (training/export.py), in a run folder's final_model/."""
    from entmax_vit.training.export import export_backbone

    run = tmp_path_factory.mktemp("run64")
    export_backbone(_model_64(), run / "final_model", config_yaml="crops: {global_size: 64}\n")
    return run


@pytest.fixture(scope="module")
def labelled_data(tmp_path_factory):
    rng = np.random.default_rng(0)

    def split(n: int) -> Dataset:
        images = [rng.integers(0, 255, size=(80, 96, 3), dtype=np.uint8) for _ in range(n)]
        return Dataset.from_dict({"image": [dict(bytes=_png(a), path=None) for a in images], "label": [i % 2 for i in range(n)]},
                                 features=Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b"])}))

    path = tmp_path_factory.mktemp("data") / "saved"
    DatasetDict({"train": split(6), "validation": split(4)}).save_to_disk(str(path))
    return path


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_exported_processor_crops_to_the_training_resolution(exported):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(exported / "final_model", trust_remote_code=True)
    assert processor.crop_size == {"height": 64, "width": 64}
    assert processor.size == {"shortest_edge": 73}  # DINO's 256/224 ratio at 64 px
    from PIL import Image

    assert processor(Image.new("RGB", (300, 200)), return_tensors="pt")["pixel_values"].shape[-2:] == (64, 64)
    assert make_image_processor().crop_size == {"height": 224, "width": 224}  # the default stays DINO's 224


def test_own_resolution_of_entmax_vit_and_other_models(exported, tmp_path):
    assert own_resolution(str(exported / "final_model")) == (73, 64)
    assert own_resolution(str(exported)) == (73, 64)  # a run folder: its final_model
    # a foreign model (HF ViT) is fed what its own processor says
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    vit = tmp_path / "vit"
    ViTModel(ViTConfig(image_size=48, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(vit)
    ViTImageProcessor(size={"height": 40, "width": 40}, do_center_crop=False).save_pretrained(vit)
    assert own_resolution(str(vit)) == (55, 48)  # no crop in the processor: the config's image_size
    ViTImageProcessor(size={"shortest_edge": 60}, crop_size={"height": 48, "width": 48},
                      do_center_crop=True).save_pretrained(vit)
    assert own_resolution(str(vit)) == (60, 48)


def test_asking_for_another_resolution_warns(exported, caplog):
    model = str(exported / "final_model")
    with caplog.at_level(logging.WARNING, logger="entmax_vit.evaluation.resolution"):
        assert eval_resolution(None, None, model) == (73, 64)
        assert not caplog.records
        assert eval_resolution(None, 224, model) == (256, 224)
    assert "trained at 64 px" in caplog.text and "224" in caplog.text


def test_eval_knn_defaults_to_the_model_resolution(exported, labelled_data, tmp_path, caplog):
    """End to end through the entry point: no --crop evaluates at 64 px (the results and the written config say
    so); --crop 32 is honoured with a warning."""
    import yaml

    from entmax_vit.cli.entry_point import eval_knn

    out = tmp_path / "knn"
    eval_knn(["--model", str(exported), "--dataset", str(labelled_data), "--ks", "3", "--output_dir", str(out),
              "--cache_dir", ""])
    record = json.loads((out / "results_knn.json").read_text())  # the command returns None (a console script)
    assert record["protocol"]["transform"].startswith("resize73_crop64")
    assert yaml.safe_load((out / "eval_knn_config.yaml").read_text())["crop"] == 64
    assert len(record["model"]["weights_sha256"]) == 64
    with caplog.at_level(logging.WARNING):
        eval_knn(["--model", str(exported), "--dataset", str(labelled_data), "--ks", "3", "--crop", "32",
                  "--output_dir", str(out), "--cache_dir", ""])
    record = json.loads((out / "results_knn.json").read_text())
    assert record["protocol"]["transform"].startswith("resize37_crop32")
    assert "trained at 64 px" in caplog.text


def test_card_processor_and_sparsity_use_the_model_resolution(exported, tmp_path):
    """A folder whose processor still crops to 224 px (an older export) ships one at the model's 64 px, and the
    card's sparsity is measured at 64 px (16 patches + [CLS] = 17 tokens)."""
    from entmax_vit.hub_release.assemble import assemble_repository

    model_dir = tmp_path / "old_export"
    _model_64().save_pretrained(model_dir)
    make_image_processor().save_pretrained(model_dir)  # 256/224, as exports before issue 24 wrote
    repo = assemble_repository(model_dir, tmp_path / "repo", verify=False, measure=True)
    saved = json.loads((tmp_path / "repo" / "preprocessor_config.json").read_text())
    assert saved["crop_size"] == {"height": 64, "width": 64}
    assert repo.sparsity.resolution == 64 and repo.sparsity.num_tokens == 17
    assert "center-cropped to 64 px (17 tokens" in (tmp_path / "repo" / "README.md").read_text()


def test_analysis_defaults_to_the_model_resolution(tmp_path, caplog):
    """``analyze --preset quick`` without --image_size: --model's own 32 px (the preset names no size); a compared
    model trained at 48 px is analysed at the same 32 px, with a warning."""
    import yaml
    from PIL import Image

    from entmax_vit.analysis.run import PRESET_DIR, AnalyzeConfig, main
    from entmax_vit.cli.config import parse_config

    def parse_analyze_config(argv):
        return parse_config(AnalyzeConfig, argv, preset_dir=PRESET_DIR)

    for side in (32, 48):
        torch.manual_seed(0)
        EntmaxViTModel(EntmaxViTConfig(image_size=side, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=64)).save_pretrained(tmp_path / f"m{side}")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    cfg = parse_analyze_config(["--config", "quick", "--model", str(tmp_path / "m32"), "--compare", str(tmp_path / "m48"),
                                "--dataset", str(images), "--num_images", "2", "--num_figure_images", "0",
                                "--no_separate_curves", "--output_dir", str(tmp_path / "out")])
    assert cfg.image_size is None
    with caplog.at_level(logging.WARNING):
        main(cfg)
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["image_size"] == 32
    record = json.loads((tmp_path / "out" / "m32" / "analysis_results.json").read_text())
    assert record["protocol"]["image_size"] == [32, 32]
    assert "m48: evaluating at image_size 32 px, but the model was trained at 48 px" in caplog.text
