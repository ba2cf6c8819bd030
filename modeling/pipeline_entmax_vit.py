"""The Hub pipelines: semantic segmentation with the linear probe shipped beside an EntmaxViT checkpoint, and
image feature extraction, both fed by the project's one image decoder.

Hub code: copied flat into the model repository (with its relative imports ``segmentation_head.py`` and
``image_decoding.py``) and loaded by ``pipeline("image-segmentation", model=repo, trust_remote_code=True)``
(name the task: a repository with both custom pipelines makes ``pipeline(model=repo, ...)`` raise, since
transformers cannot pick one). Every input (PIL image, path, URL, base64, bytes) is decoded by
``image_decoding.decode_image``, the decoder training and evaluation use.

``EntmaxViTFeatureExtractionPipeline`` is transformers' image-feature-extraction pipeline with that decoder in
front: the built-in one opens inputs with ``transformers.image_utils.load_image``, whose ``convert("RGB")``
clips 16-bit / float images and drops transparency before the image processor sees them. A repository serves it
for ``pipeline("image-feature-extraction", model=repo, trust_remote_code=True)`` when its config's
``custom_pipelines`` holds :data:`CUSTOM_PIPELINES`.

Output follows transformers' image-segmentation pipelines: a list with one dict per label present in the
prediction, ``{"label": str, "score": float, "mask": PIL.Image (mode "L", 0/255)}`` at the INPUT image's
size. ``score`` is the mean of the winning class probability over the label's pixels (transformers'
semantic-segmentation pipelines return None there; we give the probe's confidence instead).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import PIL.Image
import torch
import torch.nn.functional as F
from transformers import ImageFeatureExtractionPipeline, Pipeline
from transformers.image_transforms import to_pil_image
from transformers.image_utils import PILImageResampling
from transformers.utils import cached_file

from .image_decoding import ImageDecodeError, decode_image
from .segmentation_head import HEAD_CONFIG, HEAD_WEIGHTS, LinearSegmentationHead

# Used only when the repository has no image processor config (it always has one when assembled by us).
_DEFAULT_MEAN = (0.485, 0.456, 0.406)
_DEFAULT_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------
# Image input: the project's one decoder (image_decoding.py), plus http(s) URLs
# ----------------------------------------------------------------------------------------------------------
def open_image(image: Any, timeout: Optional[float] = None) -> "PIL.Image.Image":
    """PIL image, path, http(s) URL, base64 / data: URL string, raw bytes, numpy array or tensor -> upright RGB
    PIL image, decoded exactly as in training; unreadable input raises ImageDecodeError (a ValueError)."""
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


# ----------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------
class EntmaxViTSegmentationPipeline(Pipeline):
    """Linear-probe semantic segmentation on frozen EntmaxViT patch features.

    The probe (``segmentation_head.safetensors`` + ``segmentation_head.json``) is read from the model's
    repository or folder, or given as ``segmentation_head=`` (a folder or a LinearSegmentationHead).
    Each image is resized to the probe's ``input_size`` square, normalised with the image processor's
    mean/std, the logits are bilinearly upsampled to the input image's size and arg-maxed.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args: Any, segmentation_head: Union[str, os.PathLike, LinearSegmentationHead, None] = None,
                 revision: Optional[str] = None, token: Union[str, bool, None] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(segmentation_head, LinearSegmentationHead):
            head = segmentation_head
        else:
            source = segmentation_head if segmentation_head is not None else self._model_source()
            head = self._load_head(source, revision=revision, token=token)
        hidden = getattr(self.model.config, "hidden_size", None)
        if hidden is not None and head.config.hidden_size != hidden:
            raise ValueError(
                f"Segmentation head expects hidden_size {head.config.hidden_size}, the model has {hidden}"
            )
        self.head = head.to(self.device).eval()

    def _model_source(self) -> str:
        source = getattr(self.model, "name_or_path", None) or getattr(self.model.config, "_name_or_path", "")
        if not source:
            raise ValueError("Cannot locate the segmentation head: pass segmentation_head=FOLDER")
        return str(source)

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
        if any(p is None for p in paths):
            raise FileNotFoundError(f"{source} has no {HEAD_CONFIG} / {HEAD_WEIGHTS}: no segmentation probe shipped")
        return LinearSegmentationHead.load(os.path.dirname(paths[0]))

    @property
    def id2label(self) -> dict[int, str]:
        return self.head.config.id2label or {i: str(i) for i in range(self.head.config.num_labels)}

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
        # bytes -> (side, side, 3) uint8 -> (1, 3, side, side) float in [0, 1]
        pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(side, side, 3)
        pixels = pixels.permute(2, 0, 1).unsqueeze(0).float() / 255.0
        mean = getattr(self.image_processor, "image_mean", None) or _DEFAULT_MEAN
        std = getattr(self.image_processor, "image_std", None) or _DEFAULT_STD
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
        names = self.id2label
        results = []
        for label in prediction.unique().tolist():
            where = prediction == label
            mask = where.to(torch.uint8).mul(255)  # (H, W), 0/255
            mask_image = to_pil_image(mask.reshape(height, width, 1).numpy(), input_data_format="channels_last")
            results.append({
                "label": names.get(int(label), str(label)),
                "score": round(float(confidence[where].mean()), 6),
                "mask": mask_image,
            })
        return results


class EntmaxViTFeatureExtractionPipeline(ImageFeatureExtractionPipeline):
    """transformers' image-feature-extraction pipeline (tokens, ``pool=True`` for the pooled [CLS]) whose inputs
    are decoded by the project's decoder instead of ``load_image`` (see the module docstring)."""

    def preprocess(self, image: Any, timeout: Optional[float] = None, **image_processor_kwargs: Any) -> dict:
        image = open_image(image, timeout=timeout)
        return self.image_processor(image, return_tensors="pt", **image_processor_kwargs).to(self.dtype)


FEATURE_EXTRACTION_TASK = "image-feature-extraction"
SEGMENTATION_TASK = "image-segmentation"
# The ``custom_pipelines`` entries of a repository's config.json that serve both pipelines from this file.
CUSTOM_PIPELINES = {
    FEATURE_EXTRACTION_TASK: {"impl": "pipeline_entmax_vit.EntmaxViTFeatureExtractionPipeline",
                              "pt": ["AutoModel"], "type": "image"},
    SEGMENTATION_TASK: {"impl": "pipeline_entmax_vit.EntmaxViTSegmentationPipeline", "pt": ["AutoModel"],
                        "type": "image"},
}
