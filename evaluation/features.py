"""Frozen feature extraction with a disk cache (docs/evaluation.md), shared by the k-NN and linear probes. Per image:
normed ``cls`` (N, L, D) of the last L blocks, ``patch_mean`` (N, D) of the last block, ``patches`` (N, P, D) float16
(``store_patch_tokens``), ``labels`` (-1 without), ``index`` (row in the split); unreadable rows dropped, counted."""

import dataclasses
import hashlib
import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .resolution import eval_resolution, resolve_model_path

logger = logging.getLogger(__name__)


def load_backbone(name_or_path: str, revision: Optional[str] = None, device: str | torch.device = "cpu",
                  attn_implementation: Optional[str] = None) -> torch.nn.Module:
    """Frozen, eval-mode backbone through ``AutoModel.from_pretrained(..., trust_remote_code=True)``, classifiers
    unwrapped to their encoder: EntmaxViT, or a model with ``hidden_states`` and a final ``layernorm`` (ViT, DINOv2)."""
    import entmax_vit.modeling  # noqa: F401  (registers EntmaxViT with the Auto classes for local folders)
    from transformers import AutoModel

    from entmax_vit.data.model_path import check_model_path

    check_model_path(name_or_path)  # the entry points' check, for in-process callers too
    path = resolve_model_path(name_or_path)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModel.from_pretrained(path, revision=revision, trust_remote_code=True, **kwargs)
    except OSError as err:  # a Hub id that does not exist or cannot be reached: transformers' message, one line
        raise ValueError(f"cannot load model {name_or_path!r}: {' '.join(str(err).split())}") from None
    for attr in ("entmax_vit", "vit", "dinov2", "backbone"):
        if not hasattr(model, "get_intermediate_layers") and hasattr(model, attr):
            model = getattr(model, attr)
    model.requires_grad_(False)
    return model.eval().to(device)


def model_fingerprint(name_or_path: str, revision: Optional[str], model: torch.nn.Module) -> dict:
    """What identifies a model's features: path/id, revision, config and the weight files' size and mtime."""
    path = Path(resolve_model_path(name_or_path))
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) if path.is_dir() else []
    weights = [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files]
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    # A Hub model's resolved commit pins "main" to the exact weights the features came from.
    commit = getattr(model.config, "_commit_hash", None)
    return {"name_or_path": str(name_or_path), "revision": revision, "commit": commit, "config_hash": _hash(config, 16),
            "weights": weights}


@torch.no_grad()
def block_outputs(model: torch.nn.Module, pixel_values: torch.Tensor, n_last_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] of the last ``n`` blocks (B, n, D) and the last block's patch tokens (B, P, D), all normed."""
    if hasattr(model, "get_intermediate_layers"):
        outs = model.get_intermediate_layers(pixel_values, n=n_last_blocks, return_class_token=True, norm=True)
        cls = torch.stack([c for _, c in outs], dim=1)
        return cls, outs[-1][0]
    out = model(pixel_values=pixel_values, output_hidden_states=True)
    if out.hidden_states is None or not hasattr(model, "layernorm"):
        raise ValueError(f"{type(model).__name__} offers neither get_intermediate_layers nor hidden_states + layernorm")
    states = [model.layernorm(h) for h in out.hidden_states[-n_last_blocks:]]
    prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    return torch.stack([s[:, 0] for s in states], dim=1), states[-1][:, prefix:]


def _hash(spec: dict, n: int) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:n]


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader: torch.utils.data.DataLoader, *, n_last_blocks: int = 4,
                     store_patch_tokens: bool = False, accelerator: Any = None, desc: str = "features",
                     sharded_loader: bool = False, main_rank_only: bool = False) -> dict[str, torch.Tensor]:
    """Features gathered on every rank: a prepared loader per batch (``gather_for_metrics``), a ``sharded_loader``
    (a stream) padded and gathered once at the end. ``main_rank_only``: other ranks keep only the skip count."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    show = accelerator is None or accelerator.is_local_main_process
    drop = main_rank_only and accelerator is not None and not accelerator.is_main_process
    for batch in tqdm(loader, desc=desc, disable=not show):
        cls, patches = block_outputs(model, batch["pixel_values"].to(device), n_last_blocks)
        out = {"cls": cls.float(), "patch_mean": patches.float().mean(1), "labels": batch["labels"].to(device),
               "index": batch["index"].to(device), "valid": batch["valid"].to(device)}
        if store_patch_tokens:
            out["patches"] = patches.half()
        if accelerator is not None and not sharded_loader:
            out = accelerator.gather_for_metrics(out)
        for k, v in out.items():
            # a rank that drops gathered rows keeps their validity flags (the shared skip count), not their features
            parts[k].append(v[:0].cpu() if drop and not sharded_loader and k != "valid" else v.cpu())
    if not parts["labels"]:
        raise ValueError(f"{desc}: the data loader produced no rows")
    feats = {k: torch.cat(v) for k, v in parts.items()}
    if accelerator is not None and sharded_loader and accelerator.num_processes > 1:
        feats["present"] = torch.ones(len(feats["labels"]), dtype=torch.long)
        feats["valid"] = feats["valid"].long()  # gloo has no bool collectives
        feats = {k: accelerator.gather(accelerator.pad_across_processes(feats[k].to(accelerator.device), dim=0)).cpu()
                 for k in sorted(feats)}
        present = feats.pop("present").bool()
        feats = {k: v[present] for k, v in feats.items()}
    valid = feats.pop("valid").bool()
    skipped = int((~valid).sum())
    if skipped:
        logger.warning("%s: skipped %d unreadable image(s) of %d", desc, skipped, len(valid))
    feats = {k: (v[:0] if drop else v[valid]).contiguous() for k, v in feats.items()}
    feats["num_skipped"] = torch.tensor([skipped])
    return feats


def split_features(model: torch.nn.Module, *, model_spec: dict, dataset: str, split: str, transform: Any,
                   n_last_blocks: int = 4, store_patch_tokens: bool = False, image_column: Optional[str] = None,
                   label_column: Optional[str] = None, max_samples: Optional[int] = None, batch_size: int = 64,
                   num_workers: int = 0, cache_dir: Optional[str] = None, dataset_cache_dir: Optional[str] = None,
                   accelerator: Any = None, streaming: bool = False,
                   main_rank_only: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Features of one dataset split, from ``cache_dir`` or computed and cached there (main rank), and its sizes.
    ``streaming``: the split read on the fly, each rank its part of the stream."""
    from entmax_vit.data.datasets import find_column, open_dataset

    from .image_data import ClassificationRows, StreamingRows, num_classes_of

    ds = open_dataset(dataset, split, cache_dir=dataset_cache_dir, max_samples=max_samples, streaming=streaming,
                      accelerator=accelerator)
    image_col = find_column(ds, "image", image_column)
    label_col = find_column(ds, "label", label_column)
    info = {"num_samples": len(ds) if not streaming else None, "num_classes": num_classes_of(ds, label_col)}
    spec = {"model": model_spec, "dataset": dataset, "split": split, "max_samples": max_samples,
            "rows": "stream" if streaming else len(ds),
            "image_column": image_col, "label_column": label_col, "transform": transform.describe(),
            "n_last_blocks": n_last_blocks, "patches": store_patch_tokens, "format": 2}

    path = Path(cache_dir) / f"{_hash(spec, 24)}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        logger.info("loading cached features %s", path)
        feats = load_file(str(path))
    else:
        if streaming:
            rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
            rows = StreamingRows(ds, image_col, label_col, transform, rank, world,
                                 truncated=max_samples is not None and max_samples > 0)
            loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, num_workers=num_workers)
        else:
            rows = ClassificationRows(ds, image_col, label_col, transform)
            loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=False, num_workers=num_workers)
            if accelerator is not None:
                loader = accelerator.prepare(loader)
        feats = extract_features(model, loader, n_last_blocks=n_last_blocks, store_patch_tokens=store_patch_tokens,
                                 accelerator=accelerator, desc=f"{split} features", sharded_loader=streaming,
                                 main_rank_only=main_rank_only)
        if path is not None and (accelerator is None or accelerator.is_main_process):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({k: v.contiguous() for k, v in feats.items()}, str(tmp),
                      metadata={"spec": json.dumps(spec, default=str)})
            os.replace(tmp, path)
            logger.info("cached features at %s", path)
    info["num_skipped"] = int(feats["num_skipped"][0])
    if info["num_samples"] is None:
        info["num_samples"] = len(feats["labels"]) + info["num_skipped"]
    if info["num_classes"] is None:
        info["num_classes"] = int(feats["labels"].max()) + 1 if len(feats["labels"]) else 0
    return feats, info


def sized_to_machine(batch_size: Optional[int], num_workers: Optional[int], accelerator: Any) -> tuple[int, int]:
    """Where None: on a GPU batch 256 and up to 8 workers per process (main-process decoding starves the model;
    more rarely helps and multiplies memory; one core left for the main loop); on CPU batch 64, no workers."""
    on_gpu = accelerator.device.type == "cuda"
    if batch_size is None:
        batch_size = 256 if on_gpu else 64
    if num_workers is None:
        nodes = int(os.environ.get("NUM_NODES", os.environ.get("SLURM_NNODES", "1")) or 1)
        per_node = max(1, getattr(accelerator.state, "num_processes", 1) // max(1, nodes))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_workers = min(8, max(0, cores // per_node - 1)) if on_gpu else 0
    return batch_size, num_workers


def start_run(cfg: Any, seed: Optional[int] = None) -> tuple[Any, Any]:
    """Every evaluation's start, before it loads data or writes a file: check ``--model`` and ``--dataset``
    (data.datasets.check_source), then an Accelerator, the seed, and the frozen backbone on its device."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from entmax_vit.data.datasets import check_source

    if not cfg.model:
        raise ValueError("--model is required (an EntmaxViT folder, training output dir or Hub id)")
    try:
        check_source(cfg.dataset)
    except ValueError as err:
        raise ValueError(f"--dataset: {err}") from None
    accelerator = Accelerator()
    if seed is not None:
        set_seed(seed)
    logger.info("%d process(es) on %s", accelerator.num_processes, accelerator.device)
    return accelerator, load_backbone(cfg.model, cfg.revision, accelerator.device)


def prepare_classification(cfg: Any, batch_field: str, seed: Optional[int] = None) -> tuple[Any, Any, Any, dict]:
    """The k-NN and linear probes' start: start_run, then the resolved config and both splits' split_features kwargs."""
    from .image_data import ClassificationTransform

    accelerator, model = start_run(cfg, seed)
    batch_size, num_workers = sized_to_machine(getattr(cfg, batch_field), cfg.num_workers, accelerator)
    resize, crop = eval_resolution(cfg.resize, cfg.crop, cfg.model, cfg.revision)
    # the config written beside the results says what was used
    cfg = dataclasses.replace(cfg, **{batch_field: batch_size}, num_workers=num_workers, resize=resize, crop=crop)
    cache = str(Path(cfg.output_dir) / "feature_cache") if cfg.cache_dir is None else (cfg.cache_dir or None)
    common = dict(model_spec=model_fingerprint(cfg.model, cfg.revision, model), dataset=cfg.dataset,
                  transform=ClassificationTransform(resize, crop), image_column=cfg.image_column,
                  label_column=cfg.label_column, batch_size=batch_size, num_workers=num_workers, cache_dir=cache,
                  dataset_cache_dir=cfg.dataset_cache_dir, accelerator=accelerator, streaming=cfg.streaming)
    return cfg, accelerator, model, common


def on_main_rank(accelerator: Any, compute: Any) -> Any:
    """``compute()`` once, on the main rank (on its accelerator); every other rank receives its result."""
    result = compute() if accelerator.is_main_process else None
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        result = broadcast_object_list([result], from_process=0)[0]
    return result
