"""Fast exact sparse attention (modeling/attention.py, thresholds.py): parity with the `entmax` package,
invariants, adversarial rows, half precision, gradcheck (incl. a per-head alpha), the sort fallback and the
compiled path.
"""

from __future__ import annotations

import math
from typing import Optional

import entmax
import pytest
import torch
import torch.nn.functional as F

from entmax_vit.modeling import attention as A
from entmax_vit.modeling import thresholds as TH

PACKAGE = {"entmax15": entmax.entmax15, "sparsemax": entmax.sparsemax}
SPARSE = ["entmax15", "sparsemax"]


def _sort_reference(name: str, scores: torch.Tensor) -> torch.Tensor:
    """The exact sort-based transform (the solvers' fallback), e.g. in float64."""
    y = scores - scores.amax(dim=-1, keepdim=True)
    if name == "entmax15":
        return (torch.clamp(y - TH.entmax15_sort_threshold(y), min=0) / 2) ** 2
    return torch.clamp(y - TH.sparsemax_sort_threshold(y), min=0)



def attend(q, k, v, *, transform: str, kernel: Optional[str] = None, **kwargs):
    """The attention product of ``transform`` by ``kernel`` (the model's default when None), as the model runs it:
    (out (B, H, N, d), probs or None)."""
    return A.ATTENTION_KERNELS[A.resolve_kernel(transform, kernel)](q, k, v, transform=transform, **kwargs)


def _scores(shape, scale: float, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def _adversarial_rows(n: int = 37) -> torch.Tensor:
    """Rows that stress a threshold search: ties, masks, huge/tiny scales, support 1 and support N. (R, n)"""
    rows = [
        torch.zeros(n),  # all tied: uniform, support N
        torch.cat([torch.full((3,), 2.0), torch.zeros(n - 3)]),  # tied top three
        torch.arange(n, dtype=torch.float32) % 4,  # many ties at every level
        torch.randn(n) * 1e-6,  # tiny scale: support N, near uniform
        torch.randn(n) * 1e4,  # huge scale: support 1
        torch.cat([torch.tensor([50.0]), torch.zeros(n - 1)]),  # support exactly 1
        torch.linspace(0, 1e-3, n),  # support N with a spread
        torch.where(torch.arange(n) % 3 == 0, torch.randn(n), torch.tensor(float("-inf"))),  # -inf mask
        torch.cat([torch.tensor([1.0]), torch.full((n - 1,), float("-inf"))]),  # a single unmasked entry
        torch.randn(n) * 3 + 1e4,  # large offset (shift invariance)
    ]
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------------------
# Exactness against the entmax package and the float64 sort reference
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("scale", [0.05, 0.3, 1.0, 4.0, 30.0])
@pytest.mark.parametrize("n", [1, 2, 37, 197])
def test_matches_entmax_package(name: str, scale: float, n: int) -> None:
    scores = _scores((2, 3, 16, n), scale)
    ours = A.ATTENTION_TRANSFORMS[name](scores)
    theirs = PACKAGE[name](scores, dim=-1)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    # and against the exact sort reference in float64 (the package itself is float32 sort-based)
    ref = _sort_reference(name, scores.double())
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", SPARSE)
def test_adversarial_rows(name: str) -> None:
    rows = _adversarial_rows()
    ours = A.ATTENTION_TRANSFORMS[name](rows)
    theirs = PACKAGE[name](rows, dim=-1)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.sum(-1), torch.ones(len(rows)), atol=1e-6, rtol=0)
    assert (ours >= 0).all()
    torch.testing.assert_close(ours[0], torch.full_like(ours[0], 1 / rows.shape[-1]))  # all tied: uniform
    assert A.support_size(ours[4]).item() == 1 and A.support_size(ours[5]).item() == 1
    assert A.support_size(ours[3]).item() == rows.shape[-1]  # tiny scale keeps everything
    assert (ours[7][rows[7] == float("-inf")] == 0).all()  # masked entries are exact zeros
    assert ours[8, 0] == 1 and (ours[8, 1:] == 0).all()
    assert ours[1, :3].unique().numel() == 1  # ties get equal weight


@pytest.mark.parametrize("name", SPARSE)
def test_fallback_rows_are_exact(name: str) -> None:
    """With no Newton steps most rows fail the support check; the sort fallback must make them exact."""
    scores = _scores((4, 64, 97), 0.5)
    rescored = []
    y = scores - scores.amax(dim=-1, keepdim=True)
    TH.sparse_block_threshold(name, y.clone(), None, y.mean(-1, keepdim=True), 0,
                              lambda: rescored.append(1) or y.clone())
    assert rescored, "test needs failing rows"
    torch.testing.assert_close(TH.probabilities(scores, name, newton_steps=0), PACKAGE[name](scores, dim=-1),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [1.2, 1.5, 2.0, 2.5, 4.0])
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_entmax_bisect_matches_package(alpha: float, scale: float) -> None:
    scores = _scores((2, 4, 8, 61), scale)
    ours = A.entmax_bisect(scores, alpha)
    truth = entmax.entmax_bisect(scores.double(), alpha, dim=-1, n_iter=200)
    theirs = entmax.entmax_bisect(scores, alpha, dim=-1)
    # At least as close to the float64 answer as the package's own float32 bisection (+ rounding slack).
    err_ours = (ours.double() - truth).abs().max().item()
    err_theirs = (theirs.double() - truth).abs().max().item()
    assert err_ours <= err_theirs + 1e-6, (err_ours, err_theirs)
    if alpha <= 2:
        torch.testing.assert_close(ours, theirs, atol=3e-6, rtol=0)
    torch.testing.assert_close(ours.sum(-1), torch.ones(ours.shape[:-1]), atol=1e-6, rtol=0)


def test_entmax_bisect_alpha_15_and_2_equal_closed_forms() -> None:
    scores = _scores((3, 5, 41), 2.0, torch.float64)
    torch.testing.assert_close(A.entmax_bisect(scores, 1.5), A.entmax15(scores), atol=1e-12, rtol=0)
    torch.testing.assert_close(A.entmax_bisect(scores, 2.0), A.sparsemax(scores), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="alpha > 1"):
        A.entmax_bisect(scores, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Half precision and autocast
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["softmax", "entmax15", "sparsemax", "entmax_bisect"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_float32(name: str, dtype: torch.dtype) -> None:
    scores = _scores((2, 3, 7, 37), 3.0, dtype)
    scores.requires_grad_(True)
    out = A.ATTENTION_TRANSFORMS[name](scores)
    assert out.dtype == dtype
    expected = A.ATTENTION_TRANSFORMS[name](scores.detach().float()).to(dtype)
    assert torch.equal(out, expected)  # the float32 result, rounded once
    out.float().square().sum().backward()
    assert scores.grad.dtype == dtype and torch.isfinite(scores.grad.float()).all()


def test_autocast_bfloat16_attention() -> None:
    q, k, v = (torch.randn(2, 3, 37, 16) for _ in range(3))
    ref, _ = attend(q, k, v, transform="entmax15", scaling=0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, probs = attend(q, k, v, transform="entmax15", scaling=0.25, need_weights=True)
    assert out.dtype == torch.bfloat16 and probs.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)
    torch.testing.assert_close(probs.float().sum(-1), torch.ones(2, 3, 37), atol=2e-2, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["entmax15", "sparsemax", "entmax_bisect"])
def test_gradcheck(name: str) -> None:
    scores = _scores((2, 3, 9), 2.0, torch.float64).requires_grad_(True)
    fn = A.ATTENTION_TRANSFORMS[name]
    assert torch.autograd.gradcheck(fn, (scores,), eps=1e-6, atol=1e-7)


def test_gradcheck_entmax_bisect_per_head_alpha() -> None:
    """alpha of shape (H, 1, 1) broadcast against (B, H, N, N) scores, including alpha > 2 (bisection)."""
    scores = _scores((2, 3, 5, 5), 2.0, torch.float64).requires_grad_(True)
    alpha = torch.tensor([1.3, 1.7, 2.5], dtype=torch.float64).view(3, 1, 1).requires_grad_(True)
    assert torch.autograd.gradcheck(A.entmax_bisect, (scores, alpha), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", SPARSE)
def test_backward_matches_package_and_saves_only_output(name: str) -> None:
    scores = _scores((4, 6, 33), 2.0).requires_grad_(True)
    grad = torch.randn(4, 6, 33)
    packed = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ours = A.ATTENTION_TRANSFORMS[name](scores)
    assert len(packed) == 1 and torch.equal(packed[0], ours)
    (g_ours,) = torch.autograd.grad(ours, scores, grad)
    theirs = PACKAGE[name](scores, dim=-1)
    (g_theirs,) = torch.autograd.grad(theirs, scores, grad)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------
def test_eager_softmax_equals_sdpa() -> None:
    q, k, v = (torch.randn(2, 3, 37, 16) for _ in range(3))
    sdpa, none = attend(q, k, v, transform="softmax", scaling=0.25, kernel="sdpa")
    eager, probs = attend(q, k, v, transform="softmax", scaling=0.25, kernel="eager", need_weights=True)
    assert none is None
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager, F.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v, atol=1e-5, rtol=1e-5)
    assert probs.shape == (2, 3, 37, 37)


@pytest.mark.parametrize("name", SPARSE)
def test_eager_sparse_matches_package(name: str) -> None:
    q, k, v = (torch.randn(2, 3, 37, 16) for _ in range(3))
    out, probs = attend(q, k, v, transform=name, scaling=0.25, kernel="eager", need_weights=True)
    ref_probs = PACKAGE[name](q @ k.transpose(-1, -2) * 0.25, dim=-1)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, ref_probs @ v, atol=1e-5, rtol=1e-5)
    assert (A.support_size(probs) < 37).any()  # genuinely sparse


def test_bad_names_raise() -> None:
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="kernel"):
        attend(q, q, q, transform="entmax15", scaling=1.0, kernel="flash")
    with pytest.raises(ValueError, match="choose one of"):
        attend(q, q, q, transform="entmax2", scaling=1.0)


@pytest.mark.slow
def test_compiled_equals_eager() -> None:
    """kernel='compiled' (torch.compile of the threshold search and backward) gives the eager numbers."""
    q, k, v = (torch.randn(2, 2, 17, 8, requires_grad=True) for _ in range(3))
    alpha = torch.tensor([1.3, 2.5]).view(2, 1, 1).requires_grad_(True)
    grad = torch.randn(2, 2, 17, 8)
    for name in ["entmax15", "sparsemax", "entmax_bisect"]:
        results = []
        for kernel in ["eager", "compiled"]:
            out, probs = attend(
                q, k, v, transform=name, scaling=8**-0.5, kernel=kernel, need_weights=True,
                alpha=alpha if name == "entmax_bisect" else None,
            )
            inputs = (q, k, v, alpha) if name == "entmax_bisect" else (q, k, v)
            results.append((out, probs, *torch.autograd.grad(out, inputs, grad)))
        for eager, compiled in zip(*results):
            torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)
        assert math.isclose(float(results[1][1].detach().sum()), 2 * 2 * 17, rel_tol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Benchmark scripts (tiny smoke runs: structure and accuracy fields, never timings)


# ----------------------------------------------------------------------------------------------------------
# Benchmark scripts (tiny smoke runs: structure and accuracy fields, never timings)
# ----------------------------------------------------------------------------------------------------------
def _load_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_attention_smoke(tmp_path) -> None:
    bench = _load_script("bench_attention")
    cfg = bench.BenchAttentionConfig(
        batch_sizes=[1], tokens=[9], heads=2, head_dim=8, repeats=1, warmup=0, compiled=False,
        output_dir=str(tmp_path),
    )
    record = bench.main(cfg)
    saved = __import__("json").loads((tmp_path / "bench_attention.json").read_text())
    assert saved["cases"][0]["methods"].keys() == record["cases"][0]["methods"].keys()
    methods = record["cases"][0]["methods"]
    assert methods["softmax_sdpa"]["forward_backward_ratio_vs_sdpa"] == 1.0
    assert methods["entmax15_ours_eager"]["max_abs_err_vs_entmax15"] < 1e-6
    assert methods["entmax_bisect_ours_eager"]["max_abs_err_vs_entmax15"] < 1e-5
    assert (tmp_path / "bench_attention_config.yaml").is_file()


def test_bench_attention_methods_filter_and_profile(tmp_path) -> None:
    bench = _load_script("bench_attention")
    small = dict(batch_sizes=[1], tokens=[9], heads=2, head_dim=8, repeats=1, warmup=0, compiled=False,
                 package=False, output_dir=str(tmp_path))
    record = bench.main(bench.BenchAttentionConfig(methods=["entmax15_ours_tiled"], **small))
    assert list(record["cases"][0]["methods"]) == ["softmax_sdpa", "entmax15_ours_tiled"]
    with pytest.raises(ValueError, match="unknown methods"):
        bench.main(bench.BenchAttentionConfig(methods=["entmax15_fast"], **small))
    with pytest.raises(ValueError, match="--cases: expected BATCHxTOKENS"):  # refused before any file is written
        bench.main(bench.BenchAttentionConfig(cases=["8,197"], heads=2, output_dir=str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()
    profiled = bench.main(bench.BenchAttentionConfig(profile=True, **small))
    text = (tmp_path / "profile_N9.txt").read_text()
    assert profiled["files"] == [str(tmp_path / "profile_N9.txt")]
    assert "== softmax_sdpa" in text and "== entmax15_ours_tiled" in text and "aten::bmm" in text


def test_entmax15_training_step_peak_memory_matches_softmax(tiny_config_kwargs) -> None:
    """entmax-1.5 keeps only its output for backward, so a training step's peak memory is softmax's (eager)."""
    from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel

    bench = _load_script("bench_model")
    pixels = [torch.randn(4, 3, 32, 32)]
    peaks = {}
    for attention in ["softmax", "entmax15"]:
        torch.manual_seed(0)
        model = EntmaxViTModel._from_config(
            EntmaxViTConfig(**tiny_config_kwargs, attention=attention), attn_implementation="eager"
        ).train()
        peaks[attention] = bench.peak_step_memory(model, pixels)
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        assert peaks[attention] > params
    assert peaks["entmax15"] <= 1.1 * peaks["softmax"], peaks


# ----------------------------------------------------------------------------------------------------------
# Kernel names, AttentionInterface functions, torch.export / torch.compile(fullgraph=True)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["entmax15", "sparsemax", "entmax_bisect"])
def test_sdpa_is_refused_for_sparse_transforms(name: str) -> None:
    """SDPA computes softmax only: asking it for a sparse transform is an error, never another computation."""
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="does not run attention=.*softmax only.*choose one of"):
        attend(q, q, q, transform=name, scaling=1.0, kernel="sdpa")
    assert A.resolve_kernel(name, None) in A.kernels_for(name) and "sdpa" not in A.kernels_for(name)
    assert A.resolve_kernel("softmax", None) == "sdpa"


def test_attention_functions_are_registered_with_transformers() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # the transform's own name is the device-aware default, "<transform>_<kernel>" a chosen kernel
    for name, pair in [("entmax15", ("entmax15", "auto")), ("sparsemax", ("sparsemax", "auto")),
                       ("entmax_bisect", ("entmax_bisect", "auto")), ("entmax15_eager", ("entmax15", "eager")),
                       ("entmax15_tiled", ("entmax15", "tiled")), ("sparsemax_triton", ("sparsemax", "triton")),
                       ("softmax", ("softmax", "auto")), ("softmax_sdpa", ("softmax", "sdpa"))]:
        assert name in A.ATTENTION_INTERFACE_NAMES
        assert ALL_ATTENTION_FUNCTIONS.get_interface(name, None) is A.attention_function(*pair)
    # the eager signature: (module, q, k, v, mask, scaling, dropout) -> ((B, N, H, d), (B, H, N, N))
    q, k, v = (torch.randn(2, 3, 9, 4) for _ in range(3))
    module = torch.nn.Module()
    out, weights = A.attention_function("entmax15", "eager")(module, q, k, v, None, scaling=0.5, dropout=0.0)
    ref = entmax.entmax15(q @ k.transpose(-1, -2) * 0.5, dim=-1)
    torch.testing.assert_close(weights, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, (ref @ v).transpose(1, 2), atol=1e-5, rtol=1e-5)
    # a boolean mask (True = attend) gives exact zeros on masked keys
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool)
    mask[..., -2:] = False
    _, weights = A.attention_function("sparsemax", "eager")(module, q, k, v, mask, scaling=0.5)
    assert (weights[..., -2:] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 9), atol=1e-6, rtol=0)


class _Attend(torch.nn.Module):
    def __init__(self, name: str, newton_steps: Optional[int] = None) -> None:
        super().__init__()
        self.name, self.newton_steps = name, newton_steps

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if self.newton_steps is not None:  # the solver itself, with a given number of Newton steps
            return TH.probabilities(scores, self.name, newton_steps=self.newton_steps)
        return A.ATTENTION_TRANSFORMS[self.name](scores, 1.3 if self.name == "entmax_bisect" else None)


def _reference(name: str, scores: torch.Tensor) -> torch.Tensor:
    if name == "softmax":
        return torch.softmax(scores, -1)
    if name == "entmax_bisect":
        return entmax.entmax_bisect(scores.double(), 1.3, dim=-1, n_iter=200).float()
    return PACKAGE[name](scores, dim=-1)


@pytest.mark.parametrize("name", list(A.ATTENTION_TRANSFORMS))
def test_torch_export_is_exact(name: str) -> None:
    """torch.export traces every transform (no data-dependent Python branch), the sort fallback included:
    with no Newton steps most rows need it, and the exported program is still exact."""
    scores = _scores((2, 3, 17, 17), 2.0)
    modules = [_Attend(name)] + ([_Attend(name, newton_steps=0)] if name in TH.NEWTON_STEPS else [])
    for module in modules:
        program = torch.export.export(module, (scores,))
        for x in (scores, _scores((2, 3, 17, 17), 0.3)):
            torch.testing.assert_close(program.module()(x), _reference(name, x), atol=2e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(A.ATTENTION_TRANSFORMS))
def test_torch_compile_fullgraph_is_exact_with_gradients(name: str) -> None:
    torch._dynamo.reset()
    scores = _scores((2, 3, 17, 17), 2.0).requires_grad_(True)
    compiled = torch.compile(_Attend(name), fullgraph=True, backend="aot_eager")
    probs = compiled(scores)
    torch.testing.assert_close(probs, _reference(name, scores.detach()), atol=2e-6, rtol=0)
    grad = torch.randn_like(probs)
    (g_compiled,) = torch.autograd.grad(probs, scores, grad)
    (g_eager,) = torch.autograd.grad(_Attend(name)(scores), scores, grad)
    torch.testing.assert_close(g_compiled, g_eager, atol=1e-6, rtol=1e-5)
