"""The multi-seed mini reproduction of ``scripts/reproduce_mini.py`` (docs/reproduction.md): every run is the
main job in this process with the SAME preset and budget; only ``model.attention`` and the seed differ. Resumable:
each run lives in ``OUTPUT_DIR/<attention>/seed_<seed>/``. ``--long`` is jobs/degradation.py.
"""

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .main_job import RANDOM_DIR, MainJobConfig, main as main_job
from .run_results import FEATURES, PROBE_KEYS, load_analysis, summary_metrics
from .seed_stats import CLAIMS, METRICS, Spread, aggregate, claim_lines, comparison_lines, seed_table


@dataclass
class ReproduceMiniConfig:
    # One main-job folder per run (ATTENTION/seed_S/), results.json, results.md and the figures; resumable.
    output_dir: str = "outputs/reproduce_mini"
    # Attention transforms to compare (each gets the same pretraining budget and the same seeds).
    attentions: list[str] = field(default_factory=lambda: ["softmax", "entmax15"])
    # Pretraining seeds of every transform; empty = [0, 1, 2] ([0, 1] with --long).
    seeds: list[int] = field(default_factory=list)
    # Dataset of every stage (see the main job), e.g. "embedded:num_train=4000,num_validation=800".
    dataset: str = "embedded"
    # Training preset shared by every run (tiny_cpu: the main job's budget, ~15 min of one CPU thread per model).
    training_preset: str = "tiny_cpu"
    # Extra training overrides applied to EVERY run, e.g. --train_overrides "{optim.epochs: 40}".
    train_overrides: dict = field(default_factory=dict)
    # Validation images for the per-layer analysis.
    analysis_images: int = 64
    # Measure the paper's two analysis claims on every run (analysis.claims: a probe per block, minutes more).
    claims: bool = True
    # Smoke run: the main job's --quick budget for every model (checks the machinery, not the paper).
    tiny: bool = False
    # Rerun every stage of every model.
    force: bool = False
    # The dense-degradation run: train longer (long_train_overrides) and evaluate every checkpoint.
    long: bool = False
    # Training overrides of the long run, applied after train_overrides (30 epochs of tiny_cpu = 1860 steps).
    long_train_overrides: dict = field(default_factory=lambda: {"optim.epochs": 30})
    # Long run: a checkpoint (and an evaluation of its teacher) every N optimizer steps (310 = 5 tiny_cpu epochs).
    checkpoint_every_steps: int = 310
    # Also write the report section into DOCS_DIR/reproduce_mini_results.md and figures into DOCS_DIR/figures/.
    docs_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if len(set(self.attentions)) < 2:
            raise ValueError(f"compare at least two attention transforms, got {self.attentions}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if self.checkpoint_every_steps < 1:
            raise ValueError(f"checkpoint_every_steps must be >= 1, got {self.checkpoint_every_steps}")

    @property
    def run_seeds(self) -> list[int]:
        return list(self.seeds) or ([0, 1] if self.long else [0, 1, 2])


def main_job_config(cfg: ReproduceMiniConfig, attention: str, seed: int, run_dir: Path, stages: Sequence[str],
                    train_overrides: Optional[dict] = None) -> MainJobConfig:
    return MainJobConfig(output_dir=str(run_dir), attention=attention, seed=seed, dataset=cfg.dataset,
                         training_preset=cfg.training_preset,
                         train_overrides=cfg.train_overrides if train_overrides is None else train_overrides,
                         segmentation_features=list(FEATURES), quick=cfg.tiny, stages=list(stages),
                         force=cfg.force, analysis_images=cfg.analysis_images)


def collect(run_dir: Path, attention: str, seed: int) -> dict:
    """Every number the report needs for one run folder (``random_init`` empty without the random stage)."""
    per_layer = load_analysis(run_dir / "analysis")
    stages = json.loads((run_dir / "summary.json").read_text())["stages"] if (run_dir / "summary.json").is_file() else {}
    baseline = summary_metrics(run_dir / RANDOM_DIR, attention, FEATURES)
    return {"attention": attention, "seed": seed, **summary_metrics(run_dir, attention, FEATURES),
            "last_layer": per_layer[max(per_layer)], "per_layer": {str(k): v for k, v in per_layer.items()},
            "random_init": {k: baseline[k] for k in PROBE_KEYS if k in baseline},
            "seconds": sum(float(s.get("seconds") or 0) for s in stages.values())}


def random_rows(rows: list[dict]) -> list[dict]:
    return [{"attention": f"{row['attention']}, random init", "seed": row["seed"], **row["random_init"]}
            for row in rows if row.get("random_init")]


def training_gain_lines(table: dict, attentions: Sequence[str]) -> list[str]:
    """Per transform, trained against its random init (same config, same evaluations), generated from the numbers."""
    probes = [m for m in METRICS if m[0] in PROBE_KEYS]
    lines = []
    for attention in attentions:
        baseline = f"{attention}, random init"
        if attention in table and baseline in table:
            lines += comparison_lines({baseline: table[baseline], attention: table[attention]}, baseline, probes)
    return lines


def markdown_report(cfg: ReproduceMiniConfig, rows: list[dict], elapsed: float, figures: str = "") -> str:
    """The multi-seed section; ``figures`` prefixes the image links (e.g. "figures/" inside docs/)."""
    from entmax_vit.recipe import PAPER_RESULTS

    table = aggregate(rows, [key for key, _, _ in (*METRICS, *CLAIMS)])
    baselines = random_rows(rows)
    shown = {**table, **aggregate(baselines, [key for key, _, _ in METRICS])}  # trained, then random init
    seeds = sorted({row["seed"] for row in rows})
    head = "| attention | " + " | ".join(title for _, title, _ in METRICS) + " |"
    sep = "|---|" + "---|" * len(METRICS)
    means = [head, sep] + [f"| {a} | " + " | ".join(s[key].format(spec) for key, _, spec in METRICS) + " |"
                           for a, s in shown.items()]
    per_seed = seed_table([*rows, *baselines], ["attention", "seed"], METRICS)
    claims = seed_table([row for row in rows if any(row.get(key) is not None for key, _, _ in CLAIMS)],
                        ["attention", "seed"], CLAIMS, [title.split(" ")[0] + " " + key for key, title, _ in CLAIMS])
    baseline = "softmax" if "softmax" in table else next(iter(table))
    budget = "the main job's --quick budget (smoke run: the numbers are meaningless)" if cfg.tiny else \
        f"preset `{cfg.training_preset}`" + (f" with {cfg.train_overrides}" if cfg.train_overrides else "")
    compute = sum(row.get("seconds") or 0 for row in rows) / 60
    return "\n".join([
        "## Multi-seed comparison",
        "",
        f"Same pretraining budget ({budget}) for every transform and seeds {seeds}; only `model.attention` and "
        f"the seed differ. Data: `{cfg.dataset}` (validation split for every metric). Compute time {compute:.1f} min "
        f"over all runs and stages; this invocation {elapsed / 60:.1f} min.",
        "",
        f"Mean ± standard deviation [min, max] over {len(seeds)} seed(s) (bar chart: `{figures}reproduce_mini_seeds.png`):",
        "",
        *means,
        "",
        f"Against {baseline}, generated from the numbers above (a difference is called noise when it is not larger "
        "than the seed spread, the larger of the two standard deviations; with few seeds this is a rule of thumb, "
        "not a significance test):",
        "",
        *(comparison_lines(table, baseline) or ["- only one transform measured."]),
        "",
        "What training added: each transform against a randomly initialised model of the same config and seed "
        "(the main job's random stage: the same k-NN and segmentation probes; rows \"random init\" above):",
        "",
        *(training_gain_lines(shown, list(table)) or ["- not measured (the random stage did not run)."]),
        "",
        "The paper's two analysis claims on the same runs (analysis.claims; (a) shallow blocks align better with "
        "the foreground yet probe worse than deeper ones, shallow = mean of the first half of the blocks, deep = "
        "the last block; (b) [CLS] is complementary; differences in points, mean ± std [min, max]):",
        "",
        *(claim_lines(table) or ["- not measured (the claims stage did not run)."]),
        "",
        "Per seed:",
        "",
        *per_seed,
        "",
        *(claims + [""] if len(claims) > 2 else []),
        "",
        f"![seeds]({figures}reproduce_mini_seeds.png)",
        "",
        f"Every layer, mean over seeds: `{figures}reproduce_mini_layer_curves.png`. For comparison, the paper's "
        "linear segmentation probe:",
        "",
        "| benchmark (paper, ViT-S/16, 200 ep ImageNet) | softmax mIoU | entmax-1.5 mIoU | change |",
        "|---|---|---|---|",
        *(f"| {name} | {a:.2f} | {b:.2f} | {b - a:+.2f} |" for name, (a, b) in PAPER_RESULTS.items()),
        "",
        "Caveat of scale: a tiny ViT pretrained for minutes on a few thousand 64-pixel synthetic images is not a "
        "200-epoch ViT-S/16 on ImageNet; this tests whether the mechanism shows at a scale anyone can run, not "
        "the paper's numbers.",
        "",
    ])


def plot_probes(rows: list[dict], path: Path) -> Path:
    from matplotlib.figure import Figure  # no pyplot: see analysis/figures.py

    table = aggregate(rows, [key for key, _, _ in METRICS])
    fig = Figure(figsize=(2.4 * len(METRICS), 3.0))
    axes = fig.subplots(1, len(METRICS))
    for ax, (key, title, spec) in zip(axes, METRICS):
        scale = 100.0 if spec.endswith("%}") else 1.0
        for i, (attention, spreads) in enumerate(table.items()):
            s = spreads[key]
            if not s.values:
                continue
            ax.bar(i, s.mean * scale, yerr=0 if s.n < 2 else s.std * scale, capsize=4, color=f"C{i}", alpha=0.7)
            ax.plot([i] * s.n, [v * scale for v in s.values], "k.", ms=4)
        ax.set_xticks(range(len(table)), list(table), fontsize=7, rotation=20)
        ax.set_title(title + (" (%)" if scale == 100 else ""), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("mean over seeds, error bar = std, dots = seeds", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_losses(runs: dict[str, list[Path]], path: Path) -> Optional[Path]:
    """DINO loss against the optimizer step: one colour per transform, one line per seed."""
    from matplotlib.figure import Figure  # no pyplot: see analysis/figures.py

    from entmax_vit.training.metrics_log import read_metrics

    fig = Figure(figsize=(5, 3.4))
    ax = fig.subplots()
    drawn = False
    for i, (attention, logs) in enumerate(runs.items()):
        for j, log in enumerate(logs):
            rows = [r for r in read_metrics(log) if "loss" in r] if log.is_file() else []
            if rows:
                ax.plot([float(r["step"]) for r in rows], [float(r["loss"]) for r in rows], color=f"C{i}", alpha=0.8,
                        label=attention if j == 0 else None)
                drawn = True
    if not drawn:
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("DINO loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def mean_per_layer(rows: list[dict]) -> dict[str, dict[int, dict[str, float]]]:
    """``{attention: {layer: {metric: mean over seeds}}}``."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for attention in dict.fromkeys(row["attention"] for row in rows):
        runs = [row["per_layer"] for row in rows if row["attention"] == attention]
        layers = sorted(int(k) for k in runs[0])
        out[attention] = {layer: {m: Spread(tuple(r[str(layer)][m] for r in runs if m in r.get(str(layer), {}))).mean
                                  for m in runs[0][str(layer)]} for layer in layers}
    return out


def publish(docs_dir: Path, section: str, text: str, figures: Sequence[Path]) -> Path:
    """Replace (or append) ``section`` of DOCS_DIR/reproduce_mini_results.md, copy the figures to DOCS_DIR/figures."""
    page = docs_dir / "reproduce_mini_results.md"
    (docs_dir / "figures").mkdir(parents=True, exist_ok=True)
    begin, end = f"<!-- BEGIN {section} (generated by scripts/reproduce_mini.py) -->", f"<!-- END {section} -->"
    current = page.read_text() if page.is_file() else "# Mini reproduction: softmax vs entmax attention\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in current and end in current:
        current = current[:current.index(begin)] + block + current[current.index(end) + len(end):]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    page.write_text(current)
    for figure in figures:
        shutil.copy(figure, docs_dir / "figures" / figure.name)
    return page


def run_all(cfg: ReproduceMiniConfig, out: Path, stages: Sequence[str], train_overrides: Optional[dict] = None,
            ) -> list[tuple[str, int, Path]]:
    runs = [(a, s, out / a / f"seed_{s}") for a in cfg.attentions for s in cfg.run_seeds]
    for i, (attention, seed, run_dir) in enumerate(runs, 1):
        print(f"\n{'#' * 100}\n[reproduce_mini] run {i}/{len(runs)}: attention = {attention}, seed = {seed}\n"
              f"{'#' * 100}", flush=True)
        main_job(main_job_config(cfg, attention, seed, run_dir, stages, train_overrides))
    return runs


def main(cfg: ReproduceMiniConfig) -> dict:
    from entmax_vit.analysis.figures import plot_layer_curves
    from entmax_vit.data.config_io import save_config, to_dict

    if cfg.long:
        raise ValueError("--long is the dense-degradation study: run it with scripts/reproduce_mini.py --long or "
                         "entmax_vit.jobs.degradation.main")
    start = time.perf_counter()
    out = Path(cfg.output_dir).resolve()
    save_config(cfg, out / "reproduce_mini_config.yaml")
    runs = run_all(cfg, out, ["train", "knn", "segmentation", "analysis", *(["claims"] if cfg.claims else []),
                              "random"])
    rows = [collect(run_dir, attention, seed) for attention, seed, run_dir in runs]
    (out / "results.json").write_text(json.dumps({"config": to_dict(cfg), "runs": rows}, indent=2, default=str))
    figures = [plot_probes([*rows, *random_rows(rows)], out / "reproduce_mini_seeds.png")]  # random init: bars too
    curves = plot_layer_curves(mean_per_layer(rows), out / "curves")
    figures.append(Path(shutil.copy(curves[0], out / "reproduce_mini_layer_curves.png")))
    logs = {a: [d / "train" / "metrics.jsonl" for b, _, d in runs if b == a] for a in cfg.attentions}
    loss_png = plot_losses(logs, out / "training_loss.png")
    report = markdown_report(cfg, rows, time.perf_counter() - start)
    (out / "results.md").write_text("# Mini reproduction: softmax vs entmax attention\n\n" + report)
    if cfg.docs_dir:
        page = publish(Path(cfg.docs_dir), "multi-seed", markdown_report(cfg, rows, time.perf_counter() - start,
                                                                         figures="figures/"), figures)
        print(f"[reproduce_mini] updated {page}")
    print("\n" + report)
    print(f"[reproduce_mini] wrote {out / 'results.md'}, {out / 'results.json'}, "
          f"{', '.join(str(p) for p in [*figures, loss_png] if p)}")
    return {"rows": rows, "report": out / "results.md"}
