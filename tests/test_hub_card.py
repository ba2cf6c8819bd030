"""Model-card renderer and measured sparsity: metadata parses and carries exactly what the inputs record,
``ModelCard.load`` of a generated card gives back every result as an ``EvalResult``, converted weights get
base_model, sparsity is counted from real attention (0 for softmax, > 0 for sparsemax)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from huggingface_hub import EvalResult, ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index

from entmax_vit.evaluation.results import make_results
from entmax_vit.hub_release.assemble import find_base_model, find_datasets
from entmax_vit.hub_release.card import CardInputs, card_data, eval_results, metric_type
from entmax_vit.hub_release.sparsity import SparsityReport, measure_sparsity, sample_images
from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel, make_image_processor
from entmax_vit.recipe import BIBTEX

from card_helpers import parse_card_metadata, render_card  # tests/ is on sys.path under pytest

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64)


def _record(task, dataset, metrics, split="validation", protocol="p", **dataset_fields):
    return make_results(task=task, model_name_or_path="m", model_config={"attention": "entmax15"},
                        dataset={"name": dataset, "split": split, "num_samples": 10, **dataset_fields},
                        protocol={"name": protocol}, metrics=metrics, config={})


def model_index(name: str, results: list[dict]) -> list[dict]:
    """The ``model-index`` block as huggingface_hub serialises the card's results (``[]`` without a metric)."""
    evals = eval_results(results)
    return eval_results_to_model_index(name, evals) if evals else []


def test_metric_types():
    assert metric_type("miou") == "mean_iou"
    assert metric_type("mIoU_100") == "mean_iou"
    assert metric_type("top1_k20") == "accuracy"
    assert metric_type("accuracy") == "accuracy"
    assert metric_type("pixel_accuracy") == "accuracy"
    assert metric_type("loss") == "loss"


def test_model_index_lists_every_metric_once():
    results = [_record("linear", "ILSVRC/imagenet-1k", {"top1": 74.1, "top5": 91.9}),
               _record("segmentation", "voc2012", {"miou": 48.78})]
    index = model_index("my-model", results)
    assert index[0]["name"] == "my-model"
    entries = index[0]["results"]
    assert [e["task"]["type"] for e in entries] == ["image-classification", "image-segmentation"]
    assert [m["value"] for m in entries[0]["metrics"]] == [74.1, 91.9]
    # huggingface_hub's serialisation; the protocol is also the metric's config.
    assert entries[1]["metrics"][0] == {"type": "mean_iou", "name": "miou (p)", "value": 48.78, "config": "p"}
    assert entries[1]["dataset"] == {"name": "voc2012", "type": "voc2012", "split": "validation"}
    assert model_index("x", []) == []


# Written independently of card.py: what each results task is on the Hub.
HUB_TASK = {"knn": ("image-classification", "k-NN"), "linear": ("image-classification", "Linear probe"),
            "segmentation": ("image-segmentation", "segmentation"),
            "analysis": ("image-feature-extraction", "analysis")}


def test_model_card_load_gives_back_every_result(tmp_path):
    results = [
        _record("knn", "ILSVRC/imagenet-1k", {"top1_k20": 70.125, "top5_k20": 88.0}, protocol="dino_knn"),
        _record("linear", "ILSVRC/imagenet-1k", {"top1": 74.1}, protocol="dino_linear"),  # same split as k-NN
        _record("segmentation", "scene_parse_150", {"miou": 21.97, "pixel_accuracy": 70.5}, split="validation",
                protocol="neco_ade20k_linear", config="scene_parsing", revision="abc123"),
        _record("analysis", "embedded", {"cls_patch_cosine": 0.31234567}, split="", protocol="diffusion"),
    ]
    path = tmp_path / "README.md"
    config = EntmaxViTConfig(**TINY).to_dict()
    path.write_text(render_card(CardInputs(repo_id="someone/entmax-vits16", model_config=config, num_parameters=10,
                                           results=results)))
    loaded = ModelCard.load(path)

    assert loaded.data.model_name == "entmax-vits16"
    assert loaded.data.eval_results == card_data(CardInputs(
        repo_id="someone/entmax-vits16", model_config={}, num_parameters=10, results=results)).eval_results
    assert all(isinstance(r, EvalResult) for r in loaded.data.eval_results)

    # Every metric of every record, with its task, dataset, split, config, revision, metric type/name/value.
    expected = sorted(
        (HUB_TASK[r["task"]][0], r["dataset"]["name"], r["dataset"]["split"] or None, r["dataset"].get("config"),
         r["dataset"].get("revision"), metric_type(key), f"{key} ({r['protocol']['name']})", round(value, 4),
         r["protocol"]["name"])
        for r in results for key, value in r["metrics"].items()
    )
    got = sorted(
        (e.task_type, e.dataset_type, e.dataset_split, e.dataset_config, e.dataset_revision, e.metric_type,
         e.metric_name, e.metric_value, e.metric_config)
        for e in loaded.data.eval_results
    )
    assert got == expected
    assert all(e.dataset_name == e.dataset_type for e in loaded.data.eval_results)
    # Task names: each result's name names its own task (k-NN and linear share one model-index entry).
    by_metric = {e.metric_name: e.task_name for e in loaded.data.eval_results}
    for r in results:
        for key in r["metrics"]:
            assert HUB_TASK[r["task"]][1] in by_metric[f"{key} ({r['protocol']['name']})"]
    index = parse_card_metadata(path.read_text())["model-index"]
    assert [len(e["metrics"]) for e in index[0]["results"]] == [3, 2, 1]
    assert index[0]["results"][1]["dataset"]["config"] == "scene_parsing"

    # The prose sections are ours and survive the library's rendering.
    text = loaded.text
    assert "| segmentation | scene_parse_150 | validation | neco_ade20k_linear | 10 | miou | 21.97 |" in text
    assert "## Citation" in text and BIBTEX in text and "{{" not in text and "{#" not in text


def test_card_citation_is_the_readme_citation():
    """One citation: the card's BibTeX is, character for character, the one in the README's Citation section."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    citation = readme.split("## Citation", 1)[1]
    assert f"```bibtex\n{BIBTEX}\n```" in citation
    assert "arXiv:2605.23868" in BIBTEX and "primaryClass  = {cs.CV}" in BIBTEX and "year          = {2026}" in BIBTEX


def test_card_for_converted_weights_has_base_model_and_parses(tmp_path):
    model_dir = tmp_path / "converted"
    model_dir.mkdir()
    (model_dir / "conversion_config.yaml").write_text(yaml.safe_dump({"source": "hf-vit", "input": "facebook/dino-vits16"}))
    assert find_base_model(model_dir, {}) == "facebook/dino-vits16"
    assert find_base_model(model_dir, {"converted_from": str(model_dir)}) == "facebook/dino-vits16"
    assert find_base_model(tmp_path, {"converted_from": str(model_dir)}) is None  # a local path is not a Hub id

    config = EntmaxViTConfig(**TINY, attention="sparsemax").to_dict()
    sparsity = SparsityReport(attention="sparsemax", images=["astronaut"], resolution=32, num_tokens=17,
                              zero_fraction_per_layer=[0.5, 0.25], support_per_layer=[8.5, 12.75])
    results = [_record("knn", "ILSVRC/imagenet-1k", {"top1_k20": 70.0})]
    card = render_card(CardInputs(
        repo_id="someone/entmax-vits16", model_config=config, num_parameters=21_700_000, sparsity=sparsity,
        results=results, base_model="facebook/dino-vits16", conversion={"source": "hf-vit", "input": "facebook/dino-vits16"},
        datasets=find_datasets(None, results), files=["config.json", "README.md"],
    ))
    meta = parse_card_metadata(card)
    assert meta["base_model"] == "facebook/dino-vits16"
    assert meta["datasets"] == ["ILSVRC/imagenet-1k"]
    assert "sparsemax" in meta["tags"] and "image-segmentation" not in meta["tags"]
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 70.0
    assert "**37.5%** of attention weights are exactly zero" in card      # mean of the per-layer values
    assert "| 2 | 25.0 | 12.8 |" in card
    assert "21.70 M" in card
    assert "converted from `facebook/dino-vits16` (hf-vit format)" in card
    assert BIBTEX in card and "author        = {Su, Linxiang}" in BIBTEX  # the paper's author, none invented
    assert "image-segmentation\"" not in card                             # no segmentation usage without a head


def test_training_recipe_and_datasets_come_from_the_training_config():
    training = {"data": {"dataset": "ILSVRC/imagenet-1k", "num_workers": 8}, "optim": {"epochs": 200, "lr": 0.0005}}
    assert find_datasets(training, []) == ["ILSVRC/imagenet-1k"]
    assert find_datasets({"data": {"dataset": "embedded"}}, []) == []
    card = render_card(CardInputs(repo_id="a/b", model_config=EntmaxViTConfig(**TINY).to_dict(), num_parameters=10,
                                  training_config=training))
    assert "| `optim.epochs` | `200` |" in card
    assert "```yaml\n" + yaml.safe_dump(training, sort_keys=False).strip() in card
    assert "Sparsity was not measured" in card and "No evaluation results" in card


def test_bad_front_matter_is_rejected():
    with pytest.raises(ValueError, match="front matter"):
        parse_card_metadata("# no metadata")
    with pytest.raises(ValueError, match="front matter"):
        parse_card_metadata("---\nlicense: mit\n# never closed")
    with pytest.raises(ValueError, match="dict"):
        parse_card_metadata("---\n- a list\n---\n# card")


def test_a_template_variable_without_a_value_is_refused(monkeypatch, tmp_path):
    from entmax_vit.hub_release import card

    template = tmp_path / "card.md"
    template.write_text(card.TEMPLATE_PATH.read_text() + "\n{{ not_provided }}\n")
    monkeypatch.setattr(card, "TEMPLATE_PATH", template)
    with pytest.raises(ValueError, match="not_provided"):
        render_card(CardInputs(repo_id="a/b", model_config=EntmaxViTConfig(**TINY).to_dict(), num_parameters=10))


@torch.no_grad()
def test_measured_sparsity_is_zero_for_softmax_and_positive_for_sparsemax():
    images = sample_images(("astronaut", "coffee"))
    processor = make_image_processor(resize=36, crop=32)
    torch.manual_seed(0)
    soft = EntmaxViTModel(EntmaxViTConfig(**TINY, attention="softmax"))
    report = measure_sparsity(soft, processor, images)
    assert report.zero_fraction_per_layer == [0.0, 0.0] and report.mean_support == 17.0
    sparse = EntmaxViTModel(EntmaxViTConfig(**TINY, attention="sparsemax"))
    sparse.load_state_dict(soft.state_dict())
    for layer in sparse.encoder.layer:  # sharper scores, as after training: sparsemax then drops keys
        layer.attention.qkv.weight.mul_(8.0)
    report = measure_sparsity(sparse, processor, images)
    assert report.images == ["astronaut", "coffee"] and report.num_tokens == 17 and report.resolution == 32
    assert all(0.0 < z < 1.0 for z in report.zero_fraction_per_layer)
    for z, k in zip(report.zero_fraction_per_layer, report.support_per_layer):
        assert k == pytest.approx(17 * (1 - z), rel=1e-5) and k >= 1.0  # every row keeps at least one key
    assert json.loads(json.dumps(report.to_dict()))["mean_zero_fraction"] == pytest.approx(report.mean_zero_fraction)
