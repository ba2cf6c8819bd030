"""The DINO training data path: HF dataset -> seeded multi-crop samples with their indices -> batches
(determinism and unreadable rows: docs/training.md, "Data").
"""

import contextlib
import itertools
import logging
import random
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from entmax_vit.data.datasets import find_column, open_dataset, shard_for_rank
from entmax_vit.data.images import ImageRows
from entmax_vit.training.config import DataConfig
from entmax_vit.training.multicrop import MultiCropConfig, MultiCropTransform

logger = logging.getLogger(__name__)
UNREADABLE_NAMES_LOGGED = 5  # per rank and epoch: enough to find the files, not a flood


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch (SplitMix64-style mixing of the three numbers)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch, Python ``random`` and numpy for the block, then restore the caller's states."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class EpochPermutationSampler(Sampler[int]):
    """All indices in an order seeded by (seed, epoch), the same on every rank (Accelerate shards the batches)."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        return iter(torch.randperm(self.num_samples, generator=g).tolist())


class NoReadableImageError(ValueError):
    """Not one row of the dataset can be decoded (wrong image column, or the data is broken)."""


class SeededMultiCropDataset(Dataset):
    """Item i -> (i, crops seeded by (seed, epoch, i), unreadable): an undecodable row i is named in ``unreadable``
    and replaced by the next readable row (wrapping around, same seed)."""

    def __init__(self, rows: ImageRows, transform: MultiCropTransform, seed: int) -> None:
        self.rows, self.transform, self.seed = rows, transform, seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # persistent workers see set_epoch
        # Decoding is deterministic: this cache only saves decoding a bad row twice (resume stays exact).
        self._unreadable: set[int] = set()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, list[torch.Tensor], tuple[str, ...]]:
        n = len(self)
        with seeded_rngs(sample_seed(self.seed, self.epoch, index)):
            for offset in range(n):
                row = (index + offset) % n
                decoded = None if row in self._unreadable else self.rows.read(row)
                if decoded is not None:
                    return index, self.transform(decoded.image), (self.rows.describe(index),) if offset else ()
                self._unreadable.add(row)
        raise NoReadableImageError(
            f"none of the {n} images of the dataset can be decoded (first: {self.rows.describe(0)}): is "
            "data.image_column right and the data readable? The warnings above give each file's reason."
        )


def collate_indexed(
    batch: list[tuple[int, list[torch.Tensor], tuple[str, ...]]],
) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    """-> (crops: list of (B, 3, H_k, W_k), indices (B,), names of the unreadable rows replaced: one per row)."""
    crops = [torch.stack([item[1][k] for item in batch]) for k in range(len(batch[0][1]))]
    return crops, torch.tensor([item[0] for item in batch]), [name for item in batch for name in item[2]]


class StreamingMultiCropDataset(IterableDataset):
    """One rank's shard of a buffer-shuffled stream; yields (position, crops, unreadable items skipped before it).
    A worker's k-th augmentation is seeded by (seed, epoch, rank, worker, k): replaying an epoch (resume) is exact."""

    def __init__(self, hf_ds: Any, column: str, transform: MultiCropTransform, seed: int, rank: int,
                 world_size: int, shuffle_buffer: int = 10_000) -> None:
        ds = hf_ds.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer > 1 else hf_ds
        self.rows = ImageRows(shard_for_rank(ds, rank, world_size), column, keep=())
        self.transform, self.seed, self.rank, self.epoch = transform, seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, list[torch.Tensor], tuple[str, ...]]]:
        info = torch.utils.data.get_worker_info()
        if hasattr(self.rows.ds, "set_epoch"):
            self.rows.ds.set_epoch(self.epoch)
        stream, count = (self.epoch << 32) + (self.rank << 12) + (info.id if info is not None else 0), 0
        skipped: list[str] = []  # unreadable items since the last readable one, each reported once
        for position, decoded, name in self.rows.stream():
            if decoded is None:
                skipped.append(name)
                continue
            with seeded_rngs(sample_seed(self.seed, stream, count)):
                crops = self.transform(decoded.image)
            count += 1
            yield position, crops, tuple(skipped)
            skipped = []


def stream_sharding_problems(num_shards: Optional[int], world_size: int, num_workers: int) -> list[str]:
    """Warnings when ``num_shards`` do not give every worker of every rank whole shards of its own."""
    if not num_shards:
        return []
    if world_size > 1 and num_shards % world_size:
        return [
            f"the stream has {num_shards} shards, not a multiple of the {world_size} processes: datasets' "
            "split_dataset_by_node then makes EVERY rank read and decode-skip the whole stream, keeping one example "
            f"in {world_size} ({world_size}x the reading). Re-shard the data to a multiple of {world_size} "
            f"x data.num_workers (e.g. {world_size * max(1, num_workers)} shards)"]
    if num_workers > 1 and num_shards // world_size < num_workers:
        return [
            f"the stream has {num_shards} shards for {world_size} process(es) x {num_workers} workers: each rank gets "
            f"{num_shards // world_size}, so {num_workers - num_shards // world_size} of its data.num_workers workers "
            f"stay idle. Re-shard the data to a multiple of {world_size * num_workers} shards or lower "
            "data.num_workers"]
    return []


def build_dataset(data: DataConfig, crops: MultiCropConfig, seed: int) -> SeededMultiCropDataset:
    ds = open_dataset(data.source, data.split, data.cache_dir, data.max_samples)
    column = find_column(ds, "image", data.image_column)
    logger.info("dataset %s[%s]: %d images, column %r", data.source, data.split, len(ds), column)
    return SeededMultiCropDataset(ImageRows(ds, column, keep=()), MultiCropTransform(crops), seed)


class TrainingData:
    """The loop's view of its data; ``batches_per_epoch`` is the same on every rank. Streamed epochs are cut to
    whole accumulation cycles (a stream gives no end-of-epoch signal to flush a partial one) and resuming replays
    the epoch's stream; map-style resuming skips batches without loading them."""

    def __init__(self, data: DataConfig, crops: MultiCropConfig, seed: int, accelerator: Any,
                 accumulation: int = 1) -> None:
        self.accelerator, self.streaming = accelerator, data.streaming
        # Its own generator keeps worker seeding from touching the global RNG; drop_last as official DINO.
        loader_kwargs = dict(batch_size=data.batch_size_per_device, num_workers=data.num_workers,
                             pin_memory=data.pin_memory and torch.cuda.is_available(), drop_last=True,
                             collate_fn=collate_indexed, generator=torch.Generator().manual_seed(seed))
        rank, world_size = accelerator.process_index, accelerator.num_processes
        if data.streaming:
            if not data.streaming_num_samples:
                raise ValueError(
                    "data.streaming=true needs data.streaming_num_samples (images per epoch, e.g. 1281167 for "
                    "ImageNet-1K train): the length of a streamed dataset is unknown and sets the schedules"
                )
            ds = open_dataset(data.source, data.split, data.cache_dir, data.max_samples, streaming=True)
            column = find_column(ds, "image", data.image_column)
            if rank == 0:
                for problem in stream_sharding_problems(getattr(ds, "num_shards", None), world_size, data.num_workers):
                    logger.warning("%s", problem)
            num_samples = min(data.streaming_num_samples, data.max_samples or data.streaming_num_samples)
            batches = num_samples // (data.batch_size_per_device * world_size)
            if batches == 0:
                raise ValueError(f"{num_samples} streamed images are fewer than one global batch "
                                 f"({data.batch_size_per_device} x {world_size})")
            self.dataset, self.num_images = None, data.streaming_num_samples
            self.batches_per_epoch = (batches // accumulation) * accumulation
            stream = StreamingMultiCropDataset(ds, column, MultiCropTransform(crops), seed, rank, world_size)
            self.loader = DataLoader(stream, **loader_kwargs)  # this rank's stream, already split: not prepared
        else:
            self.dataset = build_dataset(data, crops, seed)
            # Prepared: each rank gets disjoint batches.
            self.loader = accelerator.prepare(DataLoader(
                self.dataset, sampler=EpochPermutationSampler(len(self.dataset), seed),
                persistent_workers=data.num_workers > 0, **loader_kwargs))
            self.num_images, self.batches_per_epoch = len(self.dataset), len(self.loader)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"dataset of {self.num_images} images is smaller than one global batch ({data.batch_size_per_device}"
                f" x {accelerator.num_processes} processes x {accumulation} accumulation)"
            )
        self.drawn = self.replaced = 0  # images drawn and unreadable rows replaced by this rank since take_counts

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """(crops on the device, indices) per micro-batch; replaced rows are counted, the epoch's first few named."""
        named = 0
        for crops, indices, unreadable in self._batches(epoch, skip):
            self.drawn += len(indices)
            self.replaced += len(unreadable)
            if unreadable and named < UNREADABLE_NAMES_LOGGED:
                logger.warning("epoch %d: unreadable image(s) replaced by the next readable row: %s", epoch,
                               ", ".join(unreadable[:UNREADABLE_NAMES_LOGGED - named]))
                named += len(unreadable)
            yield crops, indices

    def take_counts(self) -> tuple[int, int]:
        """(images drawn, unreadable rows replaced) by this rank since the last call (host integers: no sync)."""
        counts, self.drawn, self.replaced = (self.drawn, self.replaced), 0, 0
        return counts

    def _batches(self, epoch: int, skip: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, list[str]]]:
        if self.streaming:
            # Exactly batches_per_epoch batches, the first ``skip`` read and dropped. A rank whose shard runs out
            # starts it again, so every rank takes the same number of steps (DDP would hang otherwise).
            produced, rounds = 0, 0
            while produced < self.batches_per_epoch:
                self.loader.dataset.set_epoch(epoch + 1_000_003 * rounds)  # a repeated pass gets a different shuffle
                before = produced
                for crops, indices, unreadable in itertools.islice(self.loader, self.batches_per_epoch - produced):
                    if produced >= skip:
                        yield [c.to(self.accelerator.device, non_blocking=True) for c in crops], indices, unreadable
                    produced += 1
                if produced == before:
                    raise ValueError("the streamed dataset yielded no readable image for this rank")
                rounds += 1
            return
        self.loader.set_epoch(epoch)
        self.dataset.set_epoch(epoch)  # augmentation seeds (before iterating: workers copy the dataset then)
        yield from (self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader)
