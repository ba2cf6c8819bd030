"""Segmentation metrics from a confusion matrix ``conf[t, p]`` accumulated on device, and top-k accuracy. mIoU as
`evaluate`'s ``mean_iou`` and mmseg (docs/evaluation.md), not `evaluate` itself: it keeps every pixel map until
``compute()`` and loads the metric from the Hub (offline it fails); tests/test_eval_metrics.py checks against its
definition."""

import torch


def reduce_zero_label(labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """ADE20K convention: 0 ("other") becomes ``ignore_index``, every other class id shifts down by one."""
    out = labels.long() - 1
    out[labels.long() == 0] = ignore_index
    out[labels.long() == ignore_index] = ignore_index  # keep already-ignored pixels ignored
    return out


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """(K, K) int64 counts of ``target`` (rows) vs ``pred`` (columns), integer tensors of one shape, on their device;
    the ignore index and targets outside [0, K) left out."""
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes) & (target != ignore_index)
    pred, target = pred[keep], target[keep]
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predictions must be class ids in [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def segmentation_scores(conf: torch.Tensor) -> dict[str, object]:
    """mIoU, pixel accuracy, mean class accuracy (percent) and per-class IoU (fraction, NaN = absent)."""
    conf = conf.double().cpu()
    tp = conf.diag()
    gt = conf.sum(1)  # pixels of each target class
    pr = conf.sum(0)  # pixels predicted as each class
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    class_acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    total = conf.sum()
    return {
        "mIoU": 100.0 * float(torch.nanmean(iou)) if torch.isfinite(iou).any() else float("nan"),
        "pixel_accuracy": 100.0 * float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_class_accuracy": 100.0 * float(torch.nanmean(class_acc)) if torch.isfinite(class_acc).any() else float("nan"),
        "per_class_iou": iou.tolist(),
    }


def topk_accuracy(logits_or_scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Percentage of rows whose label is among the top-k scores, for each k (clipped to the class count)."""
    num_classes = logits_or_scores.shape[1]
    maxk = min(max(ks), num_classes)
    top = logits_or_scores.topk(maxk, dim=1).indices  # (N, maxk)
    hit = top == labels[:, None]
    n = max(len(labels), 1)
    return {k: 100.0 * hit[:, : min(k, num_classes)].any(1).float().sum().item() / n for k in ks}
