"""Benchmark the attention product: softmax SDPA, eager softmax, the `entmax` package and ours.

    python scripts/bench_attention.py                 # (B, 6, N, 64) at N = 197 (B 8), 785 (B 2), 3137 (B 1)
    python scripts/bench_attention.py --quick         # fewer repeats, no 3137 case, no package rows (minutes)
    python scripts/bench_attention.py --json          # print the results JSON instead of the table

Methods run interleaved round-robin; medians, ratios to softmax SDPA of the same run and the largest
difference from the `entmax` package's probabilities are reported (docs/performance.md). Writes
OUTPUT_DIR/bench_attention.json and the resolved config.
"""

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import entmax
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from entmax_vit.jobs.benchmarks import add_ratios, start_benchmark, write_benchmark
from entmax_vit.modeling.attention import ATTENTION_KERNELS

log = logging.getLogger("bench_attention")


@dataclass
class BenchAttentionConfig:
    # Cases "BxN" (batch x tokens): ViT-S/16 at 224 px (N = 197), 448 px (785) and 896 px (3137), at the batch
    # sizes of the feature-extraction benchmarks (strings, so the command line sets any number: --cases 8x197);
    # batch_sizes x tokens (if set) replaces them
    cases: list[str] = field(default_factory=lambda: ["8x197", "2x785", "1x3137"])
    batch_sizes: list[int] = field(default_factory=list)  # batch sizes B; with tokens, replaces cases
    tokens: list[int] = field(default_factory=list)  # sequence lengths N; every B x N pair is a case
    heads: int = 6  # attention heads H (ViT-S: 6)
    head_dim: int = 64  # dimension d of each head (ViT-S: 64)
    repeats: int = 15  # timed rounds per case (median reported)
    warmup: int = 2  # untimed rounds per case (the compiled kernel compiles in the first)
    max_seconds_per_method: float = 8.0  # a method leaves a case's rounds once its timed total passes this
    min_rounds: int = 3  # timed rounds every method runs per case, even past max_seconds_per_method
    package: bool = True  # include the `entmax` package (entmax15, entmax_bisect)
    compiled: bool = True  # include our kernel="compiled" path (torch.compile; first call compiles)
    # only these methods (names as in the table; softmax_sdpa, the baseline, always runs); empty = all
    methods: list[str] = field(default_factory=list)
    # instead of timing: torch.profiler of the forward of SDPA and our tiled entmax15 per case (the ATen calls
    # and their share of the time), written to OUTPUT_DIR/profile_N<tokens>.txt
    profile: bool = False
    threads: Optional[int] = None  # torch.set_num_threads; None = torch default
    quick: bool = False  # 5 repeats, no N = 3137 case, no package rows
    json: bool = False  # print the results JSON to stdout instead of the table
    seed: int = 0  # seed of the random q, k, v and output gradients of every case
    output_dir: str = "outputs/bench_attention"  # bench_attention.json, the resolved config, profiles


def _methods(cfg: BenchAttentionConfig, scaling: float) -> dict[str, Callable]:
    """name -> fn(q, k, v) -> (out, probs or None)."""

    def ours(transform: str, kernel: str) -> Callable:  # tiled: output only, as SDPA; the others with probs
        return lambda q, k, v: ATTENTION_KERNELS[kernel](q, k, v, transform=transform, scaling=scaling,
                                                         need_weights=kernel != "tiled")

    def package(fn: Callable) -> Callable:  # the `entmax` package's transform of the scores
        def run(q, k, v):
            probs = fn(torch.matmul(q * scaling, k.transpose(-2, -1)), dim=-1)
            return torch.matmul(probs, v), probs

        return run

    methods: dict[str, Callable] = {
        "softmax_sdpa": lambda q, k, v: (F.scaled_dot_product_attention(q, k, v, scale=scaling), None),
        "softmax_eager": ours("softmax", "eager"),
        "entmax15_ours_tiled": ours("entmax15", "tiled"),
        "entmax15_ours_eager": ours("entmax15", "eager"),
    }
    if cfg.compiled:
        methods["entmax15_ours_compiled"] = ours("entmax15", "compiled")
    if cfg.package:
        methods["entmax15_package"] = package(entmax.entmax15)
        methods["entmax_bisect_package"] = package(lambda s, dim: entmax.entmax_bisect(s, 1.5, dim=dim))
    methods["sparsemax_ours_tiled"] = ours("sparsemax", "tiled")
    methods["entmax_bisect_ours_tiled"] = ours("entmax_bisect", "tiled")
    methods["entmax_bisect_ours_eager"] = ours("entmax_bisect", "eager")
    if cfg.methods:
        if unknown := sorted(set(cfg.methods) - set(methods)):
            raise ValueError(f"unknown methods {unknown}; choose from {sorted(methods)}")
        methods = {name: fn for name, fn in methods.items() if name == "softmax_sdpa" or name in cfg.methods}
    return methods


def bench_case(cfg: BenchAttentionConfig, batch: int, tokens: int) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (batch, cfg.heads, tokens, cfg.head_dim)
    q, k, v, grad = (torch.randn(shape, generator=gen) for _ in range(4))
    scaling = cfg.head_dim**-0.5
    methods = _methods(cfg, scaling)

    errors: dict[str, float] = {}
    with torch.no_grad():
        reference = entmax.entmax15(torch.matmul(q * scaling, k.transpose(-2, -1)), dim=-1)
        eye = torch.eye(tokens).expand(batch, cfg.heads, tokens, tokens)  # tiled kernels: P = P I
        for name, fn in methods.items():
            if name.startswith("entmax15") or name.startswith("entmax_bisect"):
                probs = fn(q, k, eye)[0] if "tiled" in name else fn(q, k, v)[1]
                errors[name] = float((probs - reference).abs().max())

    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

    def forward(fn: Callable) -> None:
        with torch.no_grad():
            fn(q, k, v)

    def forward_backward(fn: Callable) -> None:
        out, _ = fn(qg, kg, vg)
        torch.autograd.grad(out, (qg, kg, vg), grad)

    times: dict[str, dict[str, list[float]]] = {m: {"forward": [], "forward_backward": []} for m in methods}
    for r in range(cfg.warmup + cfg.repeats):
        for name, fn in methods.items():  # round-robin: background load hits every method alike
            spent = sum(times[name]["forward"]) + sum(times[name]["forward_backward"])
            if len(times[name]["forward"]) >= cfg.min_rounds and spent > cfg.max_seconds_per_method:
                continue  # slow method (the package's bisection): enough rounds for a median
            for mode, run in (("forward", forward), ("forward_backward", forward_backward)):
                t0 = time.perf_counter()
                run(fn)
                if r >= cfg.warmup:
                    times[name][mode].append(time.perf_counter() - t0)

    results = {name: {"forward_ms": statistics.median(ts["forward"]) * 1e3,
                      "forward_backward_ms": statistics.median(ts["forward_backward"]) * 1e3,
                      "rounds": len(ts["forward"]), "max_abs_err_vs_entmax15": errors.get(name)}
               for name, ts in times.items()}
    for mode in ("forward", "forward_backward"):
        add_ratios(results, "softmax_sdpa", f"{mode}_ms", f"{mode}_ratio_vs_sdpa")
    return {"batch": batch, "heads": cfg.heads, "tokens": tokens, "head_dim": cfg.head_dim, "methods": results}


def profile_case(cfg: BenchAttentionConfig, batch: int, tokens: int, out_dir: Path) -> Path:
    """torch.profiler tables of the forward of softmax SDPA and of entmax15 ``tiled`` at one case."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(cfg.seed)
    q, k, v = (torch.randn(batch, cfg.heads, tokens, cfg.head_dim, generator=gen) for _ in range(3))
    methods = _methods(cfg, cfg.head_dim**-0.5)
    lines = []
    for name in ("softmax_sdpa", "entmax15_ours_tiled"):
        with torch.no_grad():
            for _ in range(2):
                methods[name](q, k, v)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    methods[name](q, k, v)
        lines += [f"== {name}, (B, H, N, d) = ({batch}, {cfg.heads}, {tokens}, {cfg.head_dim}), 5 forwards",
                  prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), ""]
    path = out_dir / f"profile_N{tokens}.txt"
    path.write_text("\n".join(lines))
    return path


def format_table(cases: list[dict]) -> str:
    lines = []
    for case in cases:
        lines.append(f"\n(B, H, N, d) = ({case['batch']}, {case['heads']}, {case['tokens']}, {case['head_dim']})")
        lines.append(f"{'method':28s} {'fwd ms':>9s} {'x sdpa':>7s} {'fwd+bwd ms':>11s} {'x sdpa':>7s} "
                     f"{'err vs entmax15':>16s}")
        for name, r in case["methods"].items():
            err = "" if r["max_abs_err_vs_entmax15"] is None else f"{r['max_abs_err_vs_entmax15']:.1e}"
            lines.append(f"{name:28s} {r['forward_ms']:9.2f} {r['forward_ratio_vs_sdpa']:7.2f} "
                         f"{r['forward_backward_ms']:11.2f} {r['forward_backward_ratio_vs_sdpa']:7.2f} {err:>16s}")
    return "\n".join(lines)


def _case(text: str) -> tuple[int, int]:
    batch, sep, tokens = text.partition("x")
    if not (sep and batch.isdigit() and tokens.isdigit() and int(batch) > 0 and int(tokens) > 0):
        raise ValueError(f"--cases: expected BATCHxTOKENS such as 8x197, got {text!r}")
    return int(batch), int(tokens)


def main(cfg: BenchAttentionConfig) -> dict:
    shapes = [(b, n) for b in cfg.batch_sizes for n in cfg.tokens] or [_case(c) for c in cfg.cases]  # checked first
    if cfg.quick:
        shapes = [(b, n) for b, n in shapes if n < 3000]
        cfg.repeats, cfg.package = min(cfg.repeats, 5), False
    out_dir = start_benchmark("attention", cfg)
    if cfg.profile:
        paths = [profile_case(cfg, batch, tokens, out_dir) for batch, tokens in shapes]
        print("\n\n".join(p.read_text() for p in paths))
        return {"benchmark": "attention_profile", "files": [str(p) for p in paths]}
    cases = []
    for batch, tokens in tqdm(shapes, desc="attention cases"):
        log.info("benchmarking B=%d H=%d N=%d d=%d", batch, cfg.heads, tokens, cfg.head_dim)
        cases.append(bench_case(cfg, batch, tokens))
    return write_benchmark("attention", cfg, {"cases": cases},
                           "medians of interleaved rounds; ratios are to softmax SDPA in the same run",
                           lambda record: format_table(record["cases"]))


if __name__ == "__main__":
    from entmax_vit.cli import entry_point

    entry_point.run(main, BenchAttentionConfig, "bench_attention")
