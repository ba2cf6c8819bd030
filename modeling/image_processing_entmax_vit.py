"""DINO's evaluation preprocessing as a transformers image processor (PIL backend: no torchvision needed).

Resize the shorter side to 256 (bicubic), center-crop 224, scale to [0, 1], normalise with ImageNet mean/std.
Before that, every PIL image is made upright and RGB the way users expect: EXIF orientation applied, 16/32-bit
and float images rescaled to 8 bits (a plain PIL ``convert`` clips them to white), transparency composited on
white, grayscale / palette / CMYK converted. Copied to the Hub with the model (``AutoImageProcessor
.from_pretrained(repo, trust_remote_code=True)``): imports only the standard library, transformers and Pillow
(transformers' vision backend, which image processors need anyway).
"""

from __future__ import annotations

from typing import Any

from transformers import BitImageProcessorPil
from transformers.utils import is_vision_available

if is_vision_available():
    import PIL.Image
    import PIL.ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pil_to_rgb(image: "PIL.Image.Image") -> "PIL.Image.Image":
    """Any PIL mode -> RGB, keeping the visible content: 16/32-bit integer and float images are rescaled to
    8 bits (65535 -> 255; float images in [0, 1] -> 0..255), transparency is composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        low, high = image.getextrema()
        if mode != "F":
            image = image.convert("I")
        if mode == "F" and high <= 1.0 and low >= 0.0:
            scale = 255.0  # float image in [0, 1]
        elif high > 255:
            scale = 255.0 / (65535.0 if high <= 65535 else float(high))
        else:
            scale = 1.0
        image = image.point(lambda v: v * scale + 0.5).convert("L")  # +0.5: round, not floor
        return image.convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


class EntmaxViTImageProcessor(BitImageProcessorPil):
    """BitImageProcessorPil (DINO eval transform) whose RGB conversion handles EXIF orientation, 16-bit, float
    and transparent images correctly instead of clipping or ignoring them."""

    def convert_to_rgb(self, image: Any, input_data_format: Any = None) -> Any:
        if is_vision_available() and isinstance(image, PIL.Image.Image):
            image = pil_to_rgb(PIL.ImageOps.exif_transpose(image))
        return super().convert_to_rgb(image, input_data_format=input_data_format)


def make_image_processor(resize: int = 256, crop: int = 224) -> EntmaxViTImageProcessor:
    """Image processor reproducing DINO's eval transform: Resize(resize, bicubic) + CenterCrop(crop)."""
    if crop > resize:
        raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
    return EntmaxViTImageProcessor(
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


__all__ = ["EntmaxViTImageProcessor", "IMAGENET_MEAN", "IMAGENET_STD", "make_image_processor", "pil_to_rgb"]
