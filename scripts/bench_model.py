"""Benchmark EntmaxViT-S/16 end to end: training step time and peak memory, feature-extraction throughput.

    python scripts/bench_model.py             # full run
    python scripts/bench_model.py --quick     # fewer repeats, smaller multi-crop step (a few minutes)
    python scripts/bench_model.py --json      # print the results JSON instead of the table

A training step is forward + backward of the backbone (train mode, drop path 0.1 as the DINO student), no
optimizer step. Variants are "attention:kernel" (softmax:sdpa is the baseline), in interleaved rounds; what is
measured: docs/performance.md (Benchmarks). Writes OUTPUT_DIR/bench_model.json and the resolved config.
"""

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from entmax_vit.evaluation.speed import backbone_step as training_step, median_seconds, peak_bytes
from entmax_vit.jobs.benchmarks import add_ratios, start_benchmark, write_benchmark
from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel

log = logging.getLogger("bench_model")


@dataclass
class BenchModelConfig:
    preset: str = "vit_small_patch16"  # architecture preset of EntmaxViTConfig.from_preset (ViT-S/16)
    batch_size: int = 8  # images of the 224 training step
    image_size: int = 224  # side of the training step's images and of the multi-crop step's global crops, in px
    multicrop_images: int = 2  # images of the multi-crop step (0 = skip it); each gives 2 global + 8 local crops
    global_crops: int = 2  # global crops per image of the multi-crop step (DINO: 2)
    local_crops: int = 8  # local crops per image of the multi-crop step (DINO: 8)
    local_size: int = 96  # side of the local crops in px (DINO: 96)
    drop_path_rate: float = 0.1  # stochastic depth of the timed training steps (the DINO student's 0.1)
    # Variants timed, "attention:kernel": softmax | entmax15 | sparsemax | entmax_bisect with a kernel of
    # modeling.attention (sdpa, eager, tiled, compiled, triton on CUDA); every one gets the same weights.
    variants: list[str] = field(default_factory=lambda: [
        "softmax:sdpa", "softmax:eager", "entmax15:tiled", "entmax15:eager", "entmax15:compiled"])
    baseline: str = "softmax:sdpa"  # ratios are to this variant
    repeats: int = 5  # timed rounds (median reported)
    warmup: int = 1  # untimed rounds (the compiled variant compiles here)
    memory: bool = True  # measure the peak memory of one training step per eager variant
    extract_batch: int = 16  # images per feature-extraction call (EntmaxViT vs transformers ViTModel)
    extract_repeats: int = 5  # timed rounds of every feature-extraction measurement (median reported)
    # feature extraction per variant, ratio to the baseline: image size -> batch (issue 13's cases)
    extract_sizes: dict[int, int] = field(default_factory=lambda: {224: 8, 448: 2, 896: 1})
    memory_sizes: list[int] = field(default_factory=lambda: [448])  # training-step peak memory (batch 2) here
    inference_memory_size: int = 896  # inference peak memory (batch 1) at this size; 0 = skip
    threads: Optional[int] = None  # torch.set_num_threads; None = torch default
    quick: bool = False  # 3 repeats, multi-crop step with 1 image, no 896 px, no compiled variant
    json: bool = False  # print the results JSON to stdout instead of the table
    seed: int = 0  # seed of the weights and the random input images
    output_dir: str = "outputs/bench_model"  # bench_model.json and the resolved config


CPU = torch.device("cpu")


def build_variants(cfg: BenchModelConfig, image_size: Optional[int] = None) -> dict[str, EntmaxViTModel]:
    """One model per variant, all with the same weights."""
    models: dict[str, EntmaxViTModel] = {}
    state = None
    for variant in cfg.variants:
        attention, _, kernel = variant.partition(":")
        if not kernel:
            raise ValueError(f"variant {variant!r}: expected 'attention:kernel', e.g. 'entmax15:tiled'")
        config = EntmaxViTConfig.from_preset(cfg.preset, attention=attention, drop_path_rate=cfg.drop_path_rate,
                                             image_size=image_size or cfg.image_size)
        model = EntmaxViTModel._from_config(config, attn_implementation=kernel).train()
        if state is None:
            state = model.state_dict()
        else:
            model.load_state_dict(state)
        models[variant] = model
    if cfg.baseline not in models:
        raise ValueError(f"baseline {cfg.baseline!r} is not among the variants {cfg.variants}")
    return models


def timed(cfg: BenchModelConfig, fns: dict[str, Callable], repeats: int, key: str) -> dict[str, dict]:
    """Median milliseconds (``key``) of each function over interleaved rounds, and its ratio to the baseline."""
    ms = {name: {key: s * 1e3} for name, s in median_seconds(fns, CPU, repeats, warmup=cfg.warmup).items()}
    return add_ratios(ms, cfg.baseline, key, "ratio_vs_baseline")


def peak_step_memory(model: EntmaxViTModel, batches: list[torch.Tensor]) -> int:
    """Peak bytes of one training step: weights + inputs + the step's peak of new tensors."""
    base = sum(p.numel() * p.element_size() for p in model.parameters())
    base += sum(b.numel() * b.element_size() for b in batches)
    return base + peak_bytes(lambda: training_step(model, batches), CPU)


def _measurable(name: str) -> bool:
    """Peak memory is tracked through the dispatcher; torch.compile'd kernels allocate outside it."""
    return not name.endswith("compiled")


def extraction_by_size(cfg: BenchModelConfig, gen: torch.Generator) -> dict:
    """Per image size: feature-extraction ms of every variant, ratio to the baseline; at ``inference_memory_size``
    also the peak memory of one forward."""
    results = {}
    for size, batch in tqdm(sorted(cfg.extract_sizes.items()), desc="feature extraction"):
        models = {name: m.eval() for name, m in build_variants(cfg, size).items()}
        pixels = torch.randn(batch, 3, size, size, generator=gen)
        with torch.inference_mode():
            case = timed(cfg, {name: (lambda m=m: m(pixels)) for name, m in models.items()}, cfg.extract_repeats, "ms")
            if size == cfg.inference_memory_size:
                for name in filter(_measurable, models):
                    case[name]["peak_memory_bytes"] = peak_bytes(lambda: models[name](pixels), CPU)
                add_ratios(case, cfg.baseline, "peak_memory_bytes", "peak_memory_ratio_vs_baseline")
        results[f"{batch} x {size}px"] = case
    return results


def training_memory_by_size(cfg: BenchModelConfig, gen: torch.Generator) -> dict:
    results = {}
    for size in cfg.memory_sizes:
        batches = [torch.randn(2, 3, size, size, generator=gen)]
        case = {name: {"peak_memory_bytes": peak_step_memory(model, batches)}
                for name, model in build_variants(cfg, size).items() if _measurable(name)}
        results[f"2 x {size}px"] = add_ratios(case, cfg.baseline, "peak_memory_bytes", "peak_memory_ratio_vs_baseline")
    return results


def feature_throughput(cfg: BenchModelConfig, gen: torch.Generator) -> dict:
    """images/s, eval + no_grad: EntmaxViT softmax (sdpa) vs transformers ViTModel of the same size (sdpa)."""
    from transformers import ViTConfig, ViTModel

    ours_cfg = EntmaxViTConfig.from_preset(cfg.preset, attention="softmax", image_size=cfg.image_size)
    ours = EntmaxViTModel._from_config(ours_cfg, attn_implementation="sdpa").eval()
    hf_cfg = ViTConfig(hidden_size=ours_cfg.hidden_size, num_hidden_layers=ours_cfg.num_hidden_layers,
                       num_attention_heads=ours_cfg.num_attention_heads, intermediate_size=ours_cfg.intermediate_size,
                       image_size=cfg.image_size, patch_size=ours_cfg.patch_size, qkv_bias=True,
                       layer_norm_eps=ours_cfg.layer_norm_eps)
    hf = ViTModel._from_config(hf_cfg, attn_implementation="sdpa", add_pooling_layer=False).eval()
    pixels = torch.randn(cfg.extract_batch, 3, cfg.image_size, cfg.image_size, generator=gen)
    runs: dict[str, Callable] = {"entmax_vit_softmax_sdpa": lambda: ours(pixels).last_hidden_state,
                                 "transformers_vit_sdpa": lambda: hf(pixel_values=pixels).last_hidden_state}
    with torch.inference_mode():
        seconds = median_seconds(runs, CPU, cfg.extract_repeats)
    out = {name: {"images_per_s": cfg.extract_batch / s} for name, s in seconds.items()}
    out["entmax_vit_over_transformers"] = (
        out["entmax_vit_softmax_sdpa"]["images_per_s"] / out["transformers_vit_sdpa"]["images_per_s"])
    return out


def format_report(record: dict) -> str:
    lines = []
    for case, results in record["training_step"].items():
        lines.append(f"\ntraining step, {case}")
        lines.append(f"{'variant':22s} {'step ms':>9s} {'x ' + record['config']['baseline']:>16s} {'peak MB':>9s}")
        for name, r in results.items():
            mem = r.get("peak_memory_bytes")
            mem_s = f"{mem / 2**20:9.1f}" if mem else f"{'-':>9s}"
            lines.append(f"{name:22s} {r['step_ms']:9.1f} {r['ratio_vs_baseline']:16.3f} {mem_s}")
    for title, key, field_ in [("feature extraction", "extraction_by_size", "ms"),
                               ("training-step peak memory", "training_memory_by_size", None)]:
        for case, results in record[key].items():
            lines.append(f"\n{title}, {case}")
            for name, r in results.items():
                value = f"{r[field_]:9.1f} ms {r['ratio_vs_baseline']:7.3f}x" if field_ else ""
                if r.get("peak_memory_bytes"):
                    ratio = r.get("peak_memory_ratio_vs_baseline", 0)
                    value += f" {r['peak_memory_bytes'] / 2**20:9.1f} MB {ratio:6.3f}x"
                lines.append(f"{name:26s} {value}")
    fe = record["feature_extraction"]
    lines.append("\nfeature extraction (images/s)")
    for name in ("entmax_vit_softmax_sdpa", "transformers_vit_sdpa"):
        lines.append(f"{name:26s} {fe[name]['images_per_s']:8.2f}")
    lines.append(f"{'EntmaxViT / transformers':26s} {fe['entmax_vit_over_transformers']:8.3f}")
    return "\n".join(lines)


def main(cfg: BenchModelConfig) -> dict:
    if cfg.quick:
        cfg.repeats = min(cfg.repeats, 3)
        cfg.extract_repeats = min(cfg.extract_repeats, 3)
        cfg.multicrop_images = min(cfg.multicrop_images, 1)
        cfg.extract_sizes = {s: b for s, b in cfg.extract_sizes.items() if s < 896}
        cfg.inference_memory_size = 0 if cfg.inference_memory_size >= 896 else cfg.inference_memory_size
        cfg.variants = [v for v in cfg.variants if not v.endswith("compiled")]
    start_benchmark("model", cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    models = build_variants(cfg)

    side = cfg.image_size
    cases = {f"batch {cfg.batch_size} x {side}": [torch.randn(cfg.batch_size, 3, side, side, generator=gen)]}
    if cfg.multicrop_images > 0:
        n, local = cfg.multicrop_images, cfg.local_size
        cases[f"multi-crop {n} img x ({cfg.global_crops}x{side} + {cfg.local_crops}x{local})"] = [
            torch.randn(n * cfg.global_crops, 3, side, side, generator=gen),
            torch.randn(n * cfg.local_crops, 3, local, local, generator=gen)]
    training: dict[str, dict] = {}
    for case, batches in cases.items():
        log.info("training step: %s", case)
        steps = {name: (lambda m=m: training_step(m, batches)) for name, m in models.items()}
        results = timed(cfg, steps, cfg.repeats, "step_ms")
        if cfg.memory:
            for name in filter(_measurable, models):
                results[name]["peak_memory_bytes"] = peak_step_memory(models[name], batches)
            add_ratios(results, "softmax:eager", "peak_memory_bytes", "peak_memory_ratio_vs_softmax_eager")
        training[case] = results
    log.info("feature extraction throughput")
    results = {"training_step": training, "extraction_by_size": extraction_by_size(cfg, gen),
               "training_memory_by_size": training_memory_by_size(cfg, gen),
               "feature_extraction": feature_throughput(cfg, gen)}
    return write_benchmark("model", cfg, results, "medians of interleaved rounds; ratios measured in the same run",
                           format_report)


if __name__ == "__main__":
    from entmax_vit.cli import entry_point

    entry_point.run(main, BenchModelConfig, "bench_model")
