"""The run's state and its bookkeeping between optimizer steps (logging, checkpoints, stops), kept out of the DINO step.

No host sync per step (official DINO's ``loss.item()`` stalls the GPU queue): ONE gather over ranks
(:meth:`Run.sync`) at log steps, before every checkpoint and at epoch ends (docs/training.md, "Running on GPUs").
"""

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from entmax_vit.training import checkpointing as ckpt

logger = logging.getLogger("entmax_vit.training.dino")
UNREADABLE_SHARE_MIN_IMAGES = 1024  # the unreadable share is checked once an epoch has drawn this many


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stops, keeping its last good checkpoint."""


class UnreadableDataError(ValueError):
    """More than ``data.max_unreadable_share`` of an epoch's images cannot be decoded."""


class StopRequest:
    """SIGTERM / SIGUSR1 (what schedulers send before pre-emption) -> finish the step, checkpoint, exit 0."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        logger.warning("received signal %d: stopping after this step with a checkpoint", signum)
        self.requested = True


@dataclass
class RunState:
    """Where the run is; saved in every checkpoint's trainer_state.json."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    images_skipped: int = 0  # unreadable rows drawn, each once per epoch, summed over ranks
    epoch_images_skipped: int = 0  # ... in the current epoch (for data.max_unreadable_share)
    epoch_images_seen: int = 0  # images drawn in the current epoch, summed over ranks


class Run:
    """``record`` every micro-batch, ``step_done`` every optimizer step, ``end_epoch`` every epoch."""

    def __init__(self, cfg: Any, accelerator: Any, data: Any, state: RunState, metrics: Any, stop: StopRequest,
                 save_checkpoint: Callable[[], Path], ckpt_root: Path, total_steps: int) -> None:
        self.cfg, self.accelerator, self.data, self.state = cfg, accelerator, data, state
        self.metrics, self.stop, self.save_checkpoint = metrics, stop, save_checkpoint
        self.ckpt_root, self.total_steps, self.steps_this_run = ckpt_root, total_steps, 0
        self.progress = tqdm(total=total_steps, initial=state.global_step, desc="DINO", dynamic_ncols=True,
                             disable=not (accelerator.is_main_process and cfg.logging.progress_bar))
        device = accelerator.device
        self.last_loss = torch.zeros((), device=device)
        # The first non-finite loss: step (-1 = none yet), batch, value. float32 (MPS has no float64): exact for
        # steps and batch indices below 2**24, far beyond any run here.
        self.bad_step, self.bad_batch, self.bad_value = (torch.full((), -1.0, device=device) for _ in range(3))
        self.images_seen, self._log_images, self._log_time = 0, 0, time.time()

    def record(self, loss: torch.Tensor, step: int, batch_in_epoch: int) -> None:
        loss = loss.detach().float()
        self.last_loss = loss
        bad = ~torch.isfinite(loss) & (self.bad_step < 0)  # on the device: no sync
        self.bad_step = torch.where(bad, float(step), self.bad_step)
        self.bad_batch = torch.where(bad, float(batch_in_epoch), self.bad_batch)
        self.bad_value = torch.where(bad, loss, self.bad_value)

    def sync(self, epoch: int, end_of_epoch: bool = False) -> float:
        """One gather over ranks: counts into ``state``, non-finite loss / unreadable share checked; returns the
        last micro-batch's loss, mean over ranks."""
        counts = torch.tensor([float(n) for n in self.data.take_counts()], device=self.bad_step.device)
        local = torch.cat([torch.stack([self.last_loss, self.bad_step, self.bad_batch, self.bad_value]), counts])
        gathered = self.accelerator.gather(local) if self.accelerator.num_processes > 1 else local
        rows = gathered.reshape(-1, 6).tolist()  # the one host sync
        state = self.state
        seen, skipped = int(sum(r[4] for r in rows)), int(sum(r[5] for r in rows))
        self.images_seen += seen
        state.epoch_images_seen += seen
        state.epoch_images_skipped += skipped
        state.images_skipped += skipped
        bad = sorted((r[1], r[2], r[3]) for r in rows if r[1] >= 0)
        if bad:
            raise NonFiniteLossError(
                f"Loss is {bad[0][2]} at step {int(bad[0][0])} (epoch {epoch}, batch {int(bad[0][1])}); stopping "
                f"training (found at step {state.global_step}: the loss is checked at log steps and before "
                f"checkpoints). Last good checkpoint: {ckpt.latest_checkpoint(self.ckpt_root) or 'none'}. Lower "
                "optim.lr_base, raise optim.warmup_epochs, lower loss.teacher_temp or use mixed_precision bf16/no."
            )
        drawn, max_share = state.epoch_images_seen, self.cfg.data.max_unreadable_share
        share = state.epoch_images_skipped / max(drawn, 1)
        if drawn and (drawn >= UNREADABLE_SHARE_MIN_IMAGES or end_of_epoch) and share > max_share:
            raise UnreadableDataError(
                f"{state.epoch_images_skipped} of the {drawn} images drawn in epoch {epoch} ({share:.1%}) cannot be "
                f"decoded, more than data.max_unreadable_share = {max_share:g}. The warnings above name the first "
                "files; clean the data, or raise data.max_unreadable_share to train on the readable rest.")
        return sum(r[0] for r in rows) / len(rows)

    def step_done(self, epoch: int, batch_in_epoch: int, log_values: Callable[[], dict]) -> bool:
        """Advance the state, log at log steps, checkpoint when due or stopping; True when the run stops early (a
        signal or debug.max_steps), after writing a checkpoint."""
        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        state.global_step = step = state.global_step + 1
        state.batch_in_epoch = batch_in_epoch + 1
        self.steps_this_run += 1
        self.progress.update(1)
        if step % cfg.logging.every_steps == 0 or step == self.total_steps:
            loss = self.sync(epoch)
            now = time.time()
            record = {"epoch": epoch, "loss": loss, **log_values(),
                      "img_per_s": (self.images_seen - self._log_images) / max(now - self._log_time, 1e-9),
                      "images_skipped": state.images_skipped}
            self.metrics.log(step, record)
            self.progress.set_postfix(epoch=epoch, loss=f"{loss:.4f}", img_s=f"{record['img_per_s']:.1f}")
            self._log_images, self._log_time = self.images_seen, now
        # the vote over ranks is this step's one host sync (none on one process)
        stop_now = self.stop.requested if accelerator.num_processes == 1 else accelerator.reduce(
            torch.tensor(float(self.stop.requested), device=accelerator.device), reduction="sum").item() > 0
        limit_hit = 0 < cfg.debug.max_steps <= self.steps_this_run and step < self.total_steps
        if stop_now or limit_hit or (cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0):
            self.sync(epoch)  # never a checkpoint after a non-finite loss; image counts complete in trainer_state
            saved = self.save_checkpoint()
        if stop_now or limit_hit:
            if accelerator.is_main_process:
                reason = "a signal" if stop_now else f"debug.max_steps = {cfg.debug.max_steps}"
                logger.warning(f"stopped at step {step} ({reason}) with checkpoint {saved}. Resume: run the same "
                               "command again (--checkpoint.resume auto, the default, continues from it). Export "
                               "this checkpoint as a model: python scripts/export_checkpoint.py "
                               f"{saved} {Path(cfg.output_dir) / 'exported'}")
            return True
        return False

    def end_epoch(self, epoch: int) -> None:
        self.sync(epoch, end_of_epoch=True)
        state = self.state
        logger.info("epoch %d done: %d unreadable image(s) replaced (%d in all)", epoch, state.epoch_images_skipped,
                    state.images_skipped)
        self.state = RunState(epoch=epoch + 1, global_step=state.global_step, images_skipped=state.images_skipped)
        if self.cfg.checkpoint.at_epoch_end:
            self.save_checkpoint()
