"""The DINO training data path: deterministic per-sample augmentation, broken images skipped and counted."""

from __future__ import annotations

import io
import json

import pytest
import torch

from entmax_vit.cli.config import parse_config
from entmax_vit.training.config import DataConfig, DinoConfig
from entmax_vit.training.dino import CONFIG_DIR, main
from entmax_vit.training.dino_data import build_dataset
from entmax_vit.training.multicrop import MultiCropConfig
from test_training_support import make_image_dataset, tiny_args

CROPS = MultiCropConfig(global_size=32, local_size=16, local_crops_number=2)


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    data = make_image_dataset(tmp_path, num_images=6)
    ds = build_dataset(DataConfig(source=str(data), num_workers=0), CROPS, seed=0)
    _, first, _ = ds[2]
    torch.manual_seed(123)  # the caller's RNG neither matters nor is consumed
    state = torch.get_rng_state()
    _ = ds[4]
    _, again, _ = ds[2]
    assert torch.equal(torch.get_rng_state(), state)
    assert len(first) == 4 and all(torch.equal(a, b) for a, b in zip(first, again))
    ds.set_epoch(1)
    _, other_epoch, _ = ds[2]
    assert not torch.equal(first[0], other_epoch[0])
    assert [tuple(c.shape) for c in first] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2


def test_broken_images_are_skipped_and_counted(tmp_path):
    from datasets import Dataset, Image as ImageFeature
    from PIL import Image

    good = []
    for i in range(16):
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), (16 * i, 80, 200 - 10 * i)).save(buf, format="PNG")
        good.append(buf.getvalue())
    broken = {3: b"not an image at all", 7: good[7][:50], 11: b"", 14: b"\x89PNG\r\n\x1a\n"}  # isolated indices
    rows = [{"bytes": broken.get(i, good[i]), "path": None} for i in range(16)]
    path = tmp_path / "broken"
    Dataset.from_dict({"image": rows}).cast_column("image", ImageFeature()).save_to_disk(str(path))

    out = tmp_path / "run"
    main(parse_config(DinoConfig, tiny_args(path, out, **{"checkpoint.every_steps": 0}), preset_dir=CONFIG_DIR))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # every epoch requests each broken index once and replaces it by the next (readable) image
    assert rows[-1]["images_skipped"] == 2 * len(broken)
    assert all(r["loss"] == r["loss"] for r in rows)  # finite
    assert (out / "final_model" / "model.safetensors").is_file()


def test_every_image_broken_is_a_clear_error(tmp_path):
    from datasets import Dataset, Image as ImageFeature

    path = tmp_path / "all_broken"
    Dataset.from_dict({"image": [{"bytes": b"junk", "path": None}] * 8}).cast_column(
        "image", ImageFeature()).save_to_disk(str(path))
    ds = build_dataset(DataConfig(source=str(path), num_workers=0), CROPS, seed=0)
    with pytest.raises(ValueError, match="could not be decoded"):
        ds[0]


def test_missing_image_column_is_named(tmp_path):
    data = make_image_dataset(tmp_path, num_images=4)
    with pytest.raises(ValueError, match="image"):
        build_dataset(DataConfig(source=str(data), image_column="jpeg", num_workers=0), CROPS, seed=0)
