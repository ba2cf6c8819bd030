"""The GPU acceptance check of ``scripts/gpu_check.py`` (docs/training.md lists its rows). Each section returns
rows; a section or kernel that raises is a failed row and the check goes on. Exactness covers every kernel of
``kernels_for`` (a new kernel needs no change here). The CPU toy mode (``TRITON_INTERPRET=1`` set before triton is
imported) tests the check itself: its numbers say nothing about GPUs.
"""

import datetime
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from entmax_vit.evaluation.speed import backbone_step, median_seconds, peak_bytes
from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel
from entmax_vit.modeling.attention import ATTENTION_KERNELS, kernels_for
from entmax_vit.modeling.thresholds import SPARSE_TRANSFORMS as SPARSE

from .benchmarks import add_ratios

logger = logging.getLogger("gpu_check")
REPO = Path(__file__).resolve().parents[1]
PROBS_TOL, OUTPUT_TOL = 1e-6, 1e-5
# compiled (the 2-core CPU's fastest at 224 px, tests/test_attention.py holds it to eager) would spend the check's
# minutes compiling a graph per transform and shape; auto is triton (CUDA) or tiled (CPU), timed under that name
EXACTNESS_SKIPS, TIMING_SKIPS = ("compiled",), ("auto", "compiled")


@dataclass
class Sizes:
    """Everything that differs between the GPU check and its CPU toy run."""

    exact_shape: tuple[int, int, int, int]  # (B, H, N, d) of the exactness case (probs read through V = I columns)
    timing_cases: list[tuple[int, int]]  # (B, N) of the attention-product timings, H and d below
    heads: int
    head_dim: int
    dtype: torch.dtype  # of the timings
    repeats: int
    preset: str  # the backbone of the multi-crop and extraction rows
    overrides: dict = field(default_factory=dict)  # EntmaxViTConfig overrides (toy: a tiny model)
    global_size: int = 224
    local_size: int = 96
    multicrop_images: int = 32
    extract_sizes: dict[int, int] = field(default_factory=lambda: {224: 64, 448: 16, 896: 4})  # px -> batch
    dino_steps: int = 100
    dino_args: dict = field(default_factory=dict)  # training/dino.py overrides of the DINO run


GPU = Sizes(
    exact_shape=(4, 6, 197, 64), timing_cases=[(8, 197), (2, 785), (1, 3137)], heads=6, head_dim=64,
    dtype=torch.bfloat16, repeats=10, preset="vit_small_patch16",
    dino_args={"model.preset": "vit_small_patch16", "model.backbone_overrides": "{}", "model.out_dim": 65536,
               "model.head_hidden_dim": 2048, "model.head_bottleneck_dim": 256, "crops.global_size": 224,
               "crops.local_size": 96, "crops.local_crops_number": 8, "data.batch_size_per_device": 32,
               "data.max_samples": 1600, "data.num_workers": 8, "data.pin_memory": True},  # 50 steps/epoch
)
CPU_TOY = Sizes(
    exact_shape=(1, 2, 37, 16), timing_cases=[(1, 17), (1, 33), (1, 65)], heads=2, head_dim=16,
    dtype=torch.bfloat16, repeats=2, preset="vit_tiny_patch8",
    overrides={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    global_size=32, local_size=16, multicrop_images=2, extract_sizes={32: 4, 64: 2, 128: 1}, dino_steps=8,
    dino_args={"model.preset": "vit_tiny_patch8", "model.out_dim": 256, "model.head_hidden_dim": 64,
               "model.head_bottleneck_dim": 32,
               "model.backbone_overrides": "{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2}",
               "crops.global_size": 32, "crops.local_size": 16, "crops.local_crops_number": 2,
               "data.source": "embedded:image_size=32,num_train=16,num_validation=4", "data.batch_size_per_device": 4,
               "data.max_samples": 16, "data.num_workers": 0, "data.pin_memory": False},  # 4 steps/epoch
)


def _row(section: str, fn: Callable[[], list[dict]]) -> list[dict]:
    t0 = time.perf_counter()
    try:
        rows = fn()
    except Exception as err:  # noqa: BLE001 - reported, not raised: the report is the product
        logger.exception("section %s failed", section)
        rows = [{"status": "failed", "error": f"{type(err).__name__}: {err}"[:500]}]
    logger.info("%s: %d row(s) in %.1f s", section, len(rows), time.perf_counter() - t0)
    return rows


def environment_rows(device: torch.device) -> list[dict]:
    def version(package: str) -> Optional[str]:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    row = {"status": "ok", "device": str(device), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "triton": version("triton"), "transformers": version("transformers"),
           "accelerate": version("accelerate"), "entmax": version("entmax"), "cpu_count": os.cpu_count(),
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        row.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count())
        smi = shutil.which("nvidia-smi")
        if smi:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=60)
            row["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    else:
        row.update(gpu=None, driver=None)
    return [row]


def kernel_probabilities(fn: Callable, q: torch.Tensor) -> torch.Tensor:
    """P of a kernel ``fn(v) -> P v``, d columns at a time: with V = columns j..j+d of the identity,
    P V = P[:, j:j+d]. Works for any N (the fused kernels need V of q's shape)."""
    n, d = q.shape[-2:]
    eye = torch.eye(n, device=q.device)
    cols = []
    for j in range(0, n, d):
        width = min(d, n - j)
        v = torch.zeros(*q.shape[:-1], d, device=q.device)
        v[..., :width] = eye[:, j : j + width]
        cols.append(fn(v)[..., :width])
    return torch.cat(cols, dim=-1)


def kernel_exactness_rows(device: torch.device, shape: tuple[int, int, int, int]) -> list[dict]:
    """Every kernel vs the ``entmax`` package in float32: q and k on a 1/8 grid make every score exact whatever
    order a kernel sums in, so kernels differ from the package only by their transforms."""
    import entmax

    references = {"entmax15": lambda s: entmax.entmax15(s, dim=-1), "sparsemax": lambda s: entmax.sparsemax(s, dim=-1),
                  "entmax_bisect": lambda s: entmax.entmax_bisect(s, 1.5, dim=-1)}
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.round(torch.randn(shape, generator=gen) * 8).div(8).to(device) for _ in range(3))
    q = q / 8  # scores of a few units, exact (dyadic)
    rows = []
    for transform in SPARSE:
        reference = references[transform](torch.matmul(q, k.transpose(-2, -1)))  # (B, H, N, N)
        for kernel in (k for k in kernels_for(transform) if k not in EXACTNESS_SKIPS):
            row = {"transform": transform, "kernel": kernel, "shape": list(shape), "dtype": "float32"}
            try:
                with torch.no_grad():
                    probs = kernel_probabilities(lambda vv: ATTENTION_KERNELS[kernel](
                        q, k, vv, transform=transform, scaling=1.0)[0], q)
                    out, _ = ATTENTION_KERNELS[kernel](q, k, v, transform=transform, scaling=1.0)
                row["max_abs_err_probs"] = float((probs.float() - reference).abs().max())
                row["max_abs_err_output"] = float((out.float() - reference @ v).abs().max())
                ok = row["max_abs_err_probs"] <= PROBS_TOL and row["max_abs_err_output"] <= OUTPUT_TOL
                row["status"] = "ok" if ok else "failed"
            except Exception as err:  # noqa: BLE001 - a kernel that raises is a failed row
                row.update(status="failed", error=f"{type(err).__name__}: {err}"[:300])
            rows.append(row)
    return rows


def kernel_timing_rows(device: torch.device, cases: list[tuple[int, int]], heads: int, head_dim: int,
                       dtype: torch.dtype, repeats: int) -> list[dict]:
    """The attention product per (B, N) case, forward and forward+backward with its peak memory, vs softmax SDPA."""
    scaling = head_dim**-0.5
    methods: dict[str, Callable] = {
        "softmax:sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scaling)}
    for transform in SPARSE:
        for kernel in (k for k in kernels_for(transform) if k not in TIMING_SKIPS):
            methods[f"{transform}:{kernel}"] = lambda q, k, v, t=transform, kn=kernel: ATTENTION_KERNELS[kn](
                q, k, v, transform=t, scaling=scaling)[0]
    rows = []
    for batch, tokens in cases:
        gen = torch.Generator().manual_seed(0)
        shape = (batch, heads, tokens, head_dim)
        q, k, v, grad = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(4))
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        runnable, case_rows = {}, {}
        for name, fn in methods.items():
            row = {"method": name, "batch": batch, "heads": heads, "tokens": tokens, "head_dim": head_dim,
                   "dtype": str(dtype).replace("torch.", "")}
            try:
                with torch.no_grad():
                    fn(q, k, v)  # warm-up, compile, or the error of a kernel that cannot run here
                runnable[name] = fn
            except Exception as err:  # noqa: BLE001
                row.update(status="failed", error=f"{type(err).__name__}: {err}"[:300])
            case_rows[name] = row
        with torch.no_grad():
            forward = median_seconds({n: (lambda fn=fn: fn(q, k, v)) for n, fn in runnable.items()}, device, repeats)
        both = {}
        for name, fn in runnable.items():
            def fwd_bwd(fn: Callable = fn) -> tuple:
                return torch.autograd.grad(fn(*leaves), leaves, grad)
            try:
                both.update(median_seconds({name: fwd_bwd}, device, repeats))
                case_rows[name]["peak_memory_fwd_bwd_mib"] = peak_bytes(fwd_bwd, device) / 2**20
            except Exception as err:  # noqa: BLE001 - e.g. a kernel without a backward
                case_rows[name]["error_backward"] = f"{type(err).__name__}: {err}"[:300]
        for name in runnable:
            case_rows[name].update(status="ok", forward_ms=forward[name] * 1e3)
            if name in both:
                case_rows[name]["forward_backward_ms"] = both[name] * 1e3
        for mode in ("forward", "forward_backward"):
            add_ratios(case_rows, "softmax:sdpa", f"{mode}_ms", f"{mode}_ratio_vs_sdpa")
        rows += list(case_rows.values())
    return rows


def _dino_command(out: Path, sizes: Sizes, device: torch.device, steps: int) -> list[str]:
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = [str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision",
                "bf16", "--dynamo_backend", "no"] + (["--cpu"] if device.type != "cuda" else [])
    per_epoch = sizes.dino_args["data.max_samples"] // sizes.dino_args["data.batch_size_per_device"]
    args = {"config": "tiny_cpu", "output_dir": out, "data.source": "embedded", "optim.mixed_precision": "bf16",
            "model.attention": "entmax15", "optim.epochs": steps // per_epoch, "optim.warmup_epochs": 1,
            "checkpoint.every_steps": steps // 2, "checkpoint.keep_last": 0, "checkpoint.at_epoch_end": False,
            "logging.every_steps": 1, "logging.progress_bar": False, "logging.tensorboard": False,
            **sizes.dino_args}
    options = []
    for key, value in args.items():
        section, _, name = key.rpartition(".")  # a boolean is tyro's flag: --a.b or --a.no_b
        is_flag = isinstance(value, bool)
        options += [f"--{section}.{'' if value else 'no_'}{name}"] if is_flag else [f"--{key}", str(value)]
    return [*launcher, str(REPO / "training" / "dino.py"), *options]


def dino_resume_rows(device: torch.device, sizes: Sizes, work: Path) -> list[dict]:
    """Run A trains ``dino_steps`` steps (checkpoint at the middle); run B starts from A's middle checkpoint in
    its own folder and must give the same losses and the same final weights, bit for bit."""
    from safetensors.torch import load_file

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    steps, half = sizes.dino_steps, sizes.dino_steps // 2
    a, b = work / "dino_a", work / "dino_b"
    shutil.rmtree(a, ignore_errors=True)
    shutil.rmtree(b, ignore_errors=True)

    def launch(out: Path) -> tuple[float, subprocess.CompletedProcess]:
        t0 = time.perf_counter()
        proc = subprocess.run(_dino_command(out, sizes, device, steps), env=env, capture_output=True, text=True,
                              timeout=900)
        (work / f"{out.name}.log").write_text(proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"{out.name} exited {proc.returncode}: {proc.stderr[-800:]}")
        return time.perf_counter() - t0, proc

    seconds_a, _ = launch(a)
    middle = a / "checkpoints" / f"step_{half:07d}"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(middle, b / "checkpoints" / middle.name)
    seconds_b, proc_b = launch(b)

    def metrics(out: Path) -> dict[int, dict]:
        return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}

    ma, mb = metrics(a), metrics(b)
    later = [s for s in sorted(ma) if s > half]
    same_losses = later == sorted(mb) and all(ma[s]["loss"] == mb[s]["loss"] for s in later)
    wa, wb = (load_file(str(out / "final_model" / "model.safetensors")) for out in (a, b))
    same_weights = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    img_s = [ma[s]["img_per_s"] for s in sorted(ma)[len(ma) // 4:]]  # past the first quarter (start-up)
    return [{"status": "ok" if same_losses and same_weights else "failed", "steps": steps, "resumed_at": half,
             "bit_identical_losses": same_losses, "bit_identical_weights": same_weights,
             "resumed_log_line": "resumed from" in proc_b.stderr, "seconds_run": round(seconds_a, 1),
             "seconds_relaunch": round(seconds_b, 1), "train_img_per_s": sum(img_s) / max(len(img_s), 1),
             "final_loss": ma[max(ma)]["loss"], "mixed_precision": "bf16",
             "model": sizes.dino_args["model.preset"], "attention": "entmax15"}]


def _throughput(sizes: Sizes, device: torch.device, side: int, call: Callable[[torch.nn.Module], object],
                per_call: int, train: bool, **fields) -> dict[str, dict]:
    """Softmax and entmax15 (default kernels) at ``side`` px: images/s of ``call(model)`` (bf16 autocast on a GPU)
    over interleaved rounds and the peak memory of one call, ratios to softmax."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def run(attention: str) -> Callable[[], None]:
        config = EntmaxViTConfig.from_preset(sizes.preset, attention=attention, image_size=side,
                                             drop_path_rate=0.1, **sizes.overrides)
        torch.manual_seed(0)
        model = EntmaxViTModel(config).to(device).train(train)  # attn_implementation: the transform's device default

        def fn() -> None:
            with torch.inference_mode(not train), autocast:
                call(model)
        return fn

    runs = {a: run(a) for a in ("softmax", "entmax15")}
    seconds = median_seconds(runs, device, sizes.repeats)
    rows = {a: {"status": "ok", "attention": a, **fields, "step_ms": seconds[a] * 1e3, "images_per_s": per_call / s,
                "peak_memory_mib": peak_bytes(runs[a], device) / 2**20} for a, s in seconds.items()}
    return add_ratios(rows, "softmax", "images_per_s", "images_per_s_ratio_vs_softmax")


def multicrop_rows(device: torch.device, sizes: Sizes) -> list[dict]:
    """images/s and peak memory of the DINO student's multi-crop step (forward + backward)."""
    n = sizes.multicrop_images
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2 * n, 3, sizes.global_size, sizes.global_size, generator=gen).to(device),
               torch.randn(8 * n, 3, sizes.local_size, sizes.local_size, generator=gen).to(device)]
    rows = _throughput(sizes, device, sizes.global_size, lambda model: backbone_step(model, batches), n, True,
                       kernel="auto (device default)", images=n, crops=f"2x{sizes.global_size} + 8x{sizes.local_size}")
    return list(add_ratios(rows, "softmax", "peak_memory_mib", "peak_memory_ratio_vs_softmax").values())


def extraction_rows(device: torch.device, sizes: Sizes) -> list[dict]:
    rows = []
    for size, batch in sorted(sizes.extract_sizes.items()):
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        rows += list(_throughput(sizes, device, size, lambda model: model(pixels), batch, False, image_size=size,
                                 batch=batch).values())
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_check(out: Path, device: Optional[torch.device] = None, sections: Optional[list[str]] = None) -> dict:
    """Run every section (or those named); write ``out/report.json`` and ``out/report.md``; return the report."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = GPU if device.type == "cuda" else CPU_TOY
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    plan: dict[str, Callable[[], list[dict]]] = {
        "environment": lambda: environment_rows(device),
        "kernel_exactness": lambda: kernel_exactness_rows(device, sizes.exact_shape),
        "kernel_timing": lambda: kernel_timing_rows(device, sizes.timing_cases, sizes.heads, sizes.head_dim,
                                                    sizes.dtype, sizes.repeats),
        "dino_resume": lambda: dino_resume_rows(device, sizes, work),
        "multicrop_step": lambda: multicrop_rows(device, sizes),
        "feature_extraction": lambda: extraction_rows(device, sizes),
    }
    if unknown := sorted(set(sections or []) - set(plan)):
        raise ValueError(f"unknown sections {unknown}; choose from {list(plan)}")
    t0 = time.perf_counter()
    mode = "gpu" if device.type == "cuda" else "cpu-toy (sizes say nothing about GPUs)"
    report = {"check": "gpu_check", "mode": mode,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "sizes": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in asdict(sizes).items()}}
    report["sections"] = {name: _row(name, fn) for name, fn in plan.items() if not sections or name in sections}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["failed_rows"] = sum(r.get("status") == "failed" for rows in report["sections"].values() for r in rows)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(format_markdown(report))
    return report


def format_markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['mode']})", "", f"Date {report['date']}, {report['seconds']} s, "
             f"{report['failed_rows']} failed row(s).", ""]
    for name, rows in report["sections"].items():
        lines += [f"## {name}", ""]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in rows:
            cells = [(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, ""))) for k in keys]
            lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)
