"""Linear semantic-segmentation probe on a frozen backbone: NeCo/Leopart and DINOv2 linear (docs/evaluation.md).
Logits at patch resolution, then upsampled: for a 1x1 conv this equals NeCo's "upsample features, then conv" exactly."""

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from entmax_vit.modeling.segmentation_head import LinearSegmentationHead, SegmentationHeadConfig

from .metrics import confusion_matrix, segmentation_scores

logger = logging.getLogger(__name__)


@dataclass
class SegmentationEvalConfig:
    """Linear segmentation probe. Presets: voc, ade20k, cityscapes (NeCo), *_dinov2, embedded."""

    model: str = ""                        # EntmaxViT folder, training output dir, or Hub id
    revision: Optional[str] = None         # Hub revision (branch, tag or commit)
    dataset: str = "embedded"              # Hub id, saved folder, ... with an image and a mask column
    train_split: str = "train"             # split the head is trained on
    eval_split: str = "validation"         # split the reported mIoU is measured on
    image_column: Optional[str] = None     # image column; default: detected (image, img, ...)
    mask_column: Optional[str] = None      # mask column; default: detected (mask, annotation, label, ...)
    max_train_samples: Optional[int] = None  # use only the first N train images (quick runs); None = all
    max_eval_samples: Optional[int] = None   # use only the first N eval images; None = all
    dataset_cache_dir: Optional[str] = None  # datasets cache folder for downloads; None = the HF cache

    # --- labels

    num_classes: int = 0                   # 0: from class_names, else inferred from the train masks
    # Class names in label-id order, for the per-class IoU and the head's id2label (their count is num_classes
    # when that is 0); empty: the ids as names (embedded: its own names).
    class_names: list[str] = field(default_factory=list)
    ignore_index: int = 255                # mask value left out of the loss and the mIoU (VOC, Cityscapes: 255)
    reduce_zero_label: bool = False        # ADE20K: 0 -> ignore, c -> c - 1
    # Mask ids as stored (none), raw Cityscapes labelIds -> trainIds (cityscapes_ids), or auto: cityscapes_ids
    # if the first masks hold values 19..33.
    label_mapping: Literal["none", "cityscapes_ids", "auto"] = "none"

    # --- probe

    # neco: NeCo/Leopart (square input, masks at mask_size, SGD with a step); dinov2: DINOv2 linear (rescaled
    # crops, sliding-window eval, logits at the label size). The presets set the rest to match.
    protocol: Literal["neco", "dinov2"] = "neco"
    layers: list[int] = field(default_factory=lambda: [-1])  # blocks whose patch tokens are used (0-based)
    backbone_norm: bool = True             # final LayerNorm on each block's tokens
    use_cls_token: bool = False            # concatenate [CLS] to every patch feature
    batch_norm: bool = False               # BN before the 1x1 conv (DINOv2 linear)
    # NeCo: square input side; DINOv2: shorter side and crop/window size. None: the model's own resolution (its
    # training size, evaluation/resolution.py); the presets set their protocol's (NeCo 448), with a warning when it
    # differs from the model's.
    input_size: Optional[int] = None
    mask_size: int = 100                   # NeCo: labels nearest-resized to mask_size^2, mIoU at that size

    # --- optimisation

    optimizer: Literal["sgd", "adamw"] = "sgd"  # optimiser of the head: sgd (NeCo) | adamw (DINOv2)
    lr: float = 0.01                       # head lr: start (step) or peak (warmup_cosine); NeCo 0.01, DINOv2 1e-3
    momentum: float = 0.9                  # SGD momentum (optimizer sgd only; NeCo 0.9)
    weight_decay: float = 1e-4             # weight decay of the head (NeCo 1e-4, DINOv2 1e-3)
    epochs: int = 25                       # training epochs (NeCo: 25 VOC/Cityscapes, 20 ADE20K); see max_iters
    max_iters: Optional[int] = None        # if set, train this many iterations instead (DINOv2: 40000)
    lr_schedule: Literal["step", "warmup_cosine"] = "step"  # step: NeCo; warmup_cosine: DINOv2, per iteration
    step_epochs: list[int] = field(default_factory=lambda: [20])  # "step": lr x step_gamma at these epochs
    step_gamma: float = 0.1                # "step": factor applied to the lr at each of step_epochs
    warmup_iters: int = 0                  # "warmup_cosine": linear warmup (DINOv2: 1500)
    batch_size: int = 16                   # training images per step and process
    hflip: bool = True                     # flip training images and masks horizontally with p 0.5
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # dinov2: train rescale factor range
    cache_features: bool = False           # NeCo only: extract train features once (no flip augmentation)

    # --- evaluation

    eval_stride: int = 341                 # DINOv2 sliding-window stride (window = input_size)
    eval_batch_size: int = 16              # NeCo eval batch (DINOv2 evaluates one image at a time)
    head_path: Optional[str] = None        # evaluate this saved head folder instead of training one
    num_workers: int = 0                   # DataLoader worker processes (train and eval); 0 = the main process
    seed: int = 0                          # seed of the head's initialisation, data order and augmentation
    # results_segmentation.json, segmentation_head/, per_class_iou.{json,png}, train_log.json, resolved config
    output_dir: str = "outputs/eval_segmentation"


# --- Schedules (per iteration, as DINO) and prediction
def lr_schedule(cfg: SegmentationEvalConfig, iters_per_epoch: int, total_iters: int) -> list[float]:
    out = []
    for it in range(total_iters):
        if cfg.lr_schedule == "step":
            epoch = it // max(iters_per_epoch, 1)
            out.append(cfg.lr * cfg.step_gamma ** sum(epoch >= s for s in cfg.step_epochs))
        elif it < cfg.warmup_iters:
            out.append(cfg.lr * (it + 1) / cfg.warmup_iters)
        else:
            progress = (it - cfg.warmup_iters) / max(total_iters - cfg.warmup_iters, 1)
            out.append(0.5 * cfg.lr * (1 + math.cos(math.pi * progress)))
    return out


@torch.no_grad()
def sliding_window_logits(head: LinearSegmentationHead, model: torch.nn.Module, pixel_values: torch.Tensor,
                          window: int, stride: int) -> torch.Tensor:
    """(B, K, H, W) logits averaged over windows of ``window`` pixels moved by ``stride`` (mmseg "slide")."""
    b, _, h, w = pixel_values.shape
    patch = model.config.patch_size
    if h < window or w < window:  # pad to a full window (zeros = the normalised mean colour's neighbourhood)
        pixel_values = F.pad(pixel_values, (0, max(0, window - w), 0, max(0, window - h)))
    H, W = pixel_values.shape[-2:]
    logits = pixel_values.new_zeros(b, head.config.num_labels, H, W)
    count = pixel_values.new_zeros(1, 1, H, W)
    rows = [*range(0, H - window, stride), H - window]  # the last window ends at the border
    cols = [*range(0, W - window, stride), W - window]
    size = (window // patch * patch,) * 2
    for top in rows:
        for left in cols:
            crop = pixel_values[..., top : top + window, left : left + window]
            if crop.shape[-1] != size[0]:
                crop = F.interpolate(crop, size=size, mode="bilinear", align_corners=False)
            logits[..., top : top + window, left : left + window] += head.predict(model, crop, size=(window, window))
            count[..., top : top + window, left : left + window] += 1
    return (logits / count)[..., :h, :w]


@torch.no_grad()
def evaluate_probe(head: LinearSegmentationHead, model: torch.nn.Module, loader, cfg: SegmentationEvalConfig,
                   num_classes: int, accelerator=None) -> tuple[torch.Tensor, int]:
    """(K, K) confusion matrix summed across ranks and the skipped rows (``features`` batches skip the backbone)."""
    device = accelerator.device if accelerator is not None else next(head.parameters()).device
    head.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    skipped = torch.zeros((), dtype=torch.long, device=device)
    show = accelerator is None or accelerator.is_local_main_process
    for batch in tqdm(loader, desc="eval", disable=not show):
        valid = batch["valid"].to(device).bool()
        skipped += (~valid).sum()
        if not valid.any():
            continue
        y = batch["labels"].to(device)[valid]
        if "features" in batch:
            logits = head(batch["features"].to(device)[valid])
        elif cfg.protocol == "dinov2":
            logits = sliding_window_logits(head, model, batch["pixel_values"].to(device)[valid], cfg.input_size,
                                           cfg.eval_stride)
        else:
            logits = head.predict(model, batch["pixel_values"].to(device)[valid], size=tuple(y.shape[-2:]))
        if logits.shape[-2:] != y.shape[-2:]:
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        conf += confusion_matrix(logits.argmax(1), y, num_classes, cfg.ignore_index)
    if accelerator is not None:
        conf = accelerator.reduce(conf, reduction="sum")
        skipped = accelerator.reduce(skipped, reduction="sum")
    return conf.cpu(), int(skipped)


# --- Training
def train_probe(head: LinearSegmentationHead, model: torch.nn.Module, loader, cfg: SegmentationEvalConfig,
                accelerator=None, feature_cache: Optional[list] = None) -> list[dict]:
    """Train ``head`` on frozen features; returns the per-epoch log (loss, lr, skipped rows). ``feature_cache``:
    extracted ``(features (B, C, h, w), labels, valid)`` batches (``cfg.cache_features``) shared by several heads."""
    device = accelerator.device if accelerator is not None else next(head.parameters()).device
    params = [p for p in head.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_head, opt = accelerator.prepare(head, opt) if accelerator is not None else (head, opt)
    if feature_cache is not None and not cfg.cache_features:
        raise ValueError("a feature_cache needs cfg.cache_features = true")
    show = accelerator is None or accelerator.is_local_main_process

    @torch.no_grad()  # as a decorator: grad mode is restored at every yield
    def read(batches) -> Iterator[tuple]:  # (features (B, C, h, w), labels, valid) of the frozen backbone
        for batch in batches:
            yield (head.extract_features(model, batch["pixel_values"].to(device)), batch["labels"].to(device),
                   batch["valid"].to(device).bool())

    if cfg.cache_features and not feature_cache:  # one frozen pass; every epoch then trains on the stored maps
        feature_cache = [] if feature_cache is None else feature_cache  # a caller's empty list is filled for reuse
        batches = read(tqdm(loader, desc="train features", disable=not show))
        feature_cache.extend((f.half(), y, v) for f, y, v in batches)
    iters_per_epoch = len(feature_cache) if cfg.cache_features else len(loader)
    total = cfg.max_iters or cfg.epochs * iters_per_epoch
    epochs = math.ceil(total / max(iters_per_epoch, 1))
    lrs = lr_schedule(cfg, iters_per_epoch, total)
    log, it = [], 0
    for epoch in range(epochs):
        head.train()
        losses, skipped = [], 0
        if cfg.cache_features:
            batches = [feature_cache[i] for i in torch.randperm(len(feature_cache)).tolist()]
        else:
            batches = read(loader)
        for feats, y, valid in tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", disable=not show, leave=False):
            if it >= total:
                break
            skipped += int((~valid).sum())
            y = torch.where(valid[:, None, None], y, torch.full_like(y, cfg.ignore_index))
            for group in opt.param_groups:
                group["lr"] = lrs[it]
            logits = F.interpolate(train_head(feats.float()), size=y.shape[-2:], mode="bilinear", align_corners=False)
            if (y != cfg.ignore_index).any():
                loss = F.cross_entropy(logits, y, ignore_index=cfg.ignore_index)
            else:
                loss = logits.sum() * 0.0  # keeps DDP ranks in step when a batch has no labelled pixel
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss) if accelerator is not None else loss.backward()
            opt.step()
            losses.append(loss.item())
            it += 1
        entry = {"epoch": epoch + 1, "loss": sum(losses) / max(len(losses), 1), "lr": lrs[min(it, total) - 1],
                 "skipped": skipped}
        log.append(entry)
        if show:
            logger.info("epoch %d: loss %.4f lr %.2e", entry["epoch"], entry["loss"], entry["lr"])
    return log


# --- Data and one probe, for the entry point and for in-process callers (analysis.claims)
@dataclass
class ProbeData:
    """The two splits of a probe run, as rows the loaders read, with the label space."""

    train_rows: torch.utils.data.Dataset
    eval_rows: torch.utils.data.Dataset
    num_classes: int
    id2label: dict
    label_mapping: str


def probe_datasets(cfg: SegmentationEvalConfig, accelerator: Any = None) -> ProbeData:
    """Open ``cfg.dataset``'s two splits, detect columns and label convention, build their ``SegmentationRows``."""
    from entmax_vit.data.datasets import find_column, open_dataset

    from .segmentation_data import SegmentationRows, has_raw_cityscapes_ids, infer_num_classes

    if not cfg.dataset:
        raise ValueError("--dataset is required for this preset (a Hub id or local folder with image + mask columns)")
    train_ds = open_dataset(cfg.dataset, cfg.train_split, cfg.dataset_cache_dir, cfg.max_train_samples,
                            accelerator=accelerator)  # the main process of each node downloads first
    eval_ds = open_dataset(cfg.dataset, cfg.eval_split, cfg.dataset_cache_dir, cfg.max_eval_samples,
                           accelerator=accelerator)
    image_col = find_column(train_ds, "image", cfg.image_column)
    mask_col = find_column(train_ds, "mask", cfg.mask_column)
    label_mapping = cfg.label_mapping
    if label_mapping == "auto":
        label_mapping = "cityscapes_ids" if has_raw_cityscapes_ids(train_ds, mask_col) else "none"
        logger.info("label_mapping auto -> %s", label_mapping)
    label_kwargs = dict(label_mapping=label_mapping, reduce_zero=cfg.reduce_zero_label, ignore_index=cfg.ignore_index)
    class_names = list(cfg.class_names)
    if not class_names and cfg.dataset == "embedded":
        from entmax_vit.data.synthetic_scenes import SEGMENTATION_CLASSES

        class_names = list(SEGMENTATION_CLASSES)
    num_classes = cfg.num_classes or len(class_names) or infer_num_classes(train_ds, mask_col, cfg.ignore_index, label_kwargs)
    if class_names and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
    id2label = {i: (class_names[i] if class_names else str(i)) for i in range(num_classes)}

    rows = dict(image_column=image_col, mask_column=mask_col, protocol=cfg.protocol, input_size=cfg.input_size,
                mask_size=cfg.mask_size, hflip=cfg.hflip, scale_range=tuple(cfg.scale_range), **label_kwargs)
    train_rows = SegmentationRows(train_ds, train=True, **rows)
    eval_rows = SegmentationRows(eval_ds, train=False, **rows)
    return ProbeData(train_rows, eval_rows, num_classes, id2label, label_mapping)


def new_head(cfg: SegmentationEvalConfig, num_classes: int, hidden_size: int, id2label: dict) -> LinearSegmentationHead:
    """A freshly initialised head reading the backbone as ``cfg`` says (layers, norm, [CLS], BN)."""
    return LinearSegmentationHead(SegmentationHeadConfig(
        num_labels=num_classes, hidden_size=hidden_size, layers=list(cfg.layers), use_cls_token=cfg.use_cls_token,
        backbone_norm=cfg.backbone_norm, batch_norm=cfg.batch_norm, input_size=cfg.input_size,
        ignore_index=cfg.ignore_index, id2label=id2label, protocol=cfg.protocol,
    ))


def probe_miou(model: torch.nn.Module, data: ProbeData, cfg: SegmentationEvalConfig) -> float:
    """The eval mIoU (percent) of one probe as ``cfg`` says, trained in this process as by the entry point."""
    head = new_head(cfg, data.num_classes, model.config.hidden_size, data.id2label).to(next(model.parameters()).device)
    train_loader, eval_loader = _loaders(cfg, data)
    train_probe(head, model, train_loader, cfg)
    conf, _ = evaluate_probe(head, model, eval_loader, cfg, data.num_classes)
    return float(segmentation_scores(conf)["mIoU"])


@torch.no_grad()
def shared_block_outputs(model: torch.nn.Module, loader, layers: list[int], norm: bool = True,
                         dtype: torch.dtype = torch.float16) -> list[tuple]:
    """One frozen pass: per batch ``({block: (patch map (B, D, h, w), cls (B, D))}, labels, valid)``, for every
    block in ``layers`` at once (what several heads of ``probe_grid_miou`` read)."""
    device, layers = next(model.parameters()).device, sorted(set(layers))
    out = []
    for batch in loader:
        outputs = model.get_intermediate_layers(batch["pixel_values"].to(device), n=layers, reshape=True,
                                                return_class_token=True, norm=norm)
        blocks = {b: (p.to(dtype), c.to(dtype)) for b, (p, c) in zip(layers, outputs)}
        out.append((blocks, batch["labels"].to(device), batch["valid"].to(device).bool()))
    return out


def head_features(blocks: dict, config: SegmentationHeadConfig, depth: int) -> torch.Tensor:
    """The (B, C, h, w) input of a head with ``config`` from ``shared_block_outputs``, in the layout of
    ``LinearSegmentationHead.extract_features`` (per layer its patch map, then [CLS] if used; tested equal)."""
    maps = []
    for layer in config.layers:
        patches, cls = blocks[layer % depth]
        maps += [patches, cls[:, :, None, None].expand_as(patches)] if config.use_cls_token else [patches]
    return torch.cat(maps, dim=1)


def probe_grid_miou(model: torch.nn.Module, data: ProbeData, cfgs: list[SegmentationEvalConfig]) -> list[float]:
    """``probe_miou`` of probes differing only in ``layers`` / ``use_cls_token``, from one backbone pass per split
    (NeCo protocol with ``cache_features``, flips drawn once; else one ``probe_miou`` each)."""
    first = cfgs[0]
    if first.protocol != "neco" or not first.cache_features:
        return [probe_miou(model, data, c) for c in cfgs]
    fields = ("protocol", "input_size", "mask_size", "hflip", "batch_size", "eval_batch_size", "backbone_norm")
    if any(getattr(c, f) != getattr(first, f) for c in cfgs for f in fields):
        raise ValueError(f"probes of one grid must share {fields}")
    depth = model.config.num_hidden_layers
    layers = sorted({layer % depth for c in cfgs for layer in c.layers})
    device = next(model.parameters()).device
    # heads first, then the data: for one probe the random draws come in probe_miou's order (same numbers)
    heads = [new_head(cfg, data.num_classes, model.config.hidden_size, data.id2label).to(device) for cfg in cfgs]
    train_loader, eval_loader = _loaders(first, data)
    # train maps in float16 as cache_features stores them; eval maps in float32 as evaluate_probe computes them
    train = shared_block_outputs(model, tqdm(train_loader, desc="train features", leave=False), layers, first.backbone_norm)
    evals = shared_block_outputs(model, tqdm(eval_loader, desc="eval features", leave=False), layers, first.backbone_norm,
                                 dtype=torch.float32)
    results = []
    for cfg, head in zip(cfgs, heads):
        cache = [(head_features(b, head.config, depth), y, v) for b, y, v in train]
        train_probe(head, model, None, cfg, feature_cache=cache)
        batches = ({"features": head_features(b, head.config, depth), "labels": y, "valid": v} for b, y, v in evals)
        conf, _ = evaluate_probe(head, model, batches, cfg, data.num_classes)
        results.append(float(segmentation_scores(conf)["mIoU"]))
    return results


def _loaders(cfg: SegmentationEvalConfig, data: ProbeData, accelerator: Any = None) -> tuple:
    """Shuffled train and ordered eval loaders; with an accelerator the train loader is prepared, and with several
    ranks each evaluates every n-th row (no duplicates, so the summed confusion matrix is exact)."""
    eval_rows = data.eval_rows
    if accelerator is not None and accelerator.num_processes > 1:
        eval_rows = torch.utils.data.Subset(eval_rows, list(range(accelerator.process_index, len(eval_rows),
                                                                  accelerator.num_processes)))
    train = torch.utils.data.DataLoader(data.train_rows, batch_size=cfg.batch_size, shuffle=True,
                                        num_workers=cfg.num_workers, drop_last=len(data.train_rows) > cfg.batch_size)
    train = accelerator.prepare(train) if accelerator is not None else train
    return train, torch.utils.data.DataLoader(eval_rows, num_workers=cfg.num_workers,
                                              batch_size=cfg.eval_batch_size if cfg.protocol == "neco" else 1)


def main(cfg: SegmentationEvalConfig) -> dict:
    """Train the probe on ``train_split``, evaluate on ``eval_split``, save the head and the results JSON."""
    from .features import start_run
    from .resolution import eval_resolution
    from .results import finish_run

    if not cfg.dataset:
        raise ValueError("--dataset is required for this preset (a Hub id or local folder with image + mask columns)")
    if len(cfg.scale_range) != 2 or not 0 < cfg.scale_range[0] <= cfg.scale_range[1]:
        raise ValueError(f"scale_range must be [low, high] with 0 < low <= high, got {cfg.scale_range}")
    accelerator, model = start_run(cfg, cfg.seed)
    _, input_size = eval_resolution(None, cfg.input_size, cfg.model, cfg.revision, what="input_size")
    cfg = dataclasses.replace(cfg, input_size=input_size)  # the config written beside the results says it
    if not hasattr(model, "get_intermediate_layers"):
        raise ValueError(f"{cfg.model}: the segmentation probe needs an EntmaxViT backbone (get_intermediate_layers)")
    if cfg.input_size % model.config.patch_size:
        raise ValueError(f"input_size {cfg.input_size} is not a multiple of the patch size {model.config.patch_size}")
    depth = model.config.num_hidden_layers
    if any(not -depth <= layer < depth for layer in cfg.layers):
        raise ValueError(f"layers {cfg.layers} out of range for a {depth}-block model")

    data = probe_datasets(cfg, accelerator)
    train_loader, eval_loader = _loaders(cfg, data, accelerator)
    if cfg.head_path:  # evaluation only: the head decides how the backbone is read
        head = LinearSegmentationHead.load(cfg.head_path, map_location=accelerator.device)
        if head.config.num_labels != data.num_classes or head.config.hidden_size != model.config.hidden_size:
            raise ValueError(f"{cfg.head_path}: head has {head.config.num_labels} labels / width "
                             f"{head.config.hidden_size}, data and model need {data.num_classes} / "
                             f"{model.config.hidden_size}")
        log: list[dict] = []
    else:
        head = new_head(cfg, data.num_classes, model.config.hidden_size, data.id2label).to(accelerator.device)
        log = train_probe(head, model, train_loader, cfg, accelerator)
    hc = head.config
    # unreadable train rows of one epoch, over all ranks
    train_skipped = int(accelerator.reduce(torch.tensor(log[-1]["skipped"] if log else 0, device=accelerator.device), "sum"))
    conf, skipped = evaluate_probe(head, model, eval_loader, cfg, data.num_classes, accelerator)
    scores = segmentation_scores(conf)
    per_class = {data.id2label[i]: v for i, v in enumerate(scores.pop("per_class_iou"))}
    metrics = {k: v for k, v in scores.items() if math.isfinite(v)}
    out = Path(cfg.output_dir)
    if accelerator.is_main_process and not cfg.head_path:
        accelerator.unwrap_model(head).save(out / "segmentation_head")
    record = finish_run(
        "segmentation", cfg, model, accelerator, metrics=metrics,
        dataset={"num_samples": len(data.eval_rows), "num_train_samples": len(data.train_rows),
                 "num_classes": data.num_classes, "num_skipped": skipped + train_skipped},
        protocol={"name": f"{cfg.protocol}_linear", "layers": list(hc.layers), "backbone_norm": hc.backbone_norm,
                  "use_cls_token": hc.use_cls_token, "batch_norm": hc.batch_norm, "input_size": cfg.input_size,
                  "label_size": cfg.mask_size if cfg.protocol == "neco" else "original",
                  "reduce_zero_label": cfg.reduce_zero_label, "label_mapping": data.label_mapping,
                  "ignore_index": cfg.ignore_index})
    if accelerator.is_main_process:
        (out / "per_class_iou.json").write_text(json.dumps(per_class, indent=2))
        (out / "train_log.json").write_text(json.dumps(log, indent=2))
        _plot_per_class(per_class, out / "per_class_iou.png", metrics.get("mIoU"))
        print(f"[eval_segmentation] mIoU {metrics.get('mIoU', float('nan')):.2f}  pixel acc "
              f"{metrics.get('pixel_accuracy', float('nan')):.2f} -> {out / 'results_segmentation.json'}")
    return record


def _plot_per_class(per_class: dict, path: Path, miou: Optional[float]) -> None:
    from matplotlib.figure import Figure  # no pyplot: see analysis/figures.py

    items = [(k, 100 * v) for k, v in per_class.items() if math.isfinite(v)]
    if not items:
        return
    fig = Figure(figsize=(max(4, 0.25 * len(items) + 2), 3.5))
    ax = fig.subplots()
    ax.bar(range(len(items)), [v for _, v in items], color="tab:blue")
    ax.set_xticks(range(len(items)), [k for k, _ in items], rotation=90, fontsize=7)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    if miou is not None:
        ax.axhline(miou, color="tab:red", ls="--", lw=1, label=f"mIoU {miou:.1f}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
