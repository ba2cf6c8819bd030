"""Linear probe: the default is official DINO eval_linear (bilinear RandomResizedCrop + flip every epoch, one lr =
0.001 x batch/256, SGD momentum 0.9, no weight decay, per-epoch cosine, N(0, 0.01) head, best epoch reported), and
it learns separable data end to end; the cached grid (a fast option) is labelled as such. Grid internals:
separable features -> ~100 %, noise -> chance; DINO feature layout; one pass trains every head independently."""

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
    accs = evaluate_grid(grid, test)
    assert max(a["top1"] for a in accs) == 100.0

    noise_train = _features(200, 5, 2, 16, 1.0, seed=2, signal=False)
    noise_test = _features(200, 5, 2, 16, 1.0, seed=3, signal=False)
    torch.manual_seed(0)
    grid = LinearGrid([HeadSpec(1, False, 0.1)], 16, 5)
    train_grid_cached(grid, noise_train, epochs=10, batch_size=64, show=False)
    (acc,) = evaluate_grid(grid, noise_test)
    assert abs(acc["top1"] - 20.0) < 6.0


def test_heads_train_independently():
    train = _features(10, 3, 2, 8, 0.5, seed=4)
    torch.manual_seed(0)
    big = LinearGrid([HeadSpec(1, False, 0.1), HeadSpec(2, True, 0.5)], 8, 3)
    torch.manual_seed(0)
    alone = LinearGrid([HeadSpec(1, False, 0.1)], 8, 3)
    train_grid_cached(big, train, epochs=3, batch_size=8, show=False)
    train_grid_cached(alone, train, epochs=3, batch_size=8, show=False)
    torch.testing.assert_close(big.heads[0].weight, alone.heads[0].weight)


# ---------------------------------------------------------------------------------------------------------
# The default protocol is official DINO eval_linear
# ---------------------------------------------------------------------------------------------------------
def test_dino_train_transform_is_torchvision_default_rrc_bilinear_and_flips():
    from PIL import Image
    from torchvision import transforms

    from entmax_vit.evaluation.linear_probe import DinoTrainTransform

    tf = DinoTrainTransform(224)
    reference = transforms.RandomResizedCrop(224)  # official: pth_transforms.RandomResizedCrop(224), defaults
    assert tf.crop_transform.interpolation == reference.interpolation == transforms.InterpolationMode.BILINEAR
    assert tf.crop_transform.scale == reference.scale == (0.08, 1.0)
    assert tf.crop_transform.ratio == reference.ratio
    assert any(isinstance(t, transforms.RandomHorizontalFlip) and t.p == 0.5 for t in tf.transform.transforms)
    assert "bilinear" in tf.describe()
    # a left/right split image: over many draws both orientations appear (the flip is drawn every call)
    arr = torch.zeros(3, 64, 64)
    arr[0, :, :32] = 1.0
    image = Image.fromarray((arr.permute(1, 2, 0).numpy() * 255).astype("uint8"))
    torch.manual_seed(0)
    tf = DinoTrainTransform(32)
    lefts = []
    for _ in range(40):
        x = tf(image)
        assert x.shape == (3, 32, 32)
        lefts.append(bool(x[0, :, :4].mean() > x[0, :, -4:].mean()))
    assert 0 < sum(lefts) < 40


def test_dino_lr_rule_optimizer_and_feature_layout():
    from entmax_vit.evaluation.linear_probe import (DINO_BASE_LR, LinearEvalConfig, dino_feature_layout, is_official,
                                                    make_optimizer, resolve_heads)
    from entmax_vit.recipe import scaled_lr

    assert DINO_BASE_LR == 0.001 and scaled_lr(0.001, 1024) == pytest.approx(0.004)  # 128 per GPU x 8
    grid = LinearGrid([HeadSpec(4, False, DINO_BASE_LR)], 8, 3)
    torch.testing.assert_close(grid.heads[0].bias, torch.zeros(3))
    assert abs(float(grid.heads[0].weight.detach().std()) - 0.01) < 0.005  # N(0, 0.01)
    opt = make_optimizer(grid, 512, 0.9, 0.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 0.0
    assert dino_feature_layout(384) == (4, False) and dino_feature_layout(192) == (4, False)  # ViT-S, ViT-Ti
    assert dino_feature_layout(768) == (1, True)  # ViT-B: n=1 with avgpool
    cfg = LinearEvalConfig(model="m")
    assert cfg.protocol == "dino" and cfg.epochs == 100 and cfg.batch_size == 1024
    assert (cfg.resize, cfg.crop, cfg.momentum, cfg.weight_decay) == (None, None, 0.9, 0.0)  # None: the model's own
    cfg = LinearEvalConfig(model="m", resize=256, crop=224)  # as main resolves them for a 224-px ViT-S/16
    specs = resolve_heads(cfg, 384, 12)
    assert specs == [HeadSpec(4, False, 0.001)] and is_official(cfg, specs, 384)
    assert resolve_heads(cfg, 768, 12) == [HeadSpec(1, True, 0.001)]
    assert not is_official(LinearEvalConfig(model="m", epochs=10), specs, 384)
    grid_cfg = LinearEvalConfig(model="m", protocol="cached_grid")
    assert len(resolve_heads(grid_cfg, 384, 12)) == 13 and not is_official(grid_cfg, resolve_heads(grid_cfg, 384, 12), 384)


def test_cosine_schedule_matches_torch_cosine_annealing_per_epoch():
    grid = LinearGrid([HeadSpec(1, False, 0.001)], 4, 2)
    log = train_grid_cached(grid, _features(2, 2, 1, 4, 0.5, seed=5), epochs=100, batch_size=1024, show=False)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.004)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, 100, eta_min=0)  # official, stepped per epoch
    for epoch in range(100):
        assert log[epoch]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        ref_opt.step()
        ref.step()


def test_best_epoch_is_reported_not_the_last():
    from entmax_vit.evaluation.linear_probe import best_epoch

    log = [{"epoch": e, "eval": [{"top1": t, "top5": 100.0}]} for e, t in ((1, 50.0), (2, 70.0), (3, 70.0), (4, 60.0))]
    assert best_epoch(log)["epoch"] == 2  # the highest top-1, the earliest on ties
    with pytest.raises(ValueError, match="no epoch"):
        best_epoch([{"epoch": 1}])


def _coloured_split(n: int, seed: int):
    """Two classes told apart by colour only (random texture): separable after any crop and flip."""
    import io

    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image as ImageFeature
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        base = np.array([210, 40, 40] if i % 2 else [40, 40, 210])
        arr = (base + rng.integers(-30, 30, size=(40, 40, 3))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
        labels.append(i % 2)
    feats = Features({"image": ImageFeature(), "label": ClassLabel(names=["blue", "red"])})
    return Dataset.from_dict({"image": images, "label": labels}, features=feats)


@pytest.fixture(scope="module")
def linear_assets(tmp_path_factory):
    from datasets import DatasetDict

    from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel

    root = tmp_path_factory.mktemp("linear")
    torch.manual_seed(0)
    EntmaxViTModel(EntmaxViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64, attention="entmax15")).save_pretrained(root / "model")
    DatasetDict({"train": _coloured_split(32, 0), "validation": _coloured_split(16, 1)}).save_to_disk(root / "data")
    return root


def test_dino_protocol_learns_separable_data_and_reports_best_epoch(linear_assets, tmp_path):
    import json

    from entmax_vit.evaluation.linear_probe import LinearEvalConfig, main

    out = tmp_path / "dino"
    cfg = LinearEvalConfig(model=str(linear_assets / "model"), dataset=str(linear_assets / "data"), resize=32, crop=32,
                           epochs=6, batch_size=8, base_lrs=[8.0], output_dir=str(out), cache_dir="")
    record = main(cfg)
    proto = record["protocol"]
    assert proto["name"] == "dino_eval_linear" and proto["reported"] == "best_epoch" and not proto["official"]
    assert proto["train_transform"].startswith("rrc32_bilinear_flip") and "bicubic" in proto["eval_transform"]
    assert proto["n_last_blocks"] == 2 and proto["avgpool_patchtokens"] is False  # DINO's ViT-S choice, clipped to depth
    assert proto["lr"] == pytest.approx(8.0 * 8 / 256)
    log = json.loads((out / "grid.json").read_text())["log"]
    assert [e["epoch"] for e in log] == list(range(1, 7)) and all("eval" in e for e in log)
    tops = [e["eval"][0]["top1"] for e in log]
    assert record["metrics"]["top1"] == max(tops)  # the best epoch, as official DINO reports
    assert proto["best_epoch"] == tops.index(max(tops)) + 1
    assert record["metrics"]["top1_last_epoch"] == tops[-1]
    assert record["metrics"]["top1"] >= 90.0  # separable by colour: learned
    assert log[-1]["lr"] < log[0]["lr"]  # cosine


def test_cached_grid_is_labelled_as_such(linear_assets, tmp_path):
    from entmax_vit.evaluation.linear_probe import LinearEvalConfig, main

    cfg = LinearEvalConfig(model=str(linear_assets / "model"), dataset=str(linear_assets / "data"), resize=32, crop=32,
                           epochs=20, batch_size=8, protocol="cached_grid", base_lrs=[0.5, 8.0],
                           output_dir=str(tmp_path / "grid"), cache_dir="")
    record = main(cfg)
    proto = record["protocol"]
    assert proto["name"] == "cached_grid" and proto["reported"] == "last_epoch" and not proto["official"]
    assert proto["train_transform"] == "center_crop_cached" and proto["grid_size"] == 2
    assert record["metrics"]["top1"] >= 90.0
