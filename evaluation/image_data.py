"""The evaluation data path: HF datasets rows -> (pixel_values, label | mask, valid) batches.

Images are decoded by the project's one decoder, ``entmax_vit.modeling.image_decoding.decode_image`` (the one
training, the image processor and the pipelines use: EXIF, every PIL mode, bomb and truncation checks); masks are
opened with the same checks but their values kept (``open_image``).
A row that fails to decode does not crash the run and is not silently dropped: it yields a zero image with
``valid = False``; the loops drop invalid rows after gathering across ranks and log how many were skipped.
Keeping the row (instead of filtering it in the collate function) keeps batch shapes equal on every rank, so
``accelerator.gather_for_metrics`` works unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from entmax_vit.modeling import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)


def open_dataset(source: str, split: str, cache_dir: Optional[str] = None, max_samples: Optional[int] = None,
                 streaming: bool = False, accelerator: Any = None):
    """One split of ``source`` (Hub id, ``imagefolder:DIR``, saved folder, ``embedded``...): map-style, or an
    ``IterableDataset`` read on the fly with ``streaming`` (the first ``max_samples`` rows).

    With an ``accelerator``, the main process of each node opens it first (downloading and preparing the cache)
    and the other ranks then read that cache, as in training, instead of every rank downloading at once."""
    from entmax_vit.data.datasets import load_image_dataset

    first = accelerator.main_process_first() if accelerator is not None and not streaming else contextlib.nullcontext()
    with first:
        ds = load_image_dataset(source, split=split, streaming=streaming, cache_dir=cache_dir)
    if streaming:
        return ds.take(max_samples) if max_samples is not None and max_samples > 0 else ds
    if not hasattr(ds, "__len__"):
        raise ValueError(f"{source} split {split!r}: evaluation needs a map-style dataset (not streaming)")
    if max_samples is not None and max_samples > 0 and len(ds) > max_samples:
        ds = ds.select(range(max_samples))
    if len(ds) == 0:
        raise ValueError(f"{source} split {split!r} is empty")
    return ds


def find_column(ds: Any, kind: str, name: Optional[str] = None) -> str:
    from entmax_vit.data.datasets import find_column as _find

    return _find(ds, kind=kind, name=name)


_SKIPS: dict[str, Any] = {}


def _skip(what: str, where: Any, err: BaseException) -> None:
    """Log a skipped row (first few with reasons, then every 100th: see data.images.SkipCounter)."""
    from entmax_vit.data.images import SkipCounter

    _SKIPS.setdefault(what, SkipCounter(what)).record(where, err)


def decode_image(value: Any, where: Any = "") -> Optional[Image.Image]:
    """RGB image, or None (logged) when the value is not a readable image."""
    from entmax_vit.modeling.image_decoding import ImageDecodeError
    from entmax_vit.modeling.image_decoding import decode_image as decode

    try:
        return decode(value)
    except ImageDecodeError as err:
        _skip("image", where, err)
        return None


def decode_mask(value: Any, where: Any = "") -> Optional[np.ndarray]:
    """Integer label map (H, W) from a mask cell (PIL image in mode L/P/I, dict, path, bytes, array), or None.
    Encoded masks get the decoder's checks (decompression bombs, truncated PNGs: a truncated mask would
    otherwise read as class 0); their values are class ids, so no orientation or colour conversion applies."""
    from entmax_vit.modeling.image_decoding import ImageDecodeError, open_image

    try:
        if isinstance(value, np.ndarray):
            return value.astype(np.int64)
        if not isinstance(value, (Image.Image, dict, str, bytes, bytearray, os.PathLike)):
            raise ValueError(f"unsupported mask value {type(value).__name__}")
        arr = np.asarray(open_image(value))
        if arr.ndim == 3:  # an RGB-saved mask: class ids are in every channel
            arr = arr[..., 0]
        return arr.astype(np.int64)
    except (ImageDecodeError, OSError, ValueError, KeyError, TypeError) as err:
        _skip("mask", where, err)
        return None


def raw_columns(ds: Any, *columns: str) -> Any:
    """``ds`` with its Image columns left undecoded ({"bytes", "path"} dicts), so that every image goes through
    ``decode_image`` / ``decode_mask`` here, where a bad file becomes a logged skip instead of an exception raised
    inside ``datasets`` while indexing."""
    import datasets

    features = getattr(ds, "features", None) or {}
    for col in columns:
        feature = features.get(col)
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds


def normalize(t: torch.Tensor) -> torch.Tensor:
    return TF.normalize(t, IMAGENET_MEAN, IMAGENET_STD)


# ----------------------------------------------------------------------------------------------------------
# Classification transforms (DINO eval_linear / eval_knn)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ClassificationTransform:
    """Eval: Resize(resize, bicubic) + CenterCrop(crop) (DINO eval_linear / eval_knn). The linear probe's training
    crops are linear_probe.DinoTrainTransform (torchvision's RandomResizedCrop, as official DINO)."""

    resize: int = 256
    crop: int = 224

    def describe(self) -> str:
        return f"resize{self.resize}_crop{self.crop}_bicubic_imagenetnorm"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = TF.center_crop(TF.resize(image, self.resize, InterpolationMode.BICUBIC), self.crop)
        return normalize(TF.to_tensor(image))


class ClassificationRows(torch.utils.data.Dataset):
    """Rows of a classification split -> {"pixel_values": (3, S, S), "labels": int, "valid": bool, "index": int}."""

    def __init__(self, ds: Any, image_column: str, label_column: Optional[str], transform: Callable) -> None:
        self.ds = raw_columns(ds, image_column)
        self.image_column, self.label_column, self.transform = image_column, label_column, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx: int) -> dict:
        item = self.decode_row(self.ds[int(idx)], f"row {idx}")
        item["index"] = int(idx)
        return item

    def decode_row(self, row: dict, where: str) -> dict:
        image = decode_image(row[self.image_column], where)
        label = int(row[self.label_column]) if self.label_column is not None else -1
        if image is None:
            size = self.transform.crop
            return {"pixel_values": torch.zeros(3, size, size), "labels": label, "valid": False}
        return {"pixel_values": self.transform(image), "labels": label, "valid": True}


class StreamingRows(torch.utils.data.IterableDataset):
    """This rank's rows of a streamed split, decoded like ClassificationRows. ``index`` is unique across ranks
    and DataLoader workers (a stream has no stable row numbers).

    A whole stream is split by ``shard_for_rank`` (each rank downloads only its part). A truncated stream
    (``truncated``: ``take(n)`` was applied) is read by every rank, each keeping every world_size-th row: a
    shard split after ``take`` would not cover exactly the first n rows."""

    def __init__(self, ds: Any, image_column: str, label_column: Optional[str], transform: Callable, rank: int = 0,
                 world_size: int = 1, truncated: bool = False) -> None:
        from entmax_vit.data.datasets import shard_for_rank

        self.stride = world_size if (truncated and world_size > 1) else 1
        if world_size > 1 and not truncated:
            ds = shard_for_rank(ds, rank, world_size)
        self.ds = raw_columns(ds, image_column)
        self.rows = ClassificationRows.__new__(ClassificationRows)
        self.rows.image_column, self.rows.label_column, self.rows.transform = image_column, label_column, transform
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, row in enumerate(self.ds):  # datasets splits an IterableDataset across workers by itself
            if self.stride > 1 and i % self.stride != self.rank:
                continue
            item = self.rows.decode_row(row, f"stream row {i}")
            item["index"] = (i * workers + worker) * self.world_size + self.rank
            yield item


def num_classes_of(ds: Any, label_column: str) -> Optional[int]:
    """Class count from a ClassLabel feature, else 1 + the largest label (None for a stream without one)."""
    feature = ds.features.get(label_column) if getattr(ds, "features", None) else None
    if feature is not None and hasattr(feature, "num_classes"):
        return int(feature.num_classes)
    if not hasattr(ds, "__len__"):
        return None
    return int(max(ds[label_column])) + 1


def class_names_of(ds: Any, label_column: str) -> Optional[list[str]]:
    feature = ds.features.get(label_column) if getattr(ds, "features", None) else None
    return list(feature.names) if feature is not None and hasattr(feature, "names") else None


__all__ = [
    "ClassificationRows",
    "ClassificationTransform",
    "StreamingRows",
    "class_names_of",
    "decode_image",
    "decode_mask",
    "find_column",
    "normalize",
    "num_classes_of",
    "open_dataset",
    "raw_columns",
]
