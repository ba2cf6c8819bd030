"""The training loop's bookkeeping without a host sync per step: the loss, the first non-finite loss and the
image counts stay on the device (or in host integers) and are combined over ranks in ONE gather at log
steps, before every checkpoint and at each epoch end.

Official DINO calls ``loss.item()`` and checks ``math.isfinite`` every step, a host sync that stalls the GPU
queue. Here the non-finite check runs at those sync points instead. Bound on lost work: the first non-finite
loss is found at most ``logging.every_steps`` optimizer steps after it happened (fewer when a checkpoint comes
first), and no checkpoint is ever written from a step after it: the last checkpoint stays the last good one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

logger = logging.getLogger("entmax_vit.training.dino")
UNREADABLE_SHARE_MIN_IMAGES = 1024  # the unreadable share is checked once an epoch has drawn this many


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stops, keeping its last good checkpoint."""


class UnreadableDataError(ValueError):
    """More than ``data.max_unreadable_share`` of an epoch's images cannot be decoded."""


@dataclass
class Synced:
    """What one :meth:`LoopStats.sync` returns (the same on every rank)."""

    mean_loss: float  # the last micro-batch's loss, mean over ranks
    first_bad_step: Optional[int]  # global step of the first non-finite loss since the run started, or None
    first_bad_batch: int
    first_bad_value: float


class LoopStats:
    """Per-rank bookkeeping of ``train_one_epoch``: ``record`` every micro-batch (no sync), ``sync`` at log
    steps, before checkpoints and at epoch ends (one gather of 6 numbers per rank)."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        device = accelerator.device
        self.last_loss = torch.zeros((), device=device)
        # The first non-finite loss: step (-1 = none yet), batch, value. float32 (MPS has no float64): exact for
        # steps and batch indices below 2**24, far beyond any run here.
        self.bad_step, self.bad_batch, self.bad_value = (torch.full((), -1.0, device=device) for _ in range(3))
        self.pending_seen = 0  # images drawn by this rank since the last sync (host integers: no sync)
        self.pending_skipped = 0

    def record(self, loss: torch.Tensor, step: int, batch_in_epoch: int, num_images: int, num_unreadable: int) -> None:
        """Keep the micro-batch's loss and, on the device, the first non-finite one; count images."""
        loss = loss.detach().float()
        self.last_loss = loss
        bad = ~torch.isfinite(loss) & (self.bad_step < 0)  # on the device: no sync
        self.bad_step = torch.where(bad, float(step), self.bad_step)
        self.bad_batch = torch.where(bad, float(batch_in_epoch), self.bad_batch)
        self.bad_value = torch.where(bad, loss, self.bad_value)
        self.pending_seen += num_images
        self.pending_skipped += num_unreadable

    def sync(self, state: Any) -> Synced:
        """One gather over ranks: adds the pending image counts of every rank to ``state`` and returns the mean
        loss and the first non-finite loss (lowest step over ranks)."""
        counts = torch.tensor([float(self.pending_seen), float(self.pending_skipped)])
        local = torch.cat([torch.stack([self.last_loss, self.bad_step, self.bad_batch, self.bad_value]),
                           counts.to(self.bad_step.device)])  # (6,)
        rows = gather(self.accelerator, local).reshape(-1, 6).tolist()  # the one host sync
        self.pending_seen = self.pending_skipped = 0
        state.epoch_images_seen += int(sum(r[4] for r in rows))
        skipped = int(sum(r[5] for r in rows))
        state.epoch_images_skipped += skipped
        state.images_skipped += skipped
        bad = sorted((r[1], r[2], r[3]) for r in rows if r[1] >= 0)
        mean_loss = sum(r[0] for r in rows) / len(rows)
        if not bad:
            return Synced(mean_loss, None, -1, 0.0)
        return Synced(mean_loss, int(bad[0][0]), int(bad[0][1]), bad[0][2])

    def flush(self, state: Any, epoch: int, max_unreadable_share: float,
              last_good: Callable[[], Any] = lambda: None, end_of_epoch: bool = False) -> Synced:
        """``sync``, then stop on a non-finite loss (NonFiniteLossError) or too many unreadable images."""
        synced = self.sync(state)
        if synced.first_bad_step is not None:
            raise NonFiniteLossError(
                f"Loss is {synced.first_bad_value} at step {synced.first_bad_step} (epoch {epoch}, batch "
                f"{synced.first_bad_batch}); stopping training (found at step {state.global_step}: the loss is "
                "checked at log steps and before checkpoints). Last good checkpoint: "
                f"{last_good() or 'none'}. Lower optim.lr_base, raise optim.warmup_epochs, lower loss.teacher_temp "
                "or use mixed_precision bf16/no."
            )
        check_unreadable_share(state, epoch, max_unreadable_share, end_of_epoch)
        return synced


def gather(accelerator: Any, tensor: torch.Tensor) -> torch.Tensor:
    """``accelerator.gather`` (all ranks' tensors, concatenated); the tensor itself on one process."""
    return accelerator.gather(tensor) if accelerator.num_processes > 1 else tensor


def check_unreadable_share(state: Any, epoch: int, max_share: float, end_of_epoch: bool = False) -> None:
    """UnreadableDataError when more than ``max_share`` of the epoch's images so far were unreadable (checked
    once the epoch has drawn UNREADABLE_SHARE_MIN_IMAGES images, and at its end)."""
    seen = state.epoch_images_seen
    if seen == 0 or (seen < UNREADABLE_SHARE_MIN_IMAGES and not end_of_epoch):
        return
    share = state.epoch_images_skipped / seen
    if share > max_share:
        raise UnreadableDataError(
            f"{state.epoch_images_skipped} of the {seen} images drawn in epoch {epoch} ({share:.1%}) cannot be "
            f"decoded, more than data.max_unreadable_share = {max_share:g}. The warnings above name the first "
            "files; clean the data, or raise data.max_unreadable_share to train on the readable rest."
        )


__all__ = ["LoopStats", "NonFiniteLossError", "Synced", "UnreadableDataError", "check_unreadable_share"]
