"""A mini reproduction of the paper on CPU: softmax vs entmax-1.5 (optionally sparsemax) under one budget.

    python scripts/reproduce_mini.py                                   # ~30-45 min on 2 CPU cores
    python scripts/reproduce_mini.py --attentions softmax,entmax15,sparsemax
    python scripts/reproduce_mini.py --tiny --output_dir /tmp/repro    # smoke run of the whole pipeline

For every attention transform it runs the main job's pretraining and evaluation stages (scripts/main_job.py)
with the SAME preset, budget and seed - only ``model.attention`` differs, as in the paper - then collects:

- k-NN top-1 accuracy of the teacher's [CLS] (validation split of the embedded scenes);
- linear segmentation mIoU from the last layer's patch tokens, with and without the [CLS] token concatenated;
- per-layer attention sparsity (share of exact zeros, support) and the semantic-diffusion metrics
  (patch-to-[CLS] and patch-to-patch cosine similarity, locality contrast, high-norm outliers, ...).

Writes ``OUTPUT_DIR/results.md`` (a markdown table + the paper's numbers for comparison),
``OUTPUT_DIR/results.json``, ``OUTPUT_DIR/curves/*.png`` (one line per transform over layers) and
``OUTPUT_DIR/training_loss.png``. Resumable: each model lives in ``OUTPUT_DIR/<attention>/`` and the main job
skips the stages that already finished with the same settings (training resumes from its last checkpoint),
so rerunning after an interruption continues where it stopped; ``--force`` starts over.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]

# The paper's DINOv1 ViT-S/16, 200 epochs on ImageNet-1K, linear segmentation probe mIoU (softmax, entmax-1.5).
PAPER_MIOU = {"VOC": (42.80, 48.78), "ADE20K": (19.85, 21.97), "Cityscapes": (36.79, 37.87)}

# Last-layer metrics shown in the table: (analysis metric, column title, format).
TABLE_LAYER_METRICS = (
    ("attention_zero_share", "attn. exact zeros", "{:.1%}"),
    ("support_mean", "attn. support (tokens)", "{:.1f}"),
    ("attention_distance", "attn. distance (patches)", "{:.2f}"),
    ("cos_to_cls", "cos(patch, [CLS])", "{:.3f}"),
    ("cos_pairwise", "cos(patch, patch)", "{:.3f}"),
    ("locality_contrast", "locality contrast", "{:.3f}"),
    ("outlier_share", "high-norm share", "{:.2%}"),
)


@dataclass
class ReproduceMiniConfig:
    output_dir: str = "outputs/reproduce_mini"
    # Attention transforms to compare (each gets the same pretraining budget and seed).
    attentions: list[str] = field(default_factory=lambda: ["softmax", "entmax15"])
    # Dataset of every stage (see scripts/main_job.py), e.g. "embedded:num_train=4000,num_validation=800".
    dataset: str = "embedded"
    # Pretraining seed shared by every run.
    seed: int = 0
    # Training preset shared by every run (tiny_cpu: the main job's ~5 min budget per model).
    training_preset: str = "tiny_cpu"
    # Extra training overrides applied to EVERY run, e.g. --train_overrides "{optim.epochs: 40}".
    train_overrides: dict = field(default_factory=dict)
    # Validation images for the per-layer analysis.
    analysis_images: int = 64
    # Smoke run: the main job's --quick budget for every model (checks the pipeline, not the paper).
    tiny: bool = False
    # Rerun every stage of every model.
    force: bool = False


def main_job_command(cfg: ReproduceMiniConfig, attention: str, out: Path) -> list[str]:
    command = [sys.executable, "scripts/main_job.py", "--output_dir", str(out), "--attention", attention,
               "--dataset", cfg.dataset, "--seed", str(cfg.seed), "--training_preset", cfg.training_preset,
               "--segmentation_features", "[patch,patch+cls]", "--analysis_images", str(cfg.analysis_images),
               "--stages", "[train,knn,segmentation,analysis]"]
    if cfg.train_overrides:
        command += ["--train_overrides", json.dumps(cfg.train_overrides)]
    if cfg.tiny:
        command.append("--quick")
    if cfg.force:
        command.append("--force")
    return command


# ----------------------------------------------------------------------------------------------------------
# Collecting results
# ----------------------------------------------------------------------------------------------------------
def load_analysis(analysis_dir: Path) -> dict[int, dict[str, float]]:
    """Per-layer metrics ``{layer: {metric: value}}`` from the analysis results JSON in ``analysis_dir``."""
    from entmax_vit.analysis.per_layer import unflatten_metrics
    from entmax_vit.evaluation.results import load_results

    for path in sorted(analysis_dir.rglob("analysis_results.json")):
        try:
            record = load_results(path)
        except ValueError:
            continue
        if record["task"] == "analysis":
            return unflatten_metrics(record["metrics"])
    raise ValueError(f"no analysis results JSON (task 'analysis') in {analysis_dir}")


def load_losses(metrics_jsonl: Path) -> tuple[list[float], list[float]]:
    """(step, loss) pairs from the training log (lines without a loss are skipped)."""
    steps, losses = [], []
    if not metrics_jsonl.exists():
        return steps, losses
    for line in metrics_jsonl.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row and "step" in row and isinstance(row["loss"], (int, float)):
            steps.append(float(row["step"]))
            losses.append(float(row["loss"]))
    return steps, losses


def collect(out: Path, attention: str) -> dict:
    """Everything the table and curves need for one model."""
    run = out / attention
    summary = json.loads((run / "summary.json").read_text())
    per_layer = load_analysis(run / "analysis")
    last = per_layer[max(per_layer)] if per_layer else {}
    return {
        "attention": attention,
        "knn_top1": summary["metrics"].get("knn_top1"),
        "seg_miou_patch": summary["metrics"].get("seg_miou_patch"),
        "seg_miou_patch_cls": summary["metrics"].get("seg_miou_patch_cls"),
        "last_layer": last,
        "per_layer": {str(k): v for k, v in per_layer.items()},
        "train_seconds": summary["stages"].get("train", {}).get("seconds"),
        # compute time of every stage of this model, also of stages finished by an earlier (interrupted) run
        "seconds": sum(float(stage.get("seconds") or 0) for stage in summary["stages"].values()),
    }


# ----------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------
def _fmt(value: Optional[float], spec: str = "{:.2f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return spec.format(value)


def markdown_report(cfg: ReproduceMiniConfig, rows: list[dict], elapsed: float) -> str:
    probes = ["| attention | k-NN top-1 (%) | seg. mIoU patch (%) | seg. mIoU patch+[CLS] (%) |", "|---|---|---|---|"]
    probes += [f"| {row['attention']} | {_fmt(row['knn_top1'])} | {_fmt(row['seg_miou_patch'])} | "
               f"{_fmt(row['seg_miou_patch_cls'])} |" for row in rows]
    head = ["attention"] + [title for _, title, _ in TABLE_LAYER_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["attention"]] + [_fmt(row["last_layer"].get(name), spec) for name, _, spec in TABLE_LAYER_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    paper = ["| benchmark (paper, ViT-S/16, 200 ep ImageNet) | softmax mIoU | entmax-1.5 mIoU | change |",
             "|---|---|---|---|"]
    paper += [f"| {name} | {a:.2f} | {b:.2f} | {b - a:+.2f} |" for name, (a, b) in PAPER_MIOU.items()]
    per_run = ", ".join(f"{row['attention']} {(row.get('seconds') or 0) / 60:.1f}" for row in rows)
    budget = "main job --quick budget (smoke run: numbers are meaningless)" if cfg.tiny else \
        f"preset `{cfg.training_preset}`" + (f" with {cfg.train_overrides}" if cfg.train_overrides else "")
    return "\n".join([
        "# Mini reproduction: softmax vs entmax attention in DINO pretraining",
        "",
        f"Same pretraining budget ({budget}) and seed ({cfg.seed}) for every transform; only `model.attention` "
        f"differs. Data: `{cfg.dataset}` (validation split for every metric). Compute time "
        f"{sum(row.get('seconds') or 0 for row in rows) / 60:.1f} min over all runs and stages ({per_run}); "
        f"this invocation {elapsed / 60:.1f} min.",
        "",
        "Frozen-feature probes (`probes.png`):",
        "",
        *probes,
        "",
        "Attention sparsity and semantic diffusion in the last layer (every layer: `curves/layer_curves.png`; "
        "training loss: `training_loss.png`):",
        "",
        *lines,
        "",
        "For comparison, the paper's linear segmentation probe:",
        "",
        *paper,
        "",
        "Caveat of scale: a tiny ViT pretrained for minutes on a few thousand 64-pixel synthetic images is not "
        "a 200-epoch ViT-S/16 on ImageNet. Differences here come from a single seed and can be within "
        "seed-to-seed noise; they test whether the mechanism shows at a scale anyone can run, not the paper's "
        "numbers.",
        "",
    ])


def plot_probes(out: Path, rows: list[dict]) -> Optional[Path]:
    """Grouped bars: k-NN top-1 and both segmentation mIoUs, one colour per attention transform."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("knn_top1", "k-NN top-1"), ("seg_miou_patch", "mIoU patch"), ("seg_miou_patch_cls", "mIoU patch+[CLS]")]
    if not any(row[k] is not None for row in rows for k, _ in keys):
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        values = [row[k] if row[k] is not None else float("nan") for k, _ in keys]
        bars = ax.bar([j + (i - (len(rows) - 1) / 2) * width for j in range(len(keys))], values, width,
                      label=row["attention"])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(keys)), [title for _, title in keys])
    ax.set_ylabel("%")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "probes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(out: Path, attentions: list[str]) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    drawn = False
    for attention in attentions:
        steps, losses = load_losses(out / attention / "train" / "metrics.jsonl")
        if steps:
            ax.plot(steps, losses, label=attention)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("DINO loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "training_loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
def main(cfg: ReproduceMiniConfig) -> dict:
    from entmax_vit.analysis.figures import plot_layer_curves
    from entmax_vit.cli.config import save_config

    if len(set(cfg.attentions)) < 2:
        raise ValueError(f"compare at least two attention transforms, got {cfg.attentions}")
    start = time.perf_counter()
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "reproduce_mini_config.yaml")

    for i, attention in enumerate(cfg.attentions, 1):
        command = main_job_command(cfg, attention, out / attention)
        print(f"\n{'#' * 100}\n[reproduce_mini] model {i}/{len(cfg.attentions)}: attention = {attention}\n"
              f"  {shlex.join(command)}\n{'#' * 100}", flush=True)
        proc = subprocess.run(command, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"[reproduce_mini] the {attention} run failed (exit {proc.returncode}); rerun this "
                             f"command to resume it")

    rows = [collect(out, attention) for attention in cfg.attentions]
    elapsed = time.perf_counter() - start
    report = markdown_report(cfg, rows, elapsed)
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"config": cfg.__dict__, "runs": rows}, indent=2, default=str))
    runs = {row["attention"]: {int(k): v for k, v in row["per_layer"].items()} for row in rows if row["per_layer"]}
    figures = plot_layer_curves(runs, out / "curves") if runs else []
    written = [out / "results.md", out / "results.json", *figures[:1], plot_probes(out, rows),
               plot_losses(out, cfg.attentions)]
    print("\n" + report)
    print(f"[reproduce_mini] wrote {', '.join(str(p) for p in written if p is not None)}")
    return {"rows": rows, "report": out / "results.md"}


if __name__ == "__main__":
    from entmax_vit.cli.config import parse_config

    main(parse_config(ReproduceMiniConfig, sys.argv[1:]))
