"""Multi-crop data speed: images/s for ONE worker, ours vs the official DINO recipe built literally.

    python scripts/bench_data.py                                   # text summary
    python scripts/bench_data.py --json                            # JSON on stdout
    python scripts/bench_data.py --rounds 10 --output_dir runs/bench --multicrop.local_crops_number 6
    python scripts/bench_data.py --dataset imagefolder:/data/imgs --num_images 64

Both pipelines get the same decoded RGB images (ours is also timed from JPEG bytes), are checked for equal
tensors under equal seeds, then timed in alternating rounds on one torch thread (medians; docs/data.md).
"""

import io
import itertools
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Optional

import numpy as np
import torch
from annotated_types import Ge
from PIL import Image

from entmax_vit.data.config_io import check_values, save_config
from entmax_vit.data.images import decode_image as to_rgb
from entmax_vit.training.multicrop import MultiCropConfig, MultiCropTransform, official_dino_transform

# scikit-image's bundled photos, roughly ImageNet-sized (300-512 px sides); grey and RGBA ones go through to_rgb.
SKIMAGE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera", "coins",
                  "colorwheel", "logo", "cat", "page", "horse")


@dataclass
class BenchConfig:
    dataset: Optional[str] = None  # None: scikit-image sample photos; else a load_image_dataset source
    split: str = "train"  # split of --dataset to read images from (streamed; unused for the samples)
    num_images: Annotated[int, Ge(1)] = 16  # distinct images per round (cycled from the source)
    rounds: int = 8  # timed rounds per pipeline (alternating); the median is reported
    warmup: int = 1  # untimed rounds of both pipelines before the timed ones
    threads: int = 1  # torch threads, as in one DataLoader worker
    seed: int = 0  # seed of torch and random before the timed rounds (the crops drawn)
    parity_checks: int = 4  # images checked for identical outputs under equal seeds (0 = skip)
    json: bool = False  # print the result as JSON instead of text
    output_dir: Optional[str] = None  # write bench_data.json, config.yaml, bench_data.png and an example here
    # The multi-crop recipe both pipelines run (training's crops section; official DINO's by default).
    multicrop: MultiCropConfig = field(default_factory=MultiCropConfig)

    def __post_init__(self) -> None:
        check_values(self)  # refuses num_images < 1 from Python too (the command line checks it on parsing)


def load_images(cfg: BenchConfig) -> list[Image.Image]:
    if cfg.dataset is None:
        import skimage.data

        pool = [to_rgb(getattr(skimage.data, name)()) for name in SKIMAGE_IMAGES[:cfg.num_images]]
    else:
        from entmax_vit.data.datasets import find_column, load_image_dataset

        ds = load_image_dataset(cfg.dataset, split=cfg.split, streaming=True)
        column = find_column(ds, "image")
        pool = [to_rgb(row[column]) for row in itertools.islice(ds, cfg.num_images)]
    if not pool:
        raise ValueError(f"no images in {cfg.dataset or 'scikit-image samples'}")
    return [pool[i % len(pool)] for i in range(cfg.num_images)]


def timed_round(fn: Callable, items: list) -> tuple[float, float]:
    """(images per CPU-second, images per wall-second) of one pass. CPU time is what one DataLoader worker spends
    per image; unlike wall time it does not change when other processes share the cores."""
    cpu, wall = time.process_time(), time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.process_time() - cpu), len(items) / (time.perf_counter() - wall)


def parity(ours: Callable, official: Callable, images: list[Image.Image], n: int) -> float:
    """Largest absolute difference between the two pipelines' tensors under equal torch/Python seeds."""
    worst = 0.0
    for i, img in enumerate(images[:n]):
        torch.manual_seed(i), random.seed(i)
        a = ours(img)
        torch.manual_seed(i), random.seed(i)
        b = official(img)
        worst = max(worst, max(float((x - y).abs().max()) for x, y in zip(a, b)))
    return worst


def main(cfg: BenchConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    images = load_images(cfg)
    ours, official = MultiCropTransform(cfg.multicrop), official_dino_transform(cfg.multicrop)
    max_diff = parity(ours, official, images, cfg.parity_checks) if cfg.parity_checks else None
    encoded = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        encoded.append(buf.getvalue())
    decode_and_crop = lambda data: ours(to_rgb(data))  # noqa: E731

    torch.manual_seed(cfg.seed), random.seed(cfg.seed)
    for _ in range(cfg.warmup):
        timed_round(official, images), timed_round(ours, images)
    rates: dict[str, list[float]] = {"official": [], "ours": [], "ours_decode": []}  # per CPU-second
    wall: dict[str, list[float]] = {k: [] for k in rates}
    for r in range(cfg.rounds):
        order = [("official", official, images), ("ours", ours, images)]
        order = order if r % 2 == 0 else order[::-1]
        for name, fn, items in order + [("ours_decode", decode_and_crop, encoded)]:
            cpu_rate, wall_rate = timed_round(fn, items)
            rates[name].append(cpu_rate)
            wall[name].append(wall_rate)
    median = {k: statistics.median(v) for k, v in rates.items()}
    sizes = np.array([im.size for im in images], dtype=float)  # (num_images, 2): width, height
    result = {
        "images": len(images), "mean_image_size": sizes.mean(0).tolist(),
        "crops_per_image": 2 + cfg.multicrop.local_crops_number, "threads": cfg.threads, "rounds": cfg.rounds,
        "official_img_per_s": median["official"], "ours_img_per_s": median["ours"],
        "ours_decode_and_crop_img_per_s": median["ours_decode"],
        "speedup": median["ours"] / median["official"], "ours_not_slower": median["ours"] >= median["official"],
        "official_img_per_wall_s": statistics.median(wall["official"]),
        "ours_img_per_wall_s": statistics.median(wall["ours"]),
        "per_round_img_per_s": rates, "per_round_img_per_wall_s": wall, "parity_max_abs_diff": max_diff,
        "source": cfg.dataset or "scikit-image samples",
    }
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "bench_data.json").write_text(json.dumps(result, indent=2))
        _plot(rates, out / "bench_data.png")
        torch.manual_seed(cfg.seed), random.seed(cfg.seed)
        _plot_crops(ours(images[0]), cfg.multicrop, out / "multicrop_example.png")
    print(json.dumps(result, indent=2)) if cfg.json else _print_text(result)
    return result


def _plot(rates: dict[str, list[float]], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: see analysis/figures.py

    names = list(rates)
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    ax.boxplot([rates[n] for n in names])
    ax.set_xticks(range(1, len(names) + 1), ["official\n(same images)", "ours\n(same images)", "ours\n(+JPEG decode)"])
    ax.set_ylabel("images / CPU-second (1 worker)")
    ax.set_title("DINO multi-crop throughput per round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_crops(crops: list[torch.Tensor], mc: MultiCropConfig, path: Path) -> None:
    """One image's crops side by side, de-normalised, at their relative sizes (a look at the augmentation)."""
    from matplotlib.figure import Figure  # no pyplot: see analysis/figures.py

    mean, std = torch.tensor(mc.mean).view(3, 1, 1), torch.tensor(mc.std).view(3, 1, 1)
    widths = [c.shape[-1] for c in crops]
    fig = Figure(figsize=(1.2 * len(crops) + 2, 2.4))
    axes = fig.subplots(1, len(crops), gridspec_kw={"width_ratios": widths}, squeeze=False)
    for k, (ax, crop) in enumerate(zip(axes[0], crops)):
        ax.imshow((crop * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())  # (H, W, 3) in [0, 1]
        ax.set_title("global " + str(k + 1) if k < 2 else f"local {k - 1}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _print_text(result: dict) -> None:
    print(f"multi-crop ({result['crops_per_image']} crops) on {result['images']} images "
          f"(mean {result['mean_image_size'][0]:.0f}x{result['mean_image_size'][1]:.0f}), "
          f"{result['threads']} thread, median of {result['rounds']} rounds, images per CPU-second of one worker")
    print(f"  official DINO Compose : {result['official_img_per_s']:8.1f} img/s")
    print(f"  ours                  : {result['ours_img_per_s']:8.1f} img/s  (x{result['speedup']:.2f})")
    print(f"  ours incl. JPEG decode: {result['ours_decode_and_crop_img_per_s']:8.1f} img/s")
    print(f"  wall clock (shared machine): official {result['official_img_per_wall_s']:.1f}, "
          f"ours {result['ours_img_per_wall_s']:.1f} img/s")
    if result["parity_max_abs_diff"] is not None:
        print(f"  max |ours - official| under equal seeds: {result['parity_max_abs_diff']:.2e}")


if __name__ == "__main__":
    from entmax_vit.cli import entry_point

    entry_point.run(main, BenchConfig, "bench_data", log_format=None)
