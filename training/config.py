"""Typed configuration of DINO training: official main_dino.py defaults (ViT-S/16, 100 epochs, 64 images per GPU),
overridden by ``training/configs/*.yaml`` presets, then ``--section.key value``. Comments carry the official advice.
"""

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional

from annotated_types import Ge, Gt, Interval

from entmax_vit.data.config_io import KeysOf, flatten
from entmax_vit.modeling.attention import resolve_kernel
from entmax_vit.modeling.configuration_entmax_vit import EntmaxViTConfig
from entmax_vit.training.multicrop import MultiCropConfig


@dataclass
class ModelConfig:
    # Architecture preset of EntmaxViTConfig.from_preset: vit_{tiny,small,base}_patch{8,16} (or vits16, ...).
    preset: str = "vit_small_patch16"
    # Attention transform in every block: softmax | entmax15 | sparsemax | entmax_bisect (the paper: entmax15).
    attention: str = "entmax15"
    # Attention kernel: auto (from the device per call: sdpa for softmax, else triton on CUDA, tiled on CPU) |
    # sdpa (softmax only) | eager (explicit N x N scores) | tiled | triton (CUDA).
    attn_implementation: str = "auto"
    # Stochastic depth of the STUDENT only (the teacher never drops paths). Official ViT-S: 0.1.
    drop_path_rate: Annotated[float, Interval(ge=0, lt=1)] = 0.1
    # Extra EntmaxViTConfig fields, e.g. {hidden_size: 96, num_hidden_layers: 4}; image_size is crops.global_size.
    backbone_overrides: Annotated[dict, KeysOf(EntmaxViTConfig)] = field(default_factory=dict)
    # Head output dimension K. Official 65536; for complex/large datasets a large value works well.
    out_dim: Annotated[int, Ge(1)] = 65536
    # Width of the head MLP's hidden layers (official 2048); unused when head_num_layers is 1.
    head_hidden_dim: int = 2048
    # Width of the head's bottleneck, L2-normalised before the last layer (official 256).
    head_bottleneck_dim: int = 256
    # Linear layers of the head MLP before its weight-normed last layer (official 3; 1 = one map to the bottleneck).
    head_num_layers: int = 3
    # Fix the magnitude of the head's last layer to 1: more stable; False ("boosted" ViT-S) better but may be unstable.
    norm_last_layer: bool = True
    # Recompute activations in the backward pass (less memory, ~30% slower).
    gradient_checkpointing: bool = False
    # torch.compile the student (first steps are slow while compiling).
    compile: bool = False


@dataclass
class DataConfig:
    # Hub id, "imagefolder:DIR", "webdataset:GLOB_OR_DIR", a save_to_disk folder, or "embedded" (synthetic scenes).
    source: str = "ILSVRC/imagenet-1k"
    # Split of data.source to train on, e.g. "train".
    split: str = "train"
    # Image column; None = found automatically ("image", "img", "jpg", ...).
    image_column: Optional[str] = None
    # Stream the dataset instead of downloading it (Hub ids); every rank reads a disjoint shard.
    streaming: bool = False
    # Samples per epoch when streaming (the length of an iterable dataset is unknown); ImageNet-1K: 1281167.
    streaming_num_samples: Annotated[Optional[int], Ge(1)] = None
    # Use only the first N samples (quick experiments); None = all.
    max_samples: Annotated[Optional[int], Ge(1)] = None
    # datasets cache folder for downloads and prepared data; None = the HF cache (HF_DATASETS_CACHE).
    cache_dir: Optional[str] = None
    # Images per device per step (official: 64 per GPU). The learning rate scales with the total batch.
    batch_size_per_device: Annotated[int, Ge(1)] = 64
    # DataLoader worker processes per rank (official 10 per GPU); 0 decodes and augments in the main process.
    num_workers: Annotated[int, Ge(0)] = 10
    # Pinned host memory for the batches, copied to the GPU asynchronously; ignored without CUDA.
    pin_memory: bool = True
    # Unreadable images are replaced by the next readable row and counted (images_skipped); training stops when
    # more than this share of an epoch's images is unreadable (checked from 1024 images drawn, and at the epoch's
    # end). 1.0 = only when no image is readable; e.g. 0.05 to stop on badly damaged data.
    max_unreadable_share: Annotated[float, Interval(ge=0, le=1)] = 1.0


@dataclass
class OptimConfig:
    # Training length in epochs (official 100; the paper 200); every schedule spans it.
    epochs: Annotated[int, Ge(1)] = 100
    # Peak learning rate for a total batch of 256 (lr = lr_base * total_batch / 256) after warmup. Official 5e-4.
    lr_base: Annotated[float, Gt(0)] = 0.0005
    # Epochs of linear learning-rate warmup from 0 to the peak (official 10); at most optim.epochs.
    warmup_epochs: Annotated[int, Ge(0)] = 10
    # Final learning rate of the cosine schedule.
    min_lr: Annotated[float, Ge(0)] = 1.0e-6
    # Initial weight decay, cosine to weight_decay_end (official 0.04: smaller at the start suits ViTs); not on 1-D
    # parameters.
    weight_decay: Annotated[float, Ge(0)] = 0.04
    # Final weight decay of the cosine schedule (official 0.4: a larger decay by the end helps ViTs).
    weight_decay_end: Annotated[float, Ge(0)] = 0.4
    # Gradient clipping PER PARAMETER, as official DINO (not a global norm); 0 disables. Official 3.0; ~0.3-1.0 can
    # help larger ViTs.
    clip_grad: Annotated[float, Ge(0)] = 3.0
    # Epochs the head's last layer stays fixed: 1 usually; increase it if the loss does not decrease.
    freeze_last_layer: Annotated[int, Ge(0)] = 1
    # Teacher EMA momentum, cosine from this value to 1. Official 0.996; 0.9995 for batch size 256.
    momentum_teacher: Annotated[float, Interval(ge=0, le=1)] = 0.996
    # Accumulate gradients over N micro-batches (total batch = per device x devices x N).
    gradient_accumulation_steps: Annotated[int, Ge(1)] = 1
    # no | fp16 | bf16 (official trains with fp16; bf16 on Ampere+). Through Accelerate.
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"


@dataclass
class LossConfig:
    # Student temperature (official 0.1).
    student_temp: Annotated[float, Gt(0)] = 0.1
    # Final teacher temperature. Official 0.04; above 0.07 is unstable; raise it if the loss does not decrease.
    teacher_temp: Annotated[float, Gt(0)] = 0.04
    # Initial teacher temperature, linearly warmed up to teacher_temp; lower it if training is unstable.
    warmup_teacher_temp: Annotated[float, Gt(0)] = 0.04
    # Epochs of the linear teacher-temperature warmup (official 0; boosted ViT-S 30); at most optim.epochs.
    warmup_teacher_temp_epochs: Annotated[int, Ge(0)] = 0
    # EMA momentum of the teacher-output center (official 0.9).
    center_momentum: Annotated[float, Interval(ge=0, le=1)] = 0.9


@dataclass
class CheckpointConfig:
    # Write a checkpoint every N optimizer steps (0 = none within an epoch); a stop always writes one.
    every_steps: Annotated[int, Ge(0)] = 1000
    # Also write a checkpoint at the end of every epoch.
    at_epoch_end: bool = True
    # Keep the newest K checkpoints (older ones are deleted); 0 keeps all.
    keep_last: Annotated[int, Ge(0)] = 3
    # "" = start fresh (refused over existing checkpoints), "auto" = the newest intact one if any, or a step_* path.
    resume: str = "auto"


@dataclass
class LoggingConfig:
    # Log metrics every N optimizer steps to OUTPUT_DIR/metrics.jsonl (and tensorboard); a non-finite loss stops the
    # run by the next log step.
    every_steps: Annotated[int, Ge(1)] = 10
    # Also log the metrics to tensorboard (event files under OUTPUT_DIR, through Accelerate).
    tensorboard: bool = True
    # Images of the first global crop used for the attention-support metric of the last block (0 = off).
    attention_support_images: int = 4
    # Show a tqdm progress bar on the main process (loss and images/s); false for quiet logs in batch jobs.
    progress_bar: bool = True


@dataclass
class DebugConfig:
    # Stop after this many optimizer steps OF THIS LAUNCH with a checkpoint, status 0 (schedules still span
    # optim.epochs); a resumed relaunch trains this many MORE (5 then 5 again = step 10). -1 = no limit.
    max_steps: int = -1


@dataclass
class DistributedConfig:
    # Process-group timeout in seconds: a rank waiting longer in a collective (a dead or frozen rank) stops with an
    # error instead of hanging. Raise it when the main process first downloads a large dataset (docs/training.md).
    timeout_s: Annotated[int, Ge(1)] = 1800


@dataclass
class DinoConfig:
    # Run folder: checkpoints/, metrics.jsonl, loss_curve.png, the config and final_model/ (the teacher backbone).
    output_dir: str = "outputs/dino"
    # Seed of everything: weights, data order, augmentations (a pure function of seed, epoch, sample index).
    seed: int = 0
    # Backbone (architecture, attention transform and kernel) and DINO projection head.
    model: ModelConfig = field(default_factory=ModelConfig)
    # Training images: where they come from, batch size, data loading.
    data: DataConfig = field(default_factory=DataConfig)
    # Multi-crop augmentation (official DINO's DataAugmentationDINO).
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    # AdamW, learning-rate and weight-decay schedules, teacher EMA, clipping, precision.
    optim: OptimConfig = field(default_factory=OptimConfig)
    # DINO loss: student and teacher temperatures, centering.
    loss: LossConfig = field(default_factory=LossConfig)
    # Checkpoints under OUTPUT_DIR/checkpoints and resuming from them.
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Metrics log, tensorboard and progress bar.
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Stopping a launch early (smoke tests, debugging).
    debug: DebugConfig = field(default_factory=DebugConfig)
    # Multi-process training (torch.distributed through Accelerate).
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        check_config(self)


def backbone_config(cfg: DinoConfig, drop_path_rate: float) -> EntmaxViTConfig:
    """EntmaxViTConfig from the preset, the attention transform and ``model.backbone_overrides``; the
    position-embedding grid is learnt at the global crop size."""
    overrides = dict(cfg.model.backbone_overrides)
    overrides.setdefault("image_size", cfg.crops.global_size)
    return EntmaxViTConfig.from_preset(cfg.model.preset, attention=cfg.model.attention, drop_path_rate=drop_path_rate,
                                       **overrides)


def attention_kernel(cfg: DinoConfig) -> str:
    """``model.attn_implementation``, checked against the transform; "auto" is the model's own default, decided per
    call (``modeling.attention.default_kernel``), so a model built here on the CPU runs the GPU kernel once moved."""
    requested = None if cfg.model.attn_implementation == "auto" else cfg.model.attn_implementation
    return resolve_kernel(cfg.model.attention, requested)


def check_config(cfg: DinoConfig) -> None:
    """Checks needing several fields or the model's rules, on every DinoConfig built (before any data is loaded);
    ValueError names the key."""
    from entmax_vit.data.datasets import check_source

    for key, check in (("model", lambda: backbone_config(cfg, cfg.model.drop_path_rate)),
                       ("model.attn_implementation", lambda: attention_kernel(cfg)),
                       ("data.source", lambda: check_source(cfg.data.source))):
        try:
            check()
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None


# Keys that may change when resuming: they do not alter the trajectory of the run.
RESUME_SAFE_PREFIXES: tuple[str, ...] = (
    "output_dir", "checkpoint.", "logging.", "debug.", "distributed.", "data.num_workers", "data.pin_memory",
    "data.cache_dir", "model.gradient_checkpointing", "model.compile", "model.attn_implementation",
)


def breaking_differences(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Keys whose change would alter a resumed run: {key: (saved, current)}; resume-safe keys are ignored."""
    a, b = flatten(saved), flatten(current)
    return {k: (a.get(k, "<missing>"), b.get(k, "<missing>")) for k in sorted(set(a) | set(b))
            if not k.startswith(RESUME_SAFE_PREFIXES) and a.get(k, "<missing>") != b.get(k, "<missing>")}
