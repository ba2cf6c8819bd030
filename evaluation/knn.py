"""Weighted k-NN classification on frozen [CLS] features, as official DINO's ``eval_knn.py`` (docs/evaluation.md)."""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .metrics import topk_accuracy

logger = logging.getLogger(__name__)


@torch.no_grad()
def knn_scores_for_ks(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                      ks: tuple[int, ...], num_classes: int, temperature: float = 0.07, chunk_size: int = 256,
                      device: Optional[torch.device | str] = None) -> dict[int, torch.Tensor]:
    """(N_test, C) class scores for each k in ``ks`` (clipped to the train size): one top-k at the largest k."""
    if len(train_features) == 0:
        raise ValueError("k-NN needs at least one training sample")
    device = torch.device(device) if device is not None else train_features.device
    train = F.normalize(train_features.to(device).float(), dim=1)  # (N_train, D)
    test = F.normalize(test_features.to(device).float(), dim=1)  # (N_test, D)
    labels = train_labels.to(device).long()
    eff = sorted({min(k, len(train)) for k in ks})
    scores: dict[int, list[torch.Tensor]] = {k: [] for k in eff}
    for start in range(0, len(test), chunk_size):
        sim = test[start : start + chunk_size] @ train.T  # (B, N_train)
        top_sim, top_idx = sim.topk(eff[-1], dim=1)  # (B, k_max), sorted: the first k are the k nearest
        votes = F.one_hot(labels[top_idx], num_classes).float()  # (B, k_max, C)
        weighted = votes * (top_sim / temperature).exp()[..., None]  # (B, k_max, C)
        for k in eff:
            scores[k].append(weighted[:, :k].sum(1))  # (B, C)
    return {k: torch.cat(v) for k, v in scores.items()}


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: tuple[int, ...] = (10, 20, 100, 200), temperature: float = 0.07,
                 num_classes: Optional[int] = None, device: Optional[torch.device | str] = None) -> dict[str, float]:
    """``{"top1_k10": ..., "top5_k10": ..., ...}`` in percent; k clipped to the train size, each value once."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores_for_ks(train_features, train_labels, test_features, tuple(ks), num_classes, temperature,
                               device=device)
    metrics: dict[str, float] = {}
    for k in dict.fromkeys(min(k, len(train_features)) for k in ks):  # in the order asked, each once
        acc = topk_accuracy(scores[k].cpu(), test_labels.long().cpu(), (1, 5))
        metrics[f"top1_k{k}"] = acc[1]
        metrics[f"top5_k{k}"] = acc[5]
    return metrics


@dataclass
class KNNEvalConfig:
    """k-NN evaluation of a frozen backbone (DINO defaults)."""

    model: str = ""                      # EntmaxViT folder, training output dir, or Hub id
    revision: Optional[str] = None       # Hub revision (branch, tag or commit)
    dataset: str = "embedded"            # Hub id, imagefolder:DIR, webdataset:GLOB, saved folder, or "embedded"
    train_split: str = "train"           # split whose features form the k-NN memory bank
    eval_split: str = "validation"       # split classified against it (the reported accuracy)
    image_column: Optional[str] = None   # image column; default: detected (an Image feature: image, img, ...)
    label_column: Optional[str] = None   # label column; default: detected (a ClassLabel: label, labels, ...)
    max_train_samples: Optional[int] = None  # use only the first N train images (quick runs); None = all
    max_eval_samples: Optional[int] = None   # use only the first N eval images; None = all
    streaming: bool = False              # read the splits on the fly (e.g. ImageNet from the Hub), no download
    # numbers of neighbours k, top-1 and top-5 reported for each (DINO: 10, 20, 100, 200)
    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07            # T of the neighbours' vote weights exp(cosine / T); DINO: 0.07
    resize: Optional[int] = None         # bicubic Resize of the shorter side (px); None: 256/224 of the crop
    # CenterCrop side (px). None: the model's own resolution, the size it was trained at (224 for ViT-S/16)
    crop: Optional[int] = None
    batch_size: Optional[int] = None     # images per extraction batch; None: sized to the machine (GPU 256, CPU 64)
    num_workers: Optional[int] = None    # decoding workers; None: sized to the machine (GPU: up to 8 per process, CPU: 0)
    cache_dir: Optional[str] = None      # feature cache (default: OUTPUT_DIR/feature_cache); "" disables
    dataset_cache_dir: Optional[str] = None  # datasets cache folder for downloads; None = the HF cache
    output_dir: str = "outputs/eval_knn"  # results_knn.json, the resolved config and the feature cache


def main(cfg: KNNEvalConfig) -> dict:
    """Extract (or load cached) features, run k-NN, write ``output_dir/results_knn.json``; return the record."""
    from .features import on_main_rank, prepare_classification, split_features
    from .results import finish_run

    cfg, accelerator, model, common = prepare_classification(cfg, "batch_size")
    common.update(n_last_blocks=1, main_rank_only=True)  # k-NN runs on the main rank
    train, train_info = split_features(model, split=cfg.train_split, max_samples=cfg.max_train_samples, **common)
    test, test_info = split_features(model, split=cfg.eval_split, max_samples=cfg.max_eval_samples, **common)
    num_classes = max(train_info["num_classes"], test_info["num_classes"])
    metrics = on_main_rank(accelerator, lambda: knn_classify(
        train["cls"][:, -1], train["labels"], test["cls"][:, -1], test["labels"], tuple(cfg.ks), cfg.temperature,
        num_classes, device=accelerator.device))
    for name, value in metrics.items():
        logger.info("k-NN %s = %.2f", name, value)
    record = finish_run(
        "knn", cfg, model, accelerator, metrics=metrics,
        dataset={"num_samples": len(test["labels"]), "num_train_samples": len(train["labels"]),
                 "num_classes": num_classes, "num_skipped": train_info["num_skipped"] + test_info["num_skipped"]},
        protocol={"name": "dino_knn", "temperature": cfg.temperature, "ks": list(cfg.ks), "feature": "cls_last_block",
                  "l2_normalized": True, "transform": common["transform"].describe()})
    if accelerator.is_main_process:
        print(f"[eval_knn] {', '.join(f'{k}={v:.2f}' for k, v in metrics.items())} -> "
              f"{Path(cfg.output_dir) / 'results_knn.json'}")
    return record
