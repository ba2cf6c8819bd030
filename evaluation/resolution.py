"""The resolution a model is fed by default: the one it was trained at (docs/evaluation.md, k-NN section)."""

import json
import logging
from pathlib import Path
from typing import Optional

from entmax_vit.modeling.image_processing_entmax_vit import eval_resize

logger = logging.getLogger(__name__)
DEFAULT_SIDE = 224  # a model that records no resolution at all (neither processor nor config)


def _json_file(name_or_path: str, filename: str, revision: Optional[str]) -> Optional[dict]:
    """``filename`` of a model folder, or of a Hub repository through the local cache / the Hub; None if absent."""
    from transformers.utils import cached_file

    try:
        path = cached_file(name_or_path, filename, revision=revision, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None
    return json.loads(Path(path).read_text()) if path else None


def _side(size: object) -> Optional[int]:
    """The side of an image processor's ``size`` / ``crop_size`` (an int, or a dict of shortest_edge / height)."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        for key in ("shortest_edge", "height"):
            if isinstance(size.get(key), int):
                return size[key]
    return None


def resolve_model_path(name_or_path: str) -> str:
    """A training output dir (``DIR/final_model`` inside, no ``config.json``) resolves to its final model."""
    path = Path(name_or_path)
    if not path.is_dir() or (path / "config.json").is_file():
        return name_or_path
    if (path / "final_model" / "config.json").is_file():
        return str(path / "final_model")
    if (path / "checkpoints").is_dir() or (path / "trainer_state.json").is_file():  # a run or a checkpoint
        raise ValueError(
            f"{name_or_path} is a training run or checkpoint without an exported model (no final_model: the run "
            f"stopped early or is still going). Export a checkpoint first, then evaluate the export: python "
            f"scripts/export_checkpoint.py {name_or_path} {path / 'exported'}; --model {path / 'exported'}")
    raise ValueError(f"{name_or_path} is a folder without config.json: not a save_pretrained model folder")


def own_resolution(name_or_path: str, revision: Optional[str] = None) -> tuple[int, int]:
    """(resize, crop) the model expects. EntmaxViT: its ``config.image_size`` (the training resolution);
    another model (HF ViT, DINOv2): its saved image processor's sizes, else its ``config.image_size``."""
    path = resolve_model_path(name_or_path)
    config = _json_file(path, "config.json", revision) or {}
    side = config.get("image_size")
    side = side[0] if isinstance(side, (list, tuple)) else side
    if config.get("model_type") != "entmax_vit":
        processor = _json_file(path, "preprocessor_config.json", revision) or {}
        crop = _side(processor.get("crop_size")) if processor.get("do_center_crop", True) else None
        if crop:
            return _side(processor.get("size")) or eval_resize(crop), crop
    side = int(side) if isinstance(side, int) else DEFAULT_SIDE
    return eval_resize(side), side


def eval_resolution(resize: Optional[int], crop: Optional[int], name_or_path: str, revision: Optional[str] = None,
                    what: str = "crop") -> tuple[int, int]:
    """(resize, crop) to evaluate at: the model's own (:func:`own_resolution`) where ``crop`` is None, else the
    requested one, with a warning when it differs from the model's own; ``resize`` None follows the crop."""
    own_resize, own_crop = own_resolution(name_or_path, revision)
    if crop is None:
        return (own_resize if resize is None else resize), own_crop
    if crop != own_crop:
        logger.warning("%s: evaluating at %s %d px, but the model was trained at %d px (its own resolution, the "
                       "default when %s is not given)", name_or_path, what, crop, own_crop, what)
    return (eval_resize(crop) if resize is None else resize), crop
