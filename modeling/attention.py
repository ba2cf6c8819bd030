"""Attention transforms (softmax, entmax-1.5, sparsemax, alpha-entmax) and the attention kernels.

Two separate choices, as in the house style:

* the *transform* (``config.attention``) maps attention scores to probabilities. Each transform is a pure
  function ``fn(scores, alpha=None) -> probs`` over the last dimension, registered by name in
  ``ATTENTION_TRANSFORMS``; the sparse ones solve their threshold with ``thresholds.py`` (one solver per
  transform, shared by every kernel).
* the *kernel* (``attn_implementation``) decides how the attention product is computed. ``ATTENTION_KERNELS``
  maps each kernel name to one function; ``KERNEL_TRANSFORMS`` says which transforms a kernel runs:
  ``eager`` (explicit (B, H, N, N) scores, any transform), ``compiled`` (eager with the solver through
  ``torch.compile``: the fastest at ViT-S/16 224 px on a 2-core CPU), ``sdpa`` (torch's scaled_dot_product_attention:
  softmax only), ``tiled`` (the sparse transforms in query blocks, ``tiled_attention.py``: no (B, H, N, N)
  tensor, O(B H N) saved for backward), ``triton`` (the same in fused Triton kernels for CUDA,
  ``triton_attention.py``) and ``auto``, the default: ``sdpa`` for softmax, and for a sparse transform
  ``triton`` on CUDA tensors and ``tiled`` elsewhere, decided per call from the tensors' device, so a model
  built on the CPU and moved to a GPU (or loaded with ``from_pretrained``, which does not save the kernel)
  runs the GPU kernel.

Both reach transformers through its ``AttentionInterface``: ``attention_function(transform, kernel)`` is a
function with transformers' eager signature, and importing this module registers one per pair under
``attention_interface_name(transform, kernel)``: the transform's own name for ``auto`` ("entmax15",
"sparsemax", "entmax_bisect"), else "<transform>_<kernel>" ("entmax15_eager", "entmax15_triton", ...).
transformers' own models (ViTModel, Dinov2Model, ...) accept these names as ``attn_implementation``, and so
does EntmaxViT (for its own transform), so one vocabulary serves both.

This file is copied to the Hub with the model: it imports only the standard library, torch and transformers
(triton lazily, in ``triton_kernel``, for CUDA tensors).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from .thresholds import (
    SPARSE_TRANSFORMS,
    alpha_gradient,
    alpha_per_row,
    jacobian_product,
    jacobian_weights,
    probabilities,
    tracing,
)
from .tiled_attention import tiled_attention


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    """Half precision is computed in float32 (thresholds need the mantissa); float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ----------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------
def _dense_backward(probs: torch.Tensor, alpha_rows: Optional[torch.Tensor], grad: torch.Tensor, transform: str,
                    scalar_alpha: Optional[float], need_alpha: bool):
    alpha = scalar_alpha if scalar_alpha is not None else alpha_rows
    g = jacobian_weights(probs, transform, alpha)
    grad_alpha = alpha_gradient(probs, g, grad, alpha_rows - 1) if need_alpha else None
    return jacobian_product(g, grad), grad_alpha


_COMPILED: dict[str, Callable] = {}


def _compiled(fn: Callable, compiled: bool) -> Callable:
    """``fn``, or its torch.compile'd twin (static shapes, one per function and process) for the ``compiled``
    kernel. Inside an outer torch.compile / torch.export the plain function is traced (the outer compiler
    fuses it anyway)."""
    if not compiled or tracing():
        return fn
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn.__name__]


class SparseTransformFunction(torch.autograd.Function):
    """A sparse transform over the last dimension of ``scores`` (float32 or wider); saves only its output (and
    alpha per row). ``alpha_rows`` (..., 1) for entmax_bisect, else an empty placeholder. ``compiled``: the
    solver and the backward through torch.compile (the ``compiled`` kernel; the same numbers)."""

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


def entmax15(scores: torch.Tensor, alpha: Optional[torch.Tensor] = None, *, compiled: bool = False) -> torch.Tensor:
    """Exact 1.5-entmax over the last dimension (computed in float32 or wider, returned in the input dtype)."""
    x = _as_float32(scores)
    return SparseTransformFunction.apply(x, x.new_empty(0), "entmax15", None, compiled).to(scores.dtype)


def sparsemax(scores: torch.Tensor, alpha: Optional[torch.Tensor] = None, *, compiled: bool = False) -> torch.Tensor:
    """Exact sparsemax over the last dimension (float32 under half precision)."""
    x = _as_float32(scores)
    return SparseTransformFunction.apply(x, x.new_empty(0), "sparsemax", None, compiled).to(scores.dtype)


def entmax_bisect(scores: torch.Tensor, alpha: Union[None, float, torch.Tensor] = None, *,
                  compiled: bool = False) -> torch.Tensor:
    """alpha-entmax over the last dimension. ``alpha``: None (1.5), a float, or a tensor broadcastable to
    scores.shape[:-1] + (1,), e.g. (H, 1, 1) per head against (B, H, N, N) scores; gradients flow to it."""
    x = _as_float32(scores)
    alpha_rows, scalar = alpha_per_row(alpha, x.shape[:-1], x.device, x.dtype)
    return SparseTransformFunction.apply(x, alpha_rows, "entmax_bisect", scalar, compiled).to(scores.dtype)


def softmax(scores: torch.Tensor, alpha: Optional[torch.Tensor] = None, *, compiled: bool = False) -> torch.Tensor:
    """Softmax over the last dimension, computed in float32 under half precision."""
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


ATTENTION_TRANSFORMS: dict[str, Callable[..., torch.Tensor]] = {
    "softmax": softmax,
    "entmax15": entmax15,
    "sparsemax": sparsemax,
    "entmax_bisect": entmax_bisect,
}


def get_attention_transform(name: str) -> Callable[..., torch.Tensor]:
    """Look up a transform by name; unknown names raise ValueError listing the choices."""
    try:
        return ATTENTION_TRANSFORMS[name]
    except KeyError:
        raise ValueError(
            f"Unknown attention transform {name!r}; choose one of {sorted(ATTENTION_TRANSFORMS)}"
        ) from None


# ----------------------------------------------------------------------------------------------------------
# Kernels: kernel name -> one function. Every kernel has the signature
#   kernel(query, key, value, attention_mask, *, transform, alpha, scaling, dropout, need_weights)
#     -> (out (B, H, N, d), probs (B, H, N, N) or None)
# with query/key/value (B, H, N, d), attention_mask None or broadcastable to (B, H, N, N) (bool: True = keep,
# float: added to the scores) and ``dropout`` the probability to apply (0 outside training).
# ----------------------------------------------------------------------------------------------------------
def _scores(query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor], scaling: float) -> torch.Tensor:
    # Scale the (N, d) query rather than the (N, N) scores: same math, a third of the work at d = 64.
    scores = torch.matmul(query * scaling, key.transpose(-2, -1))  # (B, H, N, N)
    if attention_mask is None:
        return scores
    if attention_mask.ndim != 4:  # a (B, N) padding mask would broadcast against the wrong axes
        raise ValueError(f"attention_mask must be 4-D, broadcastable to (B, H, N, N), got shape "
                         f"{tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:
        return scores.masked_fill(~attention_mask, float("-inf"))
    return scores + attention_mask


def eager_kernel(query, key, value, attention_mask=None, *, transform: str, alpha=None, scaling: float,
                 dropout: float = 0.0, need_weights: bool = False, compiled: bool = False):
    """Explicit scores -> transform -> dropout -> product. Any transform."""
    scores = _scores(query, key, attention_mask, scaling)
    probs = get_attention_transform(transform)(scores, alpha, compiled=compiled)
    dropped = F.dropout(probs, p=dropout, training=True) if dropout > 0 else probs
    return torch.matmul(dropped, value), (probs if need_weights else None)


def compiled_kernel(query, key, value, attention_mask=None, **kwargs):
    """The eager kernel with the solver and the backward through torch.compile (fused loops, same numbers; it
    compiles once per shape). It keeps the (B, H, N, N) probabilities for backward like eager, but on a 2-core
    CPU it runs ViT-S/16 at 224 px faster than tiled (docs/performance.md)."""
    return eager_kernel(query, key, value, attention_mask, compiled=True, **kwargs)


def _needs_eager(attention_mask, dropout: float, need_weights: bool) -> bool:
    """The fused kernels never form the probabilities: requested weights, a mask or attention dropout go
    through the eager kernel (the same solver, hence the same numbers)."""
    return need_weights or attention_mask is not None or dropout > 0


def tiled_kernel(query, key, value, attention_mask=None, *, transform: str, alpha=None, scaling: float,
                 dropout: float = 0.0, need_weights: bool = False):
    """Exact sparse attention in query blocks (``tiled_attention.py``): the (B, H, N, N) scores never exist and
    backward keeps O(B H N) state."""
    if _needs_eager(attention_mask, dropout, need_weights):
        return eager_kernel(query, key, value, attention_mask, transform=transform, alpha=alpha, scaling=scaling,
                            dropout=dropout, need_weights=need_weights)
    return tiled_attention(query, key, value, transform=transform, scaling=scaling, alpha=alpha), None


def triton_available(device: torch.device) -> bool:
    """Whether the triton kernel can run on ``device``: CUDA, or any device under TRITON_INTERPRET=1 (tests)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_kernel(query, key, value, attention_mask=None, *, transform: str, alpha=None, scaling: float,
                  dropout: float = 0.0, need_weights: bool = False):
    """Exact sparse attention in fused Triton kernels (``triton_attention.py``): CUDA tensors, self-attention
    (one N for queries and keys), head dims up to 128. triton is imported here, on first use."""
    if _needs_eager(attention_mask, dropout, need_weights):
        return eager_kernel(query, key, value, attention_mask, transform=transform, alpha=alpha, scaling=scaling,
                            dropout=dropout, need_weights=need_weights)
    if not triton_available(query.device):
        raise ValueError(f"attn_implementation='triton' needs CUDA tensors, got {query.device.type} ones; use "
                         f"'tiled' (or the default, which picks tiled there)")
    from .triton_attention import triton_attention  # lazily: CPU-only and macOS users never import triton

    return triton_attention(query, key, value, transform=transform, scaling=scaling, alpha=alpha), None


def sdpa_kernel(query, key, value, attention_mask=None, *, transform: str, alpha=None, scaling: float,
                dropout: float = 0.0, need_weights: bool = False):
    """torch's scaled_dot_product_attention (softmax only). SDPA cannot return the probabilities: when they are
    requested the eager kernel computes them (the same math)."""
    if transform != "softmax":
        raise ValueError(_unsupported_message(transform, "sdpa"))
    if need_weights:
        return eager_kernel(query, key, value, attention_mask, transform=transform, scaling=scaling,
                            dropout=dropout, need_weights=True)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out, None


def default_kernel(transform: str, device: Union[str, torch.device, None] = None) -> str:
    """The kernel that ``auto`` runs for ``transform`` on ``device``: sdpa for softmax; for a sparse transform
    triton on CUDA and tiled elsewhere (CPU, MPS, ...)."""
    get_attention_transform(transform)
    if transform == "softmax":
        return "sdpa"
    return "triton" if torch.device(device or "cpu").type == "cuda" else "tiled"


def auto_kernel(query, key, value, attention_mask=None, *, transform: str, **kwargs):
    """The device-aware default: ``default_kernel(transform, query.device)``, decided per call."""
    kernel = default_kernel(transform, query.device)
    if kernel == "triton" and (query.shape != key.shape or query.shape[-1] > 128):
        kernel = "tiled"  # cross-attention or head dims the fused kernel does not cover
    return ATTENTION_KERNELS[kernel](query, key, value, attention_mask, transform=transform, **kwargs)


# The one place where a kernel name maps to its function. A new kernel is one function and one entry here
# (plus an entry in KERNEL_TRANSFORMS if it runs only some transforms); AttentionInterface names derive from it.
ATTENTION_KERNELS: dict[str, Callable[..., tuple[torch.Tensor, Optional[torch.Tensor]]]] = {
    "auto": auto_kernel,
    "eager": eager_kernel,
    "compiled": compiled_kernel,
    "sdpa": sdpa_kernel,
    "tiled": tiled_kernel,
    "triton": triton_kernel,
}
# Kernels that run only some transforms (absent: every transform).
KERNEL_TRANSFORMS: dict[str, tuple[str, ...]] = {
    "sdpa": ("softmax",),
    "tiled": SPARSE_TRANSFORMS,
    "triton": SPARSE_TRANSFORMS,
}
# Kernels that always return the probabilities; the others compute them only when asked (output_attentions).
WEIGHTS_ALWAYS = ("eager", "compiled")


def kernels_for(transform: str) -> list[str]:
    """Kernel names that run ``transform``."""
    get_attention_transform(transform)
    return [k for k in ATTENTION_KERNELS if transform in KERNEL_TRANSFORMS.get(k, (transform,))]


def _unsupported_message(transform: str, kernel: str) -> str:
    return (
        f"attn_implementation={kernel!r} does not run attention={transform!r}"
        + (" (torch's scaled_dot_product_attention computes softmax only)" if kernel == "sdpa" else "")
        + f"; choose one of {kernels_for(transform)} for it"
    )


def resolve_kernel(transform: str, requested: Optional[str] = None) -> str:
    """The kernel name that runs ``transform``: when ``requested`` is None ``sdpa`` for softmax and ``auto`` (the
    device-aware default) for a sparse transform, else ``requested``, checked.

    ``requested`` is a kernel name ("tiled") or an AttentionInterface name of this transform ("entmax15" =
    auto, "entmax15_triton" = triton). Raises ValueError for an unknown kernel, one that does not run this
    transform (e.g. "sdpa" for a sparse transform), or the name of another transform ("sparsemax" for an
    entmax15 model)."""
    if requested is None:
        return "sdpa" if transform == "softmax" else "auto"
    for kernel in kernels_for(transform):
        if requested == attention_interface_name(transform, kernel):
            return kernel
    if requested in ATTENTION_KERNELS:
        if requested not in kernels_for(transform):
            raise ValueError(_unsupported_message(transform, requested))
        return requested
    other = requested.split("_")[0] if requested.split("_")[0] in ATTENTION_TRANSFORMS else requested
    if other in ATTENTION_TRANSFORMS or requested in ATTENTION_INTERFACE_NAMES:
        raise ValueError(
            f"attn_implementation={requested!r} names another attention transform than this model's "
            f"attention={transform!r}; change config.attention to switch transforms, or choose a kernel: "
            f"{kernels_for(transform)}"
        )
    raise ValueError(  # transformers' wording, then ours
        f'Specified `attn_implementation="{requested}"` is not supported: it names no attention kernel; choose '
        f"one of {kernels_for(transform)} for attention={transform!r} (or the AttentionInterface name "
        f"{attention_interface_name(transform, 'auto')!r}, its default)"
    )


# ----------------------------------------------------------------------------------------------------------
# transformers' AttentionInterface
# ----------------------------------------------------------------------------------------------------------
def attention_interface_name(transform: str, kernel: str) -> str:
    """The AttentionInterface name of a (transform, kernel) pair: the transform itself for the device-aware
    default ``auto`` ("entmax15"), else "<transform>_<kernel>" ("entmax15_triton", "softmax_sdpa")."""
    return transform if kernel == "auto" else f"{transform}_{kernel}"


def _module_alpha(module: nn.Module, transform: str) -> Union[None, float, torch.Tensor]:
    """alpha of entmax_bisect for this attention module: EntmaxViT's (possibly learnt, per head) ``alpha()``,
    else ``config.attention_alpha`` of a transformers model (default 1.5; a float, or one value per head as a
    list or tensor). None for the other transforms."""
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
    """An attention function with transformers' eager signature running ``transform`` with ``kernel``:

    ``fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs)`` with query/key/value
    (B, H, N, d) -> (attn_output (B, N, H, d), attn_weights (B, H, N, N) or None). ``attn_weights`` are the
    exact probabilities, computed when ``output_attentions`` asks (always by the eager kernel).
    """
    kernel = resolve_kernel(transform, kernel)
    run = ATTENTION_KERNELS[kernel]

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        scaling: Optional[float] = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
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
    """Register every (transform, kernel) pair with transformers' AttentionInterface; returns the names.

    Called on import, so ``ViTModel`` / ``Dinov2Model`` / ... accept ``attn_implementation="entmax15"`` (and
    "sparsemax", "entmax_bisect" with alpha from ``config.attention_alpha``, and "<name>_<kernel>")."""
    names = []
    for transform in ATTENTION_TRANSFORMS:
        for kernel in kernels_for(transform):
            name = attention_interface_name(transform, kernel)
            AttentionInterface.register(name, attention_function(transform, kernel))
            names.append(name)
    return names


ATTENTION_INTERFACE_NAMES: list[str] = register_attention_functions()


def support_size(probs: torch.Tensor) -> torch.Tensor:
    """Number of non-zero attention weights per row, (B, H, N)."""
    return (probs > 0).sum(dim=-1)


__all__ = [
    "ATTENTION_INTERFACE_NAMES",
    "ATTENTION_KERNELS",
    "ATTENTION_TRANSFORMS",
    "KERNEL_TRANSFORMS",
    "attention_function",
    "attention_interface_name",
    "default_kernel",
    "entmax15",
    "entmax_bisect",
    "get_attention_transform",
    "kernels_for",
    "register_attention_functions",
    "resolve_kernel",
    "softmax",
    "sparsemax",
    "support_size",
]
