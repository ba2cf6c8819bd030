"""EntmaxViT configuration and named presets. Hub code: imports only the standard library and transformers."""

from typing import Any, Optional

from transformers import PretrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

from .attention import get_attention_transform, resolve_kernel

_SIZES: dict[str, dict[str, int]] = {
    "vit_tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3),
    "vit_small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vit_base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
}
PRESETS = {f"{name}_patch{patch}": dict(size, patch_size=patch) for name, size in _SIZES.items() for patch in (8, 16)}
# Short aliases as people write them: "vits16", "vitb8", ...
PRESET_ALIASES = {f"vit{name[4]}{patch}": f"{name}_patch{patch}" for name in _SIZES for patch in (8, 16)}


class EntmaxViTConfig(BackboneConfigMixin, PretrainedConfig):
    r"""Configuration of an EntmaxViT: a DINO-style ViT whose attention transform is a config field. Defaults are
    DINO's ViT-S/16 (note layer_norm_eps 1e-6, not HF ViT's 1e-12).

    Args:
        image_size: training resolution; position embeddings are interpolated (as DINO) for other sizes.
        intermediate_size: MLP width; None = ``mlp_ratio * hidden_size``.
        drop_path_rate: maximum stochastic depth, rising linearly over blocks (DINO student: 0.1).
        num_register_tokens: learnt tokens after [CLS] ("Vision Transformers Need Registers"); 0 = none.
        attention: "softmax" | "entmax15" | "sparsemax" | "entmax_bisect".
        attention_alpha: alpha of "entmax_bisect" (> 1; 1.5 = entmax-1.5, 2 = sparsemax).
        attention_alpha_learnable: learn one alpha per head and layer (entmax_bisect), from ``attention_alpha``.
        interpolate_offset: DINO v1 adds 0.1 to the target grid when interpolating position embeddings.
        out_features, out_indices: ``EntmaxViTBackbone``'s stages among "stem" (embeddings) and "stage1".."stageL"
            (as every transformers backbone; negative indices count from the end; both None = the last stage).
        backbone_norm: apply the final LayerNorm to backbone feature maps.
    """

    model_type = "entmax_vit"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 384,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        intermediate_size: Optional[int] = None,
        mlp_ratio: float = 4.0,
        hidden_act: str = "gelu",
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        num_register_tokens: int = 0,
        attention: str = "entmax15",
        attention_alpha: float = 1.5,
        attention_alpha_learnable: bool = False,
        interpolate_offset: float = 0.1,
        out_features: Optional[list[str]] = None,
        out_indices: Optional[list[int]] = None,
        backbone_norm: bool = True,
        **kwargs: Any,
    ) -> None:
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.intermediate_size = intermediate_size if intermediate_size is not None else int(hidden_size * mlp_ratio)
        self.hidden_act = hidden_act
        self.qkv_bias = qkv_bias
        self.layer_norm_eps = layer_norm_eps
        self.drop_path_rate = drop_path_rate
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.num_register_tokens = num_register_tokens
        self.attention = attention
        self.attention_alpha = attention_alpha
        self.attention_alpha_learnable = attention_alpha_learnable
        self.interpolate_offset = interpolate_offset
        self.backbone_norm = backbone_norm
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, num_hidden_layers + 1)]
        self.set_output_features_output_indices(out_features=None if out_features is None else list(out_features),
                                                out_indices=None if out_indices is None else list(out_indices))
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        get_attention_transform(self.attention)  # unknown names raise, listing the choices
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
                     "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for size, divisor in (("hidden_size", "num_attention_heads"), ("image_size", "patch_size")):
            if getattr(self, size) % getattr(self, divisor):
                raise ValueError(f"{size} ({getattr(self, size)}) must be divisible by {divisor} "
                                 f"({getattr(self, divisor)})")
        if not self.attention_alpha > 1.0:
            raise ValueError(f"attention_alpha must be > 1 (1 would be softmax), got {self.attention_alpha}")
        if self.attention_alpha_learnable and self.attention != "entmax_bisect":
            raise ValueError("attention_alpha_learnable=True requires attention='entmax_bisect'")
        if self.attention != "entmax_bisect" and self.attention_alpha != 1.5:
            raise ValueError(f"attention_alpha={self.attention_alpha} only applies to attention='entmax_bisect' "
                             f"(got attention={self.attention!r})")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {self.num_register_tokens}")
        if (impl := getattr(self, "_attn_implementation_internal", None)) is not None:
            resolve_kernel(self.attention, impl)  # raises for an unknown kernel or one that cannot run the transform

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "EntmaxViTConfig":
        """Build a config from a named preset (``vit_small_patch16`` or alias ``vits16``) plus overrides."""
        key = PRESET_ALIASES.get(name, name)
        if key not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)} or {sorted(PRESET_ALIASES)}")
        return cls(**{**PRESETS[key], **overrides})
