"""CLI smoke runs on a tiny save_pretrained model and a tiny save_to_disk dataset made here (one row with a
corrupt image, which must be skipped and counted, not crash), plus the results JSON round trip."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image as ImageFeature

from entmax_vit.evaluation.results import load_results
from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel
from entmax_vit.modeling.segmentation_head import LinearSegmentationHead

ROOT = Path(__file__).resolve().parents[1]


def _png(arr: np.ndarray) -> dict:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _split(n: int, seed: int, corrupt: bool) -> Dataset:
    rng = np.random.default_rng(seed)
    images, masks, labels = [], [], []
    for i in range(n):
        label = i % 2
        base = np.array([200, 30, 30] if label else [30, 30, 200], dtype=np.int64)
        img = (base + rng.integers(-20, 20, size=(40, 48, 3))).clip(0, 255).astype(np.uint8)
        mask = np.zeros((40, 48), np.uint8)
        mask[8:32, 8:40] = 1 + label
        mask[0, :] = 255
        images.append(_png(img))
        masks.append(_png(mask))
        labels.append(label)
    if corrupt:
        images[1] = {"bytes": b"\x89PNG\r\n\x1a\n truncated", "path": None}
    feats = Features({"image": ImageFeature(), "mask": ImageFeature(), "label": ClassLabel(names=["blue", "red"])})
    return Dataset.from_dict({"image": images, "mask": masks, "label": labels}, features=feats)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    torch.manual_seed(0)
    config = EntmaxViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, attention="entmax15")
    EntmaxViTModel(config).save_pretrained(root / "model")
    DatasetDict({"train": _split(12, 0, corrupt=True), "validation": _split(6, 1, corrupt=False)}).save_to_disk(root / "data")
    return root


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_knn_cli(assets):
    out = assets / "knn"
    proc = _run("eval_knn.py", "--model", str(assets / "model"), "--dataset", str(assets / "data"), "--resize", "32",
                "--crop", "32", "--batch_size", "4", "--output_dir", str(out), cwd=assets)
    record = load_results(out / "results_knn.json")
    assert record["task"] == "knn" and record["protocol"]["name"] == "dino_knn"
    assert record["model"]["attention"] == "entmax15"
    assert record["dataset"]["num_skipped"] == 1 and record["dataset"]["num_train_samples"] == 11
    assert set(record["metrics"]) == {"top1_k10", "top5_k10", "top1_k11", "top5_k11"}
    assert (out / "eval_knn_config.yaml").is_file() and "unreadable" in proc.stderr
    assert len(list((out / "feature_cache").glob("*.safetensors"))) == 2  # train + validation


def test_feature_cache_in_process(assets, tmp_path):
    """Same spec -> read from disk (no recompute, identical tensors); another transform -> another entry."""
    from entmax_vit.evaluation.features import load_backbone, model_fingerprint, split_features
    from entmax_vit.evaluation.image_data import ClassificationTransform

    model = load_backbone(str(assets / "model"))
    spec = model_fingerprint(str(assets / "model"), None, model)
    kwargs = dict(model_spec=spec, dataset=str(assets / "data"), split="validation", n_last_blocks=2,
                  cache_dir=str(tmp_path), batch_size=4)
    first, info = split_features(model, transform=ClassificationTransform(32, 32), **kwargs)
    assert first["cls"].shape == (6, 2, 32) and first["patch_mean"].shape == (6, 32) and info["num_classes"] == 2
    # the last [CLS] entry is the model's pooled output (DINO's k-NN feature)
    from entmax_vit.data.datasets import open_dataset
    from entmax_vit.evaluation.image_data import ClassificationRows

    rows = ClassificationRows(open_dataset(str(assets / "data"), "validation"), "image", "label", ClassificationTransform(32, 32))
    with torch.no_grad():
        pooled = model(pixel_values=rows[0]["pixel_values"][None]).pooler_output
    torch.testing.assert_close(first["cls"][0, -1], pooled[0], atol=1e-5, rtol=1e-5)
    again, _ = split_features(model, transform=ClassificationTransform(32, 32), **kwargs)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    torch.testing.assert_close(again["cls"], first["cls"])
    split_features(model, transform=ClassificationTransform(40, 32), **kwargs)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


@pytest.mark.parametrize("max_samples", [None, 7])
def test_streaming_features_match_map_style(assets, max_samples):
    """A streamed split (corrupt row included) yields the same rows, labels and features as the map-style one."""
    from entmax_vit.evaluation.features import load_backbone, split_features
    from entmax_vit.evaluation.image_data import ClassificationTransform

    model = load_backbone(str(assets / "model"))
    kwargs = dict(model_spec={}, dataset=str(assets / "data"), split="train", n_last_blocks=1, batch_size=4,
                  transform=ClassificationTransform(32, 32), max_samples=max_samples)
    ref, ref_info = split_features(model, **kwargs)
    got, info = split_features(model, streaming=True, **kwargs)
    assert info["num_skipped"] == ref_info["num_skipped"] == 1
    assert info["num_samples"] == ref_info["num_samples"] and info["num_classes"] == ref_info["num_classes"]
    torch.testing.assert_close(got["cls"], ref["cls"])
    assert got["labels"].tolist() == ref["labels"].tolist()


def test_segmentation_cli(assets):
    out = assets / "seg"
    _run("eval_segmentation.py", "--preset", "voc", "--model", str(assets / "model"), "--dataset", str(assets / "data"),
         "--num_classes", "3", "--class_names", "--input_size", "32", "--mask_size", "20", "--epochs", "2",
         "--batch_size", "4", "--use_cls_token", "--output_dir", str(out), cwd=assets)
    record = load_results(out / "results_segmentation.json")
    assert record["task"] == "segmentation" and record["protocol"]["name"] == "neco_linear"
    assert record["protocol"]["use_cls_token"] is True and record["dataset"]["num_skipped"] == 1
    assert 0 <= record["metrics"]["mIoU"] <= 100 and 0 <= record["metrics"]["pixel_accuracy"] <= 100
    head = LinearSegmentationHead.load(out / "segmentation_head")
    assert head.config.num_labels == 3 and head.config.use_cls_token and head.config.input_size == 32
    assert (out / "per_class_iou.png").is_file()
    assert set(json.loads((out / "per_class_iou.json").read_text())) == {"0", "1", "2"}


def run(config_cls, main, prog, argv):
    """An evaluation entry point (evaluation.entry_point) with another ``main``."""
    from entmax_vit.cli.entry_point import run as entry_run
    from entmax_vit.evaluation.entry_point import PRESET_DIR

    default = "embedded" if prog == "eval_segmentation" else None
    return entry_run(main, config_cls, prog, preset_dir=PRESET_DIR, default_preset=default, argv=argv,
                     model_fields=("model",))


def test_bad_override_is_a_clear_error(capsys):
    from entmax_vit.evaluation.segmentation_probe import SegmentationEvalConfig

    def never(cfg):  # the run must stop before main
        raise AssertionError("main ran")

    with pytest.raises(SystemExit) as info:
        run(SegmentationEvalConfig, never, "eval_segmentation", argv=["--preset", "voc", "--use_cls", "1"])
    message = str(info.value.code)
    assert message.startswith("eval_segmentation:") and "--use_cls," in message and "use_cls_token" in message
    with pytest.raises(SystemExit, match="protocol"):
        run(SegmentationEvalConfig, never, "eval_segmentation", argv=["--protocol", "mask2former"])
    with pytest.raises(SystemExit, match="No preset"):
        run(SegmentationEvalConfig, never, "eval_segmentation", argv=["--preset=pascal"])


def test_model_paths_are_checked_before_main(assets, tmp_path):
    """Issue 14: a missing local folder says so (not "Repo id must be in the form ..."), a truncated
    model.safetensors is named; both before main runs, for every evaluation entry point."""
    import shutil

    from entmax_vit.evaluation.knn import KNNEvalConfig
    from entmax_vit.evaluation.linear_probe import LinearEvalConfig
    from entmax_vit.evaluation.segmentation_probe import SegmentationEvalConfig

    def never(cfg):
        raise AssertionError("main ran")

    model = tmp_path / "model"
    shutil.copytree(assets / "model", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    for cls, prog in [(KNNEvalConfig, "eval_knn"), (LinearEvalConfig, "eval_linear"),
                      (SegmentationEvalConfig, "eval_segmentation")]:
        with pytest.raises(SystemExit) as info:
            run(cls, never, prog, argv=["--model", "/no/such/folder"])
        message = str(info.value.code)
        assert message.startswith(f"{prog}: model folder not found: /no/such/folder") and "Repo id" not in message
        with pytest.raises(SystemExit) as info:
            run(cls, never, prog, argv=["--model", str(model)])
        assert str(weights) in str(info.value.code) and "truncated" in str(info.value.code)
    # an edited config.json (3 heads do not divide hidden size 32) stops main with the message alone
    from entmax_vit.evaluation.knn import main as knn_main

    shutil.rmtree(model)
    shutil.copytree(assets / "model", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_attention_heads": 3}))
    with pytest.raises(SystemExit, match="num_attention_heads"):
        run(KNNEvalConfig, knn_main, "eval_knn", argv=["--model", str(model), "--dataset", str(assets / "data"),
                                                       "--output_dir", str(tmp_path / "out")])


def test_presets_parse():
    from entmax_vit.cli.config import parse_config
    from entmax_vit.evaluation.entry_point import PRESET_DIR
    from entmax_vit.evaluation.segmentation_probe import SegmentationEvalConfig

    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert {"voc", "ade20k", "cityscapes", "voc_dinov2", "ade20k_dinov2", "cityscapes_dinov2", "embedded"} <= set(names)
    voc = parse_config(SegmentationEvalConfig, ["--config", "voc"], preset_dir=PRESET_DIR)
    assert (voc.num_classes, voc.input_size, voc.mask_size, voc.lr, voc.epochs) == (21, 448, 100, 0.01, 25)
    assert len(voc.class_names) == 21
    ade = parse_config(SegmentationEvalConfig, ["--config", "ade20k_dinov2"], preset_dir=PRESET_DIR)
    assert ade.reduce_zero_label and ade.batch_norm and ade.protocol == "dinov2" and ade.max_iters == 40000
    assert len(ade.class_names) == ade.num_classes == 150 and ade.class_names[0] == "wall"
    city = parse_config(SegmentationEvalConfig, ["--config", "cityscapes"], preset_dir=PRESET_DIR)
    assert city.num_classes == len(city.class_names) == 19 and city.label_mapping == "auto"


def test_linear_cli(assets):
    out = assets / "linear"
    _run("eval_linear.py", "--model", str(assets / "model"), "--dataset", str(assets / "data"), "--resize", "32",
         "--crop", "32", "--epochs", "3", "--batch_size", "8", "--n_last_blocks", "1", "2", "--avgpool_patchtokens",
         "False", "True", "--base_lrs", "0.01", "0.1", "--output_dir", str(out), cwd=assets)
    record = load_results(out / "results_linear.json")
    assert record["task"] == "linear" and record["protocol"]["grid_size"] == 8
    assert record["dataset"]["num_skipped"] == 1
    grid = json.loads((out / "grid.json").read_text())
    assert len(grid["heads"]) == 8 and (out / "linear_grid.png").is_file()
    assert record["metrics"]["top1"] == max(h["eval_top1"] for h in grid["heads"])  # selected on the eval split


def test_results_round_trip(tmp_path):
    from entmax_vit.evaluation.results import make_results, write_results

    record = make_results(task="segmentation", model_name_or_path="m", model_config={"attention": "entmax15"},
                          dataset={"name": "embedded", "split": "validation", "num_samples": 3, "num_classes": 9},
                          protocol={"name": "neco_linear", "layers": [-1]}, metrics={"mIoU": 41.5},
                          config={"lr": 0.01})
    path = write_results(record, tmp_path / "r.json")
    assert load_results(path) == json.loads(json.dumps(record))
    (tmp_path / "bad.json").write_text(json.dumps({**record, "schema": "other"}))
    with pytest.raises(ValueError, match="schema"):
        load_results(tmp_path / "bad.json")


def _torchrun(script: str, *args: str, cwd: Path, port: int) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(ROOT / "scripts" / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr


@pytest.mark.slow
def test_two_processes_match_one(assets):
    """Two real CPU processes (gloo): gathered k-NN features and the rank-summed confusion matrix give exactly
    the single-process numbers, with no sample counted twice."""
    common = ["--model", str(assets / "model"), "--dataset", str(assets / "data"), "--cache_dir", ""]
    knn = [*common, "--resize", "32", "--crop", "32", "--batch_size", "4"]
    _run("eval_knn.py", *knn, "--output_dir", str(assets / "knn1"), cwd=assets)
    _torchrun("eval_knn.py", *knn, "--output_dir", str(assets / "knn2"), cwd=assets, port=29651)
    one, two = load_results(assets / "knn1" / "results_knn.json"), load_results(assets / "knn2" / "results_knn.json")
    assert one["metrics"] == two["metrics"] and one["dataset"] == two["dataset"]
    for extra in ([], ["--max_train_samples", "9"]):  # whole stream: shards per rank; truncated: strided rows
        _run("eval_knn.py", *knn, *extra, "--output_dir", str(assets / "knn3"), cwd=assets)
        _torchrun("eval_knn.py", *knn, *extra, "--streaming", "--output_dir", str(assets / "knn4"), cwd=assets,
                  port=29653)
        one, two = load_results(assets / "knn3" / "results_knn.json"), load_results(assets / "knn4" / "results_knn.json")
        assert one["metrics"] == two["metrics"] and one["dataset"] == two["dataset"]

    seg = ["--model", str(assets / "model"), "--dataset", str(assets / "data"), "--input_size", "32", "--mask_size", "20",
           "--batch_size", "4", "--eval_batch_size", "2"]
    _run("eval_segmentation.py", *seg, "--epochs", "2", "--output_dir", str(assets / "segtrain"), cwd=assets)
    head = str(assets / "segtrain" / "segmentation_head")
    _run("eval_segmentation.py", *seg, "--head_path", head, "--output_dir", str(assets / "seg1"), cwd=assets)
    _torchrun("eval_segmentation.py", *seg, "--head_path", head, "--output_dir", str(assets / "seg2"), cwd=assets, port=29652)
    one = load_results(assets / "seg1" / "results_segmentation.json")
    two = load_results(assets / "seg2" / "results_segmentation.json")
    assert one["metrics"] == two["metrics"] and one["dataset"]["num_skipped"] == two["dataset"]["num_skipped"]
