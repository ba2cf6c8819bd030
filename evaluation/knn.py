"""Weighted k-NN classification on frozen [CLS] features, as official DINO's ``eval_knn.py``.

Features are L2-normalised; each test image takes its k nearest training images by cosine similarity, and
each neighbour votes for its class with weight exp(similarity / T), T = 0.07. Top-1 / top-5 accuracy for
k in {10, 20, 100, 200} (each clipped to the train-set size).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .metrics import topk_accuracy

logger = logging.getLogger(__name__)


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    num_classes: int,
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> torch.Tensor:
    """Class scores (N_test, C): sum over the k nearest training samples of exp(cos_sim / T) one-hot votes."""
    if len(train_features) == 0:
        raise ValueError("k-NN needs at least one training sample")
    train = F.normalize(train_features.float(), dim=1)  # (N_train, D)
    test = F.normalize(test_features.float(), dim=1)  # (N_test, D)
    k = min(k, len(train))
    scores = []
    for start in range(0, len(test), chunk_size):
        sim = test[start : start + chunk_size] @ train.T  # (B, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)  # (B, k)
        votes = F.one_hot(train_labels[top_idx].long(), num_classes).float()  # (B, k, C)
        weights = (top_sim / temperature).exp()  # (B, k)
        scores.append((votes * weights[..., None]).sum(1))  # (B, C)
    return torch.cat(scores)


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: tuple[int, ...] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
) -> dict[str, float]:
    """``{"top1_k10": ..., "top5_k10": ..., ...}`` in percent; k values above the train size are clipped
    (and a k that clips to an already-reported value is skipped)."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    metrics: dict[str, float] = {}
    done = set()
    for k in ks:
        eff = min(k, len(train_features))
        if eff in done:
            continue
        done.add(eff)
        scores = knn_scores(train_features, train_labels, test_features, eff, num_classes, temperature)
        acc = topk_accuracy(scores, test_labels.long(), (1, 5))
        metrics[f"top1_k{eff}"] = acc[1]
        metrics[f"top5_k{eff}"] = acc[5]
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Entry point (scripts/eval_knn.py)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class KNNEvalConfig:
    """k-NN evaluation of a frozen backbone (DINO defaults)."""

    model: str = ""                      # EntmaxViT folder, training output dir, or Hub id
    revision: Optional[str] = None       # Hub revision (branch, tag or commit)
    dataset: str = "embedded"            # Hub id, imagefolder:DIR, webdataset:GLOB, saved folder, or "embedded"
    train_split: str = "train"
    eval_split: str = "validation"
    image_column: Optional[str] = None   # default: detected
    label_column: Optional[str] = None   # default: detected
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    streaming: bool = False              # read the splits on the fly (e.g. ImageNet from the Hub), no download
    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07            # DINO: 0.07
    resize: int = 256                    # eval transform: Resize(resize, bicubic) + CenterCrop(crop)
    crop: int = 224
    batch_size: int = 64
    num_workers: int = 0
    cache_dir: Optional[str] = None      # feature cache (default: OUTPUT_DIR/feature_cache); "" disables
    dataset_cache_dir: Optional[str] = None
    output_dir: str = "outputs/eval_knn"


def main(cfg: KNNEvalConfig) -> dict:
    """Extract (or load cached) features, run k-NN, write ``output_dir/results_knn.json``; return the record."""
    from accelerate import Accelerator

    from entmax_vit.cli.config import save_config, to_dict

    from .features import load_backbone, model_fingerprint, split_features
    from .image_data import ClassificationTransform
    from .results import make_results, write_results

    if not cfg.model:
        raise ValueError("--model is required (an EntmaxViT folder, training output dir or Hub id)")
    accelerator = Accelerator()
    out = Path(cfg.output_dir)
    logger.info("k-NN: %d process(es) on %s", accelerator.num_processes, accelerator.device)
    if accelerator.is_main_process:
        save_config(cfg, out / "eval_knn_config.yaml")
    model = load_backbone(cfg.model, cfg.revision, accelerator.device)
    spec = model_fingerprint(cfg.model, cfg.revision, model)
    transform = ClassificationTransform(cfg.resize, cfg.crop)
    cache = str(out / "feature_cache") if cfg.cache_dir is None else (cfg.cache_dir or None)
    common = dict(model_spec=spec, dataset=cfg.dataset, transform=transform, n_last_blocks=1,
                  image_column=cfg.image_column, label_column=cfg.label_column, batch_size=cfg.batch_size,
                  num_workers=cfg.num_workers, cache_dir=cache, dataset_cache_dir=cfg.dataset_cache_dir,
                  accelerator=accelerator, streaming=cfg.streaming)
    train, train_info = split_features(model, split=cfg.train_split, max_samples=cfg.max_train_samples, **common)
    test, test_info = split_features(model, split=cfg.eval_split, max_samples=cfg.max_eval_samples, **common)
    num_classes = max(train_info["num_classes"], test_info["num_classes"])
    metrics = knn_classify(train["cls"][:, -1], train["labels"], test["cls"][:, -1], test["labels"],
                           tuple(cfg.ks), cfg.temperature, num_classes)
    for name, value in metrics.items():
        logger.info("k-NN %s = %.2f", name, value)
    record = make_results(
        task="knn",
        model_name_or_path=cfg.model,
        model_config=model.config.to_dict(),
        dataset={"name": cfg.dataset, "split": cfg.eval_split, "train_split": cfg.train_split,
                 "num_samples": len(test["labels"]), "num_train_samples": len(train["labels"]),
                 "num_classes": num_classes, "num_skipped": train_info["num_skipped"] + test_info["num_skipped"]},
        protocol={"name": "dino_knn", "temperature": cfg.temperature, "ks": list(cfg.ks), "feature": "cls_last_block",
                  "l2_normalized": True, "transform": transform.describe()},
        metrics=metrics,
        config=to_dict(cfg),
    )
    if accelerator.is_main_process:
        write_results(record, out / "results_knn.json")
        print(f"[eval_knn] {', '.join(f'{k}={v:.2f}' for k, v in metrics.items())} -> {out / 'results_knn.json'}")
    return record


__all__ = ["KNNEvalConfig", "knn_classify", "knn_scores", "main"]
