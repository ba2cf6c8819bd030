"""The main job (entmax_vit.jobs.main_job, scripts/main_job.py) and the mini reproduction
(entmax_vit.jobs.reproduce_mini / degradation / seed_stats, scripts/reproduce_mini.py).

Fast tests check the stage bookkeeping (skip when finished with the same inputs, rerun and clean when the
settings or the files read changed), the typed configs handed to each entry point, the seed statistics and the
generated reports. The slow tests run the shortened main job and the tiny reproductions (multi-seed and
along training) end to end on a small embedded dataset.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from entmax_vit.jobs import degradation, main_job, reproduce_mini, run_results, seed_stats

REPO = Path(__file__).resolve().parents[1]


def _writer(path: Path, text: str):
    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return write


def test_run_stage_skips_reruns_and_cleans(tmp_path):
    out_file = tmp_path / "stage_out" / "result.txt"
    first = main_job.run_stage(tmp_path, "demo", _writer(out_file, "one"), [out_file], settings="one",
                               clean=[out_file.parent])
    assert not first["skipped"] and out_file.read_text() == "one"
    record = json.loads((tmp_path / "stages" / "demo.json").read_text())
    assert record["key"]["settings"] == "one"

    again = main_job.run_stage(tmp_path, "demo", _writer(out_file, "one"), [out_file], settings="one")
    assert again["skipped"]

    stale = out_file.parent / "stale.txt"
    stale.write_text("from the old settings")
    changed = main_job.run_stage(tmp_path, "demo", _writer(out_file, "two"), [out_file], settings="two",
                                 clean=[out_file.parent])
    assert not changed["skipped"] and out_file.read_text() == "two" and not stale.exists()

    out_file.unlink()  # outputs gone: rerun even though the record matches
    redo = main_job.run_stage(tmp_path, "demo", _writer(out_file, "two"), [out_file], settings="two")
    assert not redo["skipped"] and out_file.exists()

    forced = main_job.run_stage(tmp_path, "demo", _writer(out_file, "two"), [out_file], settings="two", force=True)
    assert not forced["skipped"]


def test_interrupted_stage_keeps_its_folder(tmp_path):
    """No record yet (an interrupted run): the folder stays, so training can resume from its checkpoints."""
    checkpoint = tmp_path / "train" / "checkpoints" / "step_0000010"
    checkpoint.mkdir(parents=True)
    out_file = tmp_path / "train" / "final.txt"
    main_job.run_stage(tmp_path, "train", _writer(out_file, "done"), [out_file], settings="a", clean=[tmp_path / "train"])
    assert checkpoint.exists()


def test_stage_reruns_when_its_input_changes(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"old weights")
    out_file = tmp_path / "eval" / "result.txt"
    run = lambda: main_job.run_stage(tmp_path, "eval", _writer(out_file, "evaluated"), [out_file], inputs=[weights])
    assert not run()["skipped"]
    assert run()["skipped"]
    weights.write_bytes(b"retrained weights")  # same settings, new model: the old results are stale
    os.utime(weights, ns=(1, 1))
    assert not run()["skipped"]
    weights.write_bytes(b"retrained weights")  # rewritten with the same bytes (a deterministic rerun): still valid
    assert run()["skipped"]


def test_stage_failures_are_reported(tmp_path):
    with pytest.raises(SystemExit, match="stage broken failed"):
        main_job.run_process("broken", [sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(SystemExit, match="did not write"):
        main_job.run_stage(tmp_path, "silent", lambda: None, [tmp_path / "never.txt"])

    def crash() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        main_job.run_stage(tmp_path, "broken", crash, [])
    assert not (tmp_path / "stages" / "broken.json").exists()
    assert not (tmp_path / "stages" / "silent.json").exists()


def test_stage_configs_carry_settings(tmp_path, monkeypatch):
    cfg = main_job.MainJobConfig(attention="softmax", seed=7, quick=True, dataset="embedded:num_train=64",
                                 train_overrides={"optim": {"epochs": 3}, "data.batch_size_per_device": 8})
    train = main_job.training_config(cfg, tmp_path / "train")
    assert train.model.preset == "vit_tiny_patch8" and train.model.backbone_overrides["hidden_size"] == 96  # tiny_cpu
    assert train.model.attention == "softmax" and train.seed == 7
    assert train.data.source == "embedded:num_train=64" and train.data.max_samples == 64  # --quick
    assert train.optim.epochs == 3  # the user's override wins over --quick's
    assert train.data.batch_size_per_device == 8
    assert train.output_dir == str(tmp_path / "train")

    launched = []
    monkeypatch.setattr(main_job, "run_process", lambda name, command: launched.append(command))
    main_job.train(cfg, tmp_path / "train")
    command = launched[0]
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and command[-3].endswith("dino.py")
    assert command[command.index("--num_processes") + 1] == "1"
    assert yaml.safe_load(Path(command[-1]).read_text())["optim"]["epochs"] == 3  # the resolved config is launched

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"image_size": 64}))
    cfg.segmentation_features = ["patch", "patch+cls"]
    jobs = main_job.evaluation_jobs(cfg, model, tmp_path, main_job.STAGES)
    jobs = {folder.name: stage_cfg for folder, _, stage_cfg, _ in jobs}
    seg = jobs["segmentation_patch"]
    assert seg.use_cls_token is False and seg.input_size == 64 and seg.epochs == 1  # embedded preset + --quick
    assert jobs["segmentation_patch_cls"].use_cls_token is True
    assert seg.output_dir == str(tmp_path / "segmentation_patch")
    with pytest.raises(ValueError, match="patch"):
        main_job.MainJobConfig(segmentation_features=["cls"])
    cfg.segmentation_features = ["cls"]  # changed after the config's own check
    with pytest.raises(ValueError, match="patch"):
        main_job.evaluation_jobs(cfg, model, tmp_path, ["segmentation"])
    knn = jobs["knn"]
    assert knn.resize == knn.crop == 64 and knn.max_eval_samples == 128
    assert jobs["analysis"].num_images == 16


def test_random_init_baseline_beside_the_trained_model(tmp_path, tiny_config_kwargs):
    """The random stage: a seeded random-init model of the trained model's config (and processor), evaluated by
    the same k-NN stage with the same settings; the summary reports it and the gain over it; a rerun skips it."""
    import torch

    from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel

    out = tmp_path / "job"
    trained = out / "train" / "final_model"
    torch.manual_seed(123)
    EntmaxViTModel(EntmaxViTConfig(attention="entmax15", **tiny_config_kwargs)).save_pretrained(trained)
    (trained / "preprocessor_config.json").write_text(json.dumps({"crop_size": {"height": 32, "width": 32}}))
    cfg = main_job.MainJobConfig(output_dir=str(out), dataset="embedded:num_train=48,num_validation=24", seed=5,
                                 stages=["knn", "random"], quick=True)
    summary = main_job.main(cfg)
    random_dir = out / main_job.RANDOM_DIR
    baseline = EntmaxViTModel.from_pretrained(random_dir / "model")
    torch.manual_seed(5)
    expected = EntmaxViTModel(EntmaxViTConfig.from_pretrained(trained))
    assert all(torch.equal(a, b) for a, b in zip(baseline.state_dict().values(), expected.state_dict().values()))
    assert (random_dir / "model" / "preprocessor_config.json").read_text() == (
        trained / "preprocessor_config.json").read_text()
    assert (random_dir / "knn" / "results_knn.json").is_file() and (out / "knn" / "results_knn.json").is_file()
    ours = yaml.safe_load((out / "knn" / "eval_knn_config.yaml").read_text())
    theirs = yaml.safe_load((random_dir / "knn" / "eval_knn_config.yaml").read_text())
    assert {k: v for k, v in ours.items() if k not in ("model", "output_dir")} == {
        k: v for k, v in theirs.items() if k not in ("model", "output_dir")}  # the same evaluation
    metrics = summary["metrics"]
    assert metrics["random_init_knn_top1"] == run_results.summary_metrics(random_dir, "entmax15", [])["knn_top1"]
    assert math.isclose(metrics["knn_top1_gain_over_random"], metrics["knn_top1"] - metrics["random_init_knn_top1"])
    assert "random_random_model" not in summary["stages"] and not summary["stages"]["random_model"]["skipped"]
    again = main_job.main(cfg)
    assert again["stages"]["random_model"]["skipped"] and again["stages"]["random_knn"]["skipped"]
    assert again["metrics"] == metrics


def test_hub_stage_assembles_and_verifies_without_uploading(tmp_path, monkeypatch):
    import entmax_vit.hub_release.assemble as assemble
    import entmax_vit.hub_release.upload as upload
    from entmax_vit.hub_release.verify import VerificationReport

    calls = []

    class Assembled:
        verification = VerificationReport(model_class="transformers_modules.x.EntmaxViTModel", segmenter_class=None,
                                          max_abs_diff={"pooler_output": 2e-7, "last_hidden_state": 3e-7})

    monkeypatch.setattr(assemble, "assemble_repository", lambda *a, **k: calls.append((a, k)) or Assembled())
    monkeypatch.setattr(upload, "upload_repository", lambda *a, **k: pytest.fail("the main job never uploads"))
    cfg = main_job.MainJobConfig()
    result = main_job.hub(cfg, tmp_path / "m", tmp_path / "h", [tmp_path / "a.json", tmp_path / "b.json"], None)
    (_, kwargs), = calls
    assert kwargs["verify"] is True and len(kwargs["results"]) == 2 and kwargs["repo_id"] == cfg.hub_repo_id
    assert result["reload_max_abs_diff"] == 3e-7


def test_claims_stage_measures_the_model_folder(tmp_path, monkeypatch):
    claims = pytest.importorskip("entmax_vit.analysis.claims")  # H15a's module (issue 15)
    seen = []
    numbers = {"fg_shallow_minus_deep": 3.0, "miou_deep_minus_shallow": 4.0, "cls_gain_miou": 2.5,
               "claim_cls_complementary": 1.0, "block_0/seg_miou": 10.0}
    monkeypatch.setattr(claims, "measure", lambda model, cfg: seen.append((model, cfg)) or numbers)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    cfg = main_job.MainJobConfig(seed=3, quick=True, dataset="embedded:num_train=64", analysis_images=8)
    records = main_job.evaluate(cfg, model, tmp_path / "eval", ["claims"])
    assert not records["claims"]["skipped"] and seen[0][0] == str(model)
    assert (seen[0][1].seed, seen[0][1].dataset, seen[0][1].foreground_images) == (3, "embedded:num_train=64", 8)
    metrics = run_results.summary_metrics(tmp_path / "eval", "entmax15", [])
    assert metrics["cls_gain_miou"] == 2.5 and "block_0/seg_miou" not in metrics
    assert main_job.evaluate(cfg, model, tmp_path / "eval", ["claims"])["claims"]["skipped"]


def test_main_rejects_unknown_stage(tmp_path):
    with pytest.raises(ValueError, match="unknown stages"):
        main_job.main(main_job.MainJobConfig(output_dir=str(tmp_path), stages=["train", "deploy"]))


def test_config_parsing_of_flags(tmp_path):
    from entmax_vit.cli.config import parse_config

    cfg = parse_config(main_job.MainJobConfig, ["--quick", "--stages", "train", "knn",
                                                "--segmentation_features", "patch", "patch+cls"])
    assert cfg.quick and cfg.stages == ["train", "knn"] and cfg.segmentation_features == ["patch", "patch+cls"]
    rcfg = parse_config(reproduce_mini.ReproduceMiniConfig, ["--attentions", "softmax", "entmax15", "sparsemax", "--tiny"])
    job = reproduce_mini.main_job_config(rcfg, "sparsemax", 1, tmp_path, ["train"])
    assert job.quick and job.attention == "sparsemax" and job.seed == 1
    assert job.segmentation_features == ["patch", "patch+cls"]
    assert rcfg.run_seeds == [0, 1, 2]
    assert parse_config(reproduce_mini.ReproduceMiniConfig, ["--long"]).run_seeds == [0, 1]
    assert parse_config(reproduce_mini.ReproduceMiniConfig, ["--seeds", "3", "4"]).run_seeds == [3, 4]


def test_reproduce_needs_two_transforms(tmp_path):
    with pytest.raises(ValueError, match="at least two"):
        reproduce_mini.main(reproduce_mini.ReproduceMiniConfig(output_dir=str(tmp_path), attentions=["entmax15"]))


def test_degradation_builds_on_reproduce_mini_not_the_reverse(tmp_path):
    """No import cycle: jobs/reproduce_mini.py imports nothing from jobs/degradation.py (anywhere in the file);
    --long goes to degradation.main through the script, and reproduce_mini.main refuses it in one line."""
    import ast

    tree = ast.parse((REPO / "jobs" / "reproduce_mini.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m and m.split(".")[-1] == "degradation"}
    with pytest.raises(ValueError, match="dense-degradation"):
        reproduce_mini.main(reproduce_mini.ReproduceMiniConfig(output_dir=str(tmp_path), long=True))
    assert not (tmp_path / "reproduce_mini_config.yaml").exists()  # refused before writing anything


def test_seed_spread_and_verdicts():
    s = seed_stats.Spread((1.0, 2.0, 3.0))
    assert (s.mean, s.std, s.min, s.max, s.n) == (2.0, 1.0, 1.0, 3.0, 3)
    assert s.format("{:.1f}") == "2.0 ± 1.0 [1.0, 3.0]"
    assert math.isnan(seed_stats.Spread((5.0,)).std) and seed_stats.Spread((5.0,)).format("{:.1f}") == "5.0"
    base = seed_stats.Spread((10.0, 12.0))  # std 1.414
    assert seed_stats.verdict(base, seed_stats.Spread((12.0, 12.4))).startswith("noise")  # +1.2 < 1.414
    assert seed_stats.verdict(base, seed_stats.Spread((15.0, 15.2))) == "beyond the seed spread"
    assert seed_stats.verdict(seed_stats.Spread((1.0,)), seed_stats.Spread((9.0,))).startswith("one seed")


def _results(path: Path, task: str, metrics: dict, attention: str) -> None:
    from entmax_vit.evaluation.results import make_results, write_results

    write_results(make_results(task=task, model_name_or_path="m", model_config={"attention": attention},
                               dataset={"name": "embedded"}, protocol={"name": task}, metrics=metrics, config={}), path)


def _fake_run(run: Path, attention: str, knn: float, miou: float, zero_share: float) -> None:
    """What the main job leaves behind for one (transform, seed): results files and the training log."""
    from entmax_vit.analysis.per_layer import flatten_metrics

    (run / "train").mkdir(parents=True)
    _results(run / "knn" / "results_knn.json", "knn", {"top1_k10": knn - 1, "top1_k20": knn}, attention)
    _results(run / "segmentation_patch" / "results_segmentation.json", "segmentation", {"mIoU": miou}, attention)
    _results(run / "segmentation_patch_cls" / "results_segmentation.json", "segmentation", {"mIoU": miou + 1}, attention)
    per_layer = {0: {"attention_zero_share": 0.0, "cos_to_cls": 0.5, "attention_distance": 2.0, "support_mean": 65.0},
                 1: {"attention_zero_share": zero_share, "cos_to_cls": 0.4, "attention_distance": 3.0, "support_mean": 40.0}}
    _results(run / "analysis" / attention / "analysis_results.json", "analysis", flatten_metrics(per_layer), attention)
    _results(run / "claims" / "claims_results.json", "analysis", {"fg_shallow_minus_deep": zero_share * 10 - 2,
             "miou_deep_minus_shallow": 5.0, "cls_gain_miou": 1.0, "block_0/seg_miou": miou - 5}, attention)
    (run / "summary.json").write_text(json.dumps({"stages": {"train": {"seconds": 12.0}}}))
    (run / "train" / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 8.0 - s}) for s in range(3)))


def test_report_from_finished_runs(tmp_path):
    values = {("softmax", 0): (50.0, 30.0, 0.0), ("softmax", 1): (51.0, 31.0, 0.0),
              ("entmax15", 0): (52.5, 33.25, 0.625), ("entmax15", 1): (60.0, 31.25, 0.5)}
    rows = []
    for (attention, seed), (knn, miou, zeros) in values.items():
        _fake_run(tmp_path / attention / f"seed_{seed}", attention, knn, miou, zeros)
        rows.append(reproduce_mini.collect(tmp_path / attention / f"seed_{seed}", attention, seed))
    assert rows[2]["last_layer"]["attention_zero_share"] == 0.625 and rows[2]["knn_top1"] == 52.5
    cfg = reproduce_mini.ReproduceMiniConfig(output_dir=str(tmp_path))
    report = reproduce_mini.markdown_report(cfg, rows, elapsed=60.0)
    per_seed = [line for line in report.splitlines() if line.startswith("| entmax15 | 0 |")]
    assert per_seed[0] == "| entmax15 | 0 | 52.50 | 33.25 | 34.25 | 62.5% | 0.400 | 3.00 |"  # then the claims row
    mean_row = next(line for line in report.splitlines() if line.startswith("| entmax15 | 56.25"))
    assert "56.25 ± 5.30 [52.50, 60.00]" in mean_row and "56.2%" in mean_row  # mean ± std [min, max]
    # generated verdicts: mIoU patch +1.75 vs spread 1.41 is beyond it; k-NN +5.75 vs spread 5.30 too; mIoU
    # patch+[CLS] likewise; the all-equal cos(patch, [CLS]) difference of 0 is noise
    lines = {line.split(":")[0]: line for line in report.splitlines() if line.startswith("- ")}
    assert lines["- mIoU patch (%)"].endswith("beyond the seed spread.")
    assert "noise" in lines["- cos(patch, [CLS]), last block"]
    assert "| VOC | 42.80 | 48.78 | +5.98 |" in report and "Caveat of scale" in report
    # the paper's claims: shallow-deep Jaccard 4.25 and 3.0 for entmax15 (mean 3.62 > std 0.88), -2 twice for softmax
    claims = [line for line in report.splitlines() if line.startswith("- (a) foreground")]
    assert claims[0].endswith("softmax: -2.00 ± +0.00 [-2.00, -2.00]; > 0 in 0 of 2 seeds: the opposite holds "
                              "beyond the seed spread.")
    assert claims[1].endswith("> 0 in 2 of 2 seeds: holds beyond the seed spread.")
    assert "| entmax15 | 1 | +3.00 | +5.00 | +1.00 |" in report  # per-seed claims
    logs = {a: [tmp_path / a / f"seed_{s}" / "train" / "metrics.jsonl" for s in (0, 1)] for a in ("softmax", "entmax15")}
    for png in (reproduce_mini.plot_losses(logs, tmp_path / "loss.png"), reproduce_mini.plot_probes(rows, tmp_path / "bars.png")):
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert reproduce_mini.mean_per_layer(rows)["entmax15"][1]["attention_zero_share"] == pytest.approx(0.5625)
    with pytest.raises(ValueError, match="no analysis results"):
        run_results.load_analysis(tmp_path / "softmax" / "seed_0" / "train")
    assert "- not measured (the random stage did not run)." in report and all(not r["random_init"] for r in rows)


def test_report_compares_training_with_random_init(tmp_path):
    """Rows "<transform>, random init" from the main job's random stage: in the means and per-seed tables, and
    a generated verdict per transform on what training added (entmax15: k-NN +20 over a spread of ~1.4)."""
    values = {("softmax", 0): 50.0, ("softmax", 1): 51.0, ("entmax15", 0): 52.0, ("entmax15", 1): 54.0}
    random_knn = {0: 31.0, 1: 33.0}
    rows = []
    for (attention, seed), knn in values.items():
        run = tmp_path / attention / f"seed_{seed}"
        _fake_run(run, attention, knn, 30.0 + seed, 0.5 if attention == "entmax15" else 0.0)
        if attention == "entmax15":  # the random stage ran for entmax15 only
            base = run / main_job.RANDOM_DIR
            _results(base / "knn" / "results_knn.json", "knn", {"top1_k20": random_knn[seed]}, attention)
            _results(base / "segmentation_patch" / "results_segmentation.json", "segmentation", {"mIoU": 29.5 + seed},
                     attention)
        rows.append(reproduce_mini.collect(run, attention, seed))
    assert rows[2]["random_init"] == {"knn_top1": 31.0, "seg_miou_patch": 29.5} and not rows[0]["random_init"]
    report = reproduce_mini.markdown_report(reproduce_mini.ReproduceMiniConfig(output_dir=str(tmp_path)), rows, 1.0)
    lines = report.splitlines()
    assert "| entmax15, random init | 1 | 33.00 | 30.50 | n/a | n/a | n/a | n/a |" in lines  # per seed
    assert any(line.startswith("| entmax15, random init | 32.00 ± 1.41 [31.00, 33.00] | 30.00 ± 0.71") for line in lines)
    gains = [line for line in lines if "- entmax15, random init" in line]
    assert gains == [
        "- k-NN top-1 (%): entmax15 - entmax15, random init = +21.00 (seed spread 1.41): beyond the seed spread.",
        "- mIoU patch (%): entmax15 - entmax15, random init = +0.50 (seed spread 0.71): noise (within the seed "
        "spread)."]
    softmax_lines = [line for line in lines if line.startswith("- k-NN top-1 (%): entmax15 - softmax")]
    assert len(softmax_lines) == 1  # the transform comparison leaves the random rows out
    assert reproduce_mini.plot_probes([*rows, *reproduce_mini.random_rows(rows)],
                                      tmp_path / "bars.png").read_bytes()[:4] == b"\x89PNG"


def test_one_seed_cannot_call_a_difference_real(tmp_path):
    rows = [{"attention": "softmax", "seed": 0, "knn_top1": 40.0}, {"attention": "entmax15", "seed": 0, "knn_top1": 60.0}]
    lines = seed_stats.comparison_lines(seed_stats.aggregate(rows, ["knn_top1"]), "softmax",
                                        [("knn_top1", "k-NN", "{:.1f}")])
    assert lines == ["- k-NN: entmax15 - softmax = +20.0 (seed spread n/a): one seed: spread unknown, cannot be "
                     "told from noise."]


def _degradation_rows() -> list[dict]:
    """softmax's patch mIoU peaks at step 200 and falls far below it; entmax15 rises and stays."""
    curves = {"softmax": [30, 40, 32], "entmax15": [30, 38, 39]}
    rows = []
    for attention, values in curves.items():
        for seed, offset in ((0, -0.5), (1, 0.5)):
            for step, v in zip((100, 200, 300), values):
                rows.append({"attention": attention, "seed": seed, "step": step, "seg_miou_patch": v + offset,
                             "seg_miou_patch_cls": v + 5 + offset, "knn_top1": 50.0 + offset,
                             "last_layer_attention_zero_share": 0.0 if attention == "softmax" else 0.1,
                             "last_layer_cos_to_cls": 0.1, "last_layer_attention_distance": 3.0})
    return rows


def test_degradation_verdict_and_figure(tmp_path):
    rows = _degradation_rows()
    soft = degradation.trend(*degradation.curves(rows, "seg_miou_patch")["softmax"])
    assert soft["peak_step"] == 200 and soft["final"] == 32 and soft["falls"] is True
    ent = degradation.trend(*degradation.curves(rows, "seg_miou_patch")["entmax15"])
    assert ent["peak_step"] == 300 and ent["falls"] is False
    lines = degradation.verdict_lines(rows)
    assert lines[-1].endswith("softmax's patch-only dense quality peaks and falls while entmax-1.5 holds, as the "
                              "paper describes.")
    random = [{**r, "step": 0, "seg_miou_patch": 99.0} for r in rows if r["step"] == 100]  # step 0: random init
    with_random = degradation.verdict_lines([*random, *rows])
    assert with_random[-1] == lines[-1] and "random init 99.00, peak 40.00 at step 200" in "\n".join(with_random)
    flat = [{**r, "seg_miou_patch": 30.0 + r["seed"]} for r in rows]  # nothing falls: the pattern is not shown
    assert "not shown at this budget" in degradation.verdict_lines(flat)[-1]
    cfg = reproduce_mini.ReproduceMiniConfig(output_dir=str(tmp_path), long=True)
    assert degradation.long_overrides(cfg)["checkpoint.keep_last"] == 0
    text = degradation.report(cfg, rows, 60.0)
    assert "| softmax | 1 | 300 | 50.50 | 32.50 | 37.50 | 0.0% |" in text  # k-NN, mIoU patch, patch+[CLS], zeros
    assert degradation.plot_degradation(rows, tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_degradation_compute_time_comes_from_the_stage_records(tmp_path):
    runs = [tmp_path / "softmax" / "seed_0", tmp_path / "entmax15" / "seed_0"]
    for i, run in enumerate(runs):
        (run / "stages").mkdir(parents=True)
        (run / "stages" / "train.json").write_text(json.dumps({"seconds": 600.0 * (i + 1)}))
        for step in ("step_0000310", "step_0000620"):
            (run / "steps" / step / "stages").mkdir(parents=True)
            for stage, seconds in (("export", 1.5), ("knn", 28.5), ("analysis", 30.0)):
                (run / "steps" / step / "stages" / f"{stage}.json").write_text(json.dumps({"seconds": seconds}))
    train, evaluation = degradation.recorded_minutes(runs)
    assert train == pytest.approx(30.0) and evaluation == pytest.approx(4.0)  # 600 + 1200 s; 2 x 2 x 60 s
    cfg = reproduce_mini.ReproduceMiniConfig(output_dir=str(tmp_path), long=True)
    text = degradation.report(cfg, _degradation_rows(), 90.0, minutes=(train, evaluation))
    assert "Compute time 34.0 min summed over the runs (training 30.0, checkpoint evaluations 4.0" in text
    assert "this invocation 1.5 min" in text


def test_publish_replaces_its_section_only(tmp_path):
    page = tmp_path / "reproduce_mini_results.md"
    page.write_text("# Title\n\nHand-written header.\n")
    figure = tmp_path / "fig.png"
    figure.write_bytes(b"\x89PNG")
    reproduce_mini.publish(tmp_path, "multi-seed", "## A\nfirst", [figure])
    reproduce_mini.publish(tmp_path, "degradation", "## B\nlong", [])
    reproduce_mini.publish(tmp_path, "multi-seed", "## A\nsecond", [])
    text = page.read_text()
    assert text.startswith("# Title\n\nHand-written header.") and "second" in text and "first" not in text
    assert text.count("## A") == 1 and "## B\nlong" in text
    assert (tmp_path / "figures" / "fig.png").exists()


SMALL = "embedded:image_size=64,num_train=96,num_validation=32"


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "ENTMAX_VIT_CACHE": str(tmp_path / "cache")}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_quick_main_job_end_to_end(tmp_path):
    out = tmp_path / "main_job"
    command = [sys.executable, "scripts/main_job.py", "--quick", "--output_dir", str(out), "--dataset", SMALL]
    subprocess.run(command, cwd=REPO, env=_env(tmp_path), check=True)
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["metrics"]
    assert 0 <= metrics["knn_top1"] <= 100 and 0 <= metrics["seg_miou_patch_cls"] <= 100
    assert metrics["reload_max_abs_diff"] < 1e-4
    assert 0 <= metrics["last_layer_attention_zero_share"] <= 1
    hub = out / "hub"
    for name in ("README.md", "config.json", "model.safetensors", "preprocessor_config.json",
                 "segmentation_head.safetensors", "modeling_entmax_vit.py"):
        assert (hub / name).exists(), name
    assert json.loads((hub / "config.json").read_text())["attention"] == "entmax15"
    assert (out / "analysis" / "entmax15" / "attention_maps_0.png").read_bytes()[:4] == b"\x89PNG"
    # A second run finds every stage finished with the same inputs and skips it.
    proc = subprocess.run(command, cwd=REPO, env=_env(tmp_path), check=True, capture_output=True, text=True)
    again = json.loads((out / "summary.json").read_text())
    assert all(again["stages"][s]["skipped"] for s in ("train", "knn", "segmentation_patch_cls", "analysis", "hub"))
    assert "skipped" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_tiny_reproduction_end_to_end(tmp_path):
    out, docs = tmp_path / "repro", tmp_path / "docs"
    subprocess.run([sys.executable, "scripts/reproduce_mini.py", "--tiny", "--seeds", "0", "1", "--output_dir", str(out),
                    "--dataset", SMALL, "--analysis_images", "8", "--docs_dir", str(docs)],
                   cwd=REPO, env=_env(tmp_path), check=True)
    report = (out / "results.md").read_text()
    assert "| softmax | 1 |" in report and "| entmax15 | 0 |" in report and "seed spread" in report
    results = json.loads((out / "results.json").read_text())
    assert sorted((row["attention"], row["seed"]) for row in results["runs"]) == [
        ("entmax15", 0), ("entmax15", 1), ("softmax", 0), ("softmax", 1)]
    # softmax never gives exact zeros; the trained model's config really used each transform and seed
    assert all(row["last_layer"]["attention_zero_share"] == 0.0 for row in results["runs"] if row["attention"] == "softmax")
    for attention in ("softmax", "entmax15"):
        for seed in (0, 1):
            model = out / attention / f"seed_{seed}" / "train" / "final_model"
            assert json.loads((model / "config.json").read_text())["attention"] == attention
            assert yaml.safe_load((model / "training_config.yaml").read_text())["seed"] == seed
    for png in ("curves/layer_curves.png", "training_loss.png", "reproduce_mini_seeds.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    assert "<!-- BEGIN multi-seed" in (docs / "reproduce_mini_results.md").read_text()
    assert (docs / "figures" / "reproduce_mini_seeds.png").exists()


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_tiny_degradation_run_end_to_end(tmp_path):
    out = tmp_path / "repro"
    command = [sys.executable, "scripts/reproduce_mini.py", "--tiny", "--long", "--seeds", "0", "1", "--output_dir",
               str(out), "--dataset", SMALL, "--analysis_images", "8", "--long_train_overrides", "{optim.epochs: 2}",
               "--checkpoint_every_steps", "2"]
    subprocess.run(command, cwd=REPO, env=_env(tmp_path), check=True)
    rows = json.loads((out / "long" / "degradation.json").read_text())["rows"]
    # 64 images, batch 32: 2 steps per epoch, 2 epochs -> checkpoints at steps 2 and 4 of every run, and step 0:
    # the random init of the same config and seed
    assert sorted({r["step"] for r in rows}) == [0, 2, 4] and len(rows) == 12
    assert "random init" in (out / "long" / "degradation.md").read_text()
    assert all(0 <= r["seg_miou_patch"] <= 100 and 0 <= r["seg_miou_patch_cls"] <= 100 for r in rows)
    assert all(r["last_layer_attention_zero_share"] == 0.0 for r in rows if r["attention"] == "softmax")
    assert "Answer, patch-only segmentation probe" in (out / "long" / "degradation.md").read_text()
    assert (out / "long" / "reproduce_mini_degradation.png").read_bytes()[:4] == b"\x89PNG"
    proc = subprocess.run(command, cwd=REPO, env=_env(tmp_path), check=True, capture_output=True, text=True)
    assert proc.stdout.count("skipped") >= 8 * 5 + 4 * 4  # resumed: every export and evaluation of every checkpoint
    # and of every random init (its model and three evaluations)
