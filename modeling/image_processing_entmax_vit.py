"""DINO's evaluation preprocessing as a transformers image processor (PIL backend: no torchvision needed).

Resize the shorter side to 256 (bicubic), center-crop 224, scale to [0, 1], normalise with ImageNet mean/std,
convert any mode (grayscale, RGBA, CMYK, palette) to RGB. Saved as ``preprocessor_config.json`` it reloads
through ``AutoImageProcessor`` (BitImageProcessor, falling back to its PIL backend without torchvision).
"""

from __future__ import annotations

from transformers import BitImageProcessorPil

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_image_processor(resize: int = 256, crop: int = 224) -> BitImageProcessorPil:
    """Image processor reproducing DINO's eval transform: Resize(resize, bicubic) + CenterCrop(crop)."""
    if crop > resize:
        raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
    return BitImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": resize},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": crop, "width": crop},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "make_image_processor"]
