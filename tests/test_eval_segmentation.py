"""Linear segmentation probe: learns a task whose labels are a function of patch content (patch colour ->
class) on a tiny real EntmaxViT backbone; label conventions; sliding-window evaluation; the head round trip."""

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image as ImageFeature
from PIL import Image

from entmax_vit.evaluation.segmentation_data import SegmentationRows, convert_labels, has_raw_cityscapes_ids
from entmax_vit.evaluation.segmentation_probe import (
    SegmentationEvalConfig, evaluate_probe, lr_schedule, sliding_window_logits, train_probe,
)
from entmax_vit.evaluation.metrics import segmentation_scores
from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel
from entmax_vit.modeling.segmentation_head import LinearSegmentationHead, SegmentationHeadConfig

COLOURS = np.array([[230, 20, 20], [20, 200, 20], [20, 20, 230], [240, 240, 240]], dtype=np.uint8)


def colour_patch_dataset(n: int, size: int = 32, patch: int = 8, seed: int = 0) -> Dataset:
    """Images tiled with patch x patch squares of one of four colours; the mask is the colour's index."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    grid = size // patch
    for _ in range(n):
        ids = rng.integers(0, len(COLOURS), size=(grid, grid))
        mask = ids.repeat(patch, 0).repeat(patch, 1).astype(np.uint8)
        img = COLOURS[mask] + rng.integers(-10, 10, size=(size, size, 3)).clip(-10, 10)
        images.append(Image.fromarray(img.clip(0, 255).astype(np.uint8)))
        masks.append(Image.fromarray(mask, mode="L"))
    return Dataset.from_dict({"image": images, "mask": masks},
                             features=Features({"image": ImageFeature(), "mask": ImageFeature()}))


@pytest.fixture
def tiny_backbone(tiny_config_kwargs):
    torch.manual_seed(0)
    return EntmaxViTModel(EntmaxViTConfig(attention="entmax15", **tiny_config_kwargs)).eval().requires_grad_(False)


def _rows(ds, train, protocol="neco", size=32):
    return SegmentationRows(ds, "image", "mask", protocol=protocol, train=train, input_size=size, mask_size=size,
                            hflip=train, scale_range=(0.5, 2.0))


def test_probe_learns_patch_colour_to_class(tiny_backbone):
    cfg = SegmentationEvalConfig(model="tiny", num_classes=4, input_size=32, mask_size=32, epochs=15, lr=0.1,
                                 step_epochs=[12], batch_size=8, cache_features=True)
    head = LinearSegmentationHead(SegmentationHeadConfig(num_labels=4, hidden_size=32, input_size=32))
    train = torch.utils.data.DataLoader(_rows(colour_patch_dataset(48), True), batch_size=8, shuffle=True)
    val = torch.utils.data.DataLoader(_rows(colour_patch_dataset(16, seed=1), False), batch_size=8)
    before = segmentation_scores(evaluate_probe(head, tiny_backbone, val, cfg, 4)[0])["mIoU"]
    shared: list = []  # a caller's empty list is filled with the extracted batches, for the next head to reuse
    log = train_probe(head, tiny_backbone, train, cfg, feature_cache=shared)
    assert len(shared) == len(train) and shared[0][0].dtype == torch.float16
    conf, skipped = evaluate_probe(head, tiny_backbone, val, cfg, 4)
    scores = segmentation_scores(conf)
    assert log[-1]["loss"] < log[0]["loss"]
    assert scores["mIoU"] > 90.0 and scores["mIoU"] > before + 30
    assert skipped == 0
    assert conf.sum() == 16 * 32 * 32  # every pixel counted once


def test_backbone_stays_frozen(tiny_backbone):
    ref = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    cfg = SegmentationEvalConfig(model="tiny", num_classes=4, input_size=32, mask_size=32, epochs=1, batch_size=8)
    head = LinearSegmentationHead(SegmentationHeadConfig(num_labels=4, hidden_size=32, input_size=32, layers=[0, 1],
                                                         use_cls_token=True, batch_norm=True))
    train_probe(head, tiny_backbone, torch.utils.data.DataLoader(_rows(colour_patch_dataset(8), True), batch_size=4), cfg)
    for k, v in tiny_backbone.state_dict().items():
        torch.testing.assert_close(v, ref[k])


def test_dinov2_rows_and_sliding_window(tiny_backbone):
    ds = colour_patch_dataset(2, size=48)
    train = _rows(ds, True, protocol="dinov2")[0]
    assert train["pixel_values"].shape == (3, 32, 32) and train["labels"].shape == (32, 32)
    ev = _rows(ds, False, protocol="dinov2")[0]  # shorter side -> 32, label keeps its 48x48 size
    assert ev["pixel_values"].shape == (3, 32, 32) and ev["labels"].shape == (48, 48)
    head = LinearSegmentationHead(SegmentationHeadConfig(num_labels=4, hidden_size=32, input_size=32, batch_norm=True)).eval()
    x = torch.randn(1, 3, 32, 56)
    logits = sliding_window_logits(head, tiny_backbone, x, window=32, stride=16)
    assert logits.shape == (1, 4, 32, 56)
    # one window covering the whole image equals a plain prediction
    torch.testing.assert_close(sliding_window_logits(head, tiny_backbone, x[..., :32], 32, 16),
                               head.predict(tiny_backbone, x[..., :32]))


def test_label_conventions():
    raw = np.array([[7, 26, 0], [33, -1 % 256, 24]])
    train_ids = convert_labels(raw, label_mapping="cityscapes_ids")
    assert train_ids.tolist() == [[0, 13, 255], [18, 255, 11]]
    ade = convert_labels(np.array([[0, 1, 150]]), reduce_zero=True)
    assert ade.tolist() == [[255, 0, 149]]
    with pytest.raises(ValueError, match="label_mapping"):
        convert_labels(raw, label_mapping="nope")
    ds = Dataset.from_dict({"mask": [Image.fromarray(np.full((4, 4), 26, np.uint8), mode="L")]},
                           features=Features({"mask": ImageFeature()}))
    assert has_raw_cityscapes_ids(ds, "mask")


def test_step_and_cosine_schedules():
    cfg = SegmentationEvalConfig(lr=0.01, step_epochs=[2], step_gamma=0.1)
    lrs = lr_schedule(cfg, iters_per_epoch=3, total_iters=12)
    assert lrs[:6] == [0.01] * 6 and all(abs(v - 0.001) < 1e-12 for v in lrs[6:])
    cfg = SegmentationEvalConfig(lr=1e-3, lr_schedule="warmup_cosine", warmup_iters=4)
    lrs = lr_schedule(cfg, iters_per_epoch=10, total_iters=20)
    assert lrs[3] == pytest.approx(1e-3) and lrs[0] == pytest.approx(2.5e-4) and lrs[-1] < 1e-5


def test_scanning_masks_ignores_broken_images():
    from entmax_vit.evaluation.segmentation_data import infer_num_classes

    ds = colour_patch_dataset(3)
    ds = ds.cast_column("image", ImageFeature(decode=False))
    rows = ds.to_dict()
    rows["image"][0] = {"bytes": b"not an image", "path": None}
    broken = Dataset.from_dict(rows, features=Features({"image": ImageFeature(), "mask": ImageFeature()}))
    assert infer_num_classes(broken, "mask", 255, {}) == 4
    sample = _rows(broken, train=False)[0]
    assert sample["valid"] is False and (sample["labels"] == 255).all()
    assert _rows(broken, train=False)[1]["valid"] is True
