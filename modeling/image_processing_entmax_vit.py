"""DINO's evaluation preprocessing as a transformers image processor (PIL backend: no torchvision needed).

Resize the shorter side to 256 (bicubic), center-crop 224, scale to [0, 1], normalise with ImageNet mean/std.
Before that, every PIL image is made upright and RGB the way users expect: EXIF orientation applied, 16/32-bit
and float images rescaled to 8 bits (a plain PIL ``convert`` clips them to white), transparency composited on
white, grayscale / palette / CMYK converted. Copied to the Hub with the model (``AutoImageProcessor
.from_pretrained(repo, trust_remote_code=True)``): imports only the standard library and transformers; the
image operations are methods of the PIL images users pass in, so this file needs no Pillow import.
"""

from __future__ import annotations

from typing import Any

from transformers import BitImageProcessorPil
from transformers.image_utils import is_pil_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# EXIF orientation tag -> PIL transpose methods (Image.Transpose values: FLIP_LEFT_RIGHT 0, FLIP_TOP_BOTTOM 1,
# ROTATE_90 2, ROTATE_180 3, ROTATE_270 4, TRANSPOSE 5, TRANSVERSE 6), as PIL.ImageOps.exif_transpose applies.
_EXIF_ORIENTATION = 0x0112
_UPRIGHT_BY_ORIENTATION = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}


def upright(image: Any) -> Any:
    """The PIL image as displayed: its EXIF orientation applied (unchanged when it has none)."""
    method = _UPRIGHT_BY_ORIENTATION.get(image.getexif().get(_EXIF_ORIENTATION, 1))
    return image if method is None else image.transpose(method)


def pil_to_rgb(image: Any) -> Any:
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
        composite = rgba.copy()
        composite.paste((255, 255, 255, 255), (0, 0, *rgba.size))  # white canvas of the same size
        composite.alpha_composite(rgba)
        return composite.convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


class EntmaxViTImageProcessor(BitImageProcessorPil):
    """BitImageProcessorPil (DINO eval transform) whose RGB conversion handles EXIF orientation, 16-bit, float
    and transparent images correctly instead of clipping or ignoring them."""

    def convert_to_rgb(self, image: Any, input_data_format: Any = None) -> Any:
        if is_pil_image(image):
            image = pil_to_rgb(upright(image))
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


__all__ = ["EntmaxViTImageProcessor", "IMAGENET_MEAN", "IMAGENET_STD", "make_image_processor", "pil_to_rgb", "upright"]
