"""Linear classification probe on frozen features (official DINO ``eval_linear.py``), training a grid of heads
in one pass (DINOv2 style).

Feature of an image: the final-normed [CLS] of the last ``n`` blocks concatenated (ViT-S: n = 4), optionally
followed by the mean of the last block's patch tokens (``avgpool``). Each head is a Linear layer initialised
N(0, 0.01), trained with SGD (momentum 0.9, no weight decay) at lr = base_lr x batch_size / 256 with a cosine
schedule over the epochs (DINO: base_lr 0.001, 100 epochs). Every (n, avgpool, base_lr) combination is one
head; all heads see the same batches, and the best on the selection split is reported.

Two modes:
    cached     train on cached center-crop features (Resize 256 + CenterCrop 224): one backbone pass for the
               whole grid. A documented deviation from DINO, which augments (RandomResizedCrop + flip).
    augmented  DINO's train augmentation: every epoch runs the backbone on freshly augmented crops.
Selection: on the eval split (as DINO/DINOv2 report), or on ``holdout_fraction`` of the train split held
out, which gives an unbiased eval-split accuracy.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .metrics import topk_accuracy

logger = logging.getLogger(__name__)

DEFAULT_BASE_LRS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1]


def probe_inputs(cls: torch.Tensor, patch_mean: torch.Tensor, n: int, avgpool: bool) -> torch.Tensor:
    """(B, L, D) [CLS] of the last L blocks + (B, D) mean patch token -> (B, n*D [+ D]) probe input."""
    if n > cls.shape[1]:
        raise ValueError(f"n_last_blocks {n} > the {cls.shape[1]} blocks extracted")
    x = cls[:, -n:].flatten(1)
    return torch.cat([x, patch_mean], dim=1) if avgpool else x


@dataclass(frozen=True)
class HeadSpec:
    n_last_blocks: int
    avgpool: bool
    base_lr: float

    @property
    def name(self) -> str:
        return f"n{self.n_last_blocks}_{'avgpool_' if self.avgpool else ''}lr{self.base_lr:g}"


class LinearGrid(nn.Module):
    """One Linear head per HeadSpec, trained side by side."""

    def __init__(self, specs: list[HeadSpec], dim: int, num_classes: int) -> None:
        super().__init__()
        self.specs = specs
        self.heads = nn.ModuleList()
        for s in specs:
            head = nn.Linear(dim * s.n_last_blocks + (dim if s.avgpool else 0), num_classes)
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
            self.heads.append(head)

    def forward(self, cls: torch.Tensor, patch_mean: torch.Tensor) -> list[torch.Tensor]:
        cache: dict = {}
        out = []
        for s, head in zip(self.specs, self.heads):
            key = (s.n_last_blocks, s.avgpool)
            if key not in cache:
                cache[key] = probe_inputs(cls, patch_mean, *key)
            out.append(head(cache[key]))
        return out


def make_optimizer(grid: LinearGrid, batch_size: int, momentum: float, weight_decay: float) -> torch.optim.SGD:
    groups = [{"params": head.parameters(), "lr": s.base_lr * batch_size / 256, "initial_lr": s.base_lr * batch_size / 256}
              for s, head in zip(grid.specs, grid.heads)]
    return torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay)


def train_step(grid: LinearGrid, opt: torch.optim.Optimizer, cls: torch.Tensor, patch_mean: torch.Tensor,
               labels: torch.Tensor) -> float:
    """One SGD step of every head (the summed loss keeps each head's gradient its own); mean loss."""
    losses = [nn.functional.cross_entropy(logits, labels) for logits in grid(cls, patch_mean)]
    opt.zero_grad(set_to_none=True)
    torch.stack(losses).sum().backward()
    opt.step()
    return float(torch.stack(losses).detach().mean())


def set_cosine_lr(opt: torch.optim.Optimizer, epoch: int, epochs: int) -> None:
    """DINO: CosineAnnealingLR(T_max=epochs, eta_min=0) stepped once per epoch."""
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


@torch.no_grad()
def evaluate_grid(grid: LinearGrid, cls: torch.Tensor, patch_mean: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 4096) -> list[dict[int, float]]:
    """Top-1/top-5 (percent) of every head."""
    logits = [[] for _ in grid.heads]
    for start in range(0, len(labels), batch_size):
        for i, out in enumerate(grid(cls[start : start + batch_size], patch_mean[start : start + batch_size])):
            logits[i].append(out)
    return [topk_accuracy(torch.cat(l), labels.long(), (1, 5)) for l in logits]


def train_grid_cached(grid: LinearGrid, feats: dict[str, torch.Tensor], *, epochs: int, batch_size: int,
                      momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0, show: bool = True) -> list[dict]:
    """Train every head on cached features (shuffled mini-batches each epoch); returns the epoch log."""
    opt = make_optimizer(grid, batch_size, momentum, weight_decay)
    g = torch.Generator().manual_seed(seed)
    n = len(feats["labels"])
    log = []
    for epoch in tqdm(range(epochs), desc="linear probe", disable=not show):
        set_cosine_lr(opt, epoch, epochs)
        order = torch.randperm(n, generator=g)
        losses = []
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            losses.append(train_step(grid, opt, feats["cls"][idx], feats["patch_mean"][idx], feats["labels"][idx]))
        log.append({"epoch": epoch + 1, "loss": sum(losses) / max(len(losses), 1)})
    return log


# ----------------------------------------------------------------------------------------------------------
# Entry point (scripts/eval_linear.py)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class LinearEvalConfig:
    """Linear probe of a frozen backbone (DINO protocol, DINOv2-style lr grid)."""

    model: str = ""                      # EntmaxViT folder, training output dir, or Hub id
    revision: Optional[str] = None
    dataset: str = "embedded"
    train_split: str = "train"
    eval_split: str = "validation"
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    streaming: bool = False              # read the splits on the fly (cached mode only)
    mode: Literal["cached", "augmented"] = "cached"  # cached: center-crop features once (fast, deviation)
    n_last_blocks: list[int] = field(default_factory=lambda: [4])   # grid over n; DINO: 4 for ViT-S, 1 for ViT-B
    avgpool_patchtokens: list[bool] = field(default_factory=lambda: [False])  # grid; DINO ViT-B: true
    base_lrs: list[float] = field(default_factory=lambda: list(DEFAULT_BASE_LRS))  # x batch_size/256; DINO: 0.001
    epochs: int = 100
    batch_size: int = 1024               # DINO: 128 per GPU x 8
    momentum: float = 0.9
    weight_decay: float = 0.0
    holdout_fraction: float = 0.0        # > 0: select on this share of train, report eval of the chosen head
    resize: int = 256                    # eval transform: Resize(resize, bicubic) + CenterCrop(crop)
    crop: int = 224
    extract_batch_size: int = 64
    num_workers: int = 0
    seed: int = 0
    cache_dir: Optional[str] = None      # feature cache (default OUTPUT_DIR/feature_cache); "" disables
    dataset_cache_dir: Optional[str] = None
    output_dir: str = "outputs/eval_linear"


def main(cfg: LinearEvalConfig) -> dict:
    """Extract features, train the grid, pick the best head, write ``results_linear.json`` and ``grid.json``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from entmax_vit.cli.config import save_config, to_dict

    from .features import block_outputs, load_backbone, model_fingerprint, split_features
    from .image_data import ClassificationRows, ClassificationTransform, find_column, open_dataset
    from .results import make_results, write_results

    if not cfg.model:
        raise ValueError("--model is required (an EntmaxViT folder, training output dir or Hub id)")
    if not cfg.base_lrs or not cfg.n_last_blocks or not cfg.avgpool_patchtokens:
        raise ValueError("base_lrs, n_last_blocks and avgpool_patchtokens must each list at least one value")
    if cfg.streaming and cfg.mode == "augmented":
        raise ValueError("mode 'augmented' needs a map-style dataset: use --streaming false or --mode cached")
    if not 0.0 <= cfg.holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {cfg.holdout_fraction}")
    accelerator = Accelerator()
    set_seed(cfg.seed)
    show = accelerator.is_local_main_process
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        save_config(cfg, out / "eval_linear_config.yaml")
    model = load_backbone(cfg.model, cfg.revision, accelerator.device)
    depth = model.config.num_hidden_layers
    if max(cfg.n_last_blocks) > depth or min(cfg.n_last_blocks) < 1:
        raise ValueError(f"n_last_blocks {cfg.n_last_blocks} must be in 1..{depth}")
    n_max = max(cfg.n_last_blocks)
    eval_tf = ClassificationTransform(cfg.resize, cfg.crop, augment=False)
    cache = str(out / "feature_cache") if cfg.cache_dir is None else (cfg.cache_dir or None)
    common = dict(model_spec=model_fingerprint(cfg.model, cfg.revision, model), dataset=cfg.dataset,
                  transform=eval_tf, n_last_blocks=n_max, image_column=cfg.image_column, label_column=cfg.label_column,
                  batch_size=cfg.extract_batch_size, num_workers=cfg.num_workers, cache_dir=cache,
                  dataset_cache_dir=cfg.dataset_cache_dir, accelerator=accelerator, streaming=cfg.streaming)
    train, train_info = split_features(model, split=cfg.train_split, max_samples=cfg.max_train_samples, **common)
    test, test_info = split_features(model, split=cfg.eval_split, max_samples=cfg.max_eval_samples, **common)
    num_classes = max(train_info["num_classes"], test_info["num_classes"])

    # Hold-out selection set: chosen by row index, so both modes hold out the same images.
    # (A stream has no row numbers 0..N-1: there the indices are ranked first.)
    row_ids = train["index"].long()
    if cfg.streaming:
        row_ids = torch.empty_like(row_ids).scatter_(0, row_ids.argsort(), torch.arange(len(row_ids)))
    held = torch.zeros(max(train_info["num_samples"], int(row_ids.max()) + 1), dtype=torch.bool)
    if cfg.holdout_fraction > 0:
        perm = torch.randperm(len(held), generator=torch.Generator().manual_seed(cfg.seed))
        held[perm[: max(1, int(cfg.holdout_fraction * len(held)))]] = True
    in_holdout = held[row_ids]
    fit = {k: train[k][~in_holdout] for k in ("cls", "patch_mean", "labels")}
    select = {k: train[k][in_holdout] for k in ("cls", "patch_mean", "labels")} if cfg.holdout_fraction > 0 else test

    specs = [HeadSpec(n, a, lr) for n in cfg.n_last_blocks for a in cfg.avgpool_patchtokens for lr in cfg.base_lrs]
    torch.manual_seed(cfg.seed)  # identical heads on every rank: each trains on the same gathered batches
    grid = LinearGrid(specs, model.config.hidden_size, num_classes)
    if cfg.mode == "cached":
        log = train_grid_cached(grid, fit, epochs=cfg.epochs, batch_size=cfg.batch_size, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, seed=cfg.seed, show=show)
    else:
        ds = open_dataset(cfg.dataset, cfg.train_split, cfg.dataset_cache_dir, cfg.max_train_samples)
        rows = ClassificationRows(ds, find_column(ds, "image", cfg.image_column), find_column(ds, "label", cfg.label_column),
                                  ClassificationTransform(cfg.resize, cfg.crop, augment=True))
        rows = torch.utils.data.Subset(rows, (~held).nonzero().flatten().tolist())
        per_rank = max(1, cfg.batch_size // accelerator.num_processes)
        loader = accelerator.prepare(torch.utils.data.DataLoader(rows, batch_size=per_rank, shuffle=True,
                                                                 num_workers=cfg.num_workers, drop_last=len(rows) > per_rank))
        opt = make_optimizer(grid, cfg.batch_size, cfg.momentum, cfg.weight_decay)
        grid.to(accelerator.device)
        log = []
        for epoch in range(cfg.epochs):
            set_cosine_lr(opt, epoch, cfg.epochs)
            losses = []
            for batch in tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show, leave=False):
                cls, patches = block_outputs(model, batch["pixel_values"], n_max)
                # gather (not gather_for_metrics): every rank steps its identical heads on the global batch
                g = accelerator.gather({"cls": cls, "pm": patches.mean(1), "y": batch["labels"], "v": batch["valid"]})
                v = g["v"].bool()
                if v.any():
                    losses.append(train_step(grid, opt, g["cls"][v], g["pm"][v], g["y"][v]))
            log.append({"epoch": epoch + 1, "loss": sum(losses) / max(len(losses), 1)})
        grid.cpu()

    sel = evaluate_grid(grid, select["cls"], select["patch_mean"], select["labels"])
    best = max(range(len(specs)), key=lambda i: sel[i][1])
    final = evaluate_grid(grid, test["cls"], test["patch_mean"], test["labels"])
    table = [{"head": s.name, "n_last_blocks": s.n_last_blocks, "avgpool": s.avgpool, "base_lr": s.base_lr,
              "lr": s.base_lr * cfg.batch_size / 256, "select_top1": sel[i][1], "eval_top1": final[i][1],
              "eval_top5": final[i][5]} for i, s in enumerate(specs)]
    metrics = {"top1": final[best][1], "top5": final[best][5]}
    spec = specs[best]
    logger.info("best head %s: top-1 %.2f top-5 %.2f", spec.name, metrics["top1"], metrics["top5"])
    record = make_results(
        task="linear",
        model_name_or_path=cfg.model,
        model_config=model.config.to_dict(),
        dataset={"name": cfg.dataset, "split": cfg.eval_split, "train_split": cfg.train_split,
                 "num_samples": len(test["labels"]), "num_train_samples": len(fit["labels"]), "num_classes": num_classes,
                 "num_skipped": train_info["num_skipped"] + test_info["num_skipped"]},
        protocol={"name": "dino_linear", "mode": cfg.mode, "best_head": spec.name, "n_last_blocks": spec.n_last_blocks,
                  "avgpool_patchtokens": spec.avgpool, "base_lr": spec.base_lr, "lr": spec.base_lr * cfg.batch_size / 256,
                  "epochs": cfg.epochs, "batch_size": cfg.batch_size, "grid_size": len(specs),
                  "selection": "holdout" if cfg.holdout_fraction > 0 else cfg.eval_split,
                  "train_transform": "center_crop_cached" if cfg.mode == "cached" else "random_resized_crop_flip",
                  "eval_transform": eval_tf.describe()},
        metrics=metrics,
        config=to_dict(cfg),
    )
    if accelerator.is_main_process:
        write_results(record, out / "results_linear.json")
        (out / "grid.json").write_text(json.dumps({"heads": table, "log": log}, indent=2))
        _plot_grid(table, out / "linear_grid.png")
        print(f"[eval_linear] best {spec.name}: top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} -> {out / 'results_linear.json'}")
    return record


def _plot_grid(table: list[dict], path: Path) -> None:
    """Eval top-1 against the learning rate, one curve per feature variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in sorted({(r["n_last_blocks"], r["avgpool"]) for r in table}):
        rows = sorted((r for r in table if (r["n_last_blocks"], r["avgpool"]) == key), key=lambda r: r["base_lr"])
        ax.plot([r["base_lr"] for r in rows], [r["eval_top1"] for r in rows], marker="o",
                label=f"n={key[0]}{' + avgpool' if key[1] else ''}")
    ax.set_xscale("log")
    ax.set_xlabel("base lr (x batch/256)")
    ax.set_ylabel("top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["DEFAULT_BASE_LRS", "HeadSpec", "LinearEvalConfig", "LinearGrid", "evaluate_grid", "main", "probe_inputs",
           "train_grid_cached", "train_step"]
