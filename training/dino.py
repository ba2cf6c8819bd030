"""DINO self-distillation of an EntmaxViT, through Accelerate (one CPU to many GPU nodes).

    accelerate launch training/dino.py --config vits16_entmax15_200ep --output_dir runs/entmax
    python training/dino.py --config tiny_cpu --output_dir runs/tiny          # minutes on 2 CPU cores

Reads top to bottom like official DINO's main_dino.py: ``train`` sets up data, networks, loss, optimizer, schedules
and resume, ``train_one_epoch`` runs the steps, the teacher is exported at the end (docs/training.md).
"""

import logging
import math
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, broadcast_object_list, set_seed

from entmax_vit.data.config_io import flatten, load_preset, save_config, to_dict
from entmax_vit.training import checkpointing as ckpt
from entmax_vit.training.config import DinoConfig, breaking_differences
from entmax_vit.training.dino_data import TrainingData
from entmax_vit.training.dino_loss import DINOLoss
from entmax_vit.training.export import export_backbone
from entmax_vit.training.loop_stats import NonFiniteLossError, Run, RunState, StopRequest
from entmax_vit.training.metrics_log import MetricsLog, attention_support_size, plot_loss_curve
from entmax_vit.training.networks import build_networks
from entmax_vit.training.optim import (cancel_last_layer_gradients, clip_gradients_per_parameter, ema_update,
                                      param_groups)
from entmax_vit.recipe import scaled_lr
from entmax_vit.training.schedules import cosine_schedule, teacher_temp_schedule

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
logger = logging.getLogger("entmax_vit.training.dino")


class LostRankError(RuntimeError):
    """Another process of a distributed run died or stopped answering: this one stops too (no hang)."""


def main(cfg: DinoConfig) -> Optional[Path]:
    """Train; returns the export folder (None when stopped early by a signal or debug.max_steps)."""
    stop = StopRequest()
    try:
        return train(cfg, stop)
    except (RuntimeError, ConnectionError) as err:
        if _is_collective_failure(err):
            first_line = (str(err).strip().splitlines() or [""])[0][:300]
            raise LostRankError(
                f"lost contact with another process of the run ({type(err).__name__}: {first_line}); this process "
                "stops too. A rank died, was killed or waited more than distributed.timeout_s = "
                f"{cfg.distributed.timeout_s} s. Relaunch the same command to resume from the newest intact checkpoint "
                f"in {Path(cfg.output_dir) / 'checkpoints'}."
            ) from err
        raise
    finally:
        stop.close()
        # Accelerate keeps its settings process-wide; forget them so main() can run again in this process
        # (notebooks, tests) with another mixed precision. The process group (PartialState) stays.
        AcceleratorState._reset_state()


def _is_collective_failure(err: BaseException) -> bool:
    """A torch.distributed / gloo / NCCL error (a peer gone or a collective timed out), not a bug of ours."""
    if isinstance(err, getattr(torch.distributed, "DistError", ())):  # DistBackendError is one
        return True
    return torch.distributed.is_available() and torch.distributed.is_initialized() and any(
        marker in str(err) for marker in ("gloo", "Gloo", "NCCL", "Connection closed by peer", "Connection reset",
                                          "Timed out", "timed out", "Broken pipe"))


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
        # a dead or frozen rank ends the others' collectives after this long, with an error (no hang)
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.distributed.timeout_s))],
        dataloader_config=DataLoaderConfiguration(non_blocking=True),  # pinned batches copied asynchronously
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
    # The other ranks wait up to distributed.timeout_s (docs/training.md, "Running on GPUs": pre-download).
    with accelerator.main_process_first():
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
    # The EMA reads the student's own parameters, taken here once: unwrapping the prepared (DDP, compiled)
    # student every step would cost a Python walk, and accelerate's unwrap_model(keep_torch_compile=True)
    # re-points the compiled module at the bare model, dropping DDP (and no_sync under accumulation).
    ema_pairs = (list(teacher.parameters()), list(student.parameters()))
    student, optimizer = accelerator.prepare(student, optimizer)
    if cfg.model.compile:
        student = torch.compile(student)
    torch.manual_seed(cfg.seed + accelerator.process_index)  # drop-path draws differ between ranks

    # ============ init schedulers ============
    iters_per_epoch = math.ceil(data.batches_per_epoch / accum)  # optimizer steps
    total_batch = cfg.data.batch_size_per_device * accelerator.num_processes * accum
    epochs = cfg.optim.epochs
    # official DINO's arrays: lr, wd and teacher momentum per optimizer step, the teacher temperature per epoch
    lr_schedule = cosine_schedule(scaled_lr(cfg.optim.lr_base, total_batch), cfg.optim.min_lr, epochs,
                                  iters_per_epoch, warmup_epochs=cfg.optim.warmup_epochs)
    wd_schedule = cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, epochs, iters_per_epoch)
    momentum_schedule = cosine_schedule(cfg.optim.momentum_teacher, 1.0, epochs, iters_per_epoch)
    teacher_temps = teacher_temp_schedule(cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
                                          cfg.loss.warmup_teacher_temp_epochs, epochs)
    logger.info("%d images, %d steps/epoch, total batch %d, peak lr %.3g", data.num_images, iters_per_epoch,
                total_batch, lr_schedule.max())

    # ============ optionally resume training ============
    state = RunState()
    resume_from = resolve_resume(cfg, ckpt_root, accelerator)
    if resume_from is not None:
        saved = ckpt.read_trainer_state(resume_from)
        check_resume_compatible(resume_from, to_dict(cfg), saved, accelerator.num_processes)
        accelerator.load_state(str(resume_from))  # student, optimizer, scaler, RNG states of every rank
        ckpt.load_teacher(resume_from / ckpt.TEACHER_FILE, teacher, dino_loss.center)
        if missing := [k for k in RunState.__dataclass_fields__ if k not in saved]:  # no defaults for old layouts
            raise ValueError(f"{resume_from}/{ckpt.STATE_FILE} lacks {missing}: not a checkpoint of this version")
        state = RunState(**{k: saved[k] for k in RunState.__dataclass_fields__})
        if state.batch_in_epoch >= data.batches_per_epoch:
            state = RunState(epoch=state.epoch + 1, global_step=state.global_step,
                             images_skipped=state.images_skipped)
        logger.info("resumed from %s at epoch %d, step %d", resume_from, state.epoch, state.global_step)
    if accelerator.is_main_process:  # after the resume check: a refused config never overwrites the run's
        save_config(cfg, out_dir / ckpt.CONFIG_FILE)
    metrics = MetricsLog(out_dir / "metrics.jsonl", accelerator, cfg.logging.tensorboard,
                         resume_step=None if resume_from is None else state.global_step)
    if cfg.logging.tensorboard:
        accelerator.init_trackers("dino", config={k: v for k, v in flatten(to_dict(cfg)).items()
                                                  if isinstance(v, (int, float, str, bool))})

    def save_checkpoint() -> Path:
        trainer_state = dict(vars(run.state), world_size=accelerator.num_processes, total_batch=total_batch,
                             iters_per_epoch=iters_per_epoch, time=time.time())
        return ckpt.save_checkpoint(accelerator, ckpt_root, run.state.global_step, teacher, dino_loss.center,
                                    trainer_state, config_yaml, keep_last=cfg.checkpoint.keep_last)

    # ============ training ============
    run = Run(cfg, accelerator, data, state, metrics, stop, save_checkpoint, ckpt_root, epochs * iters_per_epoch)
    stopped = False
    for epoch in range(state.epoch, epochs):
        stopped = train_one_epoch(student, teacher, ema_pairs, dino_loss, data, optimizer, lr_schedule, wd_schedule,
                                  momentum_schedule, float(teacher_temps[epoch]), epoch, accelerator, cfg, run)
        if stopped:
            break
        run.end_epoch(epoch)
    run.progress.close()

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


def train_one_epoch(student: torch.nn.Module, teacher: torch.nn.Module, ema_pairs: tuple[list, list],
                    dino_loss: DINOLoss, data: TrainingData, optimizer: torch.optim.Optimizer, lr_schedule: np.ndarray,
                    wd_schedule: np.ndarray, momentum_schedule: np.ndarray, teacher_temp: float, epoch: int,
                    accelerator: Accelerator, cfg: DinoConfig, run: Run) -> bool:
    """True when the run stops early (signal, debug.max_steps) after a checkpoint. ``student`` is prepared (DDP),
    ``ema_pairs`` (teacher, student parameters) taken before prepare()."""
    grad_norm = torch.zeros(())
    start = run.state.batch_in_epoch
    for batch_in_epoch, (crops, _) in enumerate(data.epoch(epoch, start), start=start):
        it = run.state.global_step  # global optimizer step: index into the schedules
        with accelerator.accumulate(student):
            # update weight decay and learning rate according to their schedule
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
            run.record(loss, it, batch_in_epoch)  # no sync: checked for NaN/inf at log steps and checkpoints

            # student update
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.unscale_gradients()
                grad_norm = clip_gradients_per_parameter(student.parameters(), cfg.optim.clip_grad)
                cancel_last_layer_gradients(student, epoch, cfg.optim.freeze_last_layer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue

        # EMA update for the teacher (foreach: no loop over parameters, no sync)
        m = float(momentum_schedule[it])
        ema_update(*ema_pairs, m)

        # logging, checkpoints and stop requests
        def log_values() -> dict:
            values = {"lr": float(lr_schedule[it]), "wd": float(wd_schedule[it]), "momentum": m,
                      "teacher_temp": teacher_temp, "grad_norm": float(grad_norm)}
            if cfg.logging.attention_support_images > 0 and accelerator.is_main_process:
                with accelerator.autocast():
                    values["attention_support_last_block"] = attention_support_size(
                        teacher.backbone, crops[0][: cfg.logging.attention_support_images])
            return values

        if run.step_done(epoch, batch_in_epoch, log_values):
            return True
    return False


def resolve_resume(cfg: DinoConfig, ckpt_root: Path, accelerator: Accelerator) -> Optional[Path]:
    """``checkpoint.resume`` ("", "auto" or a path, docs/training.md), decided on the main process and broadcast:
    every rank resumes from the same folder whatever its network-file-system view, and a refusal reaches every rank."""
    decision: list = [None, None]  # [path or None, error message or None]
    if accelerator.is_main_process:
        try:
            chosen = _choose_resume(cfg.checkpoint.resume, ckpt_root)
            decision = [None if chosen is None else str(chosen), None]
        except ValueError as err:
            decision = [None, str(err)]
    decision = broadcast_object_list(decision, from_process=0)
    if decision[1] is not None:
        raise ValueError(decision[1])
    return None if decision[0] is None else Path(decision[0])


def _choose_resume(mode: str, ckpt_root: Path) -> Optional[Path]:
    if mode == "auto":
        chosen, damaged = None, []
        for candidate in reversed(ckpt.list_checkpoints(ckpt_root)):
            if not (candidate / ckpt.MANIFEST_FILE).exists():  # every complete checkpoint of this version has one
                raise ValueError(f"{candidate} has no {ckpt.MANIFEST_FILE}: not a checkpoint of this version "
                                 "(resume it with the version that wrote it, or start a new --output_dir)")
            problems = ckpt.verify_checkpoint(candidate)
            if not problems:
                chosen = candidate
                break
            damaged.append((candidate, problems))
        for path, problems in damaged:
            aside = ckpt.set_aside_damaged(path)
            logger.warning("checkpoint %s is damaged (%s): not resuming from it; moved to %s", path.name,
                           "; ".join(problems), aside.name)
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
    saved = to_dict(load_preset(DinoConfig, str(checkpoint / ckpt.CONFIG_FILE)))  # normalised: tuples, newer fields
    diff = breaking_differences(saved, current)
    if saved_state.get("world_size", world_size) != world_size:
        diff["num_processes"] = (saved_state["world_size"], world_size)
    if diff:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
        raise ValueError(
            f"Cannot resume from {checkpoint}: the config changed in ways that alter the run: {lines}. "
            "Restore these values or start a new --output_dir."
        )


def cli(argv: Optional[list[str]] = None) -> None:
    """``entmax-vit-train``: config errors and a refused resume exit 1 with the message alone; exit codes 3-5 below.
    Returns None (a console script exits with the returned value)."""
    from entmax_vit.cli.entry_point import run

    from accelerate import PartialState

    run(main, DinoConfig, "dino", preset_dir=CONFIG_DIR, argv=argv, log_format=None,  # main logs per rank
        description=__doc__, exit_codes={NonFiniteLossError: 3, ckpt.CheckpointWriteError: 4, LostRankError: 5})
    # Tear the process group down before the interpreter does: a gloo group left to interpreter teardown once made
    # rank 1 of a finished two-process run abort ("terminate called without an active exception", status -6). Only
    # on success: main() keeps the group to run again, and after a lost peer a teardown could block this rank.
    PartialState().destroy_process_group()


if __name__ == "__main__":
    cli()
