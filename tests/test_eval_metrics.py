"""Segmentation metrics against an independent per-image numpy implementation of the `evaluate` library's
``mean_iou`` definition (intersect/union areas summed over images, IoU = total_intersect / total_union,
nanmean over classes; overall accuracy = total_intersect / total_label), with ignore labels and
reduce_zero_label."""

import numpy as np
import pytest
import torch

from entmax_vit.evaluation.metrics import confusion_matrix, reduce_zero_label, segmentation_scores, topk_accuracy


def _reference_mean_iou(preds, labels, num_labels, ignore_index, reduce_labels):
    """Per image: intersect/union/pred/label areas by histogram, summed over the dataset (evaluate's recipe)."""
    total = {k: np.zeros(num_labels) for k in ("inter", "union", "pred", "label")}
    for pred, label in zip(preds, labels):
        label = label.astype(np.int64).copy()
        if reduce_labels:
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        keep = label != ignore_index
        pred, label = pred[keep], label[keep]
        inter = pred[pred == label]
        area_inter = np.histogram(inter, bins=num_labels, range=(0, num_labels - 1))[0]
        area_pred = np.histogram(pred, bins=num_labels, range=(0, num_labels - 1))[0]
        area_label = np.histogram(label, bins=num_labels, range=(0, num_labels - 1))[0]
        total["inter"] += area_inter
        total["pred"] += area_pred
        total["label"] += area_label
        total["union"] += area_pred + area_label - area_inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = total["inter"] / total["union"]
        acc = total["inter"] / total["label"]
    return {"mean_iou": np.nanmean(iou), "per_category_iou": iou, "mean_accuracy": np.nanmean(acc),
            "overall_accuracy": total["inter"].sum() / total["label"].sum()}


@pytest.mark.parametrize("reduce_labels", [False, True])
def test_miou_matches_independent_reference(reduce_labels):
    rng = np.random.default_rng(0)
    k, ignore = 6, 255
    preds, labels = [], []
    for _ in range(7):
        h, w = rng.integers(5, 20, size=2)
        label = rng.integers(0, k + (1 if reduce_labels else 0), size=(h, w))
        label[rng.random((h, w)) < 0.15] = ignore
        pred = np.where(rng.random((h, w)) < 0.6, np.clip(label - (1 if reduce_labels else 0), 0, k - 1), rng.integers(0, k, (h, w)))
        # leave class k-1 out of both targets and predictions in one run -> NaN IoU, excluded by nanmean
        preds.append(pred)
        labels.append(label)
    if not reduce_labels:
        preds = [np.where(p == k - 1, 0, p) for p in preds]
        labels = [np.where(l == k - 1, 0, l) for l in labels]
    ref = _reference_mean_iou(preds, labels, k, ignore, reduce_labels)
    conf = torch.zeros(k, k, dtype=torch.long)
    for pred, label in zip(preds, labels):
        target = torch.from_numpy(label)
        if reduce_labels:
            target = reduce_zero_label(target, ignore)
        conf += confusion_matrix(torch.from_numpy(pred), target, k, ignore)
    ours = segmentation_scores(conf)
    assert ours["mIoU"] == pytest.approx(100 * ref["mean_iou"], abs=1e-9)
    assert ours["pixel_accuracy"] == pytest.approx(100 * ref["overall_accuracy"], abs=1e-9)
    assert ours["mean_class_accuracy"] == pytest.approx(100 * ref["mean_accuracy"], abs=1e-9)
    np.testing.assert_allclose(np.array(ours["per_class_iou"]), ref["per_category_iou"], equal_nan=True)
    if not reduce_labels:
        assert np.isnan(ours["per_class_iou"][k - 1])


def test_perfect_and_disjoint_predictions():
    target = torch.tensor([[0, 1], [2, 255]])
    perfect = segmentation_scores(confusion_matrix(target.clamp(max=2), target, 3))
    assert perfect["mIoU"] == 100.0 and perfect["pixel_accuracy"] == 100.0
    wrong = segmentation_scores(confusion_matrix((target.clamp(max=2) + 1) % 3, target, 3))
    assert wrong["mIoU"] == 0.0 and wrong["pixel_accuracy"] == 0.0


def test_confusion_matrix_checks_inputs():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match="class ids"):
        confusion_matrix(torch.full((2, 2), 5), torch.zeros(2, 2), 3)


def test_reduce_zero_label_convention():
    labels = torch.tensor([0, 1, 5, 255])
    assert reduce_zero_label(labels).tolist() == [255, 0, 4, 255]


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    acc = topk_accuracy(scores, labels, (1, 2, 5))
    assert acc[1] == pytest.approx(100 / 3)
    assert acc[2] == pytest.approx(200 / 3)
    assert acc[5] == 100.0  # clipped to the 3 classes
