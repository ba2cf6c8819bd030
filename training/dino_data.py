"""The DINO training data path: HF dataset -> multi-crop samples with their indices -> batches.

Determinism (what makes ``--resume`` equal an uninterrupted run, with any number of workers): the sample
order of an epoch is a permutation seeded by (seed, epoch), and every sample's augmentation is seeded by
(seed, epoch, index) inside a forked RNG, so neither depends on what ran before. An unreadable image is
replaced by the next readable one (deterministically) and counted, so batches keep their size and ranks
stay in step.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from entmax_vit.data.datasets import find_column, load_image_dataset
from entmax_vit.training.config import DataConfig
from entmax_vit.training.multicrop import MultiCropConfig, MultiCropDataset, MultiCropTransform, multicrop_collate

logger = logging.getLogger(__name__)
MAX_CONSECUTIVE_SKIPS = 64


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch (SplitMix64-style mixing of the three numbers)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class EpochPermutationSampler(Sampler[int]):
    """All indices in an order seeded by (seed, epoch); identical on every rank (Accelerate shards the
    batches between ranks). ``set_epoch`` is called by the prepared DataLoader."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        return iter(torch.randperm(self.num_samples, generator=g).tolist())


class SeededMultiCropDataset(Dataset):
    """Item i -> (i, crops, num_skipped): crops of sample i (or of the next readable one) made with RNGs
    seeded by (seed, epoch, index), leaving the caller's global RNG state untouched."""

    def __init__(self, base: MultiCropDataset, seed: int) -> None:
        self.base, self.seed, self.epoch = base, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def _crops(self, index: int) -> Optional[list[torch.Tensor]]:
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            s = sample_seed(self.seed, self.epoch, index)
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
            try:
                return self.base[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def __getitem__(self, index: int) -> tuple[int, list[torch.Tensor], int]:
        for skipped in range(min(MAX_CONSECUTIVE_SKIPS, len(self))):
            crops = self._crops((index + skipped) % len(self))
            if crops is not None:
                return index, crops, skipped
        raise ValueError(
            f"{MAX_CONSECUTIVE_SKIPS} consecutive images from #{index} could not be decoded: is the image column "
            "right and the data readable?"
        )


def collate_indexed(batch: list[tuple[int, list[torch.Tensor], int]]) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """-> (crops: list of (B, 3, H_k, W_k), indices (B,), number of unreadable images replaced)."""
    crops, _ = multicrop_collate([item[1] for item in batch])
    return crops, torch.tensor([item[0] for item in batch]), sum(item[2] for item in batch)


def build_dataset(data: DataConfig, crops: MultiCropConfig, seed: int) -> SeededMultiCropDataset:
    """Load ``data.source`` (map-style) and wrap it for multi-crop training."""
    if data.streaming:
        raise ValueError(
            "data.streaming=true is not supported by the training loop yet: exact resume and one-read-per-sample "
            "need a map-style dataset. Download the dataset (or save_to_disk it) and set data.streaming=false."
        )
    ds = load_image_dataset(data.source, data.split, streaming=False, cache_dir=data.cache_dir)
    column = find_column(ds, "image", data.image_column)
    if data.max_samples is not None:
        if data.max_samples <= 0:
            raise ValueError(f"data.max_samples must be positive, got {data.max_samples}")
        ds = ds.select(range(min(data.max_samples, len(ds))))
    logger.info("dataset %s[%s]: %d images, column %r", data.source, data.split, len(ds), column)
    return SeededMultiCropDataset(MultiCropDataset(ds, column, MultiCropTransform(crops)), seed)


def build_dataloader(dataset: SeededMultiCropDataset, data: DataConfig, seed: int) -> DataLoader:
    """Plain DataLoader (pass it to ``accelerator.prepare``, which gives each rank disjoint batches).
    Its own generator keeps worker seeding from touching the global RNG; drop_last as official DINO."""
    return DataLoader(
        dataset,
        batch_size=data.batch_size_per_device,
        sampler=EpochPermutationSampler(len(dataset), seed),
        num_workers=data.num_workers,
        pin_memory=data.pin_memory and torch.cuda.is_available(),
        drop_last=True,
        collate_fn=collate_indexed,
        generator=torch.Generator().manual_seed(seed),
    )


__all__ = [
    "EpochPermutationSampler", "SeededMultiCropDataset", "build_dataloader", "build_dataset", "collate_indexed",
    "sample_seed",
]
