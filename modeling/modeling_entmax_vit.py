"""EntmaxViT: a DINO-style Vision Transformer whose attention transform is a config field.

Copied to the Hub with the model: imports only the standard library, torch and transformers, plus its flat
siblings (configuration_entmax_vit.py, attention.py) through relative imports.

Token layout everywhere: [CLS], registers (config.num_register_tokens), patches in row-major order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
)

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import attention_function, attention_interface_name, resolve_kernel
from .configuration_entmax_vit import EntmaxViTConfig


# ----------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------
class EntmaxViTPatchEmbeddings(nn.Module):
    """Non-overlapping patches by a strided convolution: (B, C, H, W) -> (B, H/p * W/p, D)."""

    def __init__(self, config: EntmaxViTConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}")
        _, channels, height, width = pixel_values.shape
        if channels != self.num_channels:
            raise ValueError(f"Expected {self.num_channels} input channels, got {channels}")
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Input size {height}x{width} is not divisible by the patch size {self.patch_size}; "
                "resize or crop the image to a multiple of it (the image processor does this)"
            )
        return self.projection(pixel_values).flatten(2).transpose(1, 2)  # (B, N, D)


class EntmaxViTEmbeddings(nn.Module):
    """[CLS] + registers + patch embeddings, with position embeddings interpolated as official DINO."""

    def __init__(self, config: EntmaxViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, config.hidden_size))
            if config.num_register_tokens > 0
            else None
        )
        self.patch_embeddings = EntmaxViTPatchEmbeddings(config)
        # Position embeddings cover [CLS] + patches (registers get none, as in DINOv2 with registers).
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, num_patches: int, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an input of height x width pixels, (1, 1 + h*w, D).

        Follows official DINO v1 exactly: bicubic interpolation by ``scale_factor`` of the target grid plus
        ``config.interpolate_offset`` (0.1) over the stored grid, which differs slightly from resizing by size.
        """
        pos = self.position_embeddings
        stored = pos.shape[1] - 1
        if num_patches == stored and height == width:
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        dim = pos.shape[-1]
        side = int(math.sqrt(stored))
        h0 = height // self.patch_size + self.config.interpolate_offset
        w0 = width // self.patch_size + self.config.interpolate_offset
        patch_pos = F.interpolate(
            patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2).float(),
            scale_factor=(h0 / side, w0 / side),
            mode="bicubic",
        ).to(pos.dtype)
        if patch_pos.shape[-2:] != (height // self.patch_size, width // self.patch_size):
            raise RuntimeError(f"Position-embedding interpolation gave grid {tuple(patch_pos.shape[-2:])}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}"
            )
        batch, _, height, width = pixel_values.shape
        patches = self.patch_embeddings(pixel_values.to(self.patch_embeddings.projection.weight.dtype))
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), patches), dim=1)  # (B, 1 + N, D)
        tokens = tokens + self.interpolate_pos_encoding(patches.shape[1], height, width)
        if self.register_tokens is not None:
            tokens = torch.cat((tokens[:, :1], self.register_tokens.expand(batch, -1, -1), tokens[:, 1:]), dim=1)
        return self.dropout(tokens)  # (B, 1 + R + N, D)


# ----------------------------------------------------------------------------------------------------------
# Transformer block
# ----------------------------------------------------------------------------------------------------------
class EntmaxViTAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (as DINO/timm) and a configurable transform."""

    def __init__(self, config: EntmaxViTConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj_dropout = nn.Dropout(config.hidden_dropout_prob)
        # Learnable alpha per head (alpha-entmax only), parametrised as alpha = 1 + softplus(raw) > 1.
        if config.attention_alpha_learnable:
            raw = math.log(math.expm1(config.attention_alpha - 1.0))
            self.alpha_raw = nn.Parameter(torch.full((config.num_attention_heads,), raw))
        else:
            self.alpha_raw = None

    def alpha(self) -> Union[None, float, torch.Tensor]:
        """alpha per head as (H, 1, 1) for alpha-entmax; None for fixed-shape transforms."""
        if self.config.attention != "entmax_bisect":
            return None
        if self.alpha_raw is None:
            return self.config.attention_alpha
        return (1.0 + F.softplus(self.alpha_raw)).view(-1, 1, 1)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch, tokens, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
        transform = self.config.attention
        kernel = resolve_kernel(transform, self.config._attn_implementation)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            attention_interface_name(transform, kernel), attention_function(transform, kernel)
        )
        out, probs = attention_interface(
            self, query, key, value, None, scaling=self.scaling,
            dropout=self.config.attention_probs_dropout_prob if self.training else 0.0,
            output_attentions=output_attentions,
        )
        out = out.reshape(batch, tokens, dim)  # (B, N, H, d) -> (B, N, D)
        return self.proj_dropout(self.proj(out)), probs if output_attentions else None


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
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class EntmaxViTLayer(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, config: EntmaxViTConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = EntmaxViTAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EntmaxViTMLP(config)
        self.drop_path = EntmaxViTDropPath(drop_path)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        attn_out, probs = self.attention(self.norm1(hidden_states), output_attentions=output_attentions)
        hidden_states = hidden_states + self.drop_path(attn_out)
        hidden_states = hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))
        return hidden_states, probs


class EntmaxViTEncoder(nn.Module):
    def __init__(self, config: EntmaxViTConfig) -> None:
        super().__init__()
        # Stochastic depth decay rule (DINO): rates rise linearly from 0 to drop_path_rate over depth.
        rates = [config.drop_path_rate * i / max(config.num_hidden_layers - 1, 1) for i in range(config.num_hidden_layers)]
        self.layer = nn.ModuleList([EntmaxViTLayer(config, r) for r in rates])
        self.gradient_checkpointing = False

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        all_hidden: tuple[torch.Tensor, ...] = (hidden_states,) if output_hidden_states else ()
        all_attn: tuple[torch.Tensor, ...] = ()
        for block in self.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden_states, probs = torch.utils.checkpoint.checkpoint(
                    block, hidden_states, output_attentions, use_reentrant=False
                )
            else:
                hidden_states, probs = block(hidden_states, output_attentions)
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_attentions:
                all_attn += (probs,)
        return hidden_states, all_hidden, all_attn


# ----------------------------------------------------------------------------------------------------------
# Pretrained model base
# ----------------------------------------------------------------------------------------------------------
class EntmaxViTPreTrainedModel(PreTrainedModel):
    config_class = EntmaxViTConfig
    config: EntmaxViTConfig
    base_model_prefix = "entmax_vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["EntmaxViTEmbeddings", "EntmaxViTLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False

    def get_correct_attn_implementation(self, requested_attention: Optional[str], is_init_check: bool = False) -> str:
        """The attention kernel for ``config.attention``: eager | compiled | sdpa (softmax only). None (transformers'
        automatic choice) picks the default kernel of the transform; a kernel that cannot run it raises."""
        return resolve_kernel(self.config.attention, requested_attention)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As transformers' from_pretrained, but a checkpoint that does not fit raises instead of silently
        re-initialising: shape mismatches (unless ``ignore_mismatched_sizes=True``) and missing backbone weights
        (task heads such as ``classifier`` may be missing: they are new) raise ValueError naming the keys."""
        want_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        # Load leniently, then judge the loading report ourselves so the error can name the keys.
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, ignore_mismatched_sizes=True,
            **kwargs,
        )
        mismatched = [k[0] if isinstance(k, (tuple, list)) else k for k in info.get("mismatched_keys", [])]
        missing = [k for k in info.get("missing_keys", []) if not k.split(".")[0] in ("classifier",)]
        if mismatched and not ignore_mismatched:
            raise ValueError(
                f"Checkpoint {pretrained_model_name_or_path} does not fit this {cls.__name__} config: "
                f"shape mismatch for {sorted(mismatched)}"
            )
        if missing:
            raise ValueError(
                f"Checkpoint {pretrained_model_name_or_path} lacks weights for {sorted(missing)}: is it an "
                "EntmaxViT checkpoint of this architecture? Convert foreign checkpoints with "
                "scripts/convert_checkpoint.py"
            )
        return (model, info) if want_info else model

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None) -> None:
        for module in self.modules():
            if isinstance(module, EntmaxViTEncoder):
                module.gradient_checkpointing = enable

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        self._set_gradient_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        self._set_gradient_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """DINO initialisation: truncated normal (std 0.02) for linear weights, [CLS], registers and position
        embeddings; zero biases; unit LayerNorms. The patch convolution keeps PyTorch's default (as DINO)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            _trunc_normal(module.weight, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, EntmaxViTEmbeddings):
            _trunc_normal(module.position_embeddings, std)
            _trunc_normal(module.cls_token, std)
            if module.register_tokens is not None:
                _trunc_normal(module.register_tokens, std)
        elif isinstance(module, EntmaxViTAttention) and module.alpha_raw is not None:
            module.alpha_raw.fill_(math.log(math.expm1(self.config.attention_alpha - 1.0)))


def _trunc_normal(tensor: torch.Tensor, std: float) -> None:
    # DINO/timm truncate at absolute +-2 (i.e. +-100 std for std 0.02), which is effectively a normal.
    nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0, b=2.0)


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Features:
    """Internal: final normed sequence plus requested extras."""

    sequence: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    attentions: tuple[torch.Tensor, ...]


class EntmaxViTModel(EntmaxViTPreTrainedModel):
    """The bare EntmaxViT encoder.

    ``last_hidden_state`` is the final-LayerNormed sequence ([CLS], registers, patches), ``pooler_output`` the
    normed [CLS] (DINO's feature), ``hidden_states`` the un-normed embedding output and each block output,
    ``attentions`` the attention probabilities of every layer (for every transform; softmax falls back from
    SDPA to the explicit product when they are requested).
    """

    def __init__(self, config: EntmaxViTConfig) -> None:
        super().__init__(config)
        self.embeddings = EntmaxViTEmbeddings(config)
        self.encoder = EntmaxViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @property
    def num_prefix_tokens(self) -> int:
        """[CLS] + registers."""
        return 1 + self.config.num_register_tokens

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[BaseModelOutputWithPooling, tuple]:
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        hidden = self.embeddings(pixel_values)
        last, all_hidden, all_attn = self.encoder(hidden, output_attentions, output_hidden_states)
        sequence = self.layernorm(last)
        pooled = sequence[:, 0]
        if not return_dict:
            out: tuple = (sequence, pooled)
            if output_hidden_states:
                out += (all_hidden,)
            if output_attentions:
                out += (all_attn,)
            return out
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence,
            pooler_output=pooled,
            hidden_states=all_hidden if output_hidden_states else None,
            attentions=all_attn if output_attentions else None,
        )

    def get_intermediate_layers(
        self,
        pixel_values: torch.Tensor,
        n: Union[int, Sequence[int]] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_register_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (int) or of the blocks with the given 0-based indices (sequence),
        as DINO/DINOv2 ``get_intermediate_layers``, for probes.

        Each entry is the patch tokens (B, N, D) or, with ``reshape``, a map (B, D, H/p, W/p); with
        ``return_class_token`` a tuple (patches, cls (B, D)); with ``return_register_tokens`` also (B, R, D).
        ``norm`` applies the final LayerNorm to each (as DINO's linear evaluation does).
        """
        depth = self.config.num_hidden_layers
        wanted = list(range(depth - n, depth)) if isinstance(n, int) else [i % depth for i in n]
        if isinstance(n, int) and not 1 <= n <= depth:
            raise ValueError(f"n must be in 1..{depth}, got {n}")
        hidden = self.embeddings(pixel_values)
        outputs = []
        for i, block in enumerate(self.encoder.layer[: max(wanted) + 1]):
            hidden, _ = block(hidden)
            if i in wanted:
                outputs.append(self.layernorm(hidden) if norm else hidden)
        prefix = self.num_prefix_tokens
        batch, _, height, width = pixel_values.shape
        p = self.config.patch_size
        results = []
        for out in outputs:
            patches = out[:, prefix:]
            if reshape:
                patches = patches.reshape(batch, height // p, width // p, -1).permute(0, 3, 1, 2).contiguous()
            item: tuple = (patches,)
            if return_class_token:
                item += (out[:, 0],)
            if return_register_tokens:
                item += (out[:, 1:prefix],)
            results.append(item if len(item) > 1 else patches)
        return tuple(results)


class EntmaxViTForImageClassification(EntmaxViTPreTrainedModel):
    """EntmaxViT with a linear head on [CLS] concatenated with the mean patch token (as DINOv2's classifier)."""

    def __init__(self, config: EntmaxViTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.entmax_vit = EntmaxViTModel(config)
        self.classifier = (
            nn.Linear(2 * config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[ImageClassifierOutput, tuple]:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.entmax_vit(
            pixel_values, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        sequence = outputs.last_hidden_state
        patches = sequence[:, self.entmax_vit.num_prefix_tokens:]
        logits = self.classifier(torch.cat([sequence[:, 0], patches.mean(dim=1)], dim=-1))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits, labels)
        if not return_dict:
            out = (logits, outputs.hidden_states, outputs.attentions)
            return ((loss,) + out) if loss is not None else out
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class EntmaxViTBackbone(EntmaxViTPreTrainedModel):
    """Patch feature maps (B, D, H/p, W/p) from chosen blocks, for dense heads.

    ``config.out_indices`` lists the blocks (1-based; 0 = the embedding output), as transformers backbones'
    stage indices; ``config.backbone_norm`` applies the final LayerNorm to each map.
    """

    def __init__(self, config: EntmaxViTConfig) -> None:
        super().__init__(config)
        self.embeddings = EntmaxViTEmbeddings(config)
        self.encoder = EntmaxViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, config.num_hidden_layers + 1)]
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.post_init()

    @property
    def out_indices(self) -> list[int]:
        return list(self.config.out_indices)

    @property
    def out_features(self) -> list[str]:
        return [self.stage_names[i] for i in self.out_indices]

    @property
    def channels(self) -> list[int]:
        return [self.num_features[i] for i in self.out_indices]

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[BackboneOutput, tuple]:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        output_attentions = bool(output_attentions)
        hidden = self.embeddings(pixel_values)
        _, all_hidden, all_attn = self.encoder(hidden, output_attentions, output_hidden_states=True)
        batch, _, height, width = pixel_values.shape
        p = self.config.patch_size
        prefix = 1 + self.config.num_register_tokens
        maps = []
        for i in self.out_indices:
            h = all_hidden[i]
            if self.config.backbone_norm:
                h = self.layernorm(h)
            maps.append(h[:, prefix:].reshape(batch, height // p, width // p, -1).permute(0, 3, 1, 2).contiguous())
        feature_maps = tuple(maps)
        hidden_out = all_hidden if output_hidden_states else None
        attn_out = all_attn if output_attentions else None
        if not return_dict:
            out: tuple = (feature_maps,)
            if output_hidden_states:
                out += (hidden_out,)
            if output_attentions:
                out += (attn_out,)
            return out
        return BackboneOutput(feature_maps=feature_maps, hidden_states=hidden_out, attentions=attn_out)


__all__ = [
    "EntmaxViTBackbone",
    "EntmaxViTForImageClassification",
    "EntmaxViTModel",
    "EntmaxViTPreTrainedModel",
]
