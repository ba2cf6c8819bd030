"""Attention transforms (``config.attention``, sparse ones solved by ``thresholds.py``) and kernels
(``attn_implementation``; EntmaxViT's docs/performance.md, "Which kernel to use"). Importing it registers every
pair with transformers' ``AttentionInterface``, so ViTModel, Dinov2Model and EntmaxViT share one vocabulary.
Hub code."""

import os
from functools import lru_cache, partial
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from .thresholds import (SPARSE_TRANSFORMS, alpha_gradient, alpha_per_row, jacobian_product, jacobian_weights,
                         probabilities, tracing)
from .tiled_attention import tiled_attention


def _dense_backward(probs: torch.Tensor, alpha_rows: Optional[torch.Tensor], grad: torch.Tensor, transform: str,
                    scalar_alpha: Optional[float], need_alpha: bool):
    alpha = scalar_alpha if scalar_alpha is not None else alpha_rows
    g = jacobian_weights(probs, transform, alpha)
    grad_alpha = alpha_gradient(probs, g, grad, alpha_rows - 1) if need_alpha else None
    return jacobian_product(g, grad), grad_alpha


@lru_cache(maxsize=None)  # one compiled twin per function and process
def _compiled_twin(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def _compiled(fn: Callable, compiled: bool) -> Callable:
    # inside an outer torch.compile / torch.export the plain function is traced (the outer compiler fuses it)
    return _compiled_twin(fn) if compiled and not tracing() else fn


class SparseTransformFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, scores: torch.Tensor, alpha_rows: torch.Tensor, transform: str,
                scalar_alpha: Optional[float] = None, compiled: bool = False) -> torch.Tensor:
        probs = _compiled(probabilities, compiled)(scores, transform, alpha_rows, scalar_alpha)
        ctx.transform, ctx.scalar_alpha, ctx.compiled = transform, scalar_alpha, compiled
        ctx.save_for_backward(probs, *([alpha_rows] if transform == "entmax_bisect" else []))
        return probs

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        probs, *alpha_rows = ctx.saved_tensors
        grad_scores, grad_alpha = _compiled(_dense_backward, ctx.compiled)(
            probs, alpha_rows[0] if alpha_rows else None, grad_output.contiguous(), ctx.transform,
            ctx.scalar_alpha, ctx.needs_input_grad[1])
        return grad_scores, grad_alpha, None, None, None


def _sparse_transform(transform: str, doc: str) -> Callable[..., torch.Tensor]:
    def fn(scores: torch.Tensor, alpha: Union[None, float, torch.Tensor] = None, *,
           compiled: bool = False) -> torch.Tensor:
        # half precision in float32: thresholds need the mantissa
        x = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
        alpha_rows, scalar = (alpha_per_row(alpha, x.shape[:-1], x.device, x.dtype) if transform == "entmax_bisect"
                              else (x.new_empty(0), None))
        return SparseTransformFunction.apply(x, alpha_rows, transform, scalar, compiled).to(scores.dtype)

    fn.__name__, fn.__qualname__, fn.__doc__ = transform, transform, doc
    return fn


entmax15 = _sparse_transform("entmax15", "Exact 1.5-entmax over the last dimension.")
sparsemax = _sparse_transform("sparsemax", "Exact sparsemax over the last dimension.")
entmax_bisect = _sparse_transform("entmax_bisect", """alpha-entmax over the last dimension. ``alpha``: None (1.5),
    a float, or a tensor broadcastable to scores.shape[:-1] + (1,), e.g. (H, 1, 1) per head; gradients flow to it.""")


def softmax(scores: torch.Tensor, alpha: Optional[torch.Tensor] = None, *, compiled: bool = False) -> torch.Tensor:
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


ATTENTION_TRANSFORMS: dict[str, Callable[..., torch.Tensor]] = {
    "softmax": softmax, "entmax15": entmax15, "sparsemax": sparsemax, "entmax_bisect": entmax_bisect}


def get_attention_transform(name: str) -> Callable[..., torch.Tensor]:
    if name not in ATTENTION_TRANSFORMS:
        raise ValueError(f"Unknown attention transform {name!r}; choose one of {sorted(ATTENTION_TRANSFORMS)}")
    return ATTENTION_TRANSFORMS[name]


# Kernels: kernel(query, key, value, attention_mask, *, transform, alpha, scaling, dropout, need_weights)
#   -> (out (B, H, N, d), probs (B, H, N, N) or None); mask None or broadcastable to (B, H, N, N) (bool: True =
#   keep; float: added to the scores), dropout 0 outside training.
def eager_kernel(query, key, value, attention_mask=None, *, transform: str, alpha=None, scaling: float,
                 dropout: float = 0.0, need_weights: bool = False, compiled: bool = False):
    """Explicit scores -> transform -> dropout -> product. Any transform."""
    # Scale the (N, d) query, not the (N, N) scores: a third of the work at d = 64.
    scores = torch.matmul(query * scaling, key.transpose(-2, -1))  # (B, H, N, N)
    if attention_mask is not None:
        if attention_mask.ndim != 4:  # a (B, N) padding mask would broadcast against the wrong axes
            raise ValueError(f"attention_mask must be 4-D, broadcastable to (B, H, N, N), got shape "
                             f"{tuple(attention_mask.shape)}")
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = get_attention_transform(transform)(scores, alpha, compiled=compiled)
    dropped = F.dropout(probs, p=dropout, training=True) if dropout > 0 else probs
    return torch.matmul(dropped, value), (probs if need_weights else None)


# Keeps (B, H, N, N) for backward, yet runs the DINO multi-crop step faster than tiled on a 2-core CPU.
compiled_kernel = partial(eager_kernel, compiled=True)


def _fused_kernel(fused: Callable[..., torch.Tensor]) -> Callable:
    """A kernel around ``fused``, which never forms the probabilities: weights, a mask or dropout go eager."""

    def kernel(query, key, value, attention_mask=None, *, transform: str, alpha=None, scaling: float,
               dropout: float = 0.0, need_weights: bool = False):
        if need_weights or attention_mask is not None or dropout > 0:
            return eager_kernel(query, key, value, attention_mask, transform=transform, alpha=alpha,
                                scaling=scaling, dropout=dropout, need_weights=need_weights)
        return fused(query, key, value, transform=transform, scaling=scaling, alpha=alpha), None

    kernel.__doc__ = fused.__doc__
    return kernel


def _triton_attention(query, key, value, **kwargs) -> torch.Tensor:
    """``triton_attention.triton_attention``, imported on first use (CUDA tensors, or any under TRITON_INTERPRET=1)."""
    if query.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"attn_implementation='triton' needs CUDA tensors, got {query.device.type} ones; use "
                         f"'tiled' (or the default, which picks tiled there)")
    from .triton_attention import triton_attention  # lazily: CPU-only and macOS users never import triton

    return triton_attention(query, key, value, **kwargs)


tiled_kernel = _fused_kernel(tiled_attention)
triton_kernel = _fused_kernel(_triton_attention)


def sdpa_kernel(query, key, value, attention_mask=None, *, transform: str, alpha=None, scaling: float,
                dropout: float = 0.0, need_weights: bool = False):
    if transform != "softmax":
        raise ValueError(_unsupported_message(transform, "sdpa"))
    if need_weights:
        return eager_kernel(query, key, value, attention_mask, transform=transform, scaling=scaling,
                            dropout=dropout, need_weights=True)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out, None


def default_kernel(transform: str, device: Union[str, torch.device, None] = None) -> str:
    get_attention_transform(transform)
    if transform == "softmax":
        return "sdpa"
    return "triton" if torch.device(device or "cpu").type == "cuda" else "tiled"


def auto_kernel(query, key, value, attention_mask=None, *, transform: str, **kwargs):
    kernel = default_kernel(transform, query.device)
    if kernel == "triton" and (query.shape != key.shape or query.shape[-1] > 128):
        kernel = "tiled"  # cross-attention or head dims the fused kernel does not cover
    return ATTENTION_KERNELS[kernel](query, key, value, attention_mask, transform=transform, **kwargs)


# The one place where a kernel name maps to its function; AttentionInterface names derive from it.
ATTENTION_KERNELS: dict[str, Callable[..., tuple[torch.Tensor, Optional[torch.Tensor]]]] = {
    "auto": auto_kernel, "eager": eager_kernel, "compiled": compiled_kernel, "sdpa": sdpa_kernel,
    "tiled": tiled_kernel, "triton": triton_kernel}
# Kernels that run only some transforms (absent: every transform).
KERNEL_TRANSFORMS = {"sdpa": ("softmax",), "tiled": SPARSE_TRANSFORMS, "triton": SPARSE_TRANSFORMS}
# Kernels that always return the probabilities; the others compute them only when asked (output_attentions).
WEIGHTS_ALWAYS = ("eager", "compiled")


def kernels_for(transform: str) -> list[str]:
    get_attention_transform(transform)
    return [k for k in ATTENTION_KERNELS if transform in KERNEL_TRANSFORMS.get(k, (transform,))]


def _unsupported_message(transform: str, kernel: str) -> str:
    sdpa = " (torch's scaled_dot_product_attention computes softmax only)" if kernel == "sdpa" else ""
    return (f"attn_implementation={kernel!r} does not run attention={transform!r}{sdpa}; choose one of "
            f"{kernels_for(transform)} for it")


def resolve_kernel(transform: str, requested: Optional[str] = None) -> str:
    """``requested`` (a kernel, or an AttentionInterface name of this transform: "entmax15" = auto,
    "entmax15_triton"), checked; None gives sdpa for softmax, else auto."""
    if requested is None:
        return "sdpa" if transform == "softmax" else "auto"
    for kernel in kernels_for(transform):
        if requested == attention_interface_name(transform, kernel):
            return kernel
    if requested in ATTENTION_KERNELS:
        if requested not in kernels_for(transform):
            raise ValueError(_unsupported_message(transform, requested))
        return requested
    if requested.split("_")[0] in ATTENTION_TRANSFORMS or requested in ATTENTION_INTERFACE_NAMES:
        raise ValueError(f"attn_implementation={requested!r} names another attention transform than this model's "
                         f"attention={transform!r}; change config.attention to switch transforms, or choose a "
                         f"kernel: {kernels_for(transform)}")
    raise ValueError(  # transformers' wording, then ours
        f'Specified `attn_implementation="{requested}"` is not supported: it names no attention kernel; choose '
        f"one of {kernels_for(transform)} for attention={transform!r} (or the AttentionInterface name "
        f"{attention_interface_name(transform, 'auto')!r}, its default)")


def attention_interface_name(transform: str, kernel: str) -> str:
    return transform if kernel == "auto" else f"{transform}_{kernel}"


def _module_alpha(module: nn.Module, transform: str) -> Union[None, float, torch.Tensor]:
    """entmax_bisect's alpha: EntmaxViT's ``alpha()``, else a transformers model's ``config.attention_alpha``."""
    if transform != "entmax_bisect":
        return None
    if callable(getattr(module, "alpha", None)):
        return module.alpha()
    alpha = getattr(getattr(module, "config", None), "attention_alpha", 1.5)
    if isinstance(alpha, (list, tuple)) or (torch.is_tensor(alpha) and alpha.numel() > 1):  # one per head
        return torch.as_tensor(alpha, dtype=torch.float32).view(-1, 1, 1)  # (H, 1, 1) against (B, H, N, N)
    return float(alpha)


@lru_cache(maxsize=None)  # one function object per pair, so AttentionInterface lookups return the same one
def attention_function(transform: str, kernel: str) -> Callable[..., tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``transform`` with ``kernel`` in transformers' eager signature: (B, H, N, d) in, (B, N, H, d) out."""
    kernel = resolve_kernel(transform, kernel)
    run = ATTENTION_KERNELS[kernel]

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        need_weights = kernel in WEIGHTS_ALWAYS or bool(kwargs.get("output_attentions", False))
        out, probs = run(query, key, value, attention_mask, transform=transform,
                         alpha=_module_alpha(module, transform), scaling=scaling, dropout=dropout,
                         need_weights=need_weights)
        return out.transpose(1, 2).contiguous(), probs  # (B, N, H, d)

    attention.__name__ = attention.__qualname__ = f"{attention_interface_name(transform, kernel)}_attention_forward"
    attention.__doc__ = f"attention={transform!r} with the {kernel!r} kernel, in transformers' eager signature."
    return attention


def register_attention_functions() -> list[str]:
    names = []
    for transform in ATTENTION_TRANSFORMS:
        for kernel in kernels_for(transform):
            name = attention_interface_name(transform, kernel)
            AttentionInterface.register(name, attention_function(transform, kernel))
            names.append(name)
    return names


ATTENTION_INTERFACE_NAMES: list[str] = register_attention_functions()


def support_size(probs: torch.Tensor) -> torch.Tensor:
    return (probs > 0).sum(dim=-1)

