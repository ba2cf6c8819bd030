"""Weighted k-NN (official DINO recipe): separable features -> ~100 %, noise -> chance, votes weighted by
exp(cos / T)."""

import math

import pytest
import torch

from entmax_vit.evaluation.knn import knn_classify, knn_scores


def _clusters(n_per_class: int, num_classes: int, dim: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centers[labels] + noise * torch.randn(len(labels), dim, generator=g), labels


def test_separable_features_are_classified_perfectly():
    xtr, ytr = _clusters(30, 10, 64, 0.1, seed=0)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 64, generator=g)  # the same centers as above (same seed, drawn first)
    yte = torch.arange(10).repeat_interleave(5)
    xte = centers[yte] + 0.1 * torch.randn(len(yte), 64)
    metrics = knn_classify(xtr, ytr, xte, yte, ks=(10, 20, 100, 200))
    assert metrics["top1_k10"] == 100.0 and metrics["top1_k20"] == 100.0
    assert metrics["top5_k10"] == 100.0
    assert "top1_k200" in metrics and "top1_k100" in metrics  # 300 train samples: no clipping needed


def test_noise_gives_chance():
    torch.manual_seed(1)
    xtr, ytr = torch.randn(2000, 32), torch.randint(0, 10, (2000,))
    xte, yte = torch.randn(1000, 32), torch.randint(0, 10, (1000,))
    metrics = knn_classify(xtr, ytr, xte, yte, ks=(20,), num_classes=10)
    assert abs(metrics["top1_k20"] - 10.0) < 4.0
    assert abs(metrics["top5_k20"] - 50.0) < 6.0


def test_k_is_clipped_to_train_size_and_deduplicated():
    xtr, ytr = _clusters(3, 4, 8, 0.05, seed=2)  # 12 training samples
    metrics = knn_classify(xtr, ytr, xtr, ytr, ks=(10, 20, 100, 200))
    assert sorted(metrics) == ["top1_k10", "top1_k12", "top5_k10", "top5_k12"]


def test_votes_are_weighted_by_exp_similarity_over_temperature():
    # Two training points: class 0 at cos 1, class 1 at cos 0 with respect to the query.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores = knn_scores(train, torch.tensor([0, 1]), torch.tensor([[2.0, 0.0]]), k=2, num_classes=2, temperature=0.07)
    assert scores[0, 0].item() == pytest.approx(math.exp(1 / 0.07), rel=1e-5)
    assert scores[0, 1].item() == pytest.approx(1.0, rel=1e-5)
    # features are L2-normalised: scaling a training vector changes nothing
    scaled = knn_scores(train * torch.tensor([[5.0], [0.3]]), torch.tensor([0, 1]), torch.tensor([[2.0, 0.0]]), 2, 2)
    torch.testing.assert_close(scaled, scores)


def test_empty_train_set_is_rejected():
    with pytest.raises(ValueError, match="at least one"):
        knn_scores(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(2, 4), 5, 3)
