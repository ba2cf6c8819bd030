"""The fused Triton kernel (modeling/triton_attention.py) on CPU tensors through triton's interpreter
(TRITON_INTERPRET=1, set in conftest.py): probabilities equal the `entmax` package, gradients equal the tiled
kernel's, half precision is solved in float32, a model with attn_implementation="triton" equals eager, and the
device-aware default picks it for CUDA tensors. The interpreter runs the kernels' exact arithmetic, slowly.
"""

from __future__ import annotations

import os
import subprocess
import sys

import entmax
import pytest
import torch

from entmax_vit.modeling import attention as A
from entmax_vit.modeling import tiled_attention as T

PACKAGE = {"entmax15": entmax.entmax15, "sparsemax": entmax.sparsemax,
           "entmax_bisect": lambda s, dim: entmax.entmax_bisect(s.double(), 1.5, dim=dim, n_iter=100).float()}
SPARSE = ("entmax15", "sparsemax", "entmax_bisect")
# numpy's warnings from the interpreter (log2(0) = -inf off the support, masked away by tl.where)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _triton(*args, **kwargs):
    from entmax_vit.modeling.triton_attention import triton_attention

    return triton_attention(*args, **kwargs)


def _kernel_probabilities(q: torch.Tensor, k: torch.Tensor, transform: str, **kwargs) -> torch.Tensor:
    """The kernel's P read through its output: with V = columns j..j+d of the identity, P V = P[:, j:j+d]."""
    batch, heads, n, d = q.shape
    eye = torch.eye(n, dtype=q.dtype)
    cols = []
    for j in range(0, n, d):
        v = torch.zeros(batch, heads, n, d, dtype=q.dtype)
        v[..., : min(d, n - j)] = eye[:, j : j + d]
        cols.append(_triton(q, k, v, transform=transform, scaling=1.0, **kwargs)[..., : min(d, n - j)])
    return torch.cat(cols, dim=-1)  # (B, H, N, N)


def _dyadic(*shape: int) -> torch.Tensor:
    """Gaussian-like entries on a 1/8 grid: every score q.k is exact in float32 whatever the summation order,
    so kernel and reference see the same scores and differ only by their transforms."""
    return torch.round(torch.randn(*shape) * 8) / 8


def _adversarial_keys(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows whose scores q k^T are tied, near-uniform, very peaked or ordinary: (1, 4, n, d) each."""
    k = _dyadic(1, 1, n, d).expand(1, 4, n, d).clone()
    q = _dyadic(1, 4, n, d) / 4
    q[0, 0] = 0  # every score 0: all tied, uniform
    q[0, 1] *= 2.0**-12  # near-uniform
    q[0, 2] *= 32  # very peaked: support 1-2
    k[0, 3, n // 2 :] = k[0, 3, : n - n // 2].clone()  # duplicated keys: tied scores at every level
    return q, k


@pytest.mark.parametrize("transform", SPARSE)
@pytest.mark.parametrize("n,d", [(1, 32), (37, 32), (37, 64), (197, 64), pytest.param(300, 32, marks=pytest.mark.slow),
                                 pytest.param(197, 32, marks=pytest.mark.slow), pytest.param(300, 64, marks=pytest.mark.slow)])
def test_probabilities_match_entmax_package(transform: str, n: int, d: int) -> None:
    q, k = _adversarial_keys(n, d)
    probs = _kernel_probabilities(q, k, transform)
    ref = PACKAGE[transform](q @ k.transpose(-1, -2), dim=-1)
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(probs[0, 0], torch.full((n, n), 1.0 / n), atol=1e-6, rtol=0)  # tied: uniform
    if n > 1:
        assert (probs[0, 2] == 0).any() and (probs >= 0).all()  # exact zeros, never negative


@pytest.mark.parametrize("transform", ["entmax15", "sparsemax"])
def test_several_key_tiles_and_the_exact_path(transform: str) -> None:
    """Keys in 16-wide tiles (the recompute path of long rows). With at most 2 passes some rows are left
    uncertified and come out wrong: the default runs them on to a certified, exact answer."""
    n, d = 100, 32
    q, k = _dyadic(1, 2, n, d) / 8, _dyadic(1, 2, n, d)
    ref = PACKAGE[transform](q @ k.transpose(-1, -2), dim=-1)
    blocks = dict(BLOCK_M=32, BLOCK_N=16)
    cut_short = _kernel_probabilities(q, k, transform, blocks=dict(blocks, MAX_PASSES=2))
    assert (cut_short - ref).abs().amax() > 1e-4, "test needs rows that two passes cannot certify"
    torch.testing.assert_close(_kernel_probabilities(q, k, transform, blocks=blocks), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [1.25, 2.0, 3.0])
def test_entmax_bisect_alpha_matches_package(alpha: float) -> None:
    q, k = _dyadic(1, 2, 37, 32) / 8, _dyadic(1, 2, 37, 32)
    probs = _kernel_probabilities(q, k, "entmax_bisect", alpha=alpha)
    scores = q @ k.transpose(-1, -2)
    truth = entmax.entmax_bisect(scores.double(), alpha, dim=-1, n_iter=200)
    if alpha <= 2:
        torch.testing.assert_close(probs.double(), truth, atol=1e-6, rtol=0)
    # alpha > 2: p = d^(1/(alpha-1)) is steep at the support's edge; at least as close to the float64 answer as
    # the package's own float32 bisection (as tests/test_attention.py holds the dense transform)
    theirs = entmax.entmax_bisect(scores, alpha, dim=-1)
    err_ours, err_theirs = ((x.double() - truth).abs().max().item() for x in (probs, theirs))
    assert err_ours <= err_theirs + 1e-6, (err_ours, err_theirs)


def _grads(fn, q, k, v, alpha, grad):
    inputs = (q, k, v) + ((alpha,) if alpha is not None else ())
    out = fn(q, k, v, alpha)
    return (out, *torch.autograd.grad(out, inputs, grad))


@pytest.mark.parametrize("transform", SPARSE)
@pytest.mark.parametrize("n,blocks", [(37, None), (70, dict(BLOCK_M=16, BLOCK_N=32))])
def test_gradients_match_tiled(transform: str, n: int, blocks) -> None:
    d = 32
    q, k, v = (torch.randn(2, 3, n, d, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 3, n, d)
    alpha = None
    if transform == "entmax_bisect":  # a learnable per-head alpha, one above 2 (the bisection branch)
        alpha = torch.tensor([1.3, 1.7, 2.5]).view(3, 1, 1).requires_grad_(True)
    ours = _grads(lambda *x: _triton(*x[:3], transform=transform, scaling=0.3, alpha=x[3], blocks=blocks),
                  q, k, v, alpha, grad)
    tiled = _grads(lambda *x: T.tiled_attention(*x[:3], transform=transform, scaling=0.3, alpha=x[3]),
                   q, k, v, alpha, grad)
    if transform != "entmax_bisect":
        for name, a, b in zip(["out", "dq", "dk", "dv"], ours, tiled):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
        return
    # alpha > 2: g = p^(2 - alpha) grows without bound at the support's edge, so float32 gradients carry rounding
    # of ~1e-5 of their scale in any kernel: both kernels are held to the float64 answer, triton as close as tiled.
    double = [x.detach().double().requires_grad_(True) for x in (q, k, v, alpha)]
    truth = _grads(lambda *x: T.tiled_attention(*x[:3], transform=transform, scaling=0.3, alpha=x[3]),
                   *double, grad.double())
    for name, a, b, c in zip(["out", "dq", "dk", "dv", "dalpha"], ours, tiled, truth):
        err_ours, err_tiled = (a.double() - c).abs().max().item(), (b.double() - c).abs().max().item()
        assert err_ours <= 2 * err_tiled + 1e-5 * c.abs().max().item(), (name, err_ours, err_tiled)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_solved_in_float32(dtype: torch.dtype) -> None:
    """Half inputs: matmuls take the input dtype, the threshold is solved in float32 (rows sum to 1, zeros exact)
    and the output comes back in the input dtype, close to the float32 answer on the same (rounded) inputs."""
    q, k, v = (torch.randn(1, 2, 37, 32).to(dtype) for _ in range(3))
    out = _triton(q, k, v, transform="entmax15", scaling=0.4)
    assert out.dtype == dtype
    exact = T.tiled_attention(q.float(), k.float(), v.float(), transform="entmax15", scaling=0.4)
    torch.testing.assert_close(out.float(), exact, atol=3e-2, rtol=2e-2)
    probs = _kernel_probabilities(q, k, "entmax15")
    ref = entmax.entmax15(q.float() @ k.float().transpose(-1, -2), dim=-1)
    torch.testing.assert_close(probs.float(), ref, atol=1e-2, rtol=1e-2)  # P rounded once to the input dtype
    assert ((probs == 0) == (ref == 0)).float().mean() > 0.99  # the same support, up to rounding at the edge
    (q2, k2, v2) = (x.clone().requires_grad_(True) for x in (q, k, v))
    _triton(q2, k2, v2, transform="entmax15", scaling=0.4).float().square().sum().backward()
    assert q2.grad.dtype == dtype and torch.isfinite(q2.grad.float()).all()


def test_model_with_triton_kernel_equals_eager(tiny_config_kwargs) -> None:
    """attn_implementation="triton" (and its AttentionInterface name) gives eager's hidden states and every
    parameter gradient, a learnable per-head alpha included; output_attentions returns the exact probabilities."""
    from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel

    for attention, extra in [("entmax15", {}), ("entmax_bisect", {"attention_alpha_learnable": True})]:
        def config():
            return EntmaxViTConfig(**tiny_config_kwargs, attention=attention, **extra)

        fused = EntmaxViTModel._from_config(config(), attn_implementation=f"{attention}_triton")
        eager = EntmaxViTModel._from_config(config(), attn_implementation="eager")
        eager.load_state_dict(fused.state_dict())
        assert fused.config._attn_implementation == "triton"
        pixels = torch.randn(2, 3, 32, 32)
        out_f, out_e = fused(pixels).last_hidden_state, eager(pixels).last_hidden_state
        torch.testing.assert_close(out_f, out_e, atol=1e-5, rtol=1e-5)
        out_f.square().mean().backward()
        out_e.square().mean().backward()
        for (name, p_f), p_e in zip(fused.named_parameters(), eager.parameters()):
            assert p_f.grad is not None, name
            torch.testing.assert_close(p_f.grad, p_e.grad, atol=1e-5, rtol=1e-4, msg=name)
        attn = fused(pixels, output_attentions=True).attentions[-1]
        torch.testing.assert_close(attn, eager(pixels, output_attentions=True).attentions[-1], atol=1e-6, rtol=0)


class _EveryConfig:
    """Stands in for triton's autotuner (which needs a GPU to time): runs the raw kernel with every candidate the
    tuner would time (after pruning) and checks that all write the same outputs."""

    def __init__(self, kernel, configs, prune=None) -> None:
        self.kernel, self.configs, self.prune, self.tried = kernel, configs, prune, []

    def __getitem__(self, grid):
        def run(*args, **meta):
            names = self.kernel.arg_names
            configs = self.prune(self.configs, dict(zip(names, args))) if self.prune else self.configs
            first = None
            for config in configs:
                kwargs = dict(config.kwargs, num_warps=config.num_warps)
                self.kernel[grid(kwargs)](*args, **meta, **kwargs)
                written = [a.clone() for a in args if torch.is_tensor(a)]
                self.tried.append(config.kwargs)
                if first is None:
                    first = written
                for a, b in zip(written, first):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{config}: {m}")

        return run


@pytest.mark.parametrize("n", [37, pytest.param(300, marks=pytest.mark.slow)])
def test_autotuned_launches_agree_for_every_candidate(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA launch path (grids from the tuner's config, meta-parameters by name): every configuration the
    autotuner may pick gives the same forward and backward, equal to the explicit launch."""
    from entmax_vit.modeling import triton_attention as TA

    fakes = {
        "fwd": _EveryConfig(TA._fwd, TA._fwd_configs(), lambda c, a: TA.prune_fwd_configs(c, a)),
        "dq": _EveryConfig(TA._bwd_dq, TA._bwd_configs((32, 64, 128), (32, 64))),
        "dkdv": _EveryConfig(TA._bwd_dkdv, TA._bwd_configs((32, 64), (32, 64, 128))),
    }
    q, k, v = (torch.randn(1, 2, n, 32, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, 2, n, 32)
    explicit = _grads(lambda *x: _triton(*x[:3], transform="entmax15", scaling=0.3), q, k, v, None, grad)
    monkeypatch.setattr(TA, "tuned_kernels", lambda: fakes)
    monkeypatch.setattr(TA, "autotuned", lambda query: True)
    tuned = _grads(lambda *x: _triton(*x[:3], transform="entmax15", scaling=0.3), q, k, v, None, grad)
    for a, b in zip(tuned, explicit):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    one_tile = [c for c in fakes["fwd"].tried if c["ONE_TILE"]]
    assert one_tile and all(c["BLOCK_N"] == (64 if n == 37 else 512) for c in one_tile)
    assert any(not c["ONE_TILE"] for c in fakes["fwd"].tried) == (n > 256)
    assert len(fakes["dq"].tried) == 12 and len(fakes["dkdv"].tried) == 12


def test_device_aware_default_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """No kernel requested: triton for CUDA tensors, tiled elsewhere, sdpa for softmax; resolved per call."""
    for transform in SPARSE:
        assert A.default_kernel(transform, torch.device("cuda")) == "triton"
        assert A.default_kernel(transform, "cuda:1") == "triton"
        assert A.default_kernel(transform, "cpu") == "tiled"
        assert A.resolve_kernel(transform) == "auto" and A.resolve_kernel(transform, transform) == "auto"
    assert A.default_kernel("softmax", "cuda") == "sdpa"
    ran = []
    for name in ("tiled", "triton"):
        monkeypatch.setitem(A.ATTENTION_KERNELS, name, lambda *a, _n=name, **kw: ran.append(_n) or (a[0], None))
    q = torch.randn(1, 1, 4, 8)
    A.auto_kernel(q, q, q, transform="entmax15", scaling=1.0)
    monkeypatch.setattr(A, "default_kernel", lambda transform, device: "triton")  # as for a CUDA tensor
    A.auto_kernel(q, q, q, transform="entmax15", scaling=1.0)
    A.auto_kernel(q, q[:, :, :2], q[:, :, :2], transform="entmax15", scaling=1.0)  # cross-attention: tiled
    assert ran == ["tiled", "triton", "tiled"]


def test_a_reloaded_model_gets_the_device_aware_default(tiny_config_kwargs, tmp_path) -> None:
    """transformers does not save the kernel: from_pretrained resolves it again, to auto (triton on CUDA)."""
    from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel

    EntmaxViTModel(EntmaxViTConfig(**tiny_config_kwargs, attention="entmax15")).save_pretrained(tmp_path)
    assert "_attn_implementation" not in (tmp_path / "config.json").read_text()
    reloaded = EntmaxViTModel.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "auto"
    assert A.default_kernel(reloaded.config.attention, "cuda") == "triton"


def test_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        A.triton_kernel(q, q, q, transform="entmax15", scaling=1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="head dims up to 128"):
        _triton(*(torch.randn(1, 1, 4, 160) for _ in range(3)), transform="entmax15", scaling=1.0)
    with pytest.raises(ValueError, match="float64"):
        _triton(q.double(), q.double(), q.double(), transform="entmax15", scaling=1.0)
    with pytest.raises(ValueError, match="alpha > 1"):
        _triton(q, q, q, transform="entmax_bisect", scaling=1.0, alpha=1.0)


def test_cpu_users_never_import_the_triton_kernel() -> None:
    """The default on CPU is tiled: a model's forward and backward never import modeling/triton_attention.py."""
    code = (
        "import sys, torch\n"
        "from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel\n"
        "m = EntmaxViTModel(EntmaxViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, intermediate_size=64))\n"
        "m(torch.randn(1, 3, 32, 32)).last_hidden_state.sum().backward()\n"
        "assert 'entmax_vit.modeling.triton_attention' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
