"""The DINO training data path: HF dataset -> multi-crop samples with their indices -> batches.

Determinism (what makes ``--resume`` equal an uninterrupted run, with any number of workers): the sample
order of an epoch is a permutation seeded by (seed, epoch), and every sample's augmentation is seeded by
(seed, epoch, index) inside a forked RNG, so neither depends on what ran before. Rows are read and decoded by the data layer (``entmax_vit.data.images.ImageRows``); under its policy an
unreadable row is replaced by the next readable one (deterministically, searching the whole dataset if need
be) and reported once, so batches keep their size, ranks stay in step and no stretch of bad rows stops
training. :class:`TrainingData` puts map-style and streamed data behind one interface for the loop, and counts
what it drew and replaced (``take_counts``) and names the first unreadable files of each epoch in the log.
"""

from __future__ import annotations

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


class NoReadableImageError(ValueError):
    """Not one row of the dataset can be decoded (wrong image column, or the data is broken)."""


class SeededMultiCropDataset(Dataset):
    """Item i -> (i, crops, unreadable): crops of row i made with RNGs seeded by (seed, epoch, i), leaving the
    caller's global RNG state untouched. ``unreadable`` is empty, or names row i (and its file) when row i cannot
    be decoded: its crops then come from the next readable row after it (wrapping around the dataset), still
    seeded by (seed, epoch, i). That search is bounded only by the dataset size, so no stretch of bad rows can
    stop training; a dataset without one readable row raises :class:`NoReadableImageError`. Each drawn
    unreadable row is reported once (not once per failed attempt of the search)."""

    def __init__(self, rows: ImageRows, transform: MultiCropTransform, seed: int) -> None:
        self.rows, self.transform, self.seed = rows, transform, seed
        # The epoch lives in shared memory: persistent DataLoader workers (forked once per run) see every
        # set_epoch of the main process, where a plain attribute would stay at the value they were forked with.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        # Rows this process found unreadable. Decoding is deterministic, so this cache only saves decoding
        # a bad row twice; it never changes which crops an index gets (resume stays exact).
        self._unreadable: set[int] = set()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def _crops(self, row: int) -> Optional[list[torch.Tensor]]:
        decoded = None if row in self._unreadable else self.rows.read(row)
        if decoded is None:
            self._unreadable.add(row)
            return None
        return self.transform(decoded.image)

    def __getitem__(self, index: int) -> tuple[int, list[torch.Tensor], tuple[str, ...]]:
        n = len(self)
        with seeded_rngs(sample_seed(self.seed, self.epoch, index)):
            for offset in range(n):
                crops = self._crops((index + offset) % n)
                if crops is not None:
                    return index, crops, (self.rows.describe(index),) if offset else ()
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


class _CountedSeededTransform:
    """Multi-crop transform whose k-th call in a stream is seeded by (seed, stream id, k)."""

    def __init__(self, transform: MultiCropTransform, seed: int) -> None:
        self.transform, self.seed, self.stream, self.count = transform, seed, 0, 0

    def __call__(self, image: Any) -> list[torch.Tensor]:
        with seeded_rngs(sample_seed(self.seed, self.stream, self.count)):
            self.count += 1
            return self.transform(image)


class StreamingMultiCropDataset(IterableDataset):
    """Streaming data for one rank: its shard (``shard_for_rank``) of a buffer-shuffled HF IterableDataset,
    reshuffled per epoch; yields (stream position, crops, names of the unreadable items skipped before it).
    DataLoader workers split the rank's shards (``datasets`` does it); augmentations are seeded by (seed, epoch,
    rank, worker, k), so replaying an epoch's stream (resume) gives the same batches."""

    def __init__(self, hf_ds: Any, column: str, transform: MultiCropTransform, seed: int, rank: int,
                 world_size: int, shuffle_buffer: int = 10_000) -> None:
        ds = hf_ds.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer > 1 else hf_ds
        self.transform = _CountedSeededTransform(transform, seed)
        self.rows = ImageRows(shard_for_rank(ds, rank, world_size), column, keep=())
        self.rank, self.epoch = rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, list[torch.Tensor], tuple[str, ...]]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        if hasattr(self.rows.ds, "set_epoch"):
            self.rows.ds.set_epoch(self.epoch)
        self.transform.stream = (self.epoch << 32) + (self.rank << 12) + worker
        self.transform.count = 0
        skipped: list[str] = []  # unreadable items since the last readable one, each reported once
        for position, decoded, name in self.rows.stream():
            if decoded is None:
                skipped.append(name)
                continue
            yield position, self.transform(decoded.image), tuple(skipped)
            skipped = []


def streaming_batches(loader: DataLoader, epoch: int, num_batches: int, skip: int = 0) -> Iterator[Any]:
    """Exactly ``num_batches`` batches of ``epoch`` from a streaming loader, the first ``skip`` read and
    dropped (resume). A rank whose shard runs out starts it again, so every rank takes the same number of
    steps (DDP would hang otherwise)."""
    dataset = loader.dataset
    produced, rounds = 0, 0
    while produced < num_batches:
        dataset.set_epoch(epoch + 1_000_003 * rounds)  # a repeated pass gets a different shuffle
        before = produced
        for batch in itertools.islice(loader, num_batches - produced):
            if produced >= skip:
                yield batch
            produced += 1
        if produced == before:
            raise ValueError("the streamed dataset yielded no readable image for this rank")
        rounds += 1


def stream_sharding_problems(num_shards: Optional[int], world_size: int, num_workers: int) -> list[str]:
    """What is wasted when a stream of ``num_shards`` shards feeds ``world_size`` ranks x ``num_workers``
    DataLoader workers each (empty when every worker of every rank reads whole shards of its own)."""
    if not num_shards:
        return []
    problems = []
    if world_size > 1 and num_shards % world_size:
        problems.append(
            f"the stream has {num_shards} shards, not a multiple of the {world_size} processes: datasets' "
            "split_dataset_by_node then makes EVERY rank read and decode-skip the whole stream, keeping one example "
            f"in {world_size} ({world_size}x the reading). Re-shard the data to a multiple of {world_size} "
            f"x data.num_workers (e.g. {world_size * max(1, num_workers)} shards)")
    elif num_workers > 1 and num_shards // world_size < num_workers:
        problems.append(
            f"the stream has {num_shards} shards for {world_size} process(es) x {num_workers} workers: each rank gets "
            f"{num_shards // world_size}, so {num_workers - num_shards // world_size} of its data.num_workers workers "
            f"stay idle. Re-shard the data to a multiple of {world_size * num_workers} shards or lower "
            "data.num_workers")
    return problems


def build_streaming_loader(data: DataConfig, crops: MultiCropConfig, seed: int, rank: int,
                           world_size: int) -> tuple[DataLoader, int]:
    """(DataLoader over this rank's stream, batches per epoch). Not to be passed to ``accelerator.prepare``:
    the stream is already split between ranks."""
    if not data.streaming_num_samples or data.streaming_num_samples <= 0:
        raise ValueError(
            "data.streaming=true needs data.streaming_num_samples (images per epoch, e.g. 1281167 for "
            "ImageNet-1K train): the length of a streamed dataset is unknown and sets the schedules"
        )
    ds = open_dataset(data.source, data.split, data.cache_dir, data.max_samples, streaming=True)
    column = find_column(ds, "image", data.image_column)
    num_samples = min(data.streaming_num_samples, data.max_samples or data.streaming_num_samples)
    if rank == 0:
        for problem in stream_sharding_problems(getattr(ds, "num_shards", None), world_size, data.num_workers):
            logger.warning("%s", problem)
    batches = num_samples // (data.batch_size_per_device * world_size)
    if batches == 0:
        raise ValueError(f"{num_samples} streamed images are fewer than one global batch "
                         f"({data.batch_size_per_device} x {world_size})")
    dataset = StreamingMultiCropDataset(ds, column, MultiCropTransform(crops), seed, rank, world_size)
    loader = DataLoader(dataset, batch_size=data.batch_size_per_device, num_workers=data.num_workers,
                        pin_memory=data.pin_memory and torch.cuda.is_available(), collate_fn=collate_indexed,
                        drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    return loader, batches


def build_dataset(data: DataConfig, crops: MultiCropConfig, seed: int) -> SeededMultiCropDataset:
    """Load ``data.source`` (map-style) and wrap it for multi-crop training."""
    if data.streaming:
        raise ValueError("streamed datasets go through build_streaming_loader")
    if data.max_samples is not None and data.max_samples <= 0:
        raise ValueError(f"data.max_samples must be positive, got {data.max_samples}")
    ds = open_dataset(data.source, data.split, data.cache_dir, data.max_samples)
    column = find_column(ds, "image", data.image_column)
    logger.info("dataset %s[%s]: %d images, column %r", data.source, data.split, len(ds), column)
    return SeededMultiCropDataset(ImageRows(ds, column, keep=()), MultiCropTransform(crops), seed)


def build_dataloader(dataset: SeededMultiCropDataset, data: DataConfig, seed: int) -> DataLoader:
    """Plain DataLoader (pass it to ``accelerator.prepare``, which gives each rank disjoint batches).
    Its own generator keeps worker seeding from touching the global RNG; drop_last as official DINO. Workers
    persist across epochs (no fork per epoch); they read the epoch from the dataset's shared memory."""
    return DataLoader(
        dataset,
        batch_size=data.batch_size_per_device,
        sampler=EpochPermutationSampler(len(dataset), seed),
        num_workers=data.num_workers,
        pin_memory=data.pin_memory and torch.cuda.is_available(),
        persistent_workers=data.num_workers > 0,
        drop_last=True,
        collate_fn=collate_indexed,
        generator=torch.Generator().manual_seed(seed),
    )


class TrainingData:
    """The training loop's one view of its data, whichever kind: ``epoch(e, skip)`` yields the micro-batches
    ``(crops on the device, indices)`` of epoch ``e`` after the first ``skip`` (resume), and
    ``batches_per_epoch`` is the same on every rank.

    Map-style data: one DataLoader over a (seed, epoch) permutation, prepared by Accelerate (each rank gets
    disjoint batches); resuming skips batches without loading them. Streaming: this rank's shard of the
    stream (not prepared: it is split already), epochs cut to whole accumulation cycles (a stream gives no
    end-of-epoch signal to flush a partial one); resuming replays the epoch's stream up to the position.
    """

    def __init__(self, data: DataConfig, crops: MultiCropConfig, seed: int, accelerator: Any,
                 accumulation: int = 1) -> None:
        if not 0.0 <= data.max_unreadable_share <= 1.0:
            raise ValueError(f"data.max_unreadable_share must be in [0, 1], got {data.max_unreadable_share}")
        self.accelerator, self.streaming = accelerator, data.streaming
        if data.streaming:
            self.loader, batches = build_streaming_loader(data, crops, seed, accelerator.process_index,
                                                          accelerator.num_processes)
            self.dataset, self.num_images = None, data.streaming_num_samples
            self.batches_per_epoch = (batches // accumulation) * accumulation
        else:
            self.dataset = build_dataset(data, crops, seed)
            self.loader = accelerator.prepare(build_dataloader(self.dataset, data, seed))
            self.num_images, self.batches_per_epoch = len(self.dataset), len(self.loader)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"dataset of {self.num_images} images is smaller than one global batch ({data.batch_size_per_device}"
                f" x {accelerator.num_processes} processes x {accumulation} accumulation)"
            )

        self.drawn = self.replaced = 0  # images drawn and unreadable rows replaced by this rank since take_counts

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """(crops on the device, indices) per micro-batch; the unreadable rows replaced are counted and the
        first few of the epoch named in the log."""
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
            device = self.accelerator.device
            for crops, indices, unreadable in streaming_batches(self.loader, epoch, self.batches_per_epoch, skip):
                yield [c.to(device, non_blocking=True) for c in crops], indices, unreadable
            return
        self.loader.set_epoch(epoch)
        self.dataset.set_epoch(epoch)  # augmentation seeds (before iterating: workers copy the dataset then)
        yield from (self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader)


__all__ = [
    "EpochPermutationSampler", "NoReadableImageError", "SeededMultiCropDataset", "StreamingMultiCropDataset",
    "TrainingData", "build_dataloader", "build_dataset", "build_streaming_loader", "collate_indexed", "sample_seed",
    "seeded_rngs", "stream_sharding_problems", "streaming_batches",
]
