"""Weighted k-NN (official DINO recipe): separable features -> ~100 %, noise -> chance, votes weighted by
exp(cos / T)."""

import math

import pytest
import torch

from entmax_vit.evaluation.knn import knn_classify, knn_scores_for_ks


def knn_scores(train, train_labels, test, k, num_classes, temperature=0.07):
    """Class scores (N_test, C) for one k."""
    return next(iter(knn_scores_for_ks(train, train_labels, test, (k,), num_classes, temperature).values()))


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


def test_one_top_k_at_the_largest_k_gives_every_k():
    """The scores of every k come from one sorted top-k at the largest k: the same as a top-k per k."""
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 7, (300,), generator=g)
    together = knn_scores_for_ks(train, labels, test, (10, 20, 100, 200), 7, chunk_size=16)
    train_n, test_n = torch.nn.functional.normalize(train, dim=1), torch.nn.functional.normalize(test, dim=1)
    for k, scores in together.items():
        sim, idx = (test_n @ train_n.T).topk(k, dim=1)
        alone = (torch.nn.functional.one_hot(labels[idx], 7).float() * (sim / 0.07).exp()[..., None]).sum(1)
        torch.testing.assert_close(scores, alone)


def test_loader_defaults_are_sized_to_the_machine(monkeypatch):
    from types import SimpleNamespace

    from entmax_vit.evaluation.features import sized_to_machine

    cpu = SimpleNamespace(device=torch.device("cpu"), state=SimpleNamespace(num_processes=1))
    assert sized_to_machine(None, None, cpu) == (64, 0) and sized_to_machine(32, 3, cpu) == (32, 3)
    gpu = SimpleNamespace(device=torch.device("cuda", 0), state=SimpleNamespace(num_processes=8))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(96)), raising=False)
    assert sized_to_machine(None, None, gpu) == (256, 8)  # 96 cores / 8 processes - 1, capped at 8
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert sized_to_machine(None, None, gpu) == (256, 1)
