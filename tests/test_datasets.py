"""load_image_dataset / find_column / shard_for_rank on local data made in tmp_path (offline)."""

import io
import tarfile

import datasets
import numpy as np
import pytest
from PIL import Image

from entmax_vit.data.datasets import (
    DatasetLoadError,
    find_column,
    load_image_dataset,
    shard_for_rank,
    webdataset_shards,
)
from entmax_vit.data.images import decode_image


def png_bytes(value: int, size: int = 8) -> bytes:
    """A constant-colour PNG (lossless, so pixel values survive exactly)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def first_pixel(value) -> int:
    return int(np.asarray(decode_image(value))[0, 0, 0])


@pytest.fixture
def imagefolder(tmp_path):
    root = tmp_path / "folder"
    for split, n in (("train", 3), ("validation", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                (root / split / cls / f"{i}.png").write_bytes(png_bytes(10 * i))
    return root


def write_shard(path, keys):
    with tarfile.open(path, "w") as tar:
        for i in keys:
            for ext, data in (("jpg", png_bytes(i)), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"sample{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_imagefolder_splits_and_columns(imagefolder, tmp_path):
    train = load_image_dataset(f"imagefolder:{imagefolder}", cache_dir=tmp_path / "cache")
    val = load_image_dataset(f"imagefolder:{imagefolder}", split="validation", cache_dir=tmp_path / "cache")
    assert isinstance(train, datasets.Dataset) and (len(train), len(val)) == (6, 4)
    assert find_column(train, "image") == "image" and find_column(train, "label") == "label"
    assert train.features["label"].names == ["cat", "dog"]
    with pytest.raises(ValueError, match="test"):
        load_image_dataset(f"imagefolder:{imagefolder}", split="test", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="not a directory"):
        load_image_dataset(f"imagefolder:{tmp_path / 'nope'}")
    stream = load_image_dataset(f"imagefolder:{imagefolder}", streaming=True, cache_dir=tmp_path / "cache")
    assert isinstance(stream, datasets.IterableDataset) and sum(1 for _ in stream) == 6


def test_webdataset_dir_glob_and_streaming(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "train-000.tar", range(0, 4))
    write_shard(shards / "train-001.tar", range(4, 8))
    write_shard(shards / "validation-000.tar", range(8, 11))
    cache = tmp_path / "cache"
    train = load_image_dataset(f"webdataset:{shards}", cache_dir=cache)
    val = load_image_dataset(f"webdataset:{shards}", split="validation", cache_dir=cache)
    assert (len(train), len(val)) == (8, 3)
    assert find_column(train, "image") == "jpg" and find_column(train, "label") == "cls"
    assert sorted(first_pixel(v) for v in val["jpg"]) == [8, 9, 10]
    one = load_image_dataset(f"webdataset:{shards}/train-001.tar", cache_dir=cache)
    assert sorted(one["cls"]) == sorted(i % 3 for i in range(4, 8))
    stream = load_image_dataset(f"webdataset:{shards}", streaming=True, cache_dir=cache)
    assert isinstance(stream, datasets.IterableDataset) and stream.n_shards == 2
    assert sorted(r["__key__"] for r in stream) == [f"sample{i:04d}" for i in range(8)]
    with pytest.raises(ValueError, match="no .tar shards for split 'test'"):
        load_image_dataset(f"webdataset:{shards}", split="test")
    with pytest.raises(ValueError, match="no files match"):
        webdataset_shards(str(tmp_path / "missing-*.tar"), "train")


def test_webdataset_per_split_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "validation").mkdir()
    write_shard(tmp_path / "train" / "a.tar", range(3))
    write_shard(tmp_path / "validation" / "a.tar", range(3, 5))
    assert webdataset_shards(str(tmp_path), "validation") == [str(tmp_path / "validation" / "a.tar")]
    assert len(load_image_dataset(f"webdataset:{tmp_path}", split="validation", cache_dir=tmp_path / "c")) == 2


def image_dataset(n: int) -> datasets.Dataset:
    ds = datasets.Dataset.from_dict({
        "image": [{"bytes": png_bytes(i), "path": None} for i in range(n)],
        "mask": [{"bytes": png_bytes(i % 2), "path": None} for i in range(n)],
        "label": [i % 2 for i in range(n)],
    })
    return ds.cast_column("image", datasets.Image()).cast_column("mask", datasets.Image()).cast_column(
        "label", datasets.ClassLabel(names=["a", "b"]))


def test_save_to_disk_dataset_dict_and_single(tmp_path):
    dd = datasets.DatasetDict({"train": image_dataset(6), "validation": image_dataset(3)})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_image_dataset(str(tmp_path / "dd"), split="validation")) == 3
    with pytest.raises(ValueError, match="splits: \\['train', 'validation'\\]"):
        load_image_dataset(str(tmp_path / "dd"), split="test")
    stream = load_image_dataset(str(tmp_path / "dd"), streaming=True)
    assert isinstance(stream, datasets.IterableDataset) and stream.n_shards == 6
    assert sorted(first_pixel(r["image"]) for r in stream) == list(range(6))
    image_dataset(4).save_to_disk(str(tmp_path / "single"))
    single = load_image_dataset(str(tmp_path / "single"), split="validation")
    assert len(single) == 4


def test_find_column_kinds_names_and_errors():
    ds = image_dataset(2)
    assert (find_column(ds, "image"), find_column(ds, "mask"), find_column(ds, "label")) == ("image", "mask", "label")
    assert find_column(ds, "image", name="mask") == "mask"
    with pytest.raises(ValueError, match=r"available columns: image \(Image\), mask \(Image\), label \(ClassLabel\)"):
        find_column(ds, "image", name="pixels")
    seg = datasets.Dataset.from_dict({"annotation": [png_bytes(1)], "picture": [png_bytes(2)]})
    seg = seg.cast_column("annotation", datasets.Image()).cast_column("picture", datasets.Image())
    assert find_column(seg, "image") == "picture" and find_column(seg, "mask") == "annotation"
    plain = datasets.Dataset.from_dict({"text": ["x"], "target": [3]})
    assert find_column(plain, "label") == "target"
    with pytest.raises(ValueError, match=r"no image column found; available columns: text \(Value\)"):
        find_column(plain, "image")
    with pytest.raises(ValueError, match="no mask column"):
        find_column(datasets.Dataset.from_dict({"image": [png_bytes(1)]}).cast_column("image", datasets.Image()), "mask")
    with pytest.raises(ValueError, match="kind"):
        find_column(ds, "depth")
    assert find_column(ds.to_iterable_dataset(), "mask") == "mask"


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("streaming", [False, True])
def test_shard_for_rank_reads_every_sample_once(world_size, streaming):
    ds = datasets.Dataset.from_dict({"idx": list(range(23))})
    if streaming:
        ds = ds.to_iterable_dataset(num_shards=6)  # divisible by 2 and 3: whole shards per rank
    seen = [[row["idx"] for row in shard_for_rank(ds, r, world_size)] for r in range(world_size)]
    flat = [i for part in seen for i in part]
    assert sorted(flat) == list(range(23)) and len(set(flat)) == 23
    assert max(map(len, seen)) - min(map(len, seen)) <= 4  # balanced up to shard granularity


def test_shard_for_rank_when_shards_do_not_divide():
    ds = datasets.Dataset.from_dict({"idx": list(range(10))}).to_iterable_dataset(num_shards=3)
    seen = [[row["idx"] for row in shard_for_rank(ds, r, 2)] for r in range(2)]
    assert sorted(seen[0] + seen[1]) == list(range(10)) and not set(seen[0]) & set(seen[1])
    assert shard_for_rank(ds, 0, 1) is ds
    with pytest.raises(ValueError, match="rank"):
        shard_for_rank(ds, 2, 2)


def test_hub_id_offline_error_mentions_token_and_local_options():
    with pytest.raises(DatasetLoadError, match="HF_TOKEN") as err:
        load_image_dataset("ILSVRC/imagenet-1k", split="validation", streaming=True)
    assert "imagefolder:DIR" in str(err.value) and isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match="non-empty"):
        load_image_dataset("  ")


def test_embedded_small_and_option_errors(tmp_path):
    source = "embedded:image_size=32,num_train=4,num_validation=3"
    val = load_image_dataset(source, split="validation", cache_dir=tmp_path)
    assert len(val) == 3 and set(val.column_names) >= {"image", "label", "mask"}
    assert find_column(val, "image") == "image" and find_column(val, "mask") == "mask"
    assert decode_image(val[0]["image"]).size == (32, 32)
    stream = load_image_dataset(source, split="train", streaming=True, cache_dir=tmp_path)
    assert sum(1 for _ in stream) == 4
    with pytest.raises(ValueError, match="bad option"):
        load_image_dataset("embedded:colour=red", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="must be an integer"):
        load_image_dataset("embedded:num_train=many", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no split 'test'"):
        load_image_dataset(source, split="test", cache_dir=tmp_path)


def test_undecoded_images_hands_broken_files_to_the_decoder():
    from entmax_vit.data.datasets import undecoded_images
    from entmax_vit.data.images import ImageDecodeError

    good = png_bytes(7)
    ds = datasets.Dataset.from_dict({"image": [{"bytes": good, "path": None}, {"bytes": good[:40], "path": None}],
                                     "label": [0, 1], "extra": ["a", "b"]}).cast_column("image", datasets.Image())
    with pytest.raises(OSError):  # datasets' own decoding trips on the truncated file
        ds[1]["image"]
    raw = undecoded_images(ds, "image", keep=("label",))
    assert raw.column_names == ["image", "label"] and raw[1]["label"] == 1
    assert first_pixel(raw[0]["image"]) == 7
    with pytest.raises(ImageDecodeError):
        decode_image(raw[1]["image"])
    with pytest.raises(ValueError, match="no image column 'pixels'"):
        undecoded_images(ds, "pixels")
