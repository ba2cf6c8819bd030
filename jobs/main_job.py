"""The main job of ``scripts/main_job.py`` (stages and skip rule: docs/reproduction.md). Each stage is an entry
point's ``main(cfg)`` in this process; only training runs as its own process, under ``accelerate launch``.
"""

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .run_results import FEATURES, PROBE_KEYS, seg_dir, summary_metrics

STAGES = ("data", "train", "knn", "segmentation", "analysis", "claims", "random", "hub")
RANDOM_DIR = "random_init"  # the random-init baseline's folder in OUTPUT_DIR: its model and its evaluations


@dataclass
class MainJobConfig:
    # Job folder: train/, knn/, segmentation_*/, analysis/, hub/, the stage records and summary.json. A stage
    # finished there with the same inputs is skipped when the job runs again.
    output_dir: str = "outputs/main_job"
    # Attention transform of the pretrained model: softmax | entmax15 | sparsemax | entmax_bisect.
    attention: str = "entmax15"
    # Dataset of every stage: "embedded" (the bundled synthetic scenes), a larger variant such as
    # embedded:num_train=512,num_validation=128, or any load_image_dataset source with image, label and mask.
    dataset: str = "embedded"
    # Seed of the pretraining run (weights, data order, augmentations).
    seed: int = 0
    # Training preset of training/configs/ (tiny_cpu: a tiny ViT on the embedded scenes, ~15 min of one CPU thread).
    training_preset: str = "tiny_cpu"
    # Extra training overrides as a mapping, e.g. --train_overrides "{optim.epochs: 10}".
    train_overrides: dict = field(default_factory=dict)
    # Processes of the training stage (accelerate launch --num_processes); > 1 needs GPUs or ACCELERATE_USE_CPU=true.
    train_processes: int = 1
    # Segmentation probes to train: "patch" = last-layer patch tokens, "patch+cls" = with [CLS] concatenated.
    segmentation_features: list[str] = field(default_factory=lambda: ["patch+cls"])
    # Shortened run for smoke tests: a few training steps and small evaluation subsets.
    quick: bool = False
    # Stages to run, in order (a subset of data, train, knn, segmentation, analysis, claims, random, hub).
    # random: the baseline, a randomly initialised model of the trained model's config (seeded by --seed)
    # evaluated by the same k-NN and segmentation stages, so that the summary shows what training added.
    stages: list[str] = field(default_factory=lambda: [s for s in STAGES if s != "claims"])
    # Rerun stages even when they finished with the same inputs (deletes their previous outputs).
    force: bool = False
    # Repository id written into the model card and Hub folder (nothing is uploaded).
    hub_repo_id: str = "entmax-vit/vit-tiny-embedded-scenes"
    # Number of validation images for the analysis metrics.
    analysis_images: int = 64

    def __post_init__(self) -> None:
        if unknown := [s for s in self.stages if s not in STAGES]:
            raise ValueError(f"unknown stages {unknown}; choose from {list(STAGES)}")
        if any(f not in FEATURES for f in self.segmentation_features):
            raise ValueError(f"segmentation_features entries must be 'patch' or 'patch+cls', got "
                             f"{self.segmentation_features}")
        if self.train_processes < 1:
            raise ValueError(f"train_processes must be >= 1, got {self.train_processes}")


def run_stage(out: Path, name: str, fn: Callable[[], Any], outputs: Sequence[Path], settings: Any = None,
              inputs: Sequence[Path] = (), clean: Sequence[Path] = (), force: bool = False) -> dict:
    """Run ``fn`` unless its record holds the same settings and input hashes and every output exists. ``clean``
    folders go before a rerun of a finished stage (or under ``force``); an interrupted stage keeps them."""
    hashes = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None for p in inputs}
    key = json.loads(json.dumps({"settings": settings, "inputs": hashes}, default=str))
    record_path = out / "stages" / f"{name}.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if record and not force and record["key"] == key and all(p.exists() for p in outputs):
        print(f"[main_job] stage {name}: already finished with these inputs, skipped ({record_path})", flush=True)
        return {**record, "skipped": True}
    if record or force:
        for path in clean:
            shutil.rmtree(path, ignore_errors=True)
        record_path.unlink(missing_ok=True)
    print(f"\n{'=' * 100}\n[main_job] stage {name}\n{'=' * 100}", flush=True)
    start = time.perf_counter()
    result = fn()
    if missing := [str(p) for p in outputs if not p.exists()]:
        raise SystemExit(f"[main_job] stage {name} finished but did not write {missing}")
    record = {"stage": name, "key": key, "seconds": round(time.perf_counter() - start, 1),
              "result": result if isinstance(result, dict) else {}}  # entry points write their results files
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2, default=str))
    return {**record, "skipped": False}


def run_process(name: str, command: list[str]) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
    if (code := subprocess.run(command, env=env).returncode) != 0:
        raise SystemExit(f"[main_job] stage {name} failed (exit code {code}): {' '.join(command)}")


def training_config(cfg: MainJobConfig, train_dir: Path):
    """The train stage's DinoConfig: preset, job settings, then the user's overrides (dotted or nested keys; a
    dict field such as model.backbone_overrides is merged key by key)."""
    from entmax_vit.data.config_io import flatten, from_dict, load_preset, to_dict
    from entmax_vit.training.config import DinoConfig
    from entmax_vit.training.dino import CONFIG_DIR

    values = flatten(to_dict(load_preset(DinoConfig, cfg.training_preset, CONFIG_DIR)))
    values.update({"output_dir": str(train_dir), "model.attention": cfg.attention, "seed": cfg.seed,
                   "data.source": cfg.dataset})
    if cfg.quick:  # a handful of optimizer steps on a small subset: the code path, not the result
        values.update({"optim.epochs": 1, "optim.warmup_epochs": 0, "data.max_samples": 64,
                       "checkpoint.every_steps": 0})
    nested: dict = {}
    for dotted, value in {**values, **flatten(cfg.train_overrides)}.items():
        *parents, last = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return from_dict(DinoConfig, nested)


def train(cfg: MainJobConfig, train_dir: Path) -> None:
    from entmax_vit.data.config_io import save_config

    dino = training_config(cfg, train_dir)
    launch_config = save_config(dino, train_dir.parent / "stages" / "train_config.yaml")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.train_processes),
              "--num_machines", "1", "--mixed_precision", dino.optim.mixed_precision, "--dynamo_backend", "no",
              *(["--multi_gpu"] if cfg.train_processes > 1 else [])]
    script = importlib.util.find_spec("entmax_vit.training.dino").origin
    run_process("train", [*launch, script, "--config", str(launch_config)])


def evaluation_jobs(cfg: MainJobConfig, model_dir: Path, out: Path, stages: Sequence[str]) -> list[tuple]:
    """``(folder, entry point, its typed config, results file)`` of every evaluation stage in ``stages``."""
    def size() -> int:  # the pretraining resolution (global crop size = position-embedding grid)
        value = json.loads((model_dir / "config.json").read_text())["image_size"]
        return int(value if isinstance(value, int) else value[0])
    model, quick, jobs = str(model_dir), cfg.quick, []
    if "knn" in stages:
        from entmax_vit.evaluation.knn import KNNEvalConfig, main as knn

        subsets = {"max_train_samples": 256, "max_eval_samples": 128} if quick else {}
        jobs.append((out / "knn", knn, KNNEvalConfig(model=model, dataset=cfg.dataset, resize=size(), crop=size(),
                                                     output_dir=str(out / "knn"), **subsets), "results_knn.json"))
    if "segmentation" in stages:
        from entmax_vit.data.config_io import load_preset
        from entmax_vit.evaluation.entry_point import PRESET_DIR
        from entmax_vit.evaluation.segmentation_probe import SegmentationEvalConfig, main as segment

        preset = load_preset(SegmentationEvalConfig, "embedded", PRESET_DIR)
        subsets = {"epochs": 1, "max_train_samples": 128, "max_eval_samples": 64} if quick else {}
        for f in cfg.segmentation_features:
            if f not in FEATURES:
                raise ValueError(f"segmentation_features entries must be 'patch' or 'patch+cls', got {f!r}")
            seg = dataclasses.replace(preset, model=model, dataset=cfg.dataset, use_cls_token=f == "patch+cls",
                                      output_dir=str(seg_dir(out, f)), **subsets)
            jobs.append((seg_dir(out, f), segment, seg, "results_segmentation.json"))
    if "analysis" in stages:
        from entmax_vit.analysis.run import AnalyzeConfig, main as analyze

        analysis = AnalyzeConfig(model=model, names=[cfg.attention], dataset=cfg.dataset, split="validation",
                                 num_images=min(cfg.analysis_images, 16) if quick else cfg.analysis_images,
                                 image_size=size(), output_dir=str(out / "analysis"),
                                 separate_curves=False)  # the overview grid only: one PNG per metric costs minutes
        jobs.append((out / "analysis", analyze, analysis, f"{cfg.attention}/analysis_results.json"))
    if "claims" in stages:
        from entmax_vit.analysis.claims import ClaimsConfig, measure, write_claims

        subsets = {"max_train_samples": 128, "max_eval_samples": 64, "epochs": 1} if quick else {}
        claims = ClaimsConfig(dataset=cfg.dataset, seed=cfg.seed, foreground_images=cfg.analysis_images, **subsets)
        jobs.append((out / "claims", lambda c: write_claims(measure(model, c), out / "claims" / "claims_results.json",
                                                            model=model, cfg=c), claims, "claims_results.json"))
    return jobs


def evaluate(cfg: MainJobConfig, model_dir: Path, out: Path, stages: Sequence[str]) -> dict[str, dict]:
    from entmax_vit.data.config_io import to_dict

    weights = [model_dir / "model.safetensors"]  # every stage reads them: a retrained model reruns all
    return {folder.name: run_stage(out, folder.name, lambda: entry(stage_cfg), [folder / result],
                                   settings=to_dict(stage_cfg), inputs=weights, clean=[folder], force=cfg.force)
            for folder, entry, stage_cfg, result in evaluation_jobs(cfg, model_dir, out, stages)}


def save_random_init(model_dir: Path, seed: int, random_dir: Path) -> None:
    """A randomly initialised model (seeded by ``seed``) with the config and image processor of ``model_dir``."""
    import torch

    from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel

    config = EntmaxViTConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    EntmaxViTModel(config).save_pretrained(random_dir)
    if (processor := model_dir / "preprocessor_config.json").is_file():
        shutil.copy(processor, random_dir / processor.name)


def random_baseline(cfg: MainJobConfig, model_dir: Path, out: Path,
                    stages: Sequence[str] = ("knn", "segmentation")) -> dict[str, dict]:
    """The ``random`` stage: the random-init model of the trained config and its evaluations, into
    ``out / RANDOM_DIR``. The dense-degradation run's step 0 is the same."""
    base, random_model = out / RANDOM_DIR, out / RANDOM_DIR / "model"
    records = {"random_model": run_stage(base, "random_model", lambda: save_random_init(model_dir, cfg.seed, random_model),
                                         [random_model / "model.safetensors"], settings={"seed": cfg.seed},
                                         inputs=[model_dir / "config.json"], clean=[random_model], force=cfg.force)}
    stages = [s for s in stages if s in cfg.stages]
    records.update({f"random_{name}": r for name, r in evaluate(cfg, random_model, base, stages).items()})
    return records


def hub(cfg: MainJobConfig, model_dir: Path, out: Path, results: list[Path], seg_head: Path | None) -> dict:
    from entmax_vit.hub_release.assemble import assemble_repository

    repo = assemble_repository(model_dir, out, repo_id=cfg.hub_repo_id, results=results, seg_head=seg_head,
                               verify=True, overwrite=True)
    return {"reloaded_class": repo.verification.model_class,
            "reload_max_abs_diff": max(repo.verification.max_abs_diff.values())}


def main(cfg: MainJobConfig) -> dict:
    from entmax_vit.data.config_io import save_config, to_dict

    start = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(cfg.output_dir).resolve()
    save_config(cfg, out / "main_job_config.yaml")
    train_dir, records = out / "train", {}
    model_dir = train_dir / "final_model"
    if "data" in cfg.stages:
        from entmax_vit.data.datasets import load_image_dataset

        sizes = [len(load_image_dataset(cfg.dataset, split=split)) for split in ("train", "validation")]
        print(f"[main_job] data {cfg.dataset}: {sizes[0]} train / {sizes[1]} validation", flush=True)
    if "train" in cfg.stages:
        records["train"] = run_stage(out, "train", lambda: train(cfg, train_dir), [model_dir / "model.safetensors"],
                                     settings=to_dict(training_config(cfg, train_dir)), clean=[train_dir],
                                     force=cfg.force)
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"[main_job] no trained model at {model_dir}: run the train stage first")
    records.update(evaluate(cfg, model_dir, out, cfg.stages))
    if "random" in cfg.stages:
        records.update(random_baseline(cfg, model_dir, out))
    if "hub" in cfg.stages:
        seg_dirs = [seg_dir(out, f) for f in cfg.segmentation_features]
        results = [p for p in [out / "knn" / "results_knn.json", *(d / "results_segmentation.json" for d in seg_dirs)]
                   if p.is_file()]
        heads = [d / "segmentation_head" for d in seg_dirs if (d / "segmentation_head").is_dir()][-1:]
        head = heads[0] if heads else None  # the last probe listed ships (patch+cls by default)
        inputs = [model_dir / "model.safetensors", *results, *(h / "segmentation_head.safetensors" for h in heads)]
        records["hub"] = run_stage(out, "hub", lambda: hub(cfg, model_dir, out / "hub", results, head),
                                   [out / "hub" / "config.json", out / "hub" / "README.md"],
                                   settings={"repo_id": cfg.hub_repo_id}, inputs=inputs, clean=[out / "hub"],
                                   force=cfg.force)

    metrics = summary_metrics(out, cfg.attention, cfg.segmentation_features)
    baseline = summary_metrics(out / RANDOM_DIR, cfg.attention, cfg.segmentation_features)
    for name in [k for k in PROBE_KEYS if k in baseline and k in metrics]:
        metrics[f"random_init_{name}"] = baseline[name]  # same config, same evaluations, no training
        metrics[f"{name}_gain_over_random"] = metrics[name] - baseline[name]
    if "hub" in records:
        metrics["reload_max_abs_diff"] = records["hub"]["result"]["reload_max_abs_diff"]
    summary = {"attention": cfg.attention, "quick": cfg.quick, "total_seconds": round(time.perf_counter() - start, 1),
               "metrics": metrics, "output_dir": str(out),
               "stages": {k: {"seconds": r["seconds"], "skipped": r["skipped"]} for k, r in records.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n[main_job] done in {summary['total_seconds'] / 60:.1f} min (attention = {cfg.attention}); {out}")
    print("\n".join(f"  {name:<34} {value:10.4g}" for name, value in metrics.items()))
    print("\n".join(f"  stage {name:<28} " + ("skipped (done before)" if s["skipped"] else f"{s['seconds']:6.1f} s")
                    for name, s in summary["stages"].items()))
    maps = out / "analysis" / cfg.attention / "attention_maps_0.png"
    print("\n".join(f"  wrote {p}" for p in (model_dir, maps, out / "hub", out / "summary.json") if p.exists()))
    return summary
