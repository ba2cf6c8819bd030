"""DINO multi-crop augmentation: exactly official DINO's ``DataAugmentationDINO`` (main_dino.py), faster.

The random numbers come from the same generators in the same order (torch for crop/flip/jitter/grayscale, Python
``random`` for blur/solarize), so equal seeds give :func:`official_dino_transform`'s tensors; the speed-ups keep
the same uint8 math (docs/data.md; ``scripts/bench_data.py`` measures them).
"""

import random
from collections import namedtuple
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Optional

import numpy as np
import torch
from annotated_types import Ge, Interval
from PIL import Image, ImageFilter, ImageOps, ImageStat
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from entmax_vit.data.config_io import check_values
from entmax_vit.data.images import decode_image
from entmax_vit.modeling import IMAGENET_MEAN, IMAGENET_STD

Probability = Annotated[float, Interval(ge=0, le=1)]


@dataclass
class MultiCropConfig:
    """Multi-crop augmentation; defaults are official DINO's (main_dino.py, DataAugmentationDINO)."""

    global_crops_scale: tuple[float, float] = (0.4, 1.0)  # area share of the image kept by a global crop
    local_crops_scale: tuple[float, float] = (0.05, 0.4)  # area share kept by a local crop; DINO (0.05, 0.4)
    local_crops_number: Annotated[int, Ge(0)] = 8  # 0 disables multi-crop (2 global crops only)
    global_size: Annotated[int, Ge(1)] = 224  # side of the 2 global crops in px; also the model's image_size
    local_size: Annotated[int, Ge(1)] = 96  # side of the local crops in px (DINO 96)
    aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop ratio range (torchvision default)
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # resampling of every crop's resize (DINO bicubic)
    flip_p: Probability = 0.5  # probability of a horizontal flip, per crop (DINO 0.5)
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    color_jitter_p: Probability = 0.8  # probability that a crop is color-jittered at all (DINO 0.8)
    grayscale_p: Probability = 0.2  # probability that a crop becomes grayscale (DINO 0.2)
    blur_radius: tuple[float, float] = (0.1, 2.0)  # PIL GaussianBlur radius drawn uniformly in this range
    global1_blur_p: Probability = 1.0  # Gaussian blur probability of global crop 1 (DINO 1.0)
    global2_blur_p: Probability = 0.1  # Gaussian blur probability of global crop 2 (DINO 0.1)
    local_blur_p: Probability = 0.5  # Gaussian blur probability of each local crop (DINO 0.5)
    global2_solarize_p: Probability = 0.2  # solarize probability of global crop 2 (the only one solarized)
    solarize_threshold: Annotated[int, Interval(ge=0, le=256)] = 128  # pixels >= it are inverted (PIL default)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # RGB mean of the normalisation, in [0, 1] (ImageNet)
    std: tuple[float, float, float] = IMAGENET_STD  # RGB std of the normalisation, > 0 (ImageNet)

    def __post_init__(self) -> None:
        check_values(self)  # bounds and choices for Python callers too (tyro checks the command line)
        for name in ("global_crops_scale", "local_crops_scale", "aspect_ratio", "blur_radius"):
            (lo, hi), top = getattr(self, name), 1.0 if name.endswith("scale") else float("inf")
            if not 0.0 < lo <= hi <= top:
                raise ValueError(f"{name} must satisfy 0 < min <= max{' <= 1' * (top == 1)}, got {(lo, hi)}")
        if min(self.color_jitter) < 0 or self.color_jitter[3] > 0.5:
            raise ValueError(f"color_jitter must be >= 0 with hue <= 0.5, got {self.color_jitter}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")


CropSpec = namedtuple("CropSpec", "name size scale blur_p solarize_p")


def crop_specs(cfg: MultiCropConfig) -> list[CropSpec]:
    """[global1, global2, local1..localN] as official DINO defines them."""
    specs = [
        CropSpec("global1", cfg.global_size, tuple(cfg.global_crops_scale), cfg.global1_blur_p, 0.0),
        CropSpec("global2", cfg.global_size, tuple(cfg.global_crops_scale), cfg.global2_blur_p, cfg.global2_solarize_p),
    ]
    specs += [CropSpec(f"local{i + 1}", cfg.local_size, tuple(cfg.local_crops_scale), cfg.local_blur_p, 0.0)
              for i in range(cfg.local_crops_number)]
    return specs


class MultiCropTransform:
    """PIL image (or anything :func:`decode_image` accepts) -> list of normalised float tensors (3, H, W)."""

    def __init__(self, cfg: Optional[MultiCropConfig] = None) -> None:
        self.cfg = cfg or MultiCropConfig()
        self.specs = crop_specs(self.cfg)
        self.resample = Image.Resampling[self.cfg.interpolation.upper()]
        # Factor ranges exactly as torchvision's ColorJitter stores them (None = that op is off); hue is last.
        self.jitter_ranges = [None if x <= 0 else (-x, x) if i == 3 else (max(0.0, 1 - x), 1 + x)
                              for i, x in enumerate(self.cfg.color_jitter)]
        # Fused ToTensor + Normalize: (x / 255 - mean) / std == (x - 255 mean) / (255 std).
        self._shift = torch.tensor([255.0 * m for m in self.cfg.mean]).view(3, 1, 1)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.cfg.std]).view(3, 1, 1)

    def __call__(self, image: Any) -> list[torch.Tensor]:
        if not (isinstance(image, Image.Image) and image.mode == "RGB"):
            image = decode_image(image)
        return [self._crop(image, spec) for spec in self.specs]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg})"

    # One crop; the random draws follow the official Compose order (see module docstring).
    def _crop(self, img: Image.Image, spec: CropSpec) -> torch.Tensor:
        cfg = self.cfg
        top, left, height, width = T.RandomResizedCrop.get_params(img, list(spec.scale), list(cfg.aspect_ratio))
        out = img.crop((left, top, left + width, top + height)).resize((spec.size, spec.size), self.resample)
        if torch.rand(1) < cfg.flip_p:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if not cfg.color_jitter_p < torch.rand(1):  # RandomApply: skip when p < u
            out = self._color_jitter(out)
        if torch.rand(1) < cfg.grayscale_p:
            out = out.convert("L")  # blur and solarize act per channel: do them once, expand to RGB at the end
        if random.random() <= spec.blur_p:
            out = out.filter(ImageFilter.GaussianBlur(radius=random.uniform(*cfg.blur_radius)))
        if spec.solarize_p > 0 and random.random() < spec.solarize_p:
            out = ImageOps.solarize(out, cfg.solarize_threshold)
        arr = torch.from_numpy(np.array(out))  # (H, W, 3) or (H, W) uint8; a writable copy
        if arr.ndim == 2:
            arr = arr.unsqueeze(-1).expand(-1, -1, 3)
        return arr.permute(2, 0, 1).float().sub_(self._shift).mul_(self._scale)  # (3, H, W), fused ToTensor+Normalize

    def _color_jitter(self, img: Image.Image) -> Image.Image:
        order, *factors = T.ColorJitter.get_params(*self.jitter_ranges)
        ops = (_adjust_brightness, _adjust_contrast, TF.adjust_saturation, _adjust_hue)
        for fn_id in order.tolist():
            if factors[fn_id] is not None:
                img = ops[fn_id](img, factors[fn_id])
        return img


def _blend_lut(constant: int, factor: float) -> list[int]:
    """PIL's Image.blend(constant image, img, factor) per uint8 value: trunc(clip(c + f (x - c))) in float32."""
    v = np.arange(256, dtype=np.float32)
    c, f = np.float32(constant), np.float32(factor)
    return np.trunc(np.clip(c + f * (v - c), 0, 255)).astype(np.uint8).tolist()


def _point(img: Image.Image, lut: list[int]) -> Image.Image:
    """``img.point(lut)`` for an integer LUT, skipping Pillow's per-entry ``round()`` (10% of the pipeline)."""
    try:
        return img._new(img.im.point(lut, None))
    except (AttributeError, TypeError):  # Pillow internals changed: the public call gives the same result
        return img.point(lut)


def _adjust_brightness(img: Image.Image, factor: float) -> Image.Image:
    """ImageEnhance.Brightness (blend with black) as one lookup table: same values, no second image."""
    return _point(img, _blend_lut(0, factor) * len(img.getbands()))


def _adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
    """ImageEnhance.Contrast (blend with the rounded mean grey level) as one lookup table."""
    mean = int(ImageStat.Stat(img.convert("L")).mean[0] + 0.5)
    return _point(img, _blend_lut(mean, factor) * len(img.getbands()))


def _adjust_hue(img: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision's PIL hue shift (uint8 add with wrap-around on H of HSV), as a 256-entry lookup table."""
    shift = int(np.int32(hue_factor * 255).astype(np.uint8))  # truncate, then wrap as uint8
    h, s, v = img.convert("HSV").split()
    h = _point(h, [(i + shift) & 255 for i in range(256)])
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def official_dino_transform(cfg: Optional[MultiCropConfig] = None) -> Callable[[Image.Image], list[torch.Tensor]]:
    """Official DINO's DataAugmentationDINO as torchvision v1 Compose pipelines (reference for tests/bench)."""
    cfg = cfg or MultiCropConfig()
    interp = InterpolationMode(cfg.interpolation)
    b, c, s, h = cfg.color_jitter
    flip_and_color_jitter = T.Compose([
        T.RandomHorizontalFlip(p=cfg.flip_p),
        T.RandomApply([T.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=cfg.color_jitter_p),
        T.RandomGrayscale(p=cfg.grayscale_p),
    ])
    normalize = T.Compose([T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])

    def blur(p: float) -> Callable[[Image.Image], Image.Image]:  # DINO utils.GaussianBlur
        return lambda img: img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*cfg.blur_radius))) \
            if random.random() <= p else img

    def solarize(p: float) -> Callable[[Image.Image], Image.Image]:  # DINO utils.Solarization
        return lambda img: ImageOps.solarize(img, cfg.solarize_threshold) if random.random() < p else img

    pipelines = []
    for spec in crop_specs(cfg):
        steps = [T.RandomResizedCrop(spec.size, scale=spec.scale, ratio=cfg.aspect_ratio, interpolation=interp),
                 flip_and_color_jitter, blur(spec.blur_p)]
        if spec.name == "global2":
            steps.append(solarize(spec.solarize_p))
        pipelines.append(T.Compose(steps + [normalize]))
    return lambda img: [p(img) for p in pipelines]

