"""The Hub pipelines (EntmaxViT's docs/hub.md), fed by the project's one image decoder instead of ``load_image``
(whose ``convert("RGB")`` clips 16-bit / float images and drops transparency)."""

import os
from typing import Any, Optional, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers import ImageFeatureExtractionPipeline, Pipeline
from transformers.image_transforms import to_pil_image
from transformers.image_utils import PILImageResampling
from transformers.utils import cached_file

from .image_decoding import ImageDecodeError, decode_image
from .image_processing_entmax_vit import IMAGENET_MEAN, IMAGENET_STD
from .segmentation_head import HEAD_CONFIG, HEAD_WEIGHTS, LinearSegmentationHead


def open_image(image: Any, timeout: Optional[float] = None) -> "PIL.Image.Image":
    """``decode_image`` (exactly as in training) of any input it takes, or of an http(s) URL's content."""
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        from huggingface_hub import get_session  # the Hub client's HTTP session (proxies, user agent)

        try:
            extra = {"timeout": timeout} if timeout is not None else {}
            response = get_session().get(image, follow_redirects=True, **extra)
            response.raise_for_status()
        except Exception as err:  # noqa: BLE001 - any fetch failure is an input error
            raise ImageDecodeError(f"Could not load image from {image}: {err}") from err
        return decode_image(response.content, source=image)
    return decode_image(image)


class EntmaxViTSegmentationPipeline(Pipeline):
    """Linear-probe semantic segmentation on frozen EntmaxViT patch features. The probe comes from the model's
    repository or folder, or ``segmentation_head=`` (a folder or a LinearSegmentationHead); images are resized to
    its ``input_size`` square, logits upsampled to the input's size. One ``{"label", "score", "mask"}`` per label,
    as transformers' (mask: "L", 0/255), but ``score`` is the label's mean winning probability, not None."""

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args: Any, segmentation_head: Union[str, os.PathLike, LinearSegmentationHead, None] = None,
                 revision: Optional[str] = None, token: Union[str, bool, None] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        head = segmentation_head
        if not isinstance(head, LinearSegmentationHead):
            source = (head or getattr(self.model, "name_or_path", None)
                      or getattr(self.model.config, "_name_or_path", ""))
            if not source:
                raise ValueError("Cannot locate the segmentation head: pass segmentation_head=FOLDER")
            head = self._load_head(source, revision=revision, token=token)
        hidden = getattr(self.model.config, "hidden_size", None)
        if hidden is not None and head.config.hidden_size != hidden:
            raise ValueError(f"Segmentation head expects hidden_size {head.config.hidden_size}, the model has {hidden}")
        self.head = head.to(self.device).eval()

    @staticmethod
    def _load_head(source: Union[str, os.PathLike], revision: Optional[str] = None,
                   token: Union[str, bool, None] = None) -> LinearSegmentationHead:
        source = os.fspath(source)
        if os.path.isdir(source):
            return LinearSegmentationHead.load(source)
        # A Hub id: fetch both files into the transformers cache; they land in one snapshot folder.
        try:
            paths = [cached_file(source, name, revision=revision, token=token) for name in (HEAD_CONFIG, HEAD_WEIGHTS)]
        except OSError as err:  # transformers raises OSError (EnvironmentError) for missing repos/files
            raise FileNotFoundError(f"{source}: no segmentation probe ({HEAD_CONFIG} + {HEAD_WEIGHTS}): {err}") from err
        return LinearSegmentationHead.load(os.path.dirname(paths[0]))

    def _sanitize_parameters(self, timeout: Optional[float] = None, **kwargs: Any) -> tuple[dict, dict, dict]:
        if kwargs:
            raise ValueError(f"Unknown arguments {sorted(kwargs)} for the EntmaxViT segmentation pipeline "
                             "(accepted: timeout)")
        preprocess = {"timeout": timeout} if timeout is not None else {}
        return preprocess, {}, {}

    def preprocess(self, image: Any, timeout: Optional[float] = None) -> dict[str, Any]:
        image = open_image(image, timeout=timeout)
        width, height = image.size
        side = self.head.config.input_size
        resized = image.resize((side, side), resample=PILImageResampling.BICUBIC)
        pixels = torch.from_numpy(np.array(resized)).permute(2, 0, 1).unsqueeze(0).float() / 255.0  # (1, 3, s, s)
        mean = getattr(self.image_processor, "image_mean", None) or IMAGENET_MEAN
        std = getattr(self.image_processor, "image_std", None) or IMAGENET_STD
        pixels = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        return {"pixel_values": pixels.to(self.dtype), "target_size": torch.tensor([[height, width]])}

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        pixel_values = model_inputs["pixel_values"]
        logits = self.head(self.head.extract_features(self.model, pixel_values))  # (B, K, side/p, side/p)
        return {"logits": logits, "target_size": model_inputs["target_size"]}

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, Any]]:
        logits = model_outputs["logits"].float()
        height, width = (int(v) for v in model_outputs["target_size"].reshape(-1, 2)[0])
        logits = F.interpolate(logits[:1], size=(height, width), mode="bilinear", align_corners=False)[0]
        probs = logits.softmax(dim=0)             # (K, H, W)
        confidence, prediction = probs.max(dim=0)  # (H, W) each
        names = self.head.config.id2label
        results = []
        for label in prediction.unique().tolist():
            where = prediction == label
            mask = where.to(torch.uint8).mul(255).reshape(height, width, 1).numpy()  # 0/255
            results.append({"label": names.get(int(label), str(label)),
                            "score": round(float(confidence[where].mean()), 6),
                            "mask": to_pil_image(mask, input_data_format="channels_last")})
        return results


class EntmaxViTFeatureExtractionPipeline(ImageFeatureExtractionPipeline):
    """transformers' image-feature-extraction pipeline (``pool=True``: the pooled [CLS]) with our decoder."""

    def preprocess(self, image: Any, timeout: Optional[float] = None, **image_processor_kwargs: Any) -> dict:
        image = open_image(image, timeout=timeout)
        return self.image_processor(image, return_tensors="pt", **image_processor_kwargs).to(self.dtype)


FEATURE_EXTRACTION_TASK = "image-feature-extraction"
SEGMENTATION_TASK = "image-segmentation"
# The ``custom_pipelines`` entries of a repository's config.json that serve both pipelines from this file.
CUSTOM_PIPELINES = {task: {"impl": f"pipeline_entmax_vit.{cls.__name__}", "pt": ["AutoModel"], "type": "image"}
                    for task, cls in ((FEATURE_EXTRACTION_TASK, EntmaxViTFeatureExtractionPipeline),
                                      (SEGMENTATION_TASK, EntmaxViTSegmentationPipeline))}
