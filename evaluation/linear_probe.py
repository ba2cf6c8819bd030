"""Linear classification probe on frozen features: protocol ``dino`` (official DINO ``eval_linear.py``, the best
epoch reported) or ``cached_grid`` (fast, NOT DINO's). Both, choice by choice: docs/evaluation.md."""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from entmax_vit.recipe import scaled_lr

from .metrics import topk_accuracy

logger = logging.getLogger(__name__)

DEFAULT_BASE_LRS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1]
DINO_BASE_LR = 0.001  # eval_linear.py --lr, for a reference batch of 256


def dino_feature_layout(hidden_size: int) -> tuple[int, bool]:
    """Official DINO's (n_last_blocks, avgpool_patchtokens) by width (eval_linear.py help: ViT-S 4, ViT-B 1 + pool)."""
    return (4, False) if hidden_size < 768 else (1, True)


class DinoTrainTransform:
    """Official eval_linear train transform (torchvision's RandomResizedCrop defaults, BILINEAR; flip), drawn
    afresh per call from torch's RNG (seeded per DataLoader worker)."""

    def __init__(self, crop: int = 224) -> None:
        from torchvision import transforms

        from entmax_vit.modeling import IMAGENET_MEAN, IMAGENET_STD

        self.crop = crop
        self.crop_transform = transforms.RandomResizedCrop(crop, interpolation=transforms.InterpolationMode.BILINEAR)
        self.transform = transforms.Compose([self.crop_transform, transforms.RandomHorizontalFlip(),
                                             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def describe(self) -> str:
        return f"rrc{self.crop}_bilinear_flip_imagenetnorm"

    def __call__(self, image) -> torch.Tensor:
        return self.transform(image)


def probe_inputs(cls: torch.Tensor, patch_mean: torch.Tensor, n: int, avgpool: bool) -> torch.Tensor:
    """(B, L, D) [CLS] of the last L blocks + (B, D) mean patch token -> (B, n*D [+ D]) probe input."""
    if n > cls.shape[1]:
        raise ValueError(f"n_last_blocks {n} > the {cls.shape[1]} blocks extracted")
    x = cls[:, -n:].flatten(1)
    # DINO interleaves [CLS] and mean-patch channels; concatenating only permutes an i.i.d.-init Linear's inputs
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
        # one probe input per feature layout, shared by the heads that read it
        layouts = dict.fromkeys((s.n_last_blocks, s.avgpool) for s in self.specs)
        inputs = {key: probe_inputs(cls, patch_mean, *key) for key in layouts}
        return [head(inputs[s.n_last_blocks, s.avgpool]) for s, head in zip(self.specs, self.heads)]


def make_optimizer(grid: LinearGrid, batch_size: int, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with one parameter group per head at ``scaled_lr(head.base_lr, batch_size)``."""
    groups = [{"params": head.parameters(), "lr": scaled_lr(s.base_lr, batch_size)}
              for s, head in zip(grid.specs, grid.heads)]
    return torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay)


def train_grid(grid: LinearGrid, batches: Callable[[], Iterable], *, epochs: int, batch_size: int,
               momentum: float = 0.9, weight_decay: float = 0.0, evaluate: Optional[Callable] = None,
               show: bool = True) -> list[dict]:
    """Train every head as DINO (SGD, CosineAnnealingLR per epoch) on ``batches()``, rows not ``valid`` counted
    as ``skipped``; ``evaluate(grid, epoch)`` runs after every epoch, its dict (None: not evaluated) joins the log."""
    opt = make_optimizer(grid, batch_size, momentum, weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    log = []
    for epoch in tqdm(range(epochs), desc="linear probe", disable=not show):
        losses, skipped = [], 0
        for cls, patch_mean, labels, valid in batches():
            skipped += int((~valid).sum())
            if valid.any():  # one step of every head: the summed loss keeps each head's gradient its own
                loss = torch.stack([nn.functional.cross_entropy(logits, labels[valid])
                                    for logits in grid(cls[valid], patch_mean[valid])])
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                losses.append(float(loss.detach().mean()))
        entry = {"epoch": epoch + 1, "loss": sum(losses) / max(len(losses), 1), "lr": schedule.get_last_lr()[0],
                 "skipped": skipped}
        schedule.step()
        entry.update((evaluate(grid, epoch + 1) if evaluate is not None else None) or {})
        log.append(entry)
        if show and "eval" in entry:
            logger.info("epoch %d: loss %.4f, eval top-1 %s", epoch + 1, entry["loss"],
                        " ".join(f"{e['top1']:.2f}" for e in entry["eval"]))
    return log


def train_grid_cached(grid: LinearGrid, feats: dict[str, torch.Tensor], *, seed: int = 0,
                      device: Optional[torch.device | str] = None, **kwargs: Any) -> list[dict]:
    """``train_grid`` on cached features (reshuffled each epoch), moved once to ``device`` (default: the grid's)."""
    grid.to(device if device is not None else next(grid.parameters()).device)
    device = next(grid.parameters()).device
    feats = {k: feats[k].to(device) for k in ("cls", "patch_mean", "labels")}
    g = torch.Generator().manual_seed(seed)
    n, size = len(feats["labels"]), kwargs["batch_size"]

    def batches():
        order = torch.randperm(n, generator=g)
        for start in range(0, n, size):
            idx = order[start : start + size].to(device)
            yield feats["cls"][idx], feats["patch_mean"][idx], feats["labels"][idx], torch.ones_like(idx, dtype=bool)

    return train_grid(grid, batches, **kwargs)


@torch.no_grad()
def evaluate_grid(grid: LinearGrid, feats: dict[str, torch.Tensor], batch_size: int = 4096) -> list[dict[str, float]]:
    """Top-1/top-5 (percent) of every head on ``feats`` (computed where the grid is, e.g. the accelerator)."""
    device = next(grid.parameters()).device
    logits = [[] for _ in grid.heads]
    for start in range(0, len(feats["labels"]), batch_size):
        chunk = slice(start, start + batch_size)
        for i, out in enumerate(grid(feats["cls"][chunk].to(device), feats["patch_mean"][chunk].to(device))):
            logits[i].append(out.cpu())
    accs = [topk_accuracy(torch.cat(l), feats["labels"].long().cpu(), (1, 5)) for l in logits]
    return [{"top1": a[1], "top5": a[5]} for a in accs]


def best_epoch(log: list[dict], head: int = 0, key: str = "eval") -> dict:
    """The epoch with the highest ``key`` top-1 of ``head``, the earliest on ties (DINO reports its best epoch)."""
    rows = [e for e in log if key in e]
    if not rows:
        raise ValueError(f"no epoch of the log has {key!r} results")
    return max(rows, key=lambda e: (e[key][head]["top1"], -e["epoch"]))


# --- Entry point (scripts/eval_linear.py)
@dataclass
class LinearEvalConfig:
    """Linear probe of a frozen backbone: official DINO eval_linear (default) or the fast cached lr grid."""

    model: str = ""                      # EntmaxViT folder, training output dir, or Hub id
    revision: Optional[str] = None       # Hub revision (branch, tag or commit)
    dataset: str = "embedded"            # Hub id, imagefolder:DIR, webdataset:GLOB, saved folder, or "embedded"
    train_split: str = "train"           # split the linear head is trained on
    eval_split: str = "validation"       # split the reported accuracy is measured on
    image_column: Optional[str] = None   # image column; default: detected (an Image feature: image, img, ...)
    label_column: Optional[str] = None   # label column; default: detected (a ClassLabel: label, labels, ...)
    max_train_samples: Optional[int] = None  # use only the first N train images (quick runs); None = all
    max_eval_samples: Optional[int] = None   # use only the first N eval images; None = all
    streaming: bool = False              # read the splits on the fly (cached_grid only)
    # dino: official eval_linear (augmented crops every epoch, one lr, best epoch reported);
    # cached_grid: fast, NOT official (centre-crop features cached once, a grid of lrs, best head's last epoch)
    protocol: Literal["dino", "cached_grid"] = "dino"
    # [CLS] of the last n blocks; empty = DINO's choice by width (4 for ViT-S and narrower, 1 for ViT-B and wider).
    # Several values train a grid of heads (cached_grid, or dino with a grid: then not the official protocol).
    n_last_blocks: list[int] = field(default_factory=list)
    avgpool_patchtokens: list[bool] = field(default_factory=list)  # empty = DINO's choice (False ViT-S, True ViT-B)
    base_lrs: list[float] = field(default_factory=list)  # x batch_size/256; empty = [0.001] (dino), 13-value grid (cached_grid)
    epochs: int = 100                    # training epochs of the head(s), cosine lr over them; DINO: 100
    batch_size: int = 1024               # global batch; DINO: 128 per GPU x 8
    momentum: float = 0.9                # SGD momentum; DINO: 0.9
    weight_decay: float = 0.0            # SGD weight decay of the head(s); DINO: 0
    eval_every: int = 1                  # dino: evaluate every this many epochs (and after the last); DINO: 1
    holdout_fraction: float = 0.0        # > 0: select on this share of train, report eval of the chosen head/epoch
    resize: Optional[int] = None         # bicubic Resize of the shorter side (px); None: 256/224 of the crop
    # CenterCrop side (px), also the dino protocol's RandomResizedCrop size. None: the model's own resolution
    crop: Optional[int] = None
    extract_batch_size: Optional[int] = None  # images per extraction batch; None: sized to the machine (256 / 64)
    num_workers: Optional[int] = None    # decoding workers; None: sized to the machine (GPU: up to 8 per process, CPU: 0)
    seed: int = 0                        # seed of the heads' initialisation, data order and the hold-out split
    cache_dir: Optional[str] = None      # feature cache (default OUTPUT_DIR/feature_cache); "" disables
    dataset_cache_dir: Optional[str] = None  # datasets cache folder for downloads; None = the HF cache
    output_dir: str = "outputs/eval_linear"  # results_linear.json, grid.json, the resolved config, feature cache


def resolve_heads(cfg: LinearEvalConfig, hidden_size: int, depth: int) -> list[HeadSpec]:
    """The heads to train: the config's lists, empty lists filled with DINO's choices."""
    n_default, avgpool_default = dino_feature_layout(hidden_size)
    ns = list(cfg.n_last_blocks) or [min(n_default, depth)]
    pools = list(cfg.avgpool_patchtokens) or [avgpool_default]
    lrs = list(cfg.base_lrs) or ([DINO_BASE_LR] if cfg.protocol == "dino" else list(DEFAULT_BASE_LRS))
    if max(ns) > depth or min(ns) < 1:
        raise ValueError(f"n_last_blocks {ns} must be in 1..{depth}")
    if min(lrs) <= 0:
        raise ValueError(f"base_lrs must be positive, got {lrs}")
    return [HeadSpec(n, a, lr) for n in ns for a in pools for lr in lrs]


def is_official(cfg: LinearEvalConfig, specs: list[HeadSpec], hidden_size: int) -> bool:
    """Every choice official DINO eval_linear's (the batch size may differ: the lr follows it by the scaling rule)."""
    if cfg.protocol != "dino" or len(specs) != 1:
        return False
    spec = specs[0]
    return (spec.base_lr == DINO_BASE_LR and (spec.n_last_blocks, spec.avgpool) == dino_feature_layout(hidden_size)
            and cfg.epochs == 100 and cfg.momentum == 0.9 and cfg.weight_decay == 0.0 and cfg.eval_every == 1
            and (cfg.resize, cfg.crop) == (256, 224) and cfg.holdout_fraction == 0.0)


def main(cfg: LinearEvalConfig) -> dict:
    """Extract features, train the head(s), write ``results_linear.json`` and ``grid.json`` (every head, the log)."""
    from entmax_vit.data.datasets import find_column, open_dataset

    from .features import block_outputs, on_main_rank, prepare_classification, split_features
    from .image_data import ClassificationRows, num_classes_of
    from .results import finish_run

    if cfg.streaming and cfg.protocol == "dino":
        raise ValueError("protocol 'dino' runs the backbone on augmented crops of a map-style dataset: "
                         "use --no_streaming or --protocol cached_grid")
    if not 0.0 <= cfg.holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {cfg.holdout_fraction}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.eval_every < 1:
        raise ValueError(f"epochs, batch_size and eval_every must be >= 1, got {cfg.epochs}, {cfg.batch_size}, "
                         f"{cfg.eval_every}")
    cfg, accelerator, model, common = prepare_classification(cfg, "extract_batch_size", seed=cfg.seed)
    show = accelerator.is_local_main_process
    specs = resolve_heads(cfg, model.config.hidden_size, model.config.num_hidden_layers)
    common["n_last_blocks"] = n_max = max(s.n_last_blocks for s in specs)
    test, test_info = split_features(model, split=cfg.eval_split, max_samples=cfg.max_eval_samples, **common)
    # Centre-crop train features: the cached grid trains on them; the dino protocol needs them only to hold out.
    need_train_feats = cfg.protocol == "cached_grid" or cfg.holdout_fraction > 0
    if need_train_feats:
        train, train_info = split_features(model, split=cfg.train_split, max_samples=cfg.max_train_samples, **common)
    if cfg.protocol == "dino":
        train_ds = open_dataset(cfg.dataset, cfg.train_split, cfg.dataset_cache_dir, cfg.max_train_samples,
                                accelerator=accelerator)
        image_col = find_column(train_ds, "image", cfg.image_column)
        label_col = find_column(train_ds, "label", cfg.label_column)
        if not need_train_feats:  # unreadable train images are counted during the first epoch (below)
            train_info = {"num_samples": len(train_ds), "num_classes": num_classes_of(train_ds, label_col)}
    num_classes = max(train_info["num_classes"], test_info["num_classes"])

    # Hold-out selection set, chosen by row index (a stream's indices are ranked first: it has no rows 0..N-1).
    held = torch.zeros(train_info["num_samples"], dtype=torch.bool)
    if need_train_feats:
        row_ids = train["index"].long()
        if cfg.streaming:
            row_ids = torch.empty_like(row_ids).scatter_(0, row_ids.argsort(), torch.arange(len(row_ids)))
        held = torch.zeros(max(len(held), int(row_ids.max()) + 1), dtype=torch.bool)
    if cfg.holdout_fraction > 0:
        perm = torch.randperm(len(held), generator=torch.Generator().manual_seed(cfg.seed))
        held[perm[: max(1, int(cfg.holdout_fraction * len(held)))]] = True
    keys = ("cls", "patch_mean", "labels")
    select = {k: train[k][held[row_ids]] for k in keys} if cfg.holdout_fraction > 0 else test
    key = "select" if cfg.holdout_fraction > 0 else "eval"

    def evaluate(g: LinearGrid, epoch: int) -> Optional[dict]:  # every eval_every epochs and after the last
        if epoch % cfg.eval_every and epoch != cfg.epochs:
            return None
        return {"eval": evaluate_grid(g, test), **({"select": evaluate_grid(g, select)} if key == "select" else {})}

    torch.manual_seed(cfg.seed)  # dino protocol: identical heads on every rank, each stepping the same gathered batches
    grid = LinearGrid(specs, model.config.hidden_size, num_classes)
    if cfg.protocol == "cached_grid":
        fit = {k: train[k][~held[row_ids]] for k in keys}
        num_fit = len(fit["labels"])

        def fit_grid() -> tuple:  # the last epoch of every head
            log = train_grid_cached(grid, fit, epochs=cfg.epochs, batch_size=cfg.batch_size, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, seed=cfg.seed, show=show, device=accelerator.device)
            return log, [{"epoch": cfg.epochs, **evaluate(grid, cfg.epochs)}] * len(specs)

        log, bests = on_main_rank(accelerator, fit_grid)
    else:
        rows = ClassificationRows(train_ds, image_col, label_col, DinoTrainTransform(cfg.crop))
        rows = torch.utils.data.Subset(rows, (~held[: len(rows)]).nonzero().flatten().tolist())
        num_fit = len(rows)
        per_rank = max(1, cfg.batch_size // accelerator.num_processes)
        loader = accelerator.prepare(torch.utils.data.DataLoader(rows, batch_size=per_rank, shuffle=True,
                                                                 num_workers=cfg.num_workers))

        def crops():  # DINO's loop: every epoch runs the frozen backbone on freshly augmented crops
            for batch in tqdm(loader, desc="train crops", disable=not show, leave=False):
                batch = {k: batch[k].to(accelerator.device) for k in ("pixel_values", "labels", "valid")}
                cls, patches = block_outputs(model, batch["pixel_values"], n_max)
                # gather (not gather_for_metrics): every rank steps its identical heads on the same rows
                cls, patch_mean, labels, valid = accelerator.gather((cls, patches.mean(1), batch["labels"],
                                                                     batch["valid"]))
                yield cls, patch_mean, labels, valid.bool()

        log = train_grid(grid.to(accelerator.device), crops, epochs=cfg.epochs, batch_size=cfg.batch_size,
                         momentum=cfg.momentum, weight_decay=cfg.weight_decay, evaluate=evaluate, show=show)
        if not need_train_feats:
            train_info["num_skipped"] = log[0]["skipped"]
        bests = [best_epoch(log, i, key) for i in range(len(specs))]  # DINO reports its best epoch
    best = max(range(len(specs)), key=lambda i: bests[i][key][i]["top1"])  # the best head on the selection split
    at = bests[best]["eval"][best]
    metrics = {"top1": at["top1"], "top5": at["top5"]}
    if cfg.protocol == "dino":
        metrics["top1_last_epoch"] = log[-1]["eval"][best]["top1"]
        reported = {"reported": "best_epoch", "best_epoch": bests[best]["epoch"]}
    else:
        reported = {"reported": "last_epoch"}
    reported["selection_top1"] = bests[best][key][best]["top1"]
    table = [{"head": s.name, "n_last_blocks": s.n_last_blocks, "avgpool": s.avgpool, "base_lr": s.base_lr,
              "lr": scaled_lr(s.base_lr, cfg.batch_size), "select_top1": b[key][i]["top1"],
              "eval_top1": b["eval"][i]["top1"], "eval_top5": b["eval"][i]["top5"],
              **({"best_epoch": b["epoch"]} if cfg.protocol == "dino" else {})}
             for i, (s, b) in enumerate(zip(specs, bests))]
    spec = specs[best]
    # several heads on DINO's crops: the best head is a selection DINO does not make
    name = "cached_grid" if cfg.protocol == "cached_grid" else "dino_eval_linear" + ("_grid" if len(specs) > 1 else "")
    logger.info("%s, head %s: top-1 %.2f top-5 %.2f", name, spec.name, metrics["top1"], metrics["top5"])
    record = finish_run(
        "linear", cfg, model, accelerator, metrics=metrics,
        dataset={"num_samples": len(test["labels"]), "num_train_samples": num_fit, "num_classes": num_classes,
                 "num_skipped": train_info["num_skipped"] + test_info["num_skipped"]},
        protocol={"name": name, "official": is_official(cfg, specs, model.config.hidden_size), **reported,
                  "head": spec.name, "n_last_blocks": spec.n_last_blocks, "avgpool_patchtokens": spec.avgpool,
                  "base_lr": spec.base_lr, "lr": scaled_lr(spec.base_lr, cfg.batch_size), "epochs": cfg.epochs,
                  "batch_size": cfg.batch_size, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
                  "schedule": "cosine_per_epoch", "grid_size": len(specs),
                  "selection": "holdout" if cfg.holdout_fraction > 0 else cfg.eval_split,
                  "train_transform": "center_crop_cached" if cfg.protocol == "cached_grid"
                  else DinoTrainTransform(cfg.crop).describe(), "eval_transform": common["transform"].describe()})
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        (out / "grid.json").write_text(json.dumps({"heads": table, "log": log}, indent=2))
        if len(specs) > 1:
            _plot_grid(table, out / "linear_grid.png")
        print(f"[eval_linear] {name} {spec.name}: top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f} "
              f"({reported['reported'].replace('_', ' ')}) -> {out / 'results_linear.json'}")
    return record


def _plot_grid(table: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: see analysis/figures.py

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
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
