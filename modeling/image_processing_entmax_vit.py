"""DINO's evaluation preprocessing as a transformers image processor (PIL backend: no torchvision needed): shorter
side to 256 (bicubic), center-crop 224, ImageNet mean/std. PIL images get the pixels training saw
(``decode_image``); numpy / torch inputs keep transformers' conventions."""

from typing import Any, Optional

from transformers import BitImageProcessorPil
from transformers.image_utils import is_pil_image

from .image_decoding import decode_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EntmaxViTImageProcessor(BitImageProcessorPil):
    """BitImageProcessorPil converting PIL images with the project's decoder, not PIL's clipping ``convert("RGB")``."""

    def convert_to_rgb(self, image: Any, input_data_format: Any = None) -> Any:
        if is_pil_image(image):
            image = decode_image(image)
        return super().convert_to_rgb(image, input_data_format=input_data_format)


def eval_resize(crop: int) -> int:
    """DINO's eval resize for a crop side: the 256/224 ratio of Resize(256) + CenterCrop(224), e.g. 73 for 64 px."""
    return round(crop * 256 / 224)


def make_image_processor(resize: Optional[int] = None, crop: int = 224) -> EntmaxViTImageProcessor:
    """DINO's eval transform: Resize(resize, bicubic) + CenterCrop(crop); ``crop`` is the model's resolution
    (``config.image_size``), ``resize`` defaults to :func:`eval_resize` of it (256 for 224)."""
    resize = eval_resize(crop) if resize is None else resize
    if crop > resize:
        raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
    return EntmaxViTImageProcessor(
        do_resize=True, size={"shortest_edge": resize}, resample=3,  # PIL bicubic
        do_center_crop=True, crop_size={"height": crop, "width": crop}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True)
