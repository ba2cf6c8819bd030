"""The main job (README quick start, ``make demo``): the whole release, for real, in minutes on a CPU.

    python scripts/main_job.py                         # ~6-9 min on 2 CPU cores
    python scripts/main_job.py --quick                 # a shortened smoke run (~1-2 min)
    python scripts/main_job.py --attention softmax --output_dir outputs/main_job_softmax

Stages (each one a real entry point of the project, run in its own process, progress shown as it goes):

1. data          render (or reuse) the embedded benchmark: synthetic scenes over real texture photographs
2. train         DINO-pretrain a tiny EntmaxViT on it (training/dino.py, preset ``tiny_cpu``)
3. knn           weighted k-NN classification of the frozen teacher's [CLS] (scripts/eval_knn.py)
4. segmentation  linear segmentation probe on frozen patch features, mIoU (scripts/eval_segmentation.py)
5. analysis      attention maps + per-layer sparsity / semantic-diffusion metrics (scripts/analyze.py)
6. hub           model card + Hub-ready folder, assembled offline (scripts/push_to_hub.py --output-dir)
7. reload        AutoModel.from_pretrained(hub folder, trust_remote_code=True) in a fresh process that does
                 not import this project, checked against the trained model

A finished stage is skipped when the job is run again with the same settings (its command is recorded in
``OUTPUT_DIR/stages/<stage>.json``), so an interrupted run resumes where it stopped (training itself resumes
from its last checkpoint). ``--force`` reruns everything. The summary is printed and written to
``OUTPUT_DIR/summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data", "train", "knn", "segmentation", "analysis", "hub", "reload")


@dataclass
class MainJobConfig:
    output_dir: str = "outputs/main_job"
    # Attention transform of the pretrained model: softmax | entmax15 | sparsemax | entmax_bisect.
    attention: str = "entmax15"
    # Dataset of every stage: "embedded" (the bundled synthetic scenes) or e.g.
    # "embedded:num_train=512,num_validation=128" (any load_image_dataset source with image, label and mask).
    dataset: str = "embedded"
    # Seed of the pretraining run (weights, data order, augmentations).
    seed: int = 0
    # Training preset of training/configs/ (tiny_cpu: a ~5 min ViT on the embedded scenes on 2 CPU cores).
    training_preset: str = "tiny_cpu"
    # Extra training overrides as a mapping, e.g. --train_overrides "{optim.epochs: 10}".
    train_overrides: dict = field(default_factory=dict)
    # Segmentation probes to train: "patch" = last-layer patch tokens, "patch+cls" = with [CLS] concatenated.
    segmentation_features: list[str] = field(default_factory=lambda: ["patch+cls"])
    # Shortened run for smoke tests: a few training steps and small evaluation subsets.
    quick: bool = False
    # Stages to run, in order (a subset of data, train, knn, segmentation, analysis, hub, reload).
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    # Rerun stages even when they finished with the same settings (deletes their previous outputs).
    force: bool = False
    # Repository id written into the model card and Hub folder (nothing is uploaded).
    hub_repo_id: str = "entmax-vit/vit-tiny-embedded-scenes"
    # Number of validation images for the analysis metrics and the reload check.
    analysis_images: int = 64


# ----------------------------------------------------------------------------------------------------------
# Stage bookkeeping
# ----------------------------------------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    """Environment of every stage: offline by default (the embedded data and the model need no network)."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def banner(text: str) -> None:
    print(f"\n{'=' * 100}\n[main_job] {text}\n{'=' * 100}", flush=True)


def _fingerprint(path: Path) -> Optional[list[int]]:
    """(size, mtime in ns) of a file, None if it does not exist."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


class StageRunner:
    """Runs stages as subprocesses; records each finished stage with its command so reruns can skip it."""

    def __init__(self, out: Path, force: bool) -> None:
        self.out, self.force = out, force
        self.records: dict[str, dict] = {}
        (out / "stages").mkdir(parents=True, exist_ok=True)

    def _record_path(self, name: str) -> Path:
        return self.out / "stages" / f"{name}.json"

    def finished(self, name: str, command: list[str], outputs: list[Path], inputs: dict) -> bool:
        path = self._record_path(name)
        if self.force or not path.exists():
            return False
        record = json.loads(path.read_text())
        if record.get("command") != command or record.get("inputs", {}) != inputs:
            return False
        if not all(p.exists() for p in outputs):
            return False
        self.records[name] = {**record, "skipped": True}
        return True

    def run(self, name: str, command: list[str], outputs: list[Path], clean: list[Path] = (),
            inputs: Optional[list[Path]] = None) -> dict:
        """Run ``command`` unless it already finished with the same command on the same ``inputs`` (files
        fingerprinted by size and modification time: a retrained model reruns every stage that reads it).
        ``clean`` folders are removed before a rerun of a stage that had finished with other settings."""
        fingerprints = {str(p): _fingerprint(p) for p in inputs or []}
        if self.finished(name, command, outputs, fingerprints):
            print(f"[main_job] stage {name}: already finished with these settings, skipped "
                  f"({self._record_path(name)})", flush=True)
            return self.records[name]
        record_path = self._record_path(name)
        if self.force or record_path.exists():  # finished before with other settings: its outputs are stale
            for path in clean:
                if path.exists():
                    print(f"[main_job] stage {name}: removing previous outputs {path}", flush=True)
                shutil.rmtree(path, ignore_errors=True)
            record_path.unlink(missing_ok=True)
        banner(f"stage {name}: {shlex.join(command)}")
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=REPO, env=child_env())
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"[main_job] stage {name} failed (exit code {proc.returncode}) after {seconds:.0f} s:\n"
                             f"  {shlex.join(command)}")
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise SystemExit(f"[main_job] stage {name} finished but did not write {missing}")
        record = {"stage": name, "command": command, "inputs": fingerprints, "seconds": round(seconds, 1),
                  "skipped": False}
        self._record_path(name).write_text(json.dumps(record, indent=2))
        self.records[name] = record
        return record


# ----------------------------------------------------------------------------------------------------------
# The commands of each stage
# ----------------------------------------------------------------------------------------------------------
def training_command(cfg: MainJobConfig, train_dir: Path) -> list[str]:
    overrides = {"model.attention": cfg.attention, "seed": cfg.seed, "data.source": cfg.dataset}
    if cfg.quick:  # a handful of optimizer steps on a small subset: the code path, not the result
        overrides.update({"optim.epochs": 1, "optim.warmup_epochs": 0, "data.max_samples": 64,
                          "checkpoint.every_steps": 0})
    overrides.update(_flatten(cfg.train_overrides))
    command = [sys.executable, "training/dino.py", "--config", cfg.training_preset, "--output_dir", str(train_dir)]
    for key, value in overrides.items():
        command += [f"--{key}", _cli_value(value)]
    return command


def _flatten(mapping: dict, prefix: str = "") -> dict:
    """{"optim": {"epochs": 5}} -> {"optim.epochs": 5} (dotted keys pass through)."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _cli_value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def eval_image_size(model_dir: Path) -> int:
    """The resolution the model was pretrained at (global crop size = position-embedding grid)."""
    config = json.loads((model_dir / "config.json").read_text())
    return int(config["image_size"] if isinstance(config["image_size"], int) else config["image_size"][0])


def knn_command(cfg: MainJobConfig, model_dir: Path, out: Path, size: int) -> list[str]:
    command = [sys.executable, "scripts/eval_knn.py", "--model", str(model_dir), "--dataset", cfg.dataset,
               "--resize", str(size), "--crop", str(size), "--output_dir", str(out)]
    if cfg.quick:
        command += ["--max_train_samples", "256", "--max_eval_samples", "128"]
    return command


def segmentation_command(cfg: MainJobConfig, model_dir: Path, out: Path, features: str) -> list[str]:
    if features not in ("patch", "patch+cls"):
        raise ValueError(f"segmentation_features entries must be 'patch' or 'patch+cls', got {features!r}")
    command = [sys.executable, "scripts/eval_segmentation.py", "--preset", "embedded", "--model", str(model_dir),
               "--dataset", cfg.dataset,
               "--use_cls_token", str(features == "patch+cls").lower(), "--output_dir", str(out)]
    if cfg.quick:
        command += ["--epochs", "1", "--max_train_samples", "128", "--max_eval_samples", "64"]
    return command


def analysis_command(cfg: MainJobConfig, model_dir: Path, out: Path, size: int) -> list[str]:
    n = min(cfg.analysis_images, 16) if cfg.quick else cfg.analysis_images
    return [sys.executable, "scripts/analyze.py", "--model", str(model_dir), "--names", cfg.attention,
            "--dataset", cfg.dataset, "--split", "validation", "--num_images", str(n), "--image_size", str(size),
            "--output_dir", str(out)]


def hub_command(cfg: MainJobConfig, model_dir: Path, out: Path, results: list[Path], seg_head: Optional[Path]) -> list[str]:
    # --upload false: assemble and verify only, whatever HF_HUB_OFFLINE says (the main job never uploads).
    command = [sys.executable, "scripts/push_to_hub.py", str(model_dir), "--repo-id", cfg.hub_repo_id,
               "--output-dir", str(out), "--upload", "false"]
    for path in results:
        command += ["--results", str(path)]
    if seg_head is not None:
        command += ["--seg-head", str(seg_head)]
    return command


# ----------------------------------------------------------------------------------------------------------
# Reload check: the Hub folder in a fresh process that never imports this project
# ----------------------------------------------------------------------------------------------------------
_RELOAD_CHILD = r"""
import json, sys
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModel
hub_dir, images_dir, out = sys.argv[1:4]
model = AutoModel.from_pretrained(hub_dir, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(hub_dir, trust_remote_code=True)
paths = sorted(__import__("pathlib").Path(images_dir).glob("*.png"))
inputs = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")
with torch.no_grad():
    pooled = model(**inputs).pooler_output
save_file({"pooler_output": pooled.contiguous(), "pixel_values": inputs["pixel_values"].contiguous()}, out)
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "entmax_vit")
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__, "project_modules": leaked}))
"""


def reload_check(model_dir: Path, hub_dir: Path, out: Path, dataset: str, num_images: int = 8) -> dict:
    """Reload ``hub_dir`` like a Hub user would and compare its features with the trained model's."""
    import torch
    from safetensors.torch import load_file

    from entmax_vit.data.datasets import find_column, load_image_dataset
    from entmax_vit.data.images import to_rgb
    from entmax_vit.modeling import EntmaxViTModel

    banner(f"stage reload: AutoModel.from_pretrained({hub_dir}, trust_remote_code=True) in a fresh process")
    start = time.perf_counter()
    images_dir = out / "reload_images"
    images_dir.mkdir(parents=True, exist_ok=True)
    validation = load_image_dataset(dataset, split="validation")
    column = find_column(validation, kind="image")
    num_images = min(num_images, len(validation))
    for i in range(num_images):
        to_rgb(validation[i][column]).save(images_dir / f"{i:03d}.png")
    tensors = out / "reload_outputs.safetensors"
    with tempfile.TemporaryDirectory() as cwd:  # outside the repo: nothing of the project on the import path
        env = child_env()
        env.pop("PYTHONPATH", None)
        proc = subprocess.run([sys.executable, "-c", _RELOAD_CHILD, str(hub_dir), str(images_dir), str(tensors)],
                              cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[main_job] reloading {hub_dir} with AutoModel failed:\n{proc.stderr[-4000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if info["project_modules"]:
        raise SystemExit(f"[main_job] the Hub folder imports the project itself: {info['project_modules']}")
    reloaded = load_file(str(tensors))
    model = EntmaxViTModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = model(pixel_values=reloaded["pixel_values"]).pooler_output
    diff = (expected - reloaded["pooler_output"]).abs().max().item()
    if not diff < 1e-4:
        raise SystemExit(f"[main_job] the reloaded Hub model differs from the trained one: max |diff| = {diff:.2e}")
    print(f"[main_job] reloaded as {info['class']}; max |diff| vs the trained model over {num_images} images = "
          f"{diff:.2e}", flush=True)
    return {"stage": "reload", "class": info["class"], "max_abs_diff": diff,
            "seconds": round(time.perf_counter() - start, 1), "skipped": False}


# ----------------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _pick(metrics: dict, *names: str) -> Optional[float]:
    for name in names:
        if name in metrics:
            return float(metrics[name])
    return None


def summarize(cfg: MainJobConfig, paths: dict[str, Path], records: dict[str, dict], total: float) -> dict:
    metrics: dict[str, float] = {}
    knn = _read_json(paths["knn_results"])
    if knn:
        top1 = {k: v for k, v in knn["metrics"].items() if k.startswith("top1_k")}
        if top1:
            best = max(top1, key=top1.get)
            metrics["knn_top1"] = top1[best]
            metrics["knn_best_k"] = float(best.removeprefix("top1_k"))
    for features, path in paths["seg_results"].items():
        seg = _read_json(path)
        if seg:
            value = _pick(seg["metrics"], "mIoU", "miou", "mean_iou")
            if value is not None:
                metrics[f"seg_miou_{features.replace('+', '_')}"] = value
    analysis = _read_json(paths["analysis"] / cfg.attention / "analysis_results.json")
    if analysis:
        layers = sorted({int(k.split("/")[0].removeprefix("layer_")) for k in analysis["metrics"] if k.startswith("layer_")})
        if layers:
            last = f"layer_{layers[-1]}/"
            for name in ("attention_zero_share", "support_mean", "cos_to_cls"):
                if last + name in analysis["metrics"]:
                    metrics[f"last_layer_{name}"] = float(analysis["metrics"][last + name])
    if "reload" in records:
        metrics["reload_max_abs_diff"] = records["reload"]["max_abs_diff"]
    summary = {
        "attention": cfg.attention,
        "quick": cfg.quick,
        "total_seconds": round(total, 1),
        "metrics": metrics,
        "stages": {name: {k: v for k, v in r.items() if k != "command"} for name, r in records.items()},
        "paths": {k: (str(v) if isinstance(v, Path) else {f: str(p) for f, p in v.items() if p.exists()})
                  for k, v in paths.items() if not isinstance(v, Path) or v.exists() or k == "summary"},
    }
    return summary


def print_summary(summary: dict) -> None:
    banner(f"done in {summary['total_seconds'] / 60:.1f} min (attention = {summary['attention']}"
           f"{', quick run' if summary['quick'] else ''})")
    for name, value in summary["metrics"].items():
        print(f"  {name:<34} {value:10.4g}")
    for name, stage in summary["stages"].items():
        state = "skipped (done before)" if stage.get("skipped") else f"{stage.get('seconds', 0):6.1f} s"
        print(f"  stage {name:<28} {state}")
    print("  wrote:")
    for name, path in summary["paths"].items():
        if isinstance(path, dict):
            for sub, p in path.items():
                print(f"    {name + ' (' + sub + ')':<26} {p}")
        else:
            print(f"    {name:<26} {path}")


# ----------------------------------------------------------------------------------------------------------
def main(cfg: MainJobConfig) -> dict:
    from entmax_vit.cli.config import save_config

    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {list(STAGES)}")
    start = time.perf_counter()
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "main_job_config.yaml")
    runner = StageRunner(out, cfg.force)

    train_dir = out / "train"
    model_dir = train_dir / "final_model"
    paths: dict = {
        "config": out / "main_job_config.yaml",
        "model": model_dir,
        "training_metrics": train_dir / "metrics.jsonl",
        "knn_results": out / "knn" / "results_knn.json",
        "seg_results": {f: out / f"segmentation_{f.replace('+', '_')}" / "results_segmentation.json"
                        for f in cfg.segmentation_features},
        "analysis": out / "analysis",
        "attention_maps": out / "analysis" / cfg.attention / "attention_maps_0.png",
        "model_card": out / "hub" / "README.md",
        "hub_folder": out / "hub",
        "summary": out / "summary.json",
    }

    if "data" in cfg.stages:
        from entmax_vit.data.datasets import load_image_dataset
        from entmax_vit.data.synthetic_scenes import default_cache_dir

        banner(f"stage data: {cfg.dataset} (embedded = synthetic scenes over real texture photographs)")
        t = time.perf_counter()
        sizes = {split: len(load_image_dataset(cfg.dataset, split=split)) for split in ("train", "validation")}
        runner.records["data"] = {"stage": "data", "seconds": round(time.perf_counter() - t, 1), "skipped": False}
        where = f", cached under {default_cache_dir() / 'synthetic_scenes'}" if cfg.dataset.startswith("embedded") else ""
        print(f"[main_job] {sizes['train']} train / {sizes['validation']} validation images{where}", flush=True)
    if "train" in cfg.stages:
        runner.run("train", training_command(cfg, train_dir), [model_dir / "config.json"], clean=[train_dir])
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"[main_job] no trained model at {model_dir}: run the train stage first")
    size = eval_image_size(model_dir)
    weights = [model_dir / "model.safetensors"]  # every later stage reads these: retraining reruns them
    if "knn" in cfg.stages:
        runner.run("knn", knn_command(cfg, model_dir, paths["knn_results"].parent, size), [paths["knn_results"]],
                   clean=[paths["knn_results"].parent], inputs=weights)
    if "segmentation" in cfg.stages:
        for features, path in paths["seg_results"].items():
            runner.run(f"segmentation_{features.replace('+', '_')}",
                       segmentation_command(cfg, model_dir, path.parent, features), [path], clean=[path.parent],
                       inputs=weights)
    if "analysis" in cfg.stages:
        runner.run("analysis", analysis_command(cfg, model_dir, paths["analysis"], size),
                   [paths["analysis"] / cfg.attention / "analysis_results.json"], clean=[paths["analysis"]],
                   inputs=weights)
    if "hub" in cfg.stages:
        results = [p for p in [paths["knn_results"], *paths["seg_results"].values()] if p.exists()]
        seg_dirs = [p.parent / "segmentation_head" for p in paths["seg_results"].values()]
        seg_head = next((d for d in reversed(seg_dirs) if d.exists()), None)
        head_files = [seg_head / "segmentation_head.safetensors"] if seg_head is not None else []
        runner.run("hub", hub_command(cfg, model_dir, paths["hub_folder"], results, seg_head),
                   [paths["hub_folder"] / "config.json", paths["hub_folder"] / "README.md"],
                   clean=[paths["hub_folder"]], inputs=weights + results + head_files)
    if "reload" in cfg.stages:
        runner.records["reload"] = reload_check(model_dir, paths["hub_folder"], out, cfg.dataset)

    summary = summarize(cfg, paths, runner.records, time.perf_counter() - start)
    paths["summary"].write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


if __name__ == "__main__":
    from entmax_vit.cli.config import parse_config

    main(parse_config(MainJobConfig, sys.argv[1:]))
