"""Issue 24, item 6: a model card says only what is true of its model. End to end: a tiny run stopped by
debug.max_steps, its checkpoint exported with scripts/export_checkpoint.py, the card assembled by
scripts/push_to_hub.py without --repo-id: the card states the partial training (steps trained of planned), holds no
local path, names a placeholder repository, accepts the results measured on these weights and refuses another
model's with one line; its Limitations say what the default kernel measures."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from entmax_vit.evaluation.results import make_results, weights_fingerprint, write_results
from entmax_vit.hub_release.card import PLACEHOLDER_OWNER, CardInputs, public_config
from entmax_vit.modeling import EntmaxViTModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from card_helpers import render_card  # noqa: E402
from training_helpers import REPO, env, make_image_dataset, run_dino, tiny_args  # noqa: E402

sys.path.pop(0)


def _push_to_hub():
    spec = importlib.util.spec_from_file_location("push_to_hub_script_provenance", REPO / "scripts" / "push_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _record(model_dir: Path, fingerprint: str, path: Path) -> Path:
    model = EntmaxViTModel.from_pretrained(model_dir)
    return write_results(make_results(
        task="knn", model_name_or_path=str(model_dir), model_config=model.config.to_dict(),
        dataset={"name": f"imagefolder:{model_dir.parent}/images", "split": "validation", "num_samples": 8,
                 "num_classes": 2},
        protocol={"name": "dino_knn"}, metrics={"top1_k10": 50.0}, config={"output_dir": str(model_dir.parent)},
        weights_sha256=fingerprint), path)


@pytest.fixture(scope="module")
def partial_export(tmp_path_factory) -> dict:
    """A 2-epoch tiny run (8 images, 4 per step: 4 steps planned) stopped after 2 steps, exported."""
    root = tmp_path_factory.mktemp("partial")
    data = make_image_dataset(root, num_images=8)
    run = root / "run"
    run_dino(tiny_args(data, run, **{"debug.max_steps": 2, "logging.attention_support_images": 0}))
    out = root / "exported"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export_checkpoint.py"), str(run), str(out)],
                          cwd=root, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "run": run, "model_dir": out}


def test_export_records_progress_and_resolution(partial_export):
    progress = json.loads((partial_export["model_dir"] / "training_progress.json").read_text())
    assert progress["steps_trained"] == 2 and progress["steps_planned"] == 4 and progress["epochs_planned"] == 2
    # the processor crops to the run's crops.global_size (32 px here), as the model was trained (item 1)
    processor = json.loads((partial_export["model_dir"] / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 32, "width": 32} and processor["size"] == {"shortest_edge": 37}


def test_card_of_a_partial_run(partial_export, tmp_path, capsys):
    model_dir, root = partial_export["model_dir"], partial_export["root"]
    fingerprint = weights_fingerprint(EntmaxViTModel.from_pretrained(model_dir))
    results = _record(model_dir, fingerprint, tmp_path / "knn.json")
    out = tmp_path / "hub_repo"
    code = _push_to_hub().cli([str(model_dir), "--output-dir", str(out), "--results", str(results),
                               "--no-verify", "--no-measure-sparsity"])
    assert code == 0, capsys.readouterr().err
    card = (out / "README.md").read_text()
    assert "**Partially trained:** exported from a checkpoint after **2 of 4 planned optimizer steps** (50%" in card
    assert "Partially trained (see Training)" in card  # Limitations
    # no local path anywhere in the card or the shipped configs and results
    for text in [card, (out / "training_config.yaml").read_text(), *[p.read_text() for p in (out / "results").glob("*")]]:
        assert str(root) not in text and str(tmp_path) not in text and "output_dir" not in text
    assert f'AutoModel.from_pretrained("{PLACEHOLDER_OWNER}/hub_repo", trust_remote_code=True)' in card
    assert f"Replace `{PLACEHOLDER_OWNER}/hub_repo` with the repository id" in card
    assert "imagefolder:<local>/images" in card
    assert yaml.safe_load((out / "training_config.yaml").read_text())["debug"]["max_steps"] == 2


def test_results_of_another_model_are_refused(partial_export, tmp_path, capsys):
    model_dir = partial_export["model_dir"]
    other = tmp_path / "other_model"
    model = EntmaxViTModel.from_pretrained(model_dir)
    with torch.no_grad():
        model.layernorm.weight.add_(1.0)
    model.save_pretrained(other)
    results = _record(model_dir, weights_fingerprint(model), tmp_path / "other_knn.json")
    code = _push_to_hub().cli([str(model_dir), "--output-dir", str(tmp_path / "repo"), "--results", str(results),
                               "--no-verify", "--no-measure-sparsity"])
    err = [line for line in capsys.readouterr().err.splitlines() if "%|" not in line and line.strip()]  # no bars
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("push_to_hub: ") and "other_knn.json: measured on other weights" in err[0]
    assert not (tmp_path / "repo").exists()
    # a record without a fingerprint cannot be tied to these weights: refused too
    unsigned = json.loads(results.read_text())
    del unsigned["model"]["weights_sha256"]
    results.write_text(json.dumps(unsigned))
    code = _push_to_hub().cli([str(model_dir), "--output-dir", str(tmp_path / "repo"), "--results", str(results),
                               "--no-verify", "--no-measure-sparsity"])
    assert code == 2 and "other_knn.json: no weights fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_limitations_follow_the_measured_kernel():
    card = render_card(CardInputs(repo_id="o/n", model_config={"attention": "entmax15", "patch_size": 16},
                                  num_parameters=10))
    limitations = card.split("## Limitations", 1)[1].split("##", 1)[0]
    assert "more memory-hungry" not in limitations
    assert "peak memory matches softmax with SDPA (measured 1.00x" in limitations
    assert "Partially trained" not in limitations  # no progress recorded: a final model


def test_public_config_drops_local_paths():
    config = {"output_dir": "/home/u/runs/x", "data": {"source": "imagefolder:/data/imgs", "other": "ILSVRC/imagenet-1k",
                                                       "cache_dir": "~/cache", "split": "train"}, "ks": [1, 2]}
    assert public_config(config) == {"data": {"source": "imagefolder:<local>/imgs", "other": "ILSVRC/imagenet-1k",
                                              "cache_dir": "<local>/cache", "split": "train"}, "ks": [1, 2]}
