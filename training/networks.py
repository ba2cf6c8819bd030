"""Student and teacher networks of DINO: EntmaxViT backbone + DINO head in a multi-crop wrapper.

The teacher is built like the student but WITHOUT drop path, starts from the student's weights, never
receives gradients (requires_grad False) and is updated only by the EMA in the training loop.
"""

from __future__ import annotations

from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel
from entmax_vit.modeling.attention import resolve_kernel
from entmax_vit.training.config import DinoConfig
from entmax_vit.training.dino_head import DINOHead
from entmax_vit.training.multicrop_wrapper import MultiCropWrapper


def backbone_config(cfg: DinoConfig, drop_path_rate: float) -> EntmaxViTConfig:
    """EntmaxViTConfig from the preset, the attention transform and ``model.backbone_overrides``; the
    position-embedding grid is learnt at the global crop size."""
    overrides = dict(cfg.model.backbone_overrides)
    overrides.setdefault("image_size", cfg.crops.global_size)
    return EntmaxViTConfig.from_preset(cfg.model.preset, attention=cfg.model.attention, drop_path_rate=drop_path_rate,
                                       **overrides)


def attention_kernel(cfg: DinoConfig) -> str:
    """``model.attn_implementation``, checked against the transform; "auto" is the model's own default: sdpa for
    softmax, and for the sparse transforms the kernel "auto" (``modeling.attention.default_kernel``: triton on
    CUDA, tiled on CPU), decided per call, so a model built here on the CPU runs the GPU kernel once moved."""
    requested = None if cfg.model.attn_implementation == "auto" else cfg.model.attn_implementation
    return resolve_kernel(cfg.model.attention, requested)


def build_networks(cfg: DinoConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """(student, teacher) with identical weights; teacher frozen, in eval mode (no dropout/BN in it)."""
    def make(drop_path_rate: float) -> MultiCropWrapper:
        backbone = EntmaxViTModel._from_config(backbone_config(cfg, drop_path_rate),
                                               attn_implementation=attention_kernel(cfg))
        m = cfg.model
        return MultiCropWrapper(backbone, DINOHead(backbone.config.hidden_size, m.out_dim, m.head_hidden_dim,
                                                   m.head_bottleneck_dim, m.head_num_layers, m.norm_last_layer))

    student, teacher = make(cfg.model.drop_path_rate), make(0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False).eval()
    return student, teacher

