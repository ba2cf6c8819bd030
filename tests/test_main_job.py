"""The main job (scripts/main_job.py) and the mini reproduction (scripts/reproduce_mini.py).

Fast tests check the stage bookkeeping (skip when finished with the same command, rerun and clean when the
settings changed), the commands handed to the other entry points and the reproduction report. The slow tests
run the shortened main job and the tiny reproduction end to end on a small embedded dataset.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


main_job = _load("main_job")
reproduce_mini = _load("reproduce_mini")


def _touch_command(path: Path, text: str) -> list[str]:
    return [sys.executable, "-c", f"import pathlib; p = pathlib.Path({str(path)!r}); p.parent.mkdir(parents=True, "
            f"exist_ok=True); p.write_text({text!r})"]


def test_stage_runner_skips_reruns_and_cleans(tmp_path, capsys):
    out_file = tmp_path / "stage_out" / "result.txt"
    runner = main_job.StageRunner(tmp_path, force=False)
    first = runner.run("demo", _touch_command(out_file, "one"), [out_file], clean=[out_file.parent])
    assert not first["skipped"] and out_file.read_text() == "one"
    record = json.loads((tmp_path / "stages" / "demo.json").read_text())
    assert record["command"] == _touch_command(out_file, "one")

    again = main_job.StageRunner(tmp_path, force=False).run("demo", _touch_command(out_file, "one"), [out_file])
    assert again["skipped"]

    stale = out_file.parent / "stale.txt"
    stale.write_text("from the old settings")
    changed = main_job.StageRunner(tmp_path, force=False).run(
        "demo", _touch_command(out_file, "two"), [out_file], clean=[out_file.parent])
    assert not changed["skipped"] and out_file.read_text() == "two" and not stale.exists()

    out_file.unlink()  # outputs gone: rerun even though the record matches
    redo = main_job.StageRunner(tmp_path, force=False).run("demo", _touch_command(out_file, "two"), [out_file])
    assert not redo["skipped"] and out_file.exists()

    forced = main_job.StageRunner(tmp_path, force=True).run("demo", _touch_command(out_file, "two"), [out_file])
    assert not forced["skipped"]


def test_stage_reruns_when_its_input_changes(tmp_path):
    import os

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"old weights")
    out_file = tmp_path / "eval" / "result.txt"
    command = _touch_command(out_file, "evaluated")
    assert not main_job.StageRunner(tmp_path, False).run("eval", command, [out_file], inputs=[weights])["skipped"]
    assert main_job.StageRunner(tmp_path, False).run("eval", command, [out_file], inputs=[weights])["skipped"]
    weights.write_bytes(b"retrained weights")  # same command, new model: the old results are stale
    os.utime(weights, ns=(1, 1))
    assert not main_job.StageRunner(tmp_path, False).run("eval", command, [out_file], inputs=[weights])["skipped"]


def test_stage_runner_reports_failures(tmp_path):
    runner = main_job.StageRunner(tmp_path, force=False)
    with pytest.raises(SystemExit, match="stage broken failed"):
        runner.run("broken", [sys.executable, "-c", "raise SystemExit(3)"], [])
    with pytest.raises(SystemExit, match="did not write"):
        runner.run("silent", [sys.executable, "-c", "pass"], [tmp_path / "never.txt"])
    assert not (tmp_path / "stages" / "broken.json").exists()


def test_commands_carry_settings(tmp_path):
    cfg = main_job.MainJobConfig(attention="softmax", seed=7, quick=True, dataset="embedded:num_train=64",
                                 train_overrides={"optim": {"epochs": 3}, "data.batch_size_per_device": 8})
    train = main_job.training_command(cfg, tmp_path / "train")
    pairs = dict(zip(train[6::2], train[7::2]))
    assert train[2:5] == ["--config", "tiny_cpu", "--output_dir"]
    assert pairs["--model.attention"] == "softmax" and pairs["--seed"] == "7"
    assert pairs["--data.source"] == "embedded:num_train=64"
    assert pairs["--optim.epochs"] == "3"  # the user's override wins over --quick's
    assert pairs["--data.batch_size_per_device"] == "8"
    seg = main_job.segmentation_command(cfg, tmp_path / "m", tmp_path / "s", "patch")
    assert seg[seg.index("--use_cls_token") + 1] == "false"
    hub = main_job.hub_command(cfg, tmp_path / "m", tmp_path / "h", [tmp_path / "a.json", tmp_path / "b.json"], None)
    assert hub[hub.index("--upload") + 1] == "false" and hub.count("--results") == 2
    with pytest.raises(ValueError, match="patch"):
        main_job.segmentation_command(cfg, tmp_path, tmp_path, "cls")


def test_main_rejects_unknown_stage(tmp_path):
    with pytest.raises(ValueError, match="unknown stages"):
        main_job.main(main_job.MainJobConfig(output_dir=str(tmp_path), stages=["train", "deploy"]))


def test_config_parsing_of_flags():
    from entmax_vit.cli.config import parse_config

    cfg = parse_config(main_job.MainJobConfig, ["--quick", "--stages", "[train,knn]",
                                                "--segmentation_features", "[patch,patch+cls]"])
    assert cfg.quick and cfg.stages == ["train", "knn"] and cfg.segmentation_features == ["patch", "patch+cls"]
    rcfg = parse_config(reproduce_mini.ReproduceMiniConfig, ["--attentions", "softmax,entmax15,sparsemax", "--tiny"])
    command = reproduce_mini.main_job_command(rcfg, "sparsemax", Path("/x"))
    assert "--quick" in command and command[command.index("--attention") + 1] == "sparsemax"
    assert command[command.index("--segmentation_features") + 1] == "[patch,patch+cls]"


def _fake_run(root: Path, attention: str, knn: float, miou: float, zero_share: float) -> None:
    """What the main job leaves behind for one model (summary, analysis results, training log)."""
    from entmax_vit.analysis.per_layer import flatten_metrics
    from entmax_vit.evaluation.results import make_results, write_results

    run = root / attention
    (run / "train").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "metrics": {"knn_top1": knn, "seg_miou_patch": miou, "seg_miou_patch_cls": miou + 1},
        "stages": {"train": {"seconds": 12.0}}}))
    per_layer = {0: {"attention_zero_share": 0.0, "cos_to_cls": 0.5}, 1: {"attention_zero_share": zero_share,
                                                                          "cos_to_cls": 0.4}}
    record = make_results(task="analysis", model_name_or_path=str(run), model_config={"attention": attention},
                          dataset={"name": "embedded"}, protocol={"name": "semantic_diffusion"},
                          metrics=flatten_metrics(per_layer), config={})
    write_results(record, run / "analysis" / attention / "analysis_results.json")
    (run / "train" / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 8.0 - s}) for s in range(3)))


def test_report_from_finished_runs(tmp_path):
    _fake_run(tmp_path, "softmax", 50.0, 30.0, 0.0)
    _fake_run(tmp_path, "entmax15", 52.5, 33.25, 0.625)
    rows = [reproduce_mini.collect(tmp_path, a) for a in ("softmax", "entmax15")]
    assert rows[1]["last_layer"]["attention_zero_share"] == 0.625 and rows[1]["knn_top1"] == 52.5
    cfg = reproduce_mini.ReproduceMiniConfig(output_dir=str(tmp_path))
    report = reproduce_mini.markdown_report(cfg, rows, elapsed=60.0)
    probes, layer = [line for line in report.splitlines() if line.startswith("| entmax15 |")]
    assert probes == "| entmax15 | 52.50 | 33.25 | 34.25 |"
    assert layer.split(" | ")[1] == "62.5%"  # last layer's exact-zero share, first metric column
    assert "| VOC | 42.80 | 48.78 | +5.98 |" in report and "Caveat of scale" in report
    for png in (reproduce_mini.plot_losses(tmp_path, ["softmax", "entmax15"]), reproduce_mini.plot_probes(tmp_path, rows)):
        assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no analysis results"):
        reproduce_mini.load_analysis(tmp_path / "softmax" / "train")


def test_reproduce_needs_two_transforms(tmp_path):
    with pytest.raises(ValueError, match="at least two"):
        reproduce_mini.main(reproduce_mini.ReproduceMiniConfig(output_dir=str(tmp_path), attentions=["entmax15"]))


SMALL = "embedded:image_size=64,num_train=96,num_validation=32"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_quick_main_job_end_to_end(tmp_path):
    out = tmp_path / "main_job"
    command = [sys.executable, "scripts/main_job.py", "--quick", "--output_dir", str(out), "--dataset", SMALL]
    env = {**__import__("os").environ, "ENTMAX_VIT_CACHE": str(tmp_path / "cache")}
    subprocess.run(command, cwd=REPO, env=env, check=True)
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
    # A second run finds every stage finished and skips it (only the cheap reload check runs again).
    proc = subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    again = json.loads((out / "summary.json").read_text())
    assert all(again["stages"][s]["skipped"] for s in ("train", "knn", "segmentation_patch_cls", "analysis", "hub"))
    assert "skipped" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_tiny_reproduction_end_to_end(tmp_path):
    out = tmp_path / "repro"
    env = {**__import__("os").environ, "ENTMAX_VIT_CACHE": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "scripts/reproduce_mini.py", "--tiny", "--output_dir", str(out),
                    "--dataset", SMALL, "--analysis_images", "8"],
                   cwd=REPO, env=env, check=True)
    report = (out / "results.md").read_text()
    assert "| softmax |" in report and "| entmax15 |" in report
    results = json.loads((out / "results.json").read_text())
    by_name = {row["attention"]: row for row in results["runs"]}
    # softmax never gives exact zeros; the trained model's config really used each transform
    assert by_name["softmax"]["last_layer"]["attention_zero_share"] == 0.0
    for attention in ("softmax", "entmax15"):
        config = json.loads((out / attention / "train" / "final_model" / "config.json").read_text())
        assert config["attention"] == attention
    for png in ("curves/layer_curves.png", "training_loss.png", "probes.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
