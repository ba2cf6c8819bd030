"""EntmaxViT: a DINO-style Vision Transformer whose attention transform is a config field, built as transformers'
ViT/Dinov2. Token layout everywhere: [CLS], registers (config.num_register_tokens), patches row-major. Hub code."""

import math
import re
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, BaseModelOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .attention import attention_function, attention_interface_name, resolve_kernel
from .configuration_entmax_vit import EntmaxViTConfig


class EntmaxViTPatchEmbeddings(nn.Module):
    """Non-overlapping patches by a strided convolution: (B, C, H, W) -> (B, H/p * W/p, D)."""

    def __init__(self, config: EntmaxViTConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The one place the input shape is checked (every model reaches the pixels through here).
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}")
        _, channels, height, width = pixel_values.shape
        if channels != self.num_channels:
            raise ValueError(f"Expected {self.num_channels} input channels, got {channels}")
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"Input size {height}x{width} is not divisible by the patch size {self.patch_size}; "
                             "resize or crop the image to a multiple of it (the image processor does this)")
        return self.projection(pixel_values).flatten(2).transpose(1, 2)  # (B, N, D)


class EntmaxViTEmbeddings(nn.Module):
    """[CLS] + registers + patch embeddings, with position embeddings interpolated as official DINO."""

    def __init__(self, config: EntmaxViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        registers = config.num_register_tokens
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, config.hidden_size)) if registers > 0 else None
        self.patch_embeddings = EntmaxViTPatchEmbeddings(config)
        # Position embeddings cover [CLS] + patches (registers get none, as in DINOv2 with registers).
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, num_patches: int, height: int, width: int) -> torch.Tensor:
        """(1, 1 + h*w, D) for height x width pixels as official DINO v1: bicubic by scale_factor, not by size."""
        pos = self.position_embeddings
        stored = pos.shape[1] - 1
        if num_patches == stored and height == width:
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        dim = pos.shape[-1]
        side = int(math.sqrt(stored))
        h0 = height // self.patch_size + self.config.interpolate_offset
        w0 = width // self.patch_size + self.config.interpolate_offset
        patch_pos = F.interpolate(patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2).float(),
                                  scale_factor=(h0 / side, w0 / side), mode="bicubic").to(pos.dtype)
        if patch_pos.shape[-2:] != (height // self.patch_size, width // self.patch_size):
            raise RuntimeError(f"Position-embedding interpolation gave grid {tuple(patch_pos.shape[-2:])}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings(pixel_values.to(self.patch_embeddings.projection.weight.dtype))  # checks shape
        batch, _, height, width = pixel_values.shape
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), patches), dim=1)  # (B, 1 + N, D)
        tokens = tokens + self.interpolate_pos_encoding(patches.shape[1], height, width)
        if self.register_tokens is not None:
            tokens = torch.cat((tokens[:, :1], self.register_tokens.expand(batch, -1, -1), tokens[:, 1:]), dim=1)
        return self.dropout(tokens)  # (B, 1 + R + N, D)


class EntmaxViTAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (as DINO/timm), run through
    ``ALL_ATTENTION_FUNCTIONS`` under the (config.attention, kernel) pair's name, e.g. "entmax15", "softmax_sdpa"."""

    def __init__(self, config: EntmaxViTConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj_dropout = nn.Dropout(config.hidden_dropout_prob)
        # Learnable alpha per head (alpha-entmax only): alpha = 1 + softplus(raw) > 1.
        raw = torch.full((config.num_attention_heads,), _alpha_raw(config.attention_alpha))
        self.alpha_raw = nn.Parameter(raw) if config.attention_alpha_learnable else None

    def alpha(self) -> Union[None, float, torch.Tensor]:
        if self.config.attention != "entmax_bisect":
            return None
        if self.alpha_raw is None:
            return self.config.attention_alpha
        return (1.0 + F.softplus(self.alpha_raw)).view(-1, 1, 1)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs: Unpack[TransformersKwargs]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch, tokens, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
        transform = self.config.attention
        kernel = resolve_kernel(transform, self.config._attn_implementation)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention_interface_name(transform, kernel),
                                                                     attention_function(transform, kernel))
        # SDPA returns no probabilities; it needs to know when they are recorded (from the call or the config).
        kwargs["output_attentions"] = kwargs.get("output_attentions") or self.config.output_attentions
        out, probs = attention_interface(self, query, key, value, attention_mask, scaling=self.scaling,
                                         dropout=self.config.attention_probs_dropout_prob if self.training else 0.0,
                                         **kwargs)
        out = out.reshape(batch, tokens, dim)  # (B, N, H, d) -> (B, N, D)
        return self.proj_dropout(self.proj(out)), probs


def _alpha_raw(alpha: float) -> float:
    return math.log(math.expm1(alpha - 1.0))


class EntmaxViTMLP(nn.Module):
    def __init__(self, config: EntmaxViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(hidden_states)))))


class EntmaxViTDropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample with probability ``drop_prob`` (training only)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class EntmaxViTLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, config: EntmaxViTConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = EntmaxViTAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EntmaxViTMLP(config)
        self.drop_path = EntmaxViTDropPath(drop_path)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        attn_out, _ = self.attention(self.norm1(hidden_states), attention_mask, **kwargs)
        hidden_states = hidden_states + self.drop_path(attn_out)
        return hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))


# Checkpoints that must be converted first: description -> (key pattern, --source).
_FOREIGN_LAYOUTS = {
    "an official DINO or timm ViT": (re.compile(r"(^|\.)(blocks\.\d+\.attn\.qkv|patch_embed\.proj|pos_embed$)"), "dino"),
    "a transformers ViT/DINOv2": (re.compile(r"(^|\.)(encoder\.layer|layers)\.\d+\.(attention\.attention\."
                                             r"(query|key|value)|attention\.[qkv]_proj|layernorm_before)"), "hf-vit"),
}
_CONVERTER = (
    "Convert it into an EntmaxViT checkpoint first with the converter of the entmax-vit package (it checks the "
    "converted model against the source to 1e-5): `pip install entmax-vit`, then `python -m entmax_vit.conversion "
    "--source {source} INPUT OUTPUT_DIR` (--source timm for a timm checkpoint)."
)


class EntmaxViTPreTrainedModel(PreTrainedModel):
    config_class = EntmaxViTConfig
    config: EntmaxViTConfig
    base_model_prefix = "entmax_vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["EntmaxViTEmbeddings", "EntmaxViTLayer"]
    _supports_sdpa = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": EntmaxViTLayer, "attentions": EntmaxViTAttention}
    _input_embed_layer = "patch_embeddings"

    def get_correct_attn_implementation(self, requested_attention: Optional[str], is_init_check: bool = False) -> str:
        return resolve_kernel(self.config.attention, requested_attention)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' from_pretrained, except that an unconverted official DINO / timm / transformers ViT
        checkpoint raises ValueError naming the converter instead of loading as a random model."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                              **kwargs)
        unexpected = sorted(info.get("unexpected_keys", ()))
        for name, (pattern, source) in _FOREIGN_LAYOUTS.items():
            if any(pattern.search(k) for k in unexpected):
                raise ValueError(f"{pretrained_model_name_or_path} holds {name} checkpoint, not an EntmaxViT one (its "
                                 f"weights did not load). " + _CONVERTER.format(source=source))
        return (model, info) if want_info else model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """DINO initialisation (truncated normal, absolute +-2 as DINO/timm); the patch convolution keeps PyTorch's
        default, as DINO does, written out for weights materialised from the meta device."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, mean=0.0, std=std, a=-2.0, b=2.0)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, EntmaxViTEmbeddings):
            for param in (module.position_embeddings, module.cls_token, module.register_tokens):
                if param is not None:
                    init.trunc_normal_(param, mean=0.0, std=std, a=-2.0, b=2.0)
        elif isinstance(module, EntmaxViTAttention) and module.alpha_raw is not None:
            init.constant_(module.alpha_raw, _alpha_raw(self.config.attention_alpha))


class EntmaxViTEncoder(EntmaxViTPreTrainedModel):

    def __init__(self, config: EntmaxViTConfig) -> None:
        super().__init__(config)
        # DINO's stochastic depth decay rule
        depth = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layer = nn.ModuleList([EntmaxViTLayer(config, r) for r in rates])
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs: Unpack[TransformersKwargs]) -> BaseModelOutput:
        for block in self.layer:
            hidden_states = block(hidden_states, attention_mask, **kwargs)
        return BaseModelOutput(last_hidden_state=hidden_states)


class EntmaxViTModel(EntmaxViTPreTrainedModel):
    """The bare encoder: ``last_hidden_state`` final-LayerNormed, ``pooler_output`` the normed [CLS] (DINO's
    feature), ``hidden_states`` un-normed (embeddings + each block), ``attentions`` every layer's probabilities."""

    def __init__(self, config: EntmaxViTConfig) -> None:
        super().__init__(config)
        self.embeddings = EntmaxViTEmbeddings(config)
        self.encoder = EntmaxViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.num_register_tokens

    def _patch_map(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Patch tokens of a (B, prefix + h*w, D) sequence as a map (B, D, h, w) for an input of height x width."""
        grid = (height // self.config.patch_size, width // self.config.patch_size)
        return tokens[:, self.num_prefix_tokens:].unflatten(1, grid).permute(0, 3, 1, 2).contiguous()

    @can_return_tuple
    def forward(self, pixel_values: Optional[torch.Tensor] = None,
                **kwargs: Unpack[TransformersKwargs]) -> BaseModelOutputWithPooling:
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        encoded = self.encoder(self.embeddings(pixel_values), **kwargs)
        sequence = self.layernorm(encoded.last_hidden_state)
        return BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=sequence[:, 0],
                                          hidden_states=encoded.hidden_states, attentions=encoded.attentions)

    def get_intermediate_layers(self, pixel_values: torch.Tensor, n: Union[int, Sequence[int]] = 1,
                                reshape: bool = False, return_class_token: bool = False,
                                return_register_tokens: bool = False, norm: bool = True) -> tuple:
        """Outputs of the last ``n`` blocks (int) or of the given 0-based blocks, as DINO/DINOv2's, for probes:
        patch tokens (B, N, D) (``reshape``: maps (B, D, H/p, W/p)), plus [CLS] (B, D) and registers (B, R, D)
        in a tuple when asked; ``norm`` applies the final LayerNorm (as DINO's linear evaluation)."""
        depth = self.config.num_hidden_layers
        if isinstance(n, int) and not 1 <= n <= depth:
            raise ValueError(f"n must be in 1..{depth}, got {n}")
        wanted = list(range(depth - n, depth)) if isinstance(n, int) else [i % depth for i in n]
        hidden = self.embeddings(pixel_values)
        prefix = self.num_prefix_tokens
        _, _, height, width = pixel_values.shape
        results = []
        for i, block in enumerate(self.encoder.layer[: max(wanted) + 1]):
            hidden = block(hidden)
            if i not in wanted:
                continue
            out = self.layernorm(hidden) if norm else hidden
            patches = self._patch_map(out, height, width) if reshape else out[:, prefix:]
            item: tuple = (patches,)
            if return_class_token:
                item += (out[:, 0],)
            if return_register_tokens:
                item += (out[:, 1:prefix],)
            results.append(item if len(item) > 1 else patches)
        return tuple(results)


class EntmaxViTForImageClassification(EntmaxViTPreTrainedModel):
    """EntmaxViT with a linear head on [CLS] concatenated with the mean patch token (as DINOv2's classifier).
    The loss follows ``config.problem_type`` (regression / single_label / multi_label), as transformers' heads."""

    def __init__(self, config: EntmaxViTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.entmax_vit = EntmaxViTModel(config)
        self.classifier = nn.Linear(2 * config.hidden_size, self.num_labels) if self.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(self, pixel_values: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                **kwargs: Unpack[TransformersKwargs]) -> ImageClassifierOutput:
        outputs: BaseModelOutputWithPooling = self.entmax_vit(pixel_values, **kwargs)
        sequence = outputs.last_hidden_state
        patches = sequence[:, self.entmax_vit.num_prefix_tokens :]
        logits = self.classifier(torch.cat([sequence[:, 0], patches.mean(dim=1)], dim=-1))
        loss = None if labels is None else self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


class EntmaxViTBackbone(BackboneMixin, EntmaxViTModel):
    """Patch maps (B, D, H/p, W/p) of the stages ``config.out_features`` / ``out_indices`` choose, final-LayerNormed
    if ``config.backbone_norm``. The same modules (and weight names) as EntmaxViTModel, another forward."""

    def __init__(self, config: EntmaxViTConfig) -> None:
        super().__init__(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)

    @can_return_tuple
    @filter_output_hidden_states
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BackboneOutput:
        encoded = self.encoder(self.embeddings(pixel_values), **kwargs)  # hidden states forced on by the filter
        _, _, height, width = pixel_values.shape
        maps = [self._patch_map(self.layernorm(h) if self.config.backbone_norm else h, height, width)
                for stage, h in zip(self.stage_names, encoded.hidden_states) if stage in self.out_features]
        return BackboneOutput(feature_maps=tuple(maps), hidden_states=encoded.hidden_states,
                              attentions=encoded.attentions)
