"""The dense-degradation run (``scripts/reproduce_mini.py --long``): does dense quality (a linear segmentation
probe on patch tokens) degrade along prolonged DINO training while image-level quality holds, as the paper says of
softmax? Every ``checkpoint_every_steps`` steps a checkpoint's teacher is evaluated by the main job's own stages;
step 0 is the run's random-init baseline (the main job's random stage). Resumable.
"""

import json
import math
import time
from pathlib import Path
from typing import Sequence

from .main_job import RANDOM_DIR, evaluate, random_baseline, run_stage
from .reproduce_mini import ReproduceMiniConfig, main_job_config, publish, run_all
from .run_results import FEATURES, summary_metrics
from .seed_stats import METRICS, Spread, seed_table

DENSE = ("seg_miou_patch", "seg_miou_patch_cls", "knn_top1")  # the quality curves the verdict reads


def long_overrides(cfg: ReproduceMiniConfig) -> dict:
    return {**cfg.train_overrides, **cfg.long_train_overrides, "checkpoint.every_steps": cfg.checkpoint_every_steps,
            "checkpoint.at_epoch_end": False, "checkpoint.keep_last": 0}


def evaluate_checkpoints(cfg: ReproduceMiniConfig, attention: str, seed: int, run_dir: Path) -> list[dict]:
    """Export and evaluate the teacher of every checkpoint of one run: one row per step."""
    from entmax_vit.training.checkpointing import STEP_DIR, TEACHER_FILE, list_checkpoints
    from entmax_vit.training.export import export_checkpoint

    job = main_job_config(cfg, attention, seed, run_dir, ["knn", "segmentation", "analysis"])
    rows, checkpoints = [], list_checkpoints(run_dir / "train" / "checkpoints")
    for i, checkpoint in enumerate(checkpoints, 1):
        step = int(STEP_DIR.match(checkpoint.name).group(1))
        print(f"[reproduce_mini] {attention} seed {seed}: checkpoint {i}/{len(checkpoints)} (step {step})", flush=True)
        out = run_dir / "steps" / checkpoint.name
        model = out / "model"
        run_stage(out, "export", lambda: export_checkpoint(checkpoint, model), [model / "model.safetensors"],
                  inputs=[checkpoint / TEACHER_FILE], clean=[model], force=cfg.force)
        evaluate(job, model, out, job.stages)
        rows.append({"attention": attention, "seed": seed, "step": step, **summary_metrics(out, attention, FEATURES)})
    if not rows:
        raise SystemExit(f"[reproduce_mini] {run_dir / 'train' / 'checkpoints'} holds no checkpoint to evaluate")
    random_baseline(job, run_dir / "steps" / checkpoints[0].name / "model", run_dir, job.stages)
    step_0 = summary_metrics(run_dir / RANDOM_DIR, attention, FEATURES)
    return [{"attention": attention, "seed": seed, "step": 0, **step_0}, *rows]


def curves(rows: Sequence[dict], key: str) -> dict[str, tuple[list[int], list[Spread]]]:
    """``{attention: (steps, Spread over seeds at each step)}`` of one metric."""
    out = {}
    for attention in dict.fromkeys(r["attention"] for r in rows):
        steps = sorted({r["step"] for r in rows if r["attention"] == attention})
        out[attention] = (steps, [Spread(tuple(r[key] for r in rows if r["attention"] == attention and r["step"] == s
                                               and r.get(key) is not None)) for s in steps])
    return out


def trend(steps: list[int], spreads: list[Spread]) -> dict:
    """Peak of the mean curve, the final value and whether the fall from the peak exceeds the seed spread
    (the larger standard deviation at the two steps; unknown with one seed)."""
    means = [s.mean for s in spreads]
    peak = max(range(len(means)), key=lambda i: means[i])
    fall = means[peak] - means[-1]
    spread = max(spreads[peak].std, spreads[-1].std)
    falls = None if math.isnan(spread) else bool(peak < len(means) - 1 and fall > spread)
    return {"peak_step": steps[peak], "peak": means[peak], "final_step": steps[-1], "final": means[-1],
            "fall": fall, "spread": spread, "falls": falls}


def verdict_lines(rows: Sequence[dict]) -> list[str]:
    titles = {key: title for key, title, _ in METRICS}
    lines, trends = [], {}
    for key in DENSE:
        for attention, (steps, spreads) in curves(rows, key).items():
            trained = [i for i, step in enumerate(steps) if step > 0]  # step 0 is the random init: not a peak
            t = trends[attention, key] = trend([steps[i] for i in trained], [spreads[i] for i in trained])
            start = f"random init {spreads[0].mean:.2f}, " if steps[0] == 0 else ""
            state = {None: "one seed: whether it falls cannot be told from noise",
                     True: "falls by more than the seed spread", False: "does not fall beyond the seed spread"}[t["falls"]]
            spread = "n/a" if math.isnan(t["spread"]) else f"{t['spread']:.2f}"
            lines.append(f"- {titles[key]}, {attention}: {start}peak {t['peak']:.2f} at step {t['peak_step']}, "
                         f"{t['final']:.2f} at step {t['final_step']} (fall {t['fall']:.2f}, seed spread {spread}): {state}.")
    soft, ent = trends.get(("softmax", "seg_miou_patch")), trends.get(("entmax15", "seg_miou_patch"))
    if soft and ent:
        if soft["falls"] and ent["falls"] is False:
            answer = "softmax's patch-only dense quality peaks and falls while entmax-1.5 holds, as the paper describes."
        elif soft["falls"] is None or ent["falls"] is None:
            answer = "with one seed, neither a fall nor its absence can be told from noise."
        else:
            answer = (f"the paper's pattern (softmax falls, entmax-1.5 holds) is not shown at this budget: softmax "
                      f"{'falls' if soft['falls'] else 'does not fall'}, entmax-1.5 "
                      f"{'falls' if ent['falls'] else 'does not fall'} beyond the seed spread.")
        lines.append(f"\nAnswer, patch-only segmentation probe: {answer}")
    return lines


def plot_degradation(rows: Sequence[dict], path: Path) -> Path:
    from matplotlib.figure import Figure  # no pyplot: see analysis/figures.py

    fig = Figure(figsize=(11, 6))
    axes = fig.subplots(2, 3)
    for ax, (key, title, spec) in zip(axes.flat, METRICS):
        scale = 100.0 if spec.endswith("%}") else 1.0
        for i, (attention, (steps, spreads)) in enumerate(curves(rows, key).items()):
            ax.plot(steps, [s.mean * scale for s in spreads], color=f"C{i}", marker="o", ms=3, label=attention)
            ax.fill_between(steps, [s.min * scale for s in spreads], [s.max * scale for s in spreads],
                            color=f"C{i}", alpha=0.2)
        ax.set_title(title + (" (%)" if scale == 100 else ""), fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("along training: mean over seeds, band = min..max over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def recorded_minutes(run_dirs: Sequence[Path]) -> tuple[float, float]:
    """(training, checkpoint evaluation) minutes summed over runs, as their stage records give them (a stage
    resumed after a kill counts its last invocation only)."""
    def seconds(records: Sequence[Path]) -> float:
        return sum(float(json.loads(p.read_text()).get("seconds") or 0) for p in records)
    train = seconds([d / "stages" / "train.json" for d in run_dirs if (d / "stages" / "train.json").is_file()])
    evaluation = seconds([p for d in run_dirs for p in sorted((d / "steps").glob("*/stages/*.json"))])
    return train / 60, evaluation / 60


def report(cfg: ReproduceMiniConfig, rows: Sequence[dict], elapsed: float, figures: str = "",
           minutes: tuple[float, float] = (0.0, 0.0)) -> str:
    table = seed_table(sorted(rows, key=lambda r: (r["attention"], r["seed"], r["step"])),
                       ["attention", "seed", "step"], METRICS)
    budget = "tiny smoke budget (the numbers are meaningless)" if cfg.tiny else \
        f"preset `{cfg.training_preset}` with {long_overrides(cfg)}"
    return "\n".join([
        "## Dense degradation along training (`--long`)",
        "",
        f"Budget: {budget}; seeds {cfg.run_seeds}; every checkpoint's teacher evaluated. Compute time "
        f"{sum(minutes):.1f} min summed over the runs (training {minutes[0]:.1f}, checkpoint evaluations "
        f"{minutes[1]:.1f}; from the stage records), this invocation {elapsed / 60:.1f} min.",
        "",
        f"![degradation]({figures}reproduce_mini_degradation.png)",
        "",
        "Step 0 is the random init of the same config and seed (untrained, the same evaluations). "
        "What it shows (generated from the numbers; a fall counts when it exceeds the seed spread, the larger "
        "standard deviation over seeds at the peak and at the last step):",
        "",
        *verdict_lines(rows),
        "",
        "Every checkpoint:",
        "",
        *table,
        "",
    ])


def main(cfg: ReproduceMiniConfig) -> dict:
    """``--long``: its own entry, so that this module builds on reproduce_mini and not the other way round."""
    from entmax_vit.data.config_io import save_config

    start = time.perf_counter()
    out = Path(cfg.output_dir).resolve()
    save_config(cfg, out / "reproduce_mini_config.yaml")
    out = out / "long"
    runs = run_all(cfg, out, ["train"], long_overrides(cfg))
    rows = [row for attention, seed, run_dir in runs for row in evaluate_checkpoints(cfg, attention, seed, run_dir)]
    (out / "degradation.json").write_text(json.dumps({"rows": rows}, indent=2))
    figure = plot_degradation(rows, out / "reproduce_mini_degradation.png")
    minutes = recorded_minutes([run_dir for _, _, run_dir in runs])
    text = report(cfg, rows, time.perf_counter() - start, minutes=minutes)
    (out / "degradation.md").write_text(text)
    if cfg.docs_dir:
        page = publish(Path(cfg.docs_dir), "degradation",
                       report(cfg, rows, time.perf_counter() - start, "figures/", minutes), [figure])
        print(f"[reproduce_mini] updated {page}")
    print("\n" + text)
    return {"rows": rows, "report": out / "degradation.md", "figure": figure}
