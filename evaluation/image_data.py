"""The classification data path: rows -> (pixel_values, label, valid, index) batches, decoded by the data layer
(``data.images.ImageRows``). An unreadable row becomes a zero image with ``valid = False`` (batch shapes stay equal
on every rank for ``gather_for_metrics``); the loops drop it after gathering and count it (``num_skipped``)."""

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from entmax_vit.data.datasets import shard_for_rank
from entmax_vit.data.images import ImageRows
from entmax_vit.modeling import IMAGENET_MEAN, IMAGENET_STD


def normalize(t: torch.Tensor) -> torch.Tensor:
    return TF.normalize(t, IMAGENET_MEAN, IMAGENET_STD)


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
        self.rows = ImageRows(ds, image_column)
        self.label_column, self.transform = label_column, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict:
        return self.item(self.rows.ds[int(idx)], f"row {idx}", int(idx))

    def item(self, row: dict, where: str, index: int) -> dict:
        decoded = self.rows.decode(row, where)
        label = int(row[self.label_column]) if self.label_column is not None else -1
        if decoded is None:  # the data layer's policy: kept, marked invalid, counted after the gather
            size = self.transform.crop
            return {"pixel_values": torch.zeros(3, size, size), "labels": label, "valid": False, "index": index}
        return {"pixel_values": self.transform(decoded.image), "labels": label, "valid": True, "index": index}


class StreamingRows(torch.utils.data.IterableDataset):
    """This rank's rows of a stream (``index`` unique across ranks and workers), split by ``shard_for_rank``; a
    ``truncated`` one (``take(n)``) is read by every rank, each keeping every world_size-th row: a shard split
    after ``take`` would not cover exactly the first n rows."""

    def __init__(self, ds: Any, image_column: str, label_column: Optional[str], transform: Callable, rank: int = 0,
                 world_size: int = 1, truncated: bool = False) -> None:
        self.stride = world_size if (truncated and world_size > 1) else 1
        if world_size > 1 and not truncated:
            ds = shard_for_rank(ds, rank, world_size)
        self.rows = ClassificationRows(ds, image_column, label_column, transform)
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, row in enumerate(self.rows.rows.ds):  # datasets splits an IterableDataset across workers by itself
            if self.stride > 1 and i % self.stride != self.rank:
                continue
            yield self.rows.item(row, f"stream row {i}", (i * workers + worker) * self.world_size + self.rank)


def num_classes_of(ds: Any, label_column: str) -> Optional[int]:
    """Class count from a ClassLabel feature, else 1 + the largest label (None for a stream without one)."""
    feature = ds.features.get(label_column) if getattr(ds, "features", None) else None
    if hasattr(feature, "num_classes"):
        return int(feature.num_classes)
    return int(max(ds[label_column])) + 1 if hasattr(ds, "__len__") else None
