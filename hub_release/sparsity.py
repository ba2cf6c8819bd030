"""Measured attention sparsity for the model card: run the model on a few real photographs that ship with
scikit-image and count the exact zeros in every layer's attention probabilities."""

import logging
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from PIL import Image

from entmax_vit.modeling.attention import support_size

logger = logging.getLogger(__name__)

# Real photographs bundled with scikit-image (no download): the same ones on every machine.
SAMPLE_IMAGES: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "rocket")


@dataclass
class SparsityReport:
    """Attention sparsity averaged over images, heads and queries."""

    attention: str
    images: list[str]
    resolution: int                      # side of the (center-cropped) input
    num_tokens: int                      # keys per attention row
    zero_fraction_per_layer: list[float] = field(default_factory=list)  # share of exact zeros per row
    support_per_layer: list[float] = field(default_factory=list)        # mean non-zero keys per row

    @property
    def mean_zero_fraction(self) -> float:
        return sum(self.zero_fraction_per_layer) / max(len(self.zero_fraction_per_layer), 1)

    @property
    def mean_support(self) -> float:
        return sum(self.support_per_layer) / max(len(self.support_per_layer), 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(mean_zero_fraction=self.mean_zero_fraction, mean_support=self.mean_support)
        return d


def sample_images(names: Sequence[str] = SAMPLE_IMAGES) -> list[tuple[str, Image.Image]]:
    """(name, RGB PIL image) for each bundled scikit-image photograph that can be loaded."""
    from skimage import data as skdata

    out = []
    for name in names:
        try:
            array = getattr(skdata, name)()
        except Exception as err:  # noqa: BLE001 - a missing sample is skipped, not fatal
            logger.warning("Skipping sample image %s: %s", name, err)
            continue
        out.append((name, Image.fromarray(array).convert("RGB")))
    if not out:
        raise ValueError(f"None of the sample images {list(names)} could be loaded from scikit-image")
    return out


@torch.no_grad()
def measure_sparsity(model: torch.nn.Module, image_processor,
                     images: Optional[list[tuple[str, Image.Image]]] = None) -> SparsityReport:
    """Share of exactly-zero attention weights per layer on real images (eager attention, eval mode)."""
    images = images if images is not None else sample_images()
    model.eval()
    pixel_values = image_processor([im for _, im in images], return_tensors="pt")["pixel_values"]
    pixel_values = pixel_values.to(next(model.parameters()).dtype)
    outputs = model(pixel_values, output_attentions=True, return_dict=True)
    zero_fracs, supports = [], []
    for probs in outputs.attentions:                     # each (B, H, N, N)
        nonzero = support_size(probs).float()              # (B, H, N) keys kept per query
        supports.append(float(nonzero.mean()))
        zero_fracs.append(float(1.0 - nonzero.mean() / probs.shape[-1]))
    return SparsityReport(attention=str(model.config.attention), images=[name for name, _ in images],
                          resolution=int(pixel_values.shape[-1]), num_tokens=int(outputs.attentions[0].shape[-1]),
                          zero_fraction_per_layer=zero_fracs, support_per_layer=supports)
