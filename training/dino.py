"""DINO self-distillation of an EntmaxViT, through Accelerate (one CPU to many GPU nodes).

    accelerate launch training/dino.py --config vits16_entmax15_200ep --output_dir runs/entmax
    python training/dino.py --config tiny_cpu --output_dir runs/tiny          # minutes on 2 CPU cores

Reads top to bottom like official DINO's main_dino.py: ``train`` sets up config -> data -> student/teacher ->
loss -> optimizer and schedules -> resume, then calls ``train_one_epoch`` per epoch (teacher forward, student
forward, loss, backward, per-parameter clipping, last-layer freezing, step, EMA, logging, checkpoints) and
exports at the end. Faithful to official DINO (see docs/training.md for every default and where it comes from).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from entmax_vit.cli.config import from_dict, save_config, to_dict
from entmax_vit.training import checkpointing as ckpt
from entmax_vit.training.config import DinoConfig, breaking_differences, flatten, without_retired_keys
from entmax_vit.training.dino_data import TrainingData
from entmax_vit.training.dino_loss import DINOLoss
from entmax_vit.training.export import export_backbone
from entmax_vit.training.metrics_log import MetricsLog, attention_support_size, plot_loss_curve
from entmax_vit.training.networks import build_networks
from entmax_vit.training.optim import cancel_last_layer_gradients, clip_gradients_per_parameter, param_groups
from entmax_vit.training.schedules import cosine_schedule, scaled_lr, teacher_temp_schedule

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
logger = logging.getLogger("entmax_vit.training.dino")
UNREADABLE_NAMES_LOGGED = 5  # per rank and epoch: enough to find the files, not a flood
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
class Schedules:
    """Per optimizer step (lr, wd, teacher momentum) and per epoch (teacher temperature), as official DINO."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray


@dataclass
class RunState:
    """Where the run is; saved in every checkpoint's trainer_state.json (``images_*`` keys default to 0 for
    checkpoints of older versions)."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    images_skipped: int = 0  # unreadable rows drawn, each once per epoch, summed over ranks
    epoch_images_skipped: int = 0  # ... in the current epoch (for data.max_unreadable_share)
    epoch_images_seen: int = 0  # images drawn in the current epoch, summed over ranks


def main(cfg: DinoConfig) -> Optional[Path]:
    """Train; returns the export folder (None when stopped early by a signal or debug.max_steps)."""
    stop = StopRequest()
    try:
        return train(cfg, stop)
    finally:
        stop.close()
        # Accelerate keeps its settings process-wide; forget them so main() can run again in this process
        # (notebooks, tests) with another mixed precision. The process group (PartialState) stays.
        AcceleratorState._reset_state()


def train(cfg: DinoConfig, stop: StopRequest) -> Optional[Path]:
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"

    # ============ distributed setup and config ============
    accelerator = Accelerator(
        mixed_precision=cfg.optim.mixed_precision,
        gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
        log_with="tensorboard" if cfg.logging.tensorboard else None,
        project_dir=str(out_dir),
        rng_types=[],  # data order and augmentation are seeded explicitly (dino_data.py)
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_seed(cfg.seed)
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in ckpt.remove_incomplete(ckpt_root):
            logger.warning("%s", ckpt.describe_leftover(path))
    accelerator.wait_for_everyone()

    # ============ preparing data ============
    accum = cfg.optim.gradient_accumulation_steps
    data = TrainingData(cfg.data, cfg.crops, cfg.seed, accelerator, accum)

    # ============ building student and teacher networks ============
    student, teacher = build_networks(cfg)
    if cfg.model.gradient_checkpointing:
        student.backbone.gradient_checkpointing_enable()
    teacher.to(accelerator.device)  # not prepared: it gets no gradients and DDP would refuse it
    num_crops = 2 + cfg.crops.local_crops_number
    logger.info("student/teacher %s (%s attention), %.1fM parameters, %d crops per image",
                cfg.model.preset, cfg.model.attention, sum(p.numel() for p in student.parameters()) / 1e6, num_crops)

    # ============ preparing loss ============
    dino_loss = DINOLoss(cfg.model.out_dim, num_crops, cfg.loss.student_temp, cfg.loss.center_momentum)
    dino_loss.to(accelerator.device)

    # ============ preparing optimizer ============
    optimizer = torch.optim.AdamW(param_groups(student))  # lr and wd are set every step by the schedules
    student, optimizer = accelerator.prepare(student, optimizer)
    if cfg.model.compile:
        student = torch.compile(student)
    torch.manual_seed(cfg.seed + accelerator.process_index)  # drop-path draws differ between ranks

    # ============ init schedulers ============
    iters_per_epoch = math.ceil(data.batches_per_epoch / accum)  # optimizer steps
    total_batch = cfg.data.batch_size_per_device * accelerator.num_processes * accum
    epochs = cfg.optim.epochs
    schedules = Schedules(
        lr=cosine_schedule(scaled_lr(cfg.optim.lr_base, total_batch), cfg.optim.min_lr, epochs, iters_per_epoch,
                           warmup_epochs=cfg.optim.warmup_epochs),
        wd=cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, epochs, iters_per_epoch),
        momentum=cosine_schedule(cfg.optim.momentum_teacher, 1.0, epochs, iters_per_epoch),
        teacher_temp=teacher_temp_schedule(cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
                                           cfg.loss.warmup_teacher_temp_epochs, epochs),
    )
    logger.info("%d images, %d steps/epoch, total batch %d, peak lr %.3g", data.num_images, iters_per_epoch,
                total_batch, schedules.lr.max())

    # ============ optionally resume training ============
    state = RunState()
    resume_from = resolve_resume(cfg, ckpt_root, accelerator)
    if resume_from is not None:
        saved = ckpt.read_trainer_state(resume_from)
        check_resume_compatible(resume_from, to_dict(cfg), saved, accelerator.num_processes)
        accelerator.load_state(str(resume_from))  # student, optimizer, scaler, RNG states of every rank
        ckpt.load_teacher(resume_from / ckpt.TEACHER_FILE, teacher, dino_loss.center)
        state = RunState(**{k: saved.get(k, 0) for k in RunState.__dataclass_fields__})
        if state.batch_in_epoch >= data.batches_per_epoch:
            state = RunState(epoch=state.epoch + 1, global_step=state.global_step,
                             images_skipped=state.images_skipped)
        logger.info("resumed from %s at epoch %d, step %d", resume_from, state.epoch, state.global_step)
    if accelerator.is_main_process:  # after the resume check: a refused config never overwrites the run's
        save_config(cfg, out_dir / ckpt.CONFIG_FILE)
    metrics = MetricsLog(out_dir / "metrics.jsonl", accelerator, use_trackers=cfg.logging.tensorboard)
    if resume_from is None:
        metrics.reset()
    else:
        metrics.truncate_after(state.global_step)
    if cfg.logging.tensorboard:
        accelerator.init_trackers("dino", config={k: v for k, v in flatten(to_dict(cfg)).items()
                                                  if isinstance(v, (int, float, str, bool))})

    def save_checkpoint() -> Path:
        trainer_state = dict(vars(state), world_size=accelerator.num_processes, total_batch=total_batch,
                             iters_per_epoch=iters_per_epoch, time=time.time())
        return ckpt.save_checkpoint(accelerator, ckpt_root, state.global_step, teacher, dino_loss.center,
                                    trainer_state, config_yaml, keep_last=cfg.checkpoint.keep_last)

    # ============ training ============
    total_steps = epochs * iters_per_epoch
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not (
        accelerator.is_main_process and cfg.logging.progress_bar), dynamic_ncols=True, desc="DINO")
    loop = Loop(cfg, accelerator, student, teacher, dino_loss, optimizer, schedules, metrics, stop, progress,
                save_checkpoint, total_steps, ckpt_root)
    stopped = False
    for epoch in range(state.epoch, epochs):
        stopped = train_one_epoch(loop, data, state, epoch)
        if stopped:
            break
        check_unreadable_share(state, epoch, cfg.data.max_unreadable_share, end_of_epoch=True)
        logger.info("epoch %d done: %d unreadable image(s) replaced (%d in all)", epoch,
                    state.epoch_images_skipped, state.images_skipped)
        state = RunState(epoch=epoch + 1, global_step=state.global_step, images_skipped=state.images_skipped)
        if cfg.checkpoint.at_epoch_end:
            save_checkpoint()
    progress.close()

    # ============ end of training: export ============
    accelerator.wait_for_everyone()
    if cfg.logging.tensorboard:
        accelerator.end_training()
    export_dir = None
    if not stopped and accelerator.is_main_process:
        export_dir = export_backbone(teacher.backbone, out_dir / "final_model", config_yaml)
        logger.info("exported the teacher backbone to %s", export_dir)
    if accelerator.is_main_process:
        png = plot_loss_curve(out_dir / "metrics.jsonl", out_dir / "loss_curve.png")
        if png:
            logger.info("loss curve: %s", png)
    accelerator.wait_for_everyone()
    return export_dir


@dataclass
class Loop:
    """What ``train_one_epoch`` works with (official DINO passes the same things as arguments)."""

    cfg: DinoConfig
    accelerator: Accelerator
    student: torch.nn.Module  # prepared (DDP-wrapped when distributed)
    teacher: torch.nn.Module  # plain module, EMA of the student
    dino_loss: DINOLoss
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    metrics: MetricsLog
    stop: StopRequest
    progress: Any
    save_checkpoint: Any  # () -> Path, writes the current RunState
    total_steps: int
    ckpt_root: Path
    steps_this_run: int = 0


def train_one_epoch(loop: Loop, data: TrainingData, state: RunState, epoch: int) -> bool:
    """One epoch from ``state.batch_in_epoch`` on, updating ``state``; True when the run stops early (a signal
    or debug.max_steps), after writing a checkpoint."""
    cfg, accelerator, student, optimizer, schedules = loop.cfg, loop.accelerator, loop.student, loop.optimizer, loop.schedules
    teacher_temp = float(schedules.teacher_temp[epoch])
    last_log_time, images_since_log, names_logged = time.time(), 0, 0
    grad_norm = torch.zeros(())
    for batch_in_epoch, (crops, indices, unreadable) in enumerate(data.epoch(epoch, state.batch_in_epoch),
                                                                 start=state.batch_in_epoch):
        it = state.global_step  # global optimizer step: index into the schedules
        with accelerator.accumulate(student):
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = float(schedules.lr[it])
                if i == 0:  # only the regularized group gets weight decay
                    group["weight_decay"] = float(schedules.wd[it])

            # teacher and student forward passes + compute dino loss
            with torch.no_grad(), accelerator.autocast():
                teacher_output = loop.teacher(crops[:2])  # only the 2 global views pass through the teacher
            student_output = student(crops)  # (num_crops*B, K)
            loss = loop.dino_loss(student_output, teacher_output, teacher_temp,
                                  reduce_sum=lambda t: accelerator.reduce(t, reduction="sum"),
                                  world_size=accelerator.num_processes)
            mean_loss = accelerator.reduce(loss.detach().float(), reduction="mean").item()
            if not math.isfinite(mean_loss):
                last = ckpt.latest_checkpoint(loop.ckpt_root)
                raise NonFiniteLossError(
                    f"Loss is {mean_loss} at step {it} (epoch {epoch}, batch {batch_in_epoch}); stopping "
                    f"training. Last good checkpoint: {last or 'none'}. Lower optim.lr_base, raise "
                    "optim.warmup_epochs, lower loss.teacher_temp or use mixed_precision bf16/no."
                )

            # student update
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.unscale_gradients()
                grad_norm = clip_gradients_per_parameter(student.parameters(), cfg.optim.clip_grad)
                cancel_last_layer_gradients(student, epoch, cfg.optim.freeze_last_layer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # unreadable rows of this micro-batch: counted over all ranks, the first few named in the log
        seen_skipped = accelerator.reduce(torch.tensor([len(indices), len(unreadable)], device=accelerator.device),
                                          reduction="sum").tolist()
        state.epoch_images_seen += int(seen_skipped[0])
        state.epoch_images_skipped += int(seen_skipped[1])
        state.images_skipped += int(seen_skipped[1])
        if unreadable and names_logged < UNREADABLE_NAMES_LOGGED:
            logger.warning("epoch %d: unreadable image(s) replaced by the next readable row: %s", epoch,
                           ", ".join(unreadable[:UNREADABLE_NAMES_LOGGED - names_logged]))
            names_logged += len(unreadable)
        check_unreadable_share(state, epoch, cfg.data.max_unreadable_share)
        images_since_log += len(indices) * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue

        # EMA update for the teacher
        with torch.no_grad():
            m = float(schedules.momentum[it])
            for param_q, param_k in zip(accelerator.unwrap_model(student).parameters(), loop.teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        state.global_step = step = it + 1
        state.batch_in_epoch = batch_in_epoch + 1
        loop.steps_this_run += 1
        loop.progress.update(1)

        # logging
        if step % cfg.logging.every_steps == 0 or step == loop.total_steps:
            elapsed = time.time() - last_log_time
            record = {"epoch": epoch, "loss": mean_loss, "lr": float(schedules.lr[it]),
                      "wd": float(schedules.wd[it]), "momentum": m, "teacher_temp": teacher_temp,
                      "grad_norm": float(grad_norm), "img_per_s": images_since_log / max(elapsed, 1e-9),
                      "images_skipped": state.images_skipped}
            if cfg.logging.attention_support_images > 0 and accelerator.is_main_process:
                with accelerator.autocast():
                    record["attention_support_last_block"] = attention_support_size(
                        loop.teacher.backbone, crops[0][: cfg.logging.attention_support_images])
            loop.metrics.log(step, record)
            loop.progress.set_postfix(epoch=epoch, loss=f"{mean_loss:.4f}", img_s=f"{record['img_per_s']:.1f}")
            last_log_time, images_since_log = time.time(), 0

        # checkpoints and stop requests
        stop_now = accelerator.reduce(torch.tensor(float(loop.stop.requested), device=accelerator.device),
                                      reduction="sum").item() > 0
        limit_hit = 0 < cfg.debug.max_steps <= loop.steps_this_run and step < loop.total_steps
        if stop_now or limit_hit or (cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0):
            loop.save_checkpoint()
        if stop_now or limit_hit:
            logger.warning("stopping at step %d (%s); resume with --checkpoint.resume auto", step,
                           "signal" if stop_now else "debug.max_steps")
            return True
    return False


def check_unreadable_share(state: RunState, epoch: int, max_share: float, end_of_epoch: bool = False) -> None:
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


def resolve_resume(cfg: DinoConfig, ckpt_root: Path, accelerator: Any = None) -> Optional[Path]:
    """``checkpoint.resume``: "" (fresh; refuses to mix with existing checkpoints), "auto" (the newest intact
    checkpoint: damaged newer ones are set aside as ``damaged_step_*`` with a warning naming them), or a path
    (refused with the problems found when it is damaged)."""
    mode = cfg.checkpoint.resume
    if mode == "auto":
        chosen, damaged = None, []
        for candidate in reversed(ckpt.list_checkpoints(ckpt_root)):
            problems = ckpt.verify_checkpoint(candidate)
            if not problems:
                chosen = candidate
                break
            damaged.append((candidate, problems))
        if accelerator is not None:
            accelerator.wait_for_everyone()  # every rank has decided before the main one renames anything
        for path, problems in damaged:
            if accelerator is None or accelerator.is_main_process:
                aside = ckpt.set_aside_damaged(path)
                logger.warning("checkpoint %s is damaged (%s): not resuming from it; moved to %s", path.name,
                               "; ".join(problems), aside.name)
        if damaged and accelerator is not None:
            accelerator.wait_for_everyone()
        if damaged:
            logger.warning("resuming from %s instead", chosen.name if chosen else "the start (no intact checkpoint)")
        return chosen
    if mode == "":
        existing = ckpt.list_checkpoints(ckpt_root)
        if existing:
            raise ValueError(
                f"{ckpt_root} already holds checkpoints (newest {existing[-1].name}); pass --checkpoint.resume auto "
                "to continue that run or choose another --output_dir"
            )
        return None
    path = Path(mode)
    if not (path / ckpt.STATE_FILE).is_file():
        raise ValueError(f"checkpoint.resume={mode!r} is not a complete checkpoint folder (no {ckpt.STATE_FILE})")
    problems = ckpt.verify_checkpoint(path)
    if problems:
        raise ValueError(f"checkpoint.resume={mode!r} is damaged: {'; '.join(problems)}. Resume from another "
                         "checkpoint (--checkpoint.resume auto picks the newest intact one).")
    return path


def check_resume_compatible(checkpoint: Path, current: dict, saved_state: dict, world_size: int) -> None:
    """ValueError naming every config key whose change would make the resumed run differ."""
    saved = yaml.safe_load((checkpoint / ckpt.CONFIG_FILE).read_text())
    saved = to_dict(from_dict(DinoConfig, without_retired_keys(saved)))  # normalise (tuples, newer fields)
    diff = breaking_differences(saved, current)
    if saved_state.get("world_size", world_size) != world_size:
        diff["num_processes"] = (saved_state["world_size"], world_size)
    if diff:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
        raise ValueError(
            f"Cannot resume from {checkpoint}: the config changed in ways that alter the run: {lines}. "
            "Restore these values or start a new --output_dir."
        )


if __name__ == "__main__":
    from entmax_vit.cli.commands import train

    train()  # config errors and a refused resume: the message alone, exit 1; a non-finite loss: exit 3
