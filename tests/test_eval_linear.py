"""Linear probe grid: separable features -> ~100 %, noise -> chance; DINO feature layout; one pass trains
every head independently (a head's result does not depend on the other heads in the grid)."""

import pytest
import torch

from entmax_vit.evaluation.linear_probe import HeadSpec, LinearGrid, evaluate_grid, probe_inputs, train_grid_cached


def _features(n_per_class, num_classes, blocks, dim, noise, seed, signal=True):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    base = centers[labels] if signal else torch.zeros(len(labels), dim)
    cls = base[:, None, :] + noise * torch.randn(len(labels), blocks, dim, generator=g)
    patch_mean = base + noise * torch.randn(len(labels), dim, generator=g)
    if not signal:
        labels = labels[torch.randperm(len(labels), generator=g)]
    return {"cls": cls, "patch_mean": patch_mean, "labels": labels}


def test_probe_inputs_layout():
    cls = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)  # (B, L, D)
    pm = torch.full((2, 3), -1.0)
    x = probe_inputs(cls, pm, n=2, avgpool=True)
    assert x.shape == (2, 9)
    torch.testing.assert_close(x[0], torch.tensor([6.0, 7, 8, 9, 10, 11, -1, -1, -1]))  # blocks L-2, L-1, then avgpool
    with pytest.raises(ValueError, match="n_last_blocks"):
        probe_inputs(cls, pm, n=5, avgpool=False)


def test_separable_features_reach_100_and_noise_gives_chance():
    specs = [HeadSpec(n, a, lr) for n in (1, 2) for a in (False, True) for lr in (0.01, 1.0)]
    train = _features(40, 5, 2, 16, 0.3, seed=0)
    test = _features(20, 5, 2, 16, 0.3, seed=1)
    torch.manual_seed(0)
    grid = LinearGrid(specs, 16, 5)
    train_grid_cached(grid, train, epochs=30, batch_size=32, show=False)
    accs = evaluate_grid(grid, test["cls"], test["patch_mean"], test["labels"])
    assert max(a[1] for a in accs) == 100.0

    noise_train = _features(200, 5, 2, 16, 1.0, seed=2, signal=False)
    noise_test = _features(200, 5, 2, 16, 1.0, seed=3, signal=False)
    torch.manual_seed(0)
    grid = LinearGrid([HeadSpec(1, False, 0.1)], 16, 5)
    train_grid_cached(grid, noise_train, epochs=10, batch_size=64, show=False)
    (acc,) = evaluate_grid(grid, noise_test["cls"], noise_test["patch_mean"], noise_test["labels"])
    assert abs(acc[1] - 20.0) < 6.0


def test_heads_train_independently():
    train = _features(10, 3, 2, 8, 0.5, seed=4)
    torch.manual_seed(0)
    big = LinearGrid([HeadSpec(1, False, 0.1), HeadSpec(2, True, 0.5)], 8, 3)
    torch.manual_seed(0)
    alone = LinearGrid([HeadSpec(1, False, 0.1)], 8, 3)
    train_grid_cached(big, train, epochs=3, batch_size=8, show=False)
    train_grid_cached(alone, train, epochs=3, batch_size=8, show=False)
    torch.testing.assert_close(big.heads[0].weight, alone.heads[0].weight)
