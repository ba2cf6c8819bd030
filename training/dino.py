"""DINO self-distillation of an EntmaxViT, through Accelerate (one CPU to many GPU nodes).

    accelerate launch training/dino.py --config vits16_entmax15_200ep --output_dir runs/entmax
    python training/dino.py --config tiny_cpu --output_dir runs/tiny          # minutes on 2 CPU cores

Reads top to bottom like official DINO's main_dino.py: config -> data -> student/teacher -> loss ->
optimizer and schedules -> resume -> training loop (teacher forward, student forward, loss, backward,
per-parameter clipping, last-layer freezing, step, EMA) -> checkpoints and export. Faithful to official
DINO (see docs/training.md for every default and where it comes from).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from entmax_vit.cli.config import from_dict, parse_config, save_config, to_dict
from entmax_vit.training import checkpointing as ckpt
from entmax_vit.training.config import DinoConfig, breaking_differences, flatten
from entmax_vit.training.dino_data import (
    build_dataloader, build_dataset, build_streaming_loader, streaming_batches,
)
from entmax_vit.training.dino_loss import DINOLoss
from entmax_vit.training.export import export_backbone
from entmax_vit.training.metrics_log import MetricsLog, attention_support_size, plot_loss_curve
from entmax_vit.training.networks import build_networks
from entmax_vit.training.optim import cancel_last_layer_gradients, clip_gradients_per_parameter, param_groups
from entmax_vit.training.schedules import cosine_schedule, scaled_lr, teacher_temp_schedule

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
logger = logging.getLogger("entmax_vit.training.dino")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stops, keeping its last good checkpoint."""


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


def tensor_digest(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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
            logger.warning("removed incomplete checkpoint %s (interrupted while writing)", path)
    accelerator.wait_for_everyone()

    # ============ preparing data ============
    streaming = cfg.data.streaming
    if streaming:  # this rank's shard of the stream; not prepared (it is split already)
        data_loader, streamed_batches = build_streaming_loader(
            cfg.data, cfg.crops, cfg.seed, accelerator.process_index, accelerator.num_processes)
        dataset, num_images = None, cfg.data.streaming_num_samples
    else:  # map-style: Accelerate hands each rank disjoint batches of one permutation per epoch
        dataset = build_dataset(cfg.data, cfg.crops, cfg.seed)
        data_loader = build_dataloader(dataset, cfg.data, cfg.seed)
        num_images = len(dataset)

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
    if streaming:
        student, optimizer = accelerator.prepare(student, optimizer)
    else:
        student, optimizer, data_loader = accelerator.prepare(student, optimizer, data_loader)
    if cfg.model.compile:
        student = torch.compile(student)
    torch.manual_seed(cfg.seed + accelerator.process_index)  # drop-path draws differ between ranks

    # ============ init schedulers ============
    accum = cfg.optim.gradient_accumulation_steps
    # streamed epochs are cut to whole accumulation cycles (no end-of-dataloader signal to flush one)
    batches_per_epoch = (streamed_batches // accum) * accum if streaming else len(data_loader)
    if batches_per_epoch == 0:
        raise ValueError(
            f"dataset of {num_images} images is smaller than one global batch "
            f"({cfg.data.batch_size_per_device} x {accelerator.num_processes} processes x {accum} accumulation)"
        )
    iters_per_epoch = math.ceil(batches_per_epoch / accum)  # optimizer steps
    total_batch = cfg.data.batch_size_per_device * accelerator.num_processes * accum
    epochs = cfg.optim.epochs
    lr_schedule = cosine_schedule(scaled_lr(cfg.optim.lr_base, total_batch), cfg.optim.min_lr, epochs,
                                  iters_per_epoch, warmup_epochs=cfg.optim.warmup_epochs)
    wd_schedule = cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, epochs, iters_per_epoch)
    momentum_schedule = cosine_schedule(cfg.optim.momentum_teacher, 1.0, epochs, iters_per_epoch)
    temp_schedule = teacher_temp_schedule(cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
                                          cfg.loss.warmup_teacher_temp_epochs, epochs)
    logger.info("%d images, %d steps/epoch, total batch %d, peak lr %.3g", num_images, iters_per_epoch,
                total_batch, lr_schedule.max())

    # ============ optionally resume training ============
    run_state = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "images_skipped": 0}
    resume_from = resolve_resume(cfg, ckpt_root)
    if resume_from is not None:
        saved = ckpt.read_trainer_state(resume_from)
        check_resume_compatible(resume_from, to_dict(cfg), saved, accelerator.num_processes)
        accelerator.load_state(str(resume_from))  # student, optimizer, scaler, RNG states of every rank
        ckpt.load_teacher(resume_from / ckpt.TEACHER_FILE, teacher, dino_loss.center)
        run_state.update({k: saved[k] for k in run_state})
        if run_state["batch_in_epoch"] >= batches_per_epoch:
            run_state.update(epoch=run_state["epoch"] + 1, batch_in_epoch=0)
        logger.info("resumed from %s at epoch %d, step %d", resume_from, run_state["epoch"], run_state["global_step"])
    if accelerator.is_main_process:  # after the resume check: a refused config never overwrites the run's
        save_config(cfg, out_dir / ckpt.CONFIG_FILE)
    metrics = MetricsLog(out_dir / "metrics.jsonl", accelerator, use_trackers=cfg.logging.tensorboard)
    if resume_from is None:
        metrics.reset()
    else:
        metrics.truncate_after(run_state["global_step"])
    if cfg.logging.tensorboard:
        accelerator.init_trackers("dino", config={k: v for k, v in flatten(to_dict(cfg)).items()
                                                  if isinstance(v, (int, float, str, bool))})
    debug_file = None
    if cfg.debug.dump_rank_state:
        (out_dir / "debug").mkdir(parents=True, exist_ok=True)
        debug_file = open(out_dir / "debug" / f"rank{accelerator.process_index}.jsonl", "a", buffering=1)

    def save(epoch: int, batch_in_epoch: int) -> Path:
        state = dict(run_state, epoch=epoch, batch_in_epoch=batch_in_epoch, world_size=accelerator.num_processes,
                     total_batch=total_batch, iters_per_epoch=iters_per_epoch, time=time.time())
        return ckpt.save_checkpoint(accelerator, ckpt_root, run_state["global_step"], teacher, dino_loss.center,
                                    state, config_yaml, keep_last=cfg.checkpoint.keep_last,
                                    pause_before_commit=cfg.debug.pause_in_checkpoint)

    # ============ training ============
    total_steps = epochs * iters_per_epoch
    max_steps = cfg.debug.max_steps
    steps_this_run = 0
    progress = tqdm(total=total_steps, initial=run_state["global_step"], disable=not (
        accelerator.is_main_process and cfg.logging.progress_bar), dynamic_ncols=True, desc="DINO")
    last_log_time, images_since_log = time.time(), 0
    stopped = False
    grad_norm = torch.zeros(())
    for epoch in range(run_state["epoch"], epochs):
        skip = run_state["batch_in_epoch"] if epoch == run_state["epoch"] else 0
        if streaming:  # replays the epoch's stream and drops the first `skip` batches when resuming
            loader = streaming_batches(data_loader, epoch, batches_per_epoch, skip)
        else:
            data_loader.set_epoch(epoch)
            dataset.set_epoch(epoch)  # augmentation seeds (before iterating: workers copy the dataset then)
            loader = accelerator.skip_first_batches(data_loader, skip) if skip else data_loader
        teacher_temp = float(temp_schedule[epoch])
        for batch_in_epoch, (crops, indices, num_skipped) in enumerate(loader, start=skip):
            it = run_state["global_step"]  # global optimizer step: index into the schedules
            if streaming:
                crops = [c.to(accelerator.device, non_blocking=True) for c in crops]
            if debug_file is not None:
                debug_file.write(json.dumps({"epoch": epoch, "batch": batch_in_epoch, "step": it,
                                             "indices": indices.tolist()}) + "\n")
            with accelerator.accumulate(student):
                for i, group in enumerate(optimizer.param_groups):
                    group["lr"] = float(lr_schedule[it])
                    if i == 0:  # only the regularized group gets weight decay
                        group["weight_decay"] = float(wd_schedule[it])

                # teacher and student forward passes + compute dino loss
                with torch.no_grad(), accelerator.autocast():
                    teacher_output = teacher(crops[:2])  # only the 2 global views pass through the teacher
                student_output = student(crops)  # (num_crops*B, K)
                loss = dino_loss(student_output, teacher_output, teacher_temp,
                                 reduce_sum=lambda t: accelerator.reduce(t, reduction="sum"),
                                 world_size=accelerator.num_processes)
                if it == cfg.debug.inject_nonfinite_at_step:
                    loss = loss * float("nan")
                mean_loss = accelerator.reduce(loss.detach().float(), reduction="mean").item()
                if not math.isfinite(mean_loss):
                    last = ckpt.latest_checkpoint(ckpt_root)
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

            run_state["images_skipped"] += int(accelerator.reduce(
                torch.tensor(num_skipped, device=accelerator.device), reduction="sum").item())
            images_since_log += len(indices) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue

            # EMA update for the teacher
            with torch.no_grad():
                m = float(momentum_schedule[it])
                for param_q, param_k in zip(accelerator.unwrap_model(student).parameters(), teacher.parameters()):
                    param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
            run_state["global_step"] = it + 1
            steps_this_run += 1
            progress.update(1)

            # logging
            step = run_state["global_step"]
            if step % cfg.logging.every_steps == 0 or step == total_steps:
                elapsed = time.time() - last_log_time
                record = {"epoch": epoch, "loss": mean_loss, "lr": float(lr_schedule[it]),
                          "wd": float(wd_schedule[it]), "momentum": m, "teacher_temp": teacher_temp,
                          "grad_norm": float(grad_norm), "img_per_s": images_since_log / max(elapsed, 1e-9),
                          "images_skipped": run_state["images_skipped"]}
                if cfg.logging.attention_support_images > 0 and accelerator.is_main_process:
                    with accelerator.autocast():
                        record["attention_support_last_block"] = attention_support_size(
                            teacher.backbone, crops[0][: cfg.logging.attention_support_images])
                metrics.log(step, record)
                progress.set_postfix(epoch=epoch, loss=f"{mean_loss:.4f}", img_s=f"{record['img_per_s']:.1f}")
                last_log_time, images_since_log = time.time(), 0
            if cfg.debug.sleep_per_step > 0:
                time.sleep(cfg.debug.sleep_per_step)

            # checkpoints and stop requests
            stop_now = accelerator.reduce(torch.tensor(float(stop.requested), device=accelerator.device),
                                          reduction="sum").item() > 0
            limit_hit = 0 < max_steps <= steps_this_run and step < total_steps
            if stop_now or limit_hit or (cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0):
                save(epoch, batch_in_epoch + 1)
            if stop_now or limit_hit:
                logger.warning("stopping at step %d (%s); resume with --checkpoint.resume auto", step,
                               "signal" if stop_now else "debug.max_steps")
                stopped = True
                break
        if stopped:
            break
        run_state.update(epoch=epoch + 1, batch_in_epoch=0)
        if cfg.checkpoint.at_epoch_end:
            save(epoch + 1, 0)
    progress.close()

    # ============ end of training: digests, export ============
    if debug_file is not None:
        debug_file.write(json.dumps({
            "final": True, "global_step": run_state["global_step"],
            "teacher_digest": tensor_digest(list(teacher.state_dict().values())),
            "center_digest": tensor_digest([dino_loss.center]),
            "student_digest": tensor_digest(list(accelerator.unwrap_model(student).state_dict().values())),
        }) + "\n")
        debug_file.close()
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


def resolve_resume(cfg: DinoConfig, ckpt_root: Path) -> Optional[Path]:
    """``checkpoint.resume``: "" (fresh; refuses to mix with existing checkpoints), "auto", or a path."""
    mode = cfg.checkpoint.resume
    if mode == "auto":
        return ckpt.latest_checkpoint(ckpt_root)
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
    return path


def check_resume_compatible(checkpoint: Path, current: dict, saved_state: dict, world_size: int) -> None:
    """ValueError naming every config key whose change would make the resumed run differ."""
    saved = yaml.safe_load((checkpoint / ckpt.CONFIG_FILE).read_text())
    saved = to_dict(from_dict(DinoConfig, saved))  # normalise (tuples, defaults of newer fields)
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
    config = parse_config(DinoConfig, sys.argv[1:], preset_dir=CONFIG_DIR)
    try:
        main(config)
    except NonFiniteLossError as err:
        logging.getLogger("entmax_vit.training.dino").error("%s", err)
        sys.exit(3)
