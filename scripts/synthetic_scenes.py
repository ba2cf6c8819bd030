"""The embedded benchmark (entmax_vit.data.synthetic_scenes): render or load it, look at it, and measure what raw
pixels alone score on it.

    python scripts/synthetic_scenes.py --preview scenes.png --pixel_baselines

Keys: ScenesConfig below (entmax_vit.data.synthetic_scenes.ScenesConfig and one option of this script).
"""

import dataclasses

import numpy as np
import torch
from PIL import Image

from entmax_vit.cli.entry_point import run
from entmax_vit.data import synthetic_scenes
from entmax_vit.data.synthetic_scenes import OBJECT_CLASSES
from entmax_vit.evaluation.knn import knn_scores_for_ks


@dataclasses.dataclass
class ScenesConfig(synthetic_scenes.ScenesConfig):
    # Print the top-1 accuracy of a k-NN and a linear probe on raw pixels (how far from chance pixels alone get).
    pixel_baselines: bool = False


def raw_pixel_baselines(scenes, size: int = 32, k: int = 20, epochs: int = 200, seed: int = 0) -> dict[str, float]:
    """Top-1 accuracy (%) of probes on raw pixels (resized to ``size`` px, standardised with train statistics):
    what the benchmark gives away. ``knn``: the project's weighted k-NN (official DINO's vote); ``linear``: the best
    validation accuracy of a full-batch softmax regression over three weight decays; ``chance``: 100 / classes."""
    def pixels(split):
        x = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)) for im in split["image"]])
        return torch.tensor(x.reshape(len(x), -1), dtype=torch.float32) / 255, torch.tensor(split["label"])

    (x_train, y_train), (x_val, y_val) = pixels(scenes["train"]), pixels(scenes["validation"])
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    classes = len(OBJECT_CLASSES)
    votes = knn_scores_for_ks(x_train, y_train, x_val, (k,), classes)[k]
    results = {"chance": 100.0 / classes, "knn": (votes.argmax(1) == y_val).float().mean().item() * 100}
    best = 0.0
    for weight_decay in (1e-4, 1e-2, 1e-1):
        torch.manual_seed(seed)
        linear = torch.nn.Linear(x_train.shape[1], classes)
        optimizer = torch.optim.Adam(linear.parameters(), lr=1e-3, weight_decay=weight_decay)
        for _ in range(epochs):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(linear(x_train), y_train).backward()
            optimizer.step()
        with torch.no_grad():
            best = max(best, (linear(x_val).argmax(1) == y_val).float().mean().item() * 100)
    return {**results, "linear": best}


def main(cfg: ScenesConfig) -> None:
    scenes = synthetic_scenes.main(cfg)
    if cfg.pixel_baselines:
        results = raw_pixel_baselines(scenes)
        print("raw-pixel probes, validation top-1 %: " + ", ".join(f"{k} {v:.1f}" for k, v in results.items()))


if __name__ == "__main__":
    run(main, ScenesConfig, "synthetic_scenes", log_format="%(message)s")
