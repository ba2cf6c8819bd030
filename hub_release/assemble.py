"""Assemble a Hub repository folder from a trained EntmaxViT folder: weights, config with auto_map, the flat
modeling files, the image processor, the custom pipelines (feature extraction; segmentation and its head when a
head is given), the results files and a generated README.md card; then verify it in a fresh process."""

import copy
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from entmax_vit.evaluation.results import load_results, weights_fingerprint
from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel, make_image_processor
from entmax_vit.modeling.pipeline_entmax_vit import (CUSTOM_PIPELINES, FEATURE_EXTRACTION_TASK, SEGMENTATION_TASK,
                                                     EntmaxViTFeatureExtractionPipeline)
from entmax_vit.modeling.segmentation_head import LinearSegmentationHead

from .card import PLACEHOLDER_OWNER, CardInputs, build_card, public_config
from .sparsity import SparsityReport, measure_sparsity, sample_images
from .upload import prepare_folder, repository_files
from .verify import VerificationReport, verify_repository

logger = logging.getLogger(__name__)

TRAINING_CONFIG = "training_config.yaml"
TRAINING_PROGRESS = "training_progress.json"  # training/export.py's PROGRESS_FILE: an export of a checkpoint
CONVERSION_CONFIG = "conversion_config.yaml"  # written by conversion/convert.py (keys: source, input, ...)
# Extra Auto classes whose weights a bare-model checkpoint fills completely.
EXTRA_AUTO_MAP = {"AutoBackbone": "modeling_entmax_vit.EntmaxViTBackbone"}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class AssembledRepository:
    folder: Path
    files: list[str]
    metadata: dict
    sparsity: Optional[SparsityReport] = None
    verification: Optional[VerificationReport] = None
    results: list[dict] = field(default_factory=list)


def is_hub_id(value: object) -> bool:
    return isinstance(value, str) and bool(_HUB_ID.fullmatch(value)) and not Path(value).exists()


def find_base_model(model_dir: Path, config: dict) -> Optional[str]:
    """The Hub id a converted checkpoint came from: config.json's ``base_model`` / ``converted_from``, else the
    ``input`` of the conversion_config.yaml conversion/convert.py wrote."""
    conversion = model_dir / CONVERSION_CONFIG
    converted = (yaml.safe_load(conversion.read_text()) or {}) if conversion.is_file() else {}
    converted = converted if isinstance(converted, dict) else {}  # not a mapping: not ours, nothing to read
    candidates = [config.get("base_model"), config.get("converted_from"), converted.get("input")]
    return next((c for c in candidates if is_hub_id(c)), None)


def find_datasets(training_config: Optional[dict], results: Sequence[dict]) -> list[str]:
    """Hub dataset ids named by the training config (any key containing 'dataset' or 'source') and results."""
    found: list[str] = []

    def walk(node: object, key: str = "") -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, str) and ("dataset" in key or "source" in key) and is_hub_id(node):
            found.append(node)

    walk(training_config or {})
    found += [r["dataset"]["name"] for r in results if is_hub_id(r["dataset"]["name"])]
    return list(dict.fromkeys(found))


def _check_model_dir(model_dir: Path) -> dict:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{model_dir} is not a model folder: no config.json (expected a save_pretrained folder, "
                         "e.g. the final_model/ of a training run)")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != EntmaxViTConfig.model_type:
        raise ValueError(f"{config_path}: model_type is {config.get('model_type')!r}, expected "
                         f"{EntmaxViTConfig.model_type!r}")
    if not any(model_dir.glob("*.safetensors")):
        raise ValueError(f"{model_dir} has no .safetensors weights")
    return config


def check_results_match(records: Sequence[dict], paths: Sequence[str | Path], fingerprint: str,
                        model_dir: Path) -> None:
    """Refuse a results file not measured on these weights: its ``model.weights_sha256`` (written by every
    evaluation, ``evaluation.results.weights_fingerprint``) must equal the model's."""
    for path, record in zip(paths, records):
        recorded = record["model"].get("weights_sha256")
        if recorded is None:
            raise ValueError(f"{path}: no weights fingerprint (model.weights_sha256), so whether it was measured on "
                             f"{model_dir} cannot be checked: evaluate the model again")
        if recorded != fingerprint:
            raise ValueError(f"{path}: measured on other weights (sha256 {recorded[:12]}...) than {model_dir} "
                             f"({fingerprint[:12]}...): results of another model do not go in its card")


def model_processor(model_dir: Path, config: EntmaxViTConfig):
    """The image processor to ship: the folder's own when it crops to the model's training resolution
    (``config.image_size``); otherwise (none saved, or one written at 224 px by an older export) DINO's eval
    preprocessing at that resolution, with a warning."""
    side = config.image_size
    if (model_dir / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
        crop = (getattr(processor, "crop_size", None) or {}).get("height")
        if crop in (None, side) or not getattr(processor, "do_center_crop", True):
            return processor
        logger.warning("%s: its image processor crops to %s px but the model was trained at %d px; shipping DINO's "
                       "eval preprocessing at %d px", model_dir, crop, side, side)
    else:
        logger.warning("%s has no preprocessor_config.json: shipping DINO's eval preprocessing at %d px",
                       model_dir, side)
    return make_image_processor(crop=side)


def assemble_repository(model_dir: str | Path, output_dir: str | Path, *, repo_id: Optional[str] = None,
                        results: Sequence[str | Path] = (), seg_head: Optional[str | Path] = None,
                        license: str = "apache-2.0", measure: bool = True, verify: bool = True,
                        overwrite: bool = False) -> AssembledRepository:
    """Build the repository folder ``output_dir`` from ``model_dir``; optionally verify it in a fresh process."""
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    raw_config = _check_model_dir(model_dir)
    records = [load_results(p) for p in results]        # ValueError on a wrong schema
    head = LinearSegmentationHead.load(seg_head) if seg_head is not None else None

    model = EntmaxViTModel.from_pretrained(model_dir).eval()
    if head is not None and head.config.hidden_size != model.config.hidden_size:
        raise ValueError(f"Segmentation head {seg_head} expects hidden_size {head.config.hidden_size}, "
                         f"the model has {model.config.hidden_size}")
    check_results_match(records, results, weights_fingerprint(model), model_dir)
    processor = model_processor(model_dir, model.config)
    prepare_folder(output_dir, overwrite)

    # -- weights, config (auto_map), modeling files, processor, pipeline code ------------------------------
    from transformers.dynamic_module_utils import custom_object_save

    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    # pipeline_entmax_vit.py and its relative imports, copied the way Pipeline.save_pretrained copies them.
    custom_object_save(EntmaxViTFeatureExtractionPipeline, output_dir)
    if head is not None:
        head.save(output_dir)
    config_path = output_dir / "config.json"
    saved = json.loads(config_path.read_text())
    # Written here, not by Pipeline.save_pretrained: a registered pipeline class records only its own task
    # (transformers keeps one task per class in _registered_impl), and we ship two. Feature extraction always (our
    # decoder in front of transformers', so 16-bit / float / transparent inputs reach the processor intact).
    tasks = [FEATURE_EXTRACTION_TASK] + ([SEGMENTATION_TASK] if head is not None else [])
    saved["custom_pipelines"] = {task: copy.deepcopy(CUSTOM_PIPELINES[task]) for task in tasks}
    saved.setdefault("auto_map", {}).update({k: v for k, v in EXTRA_AUTO_MAP.items() if k not in saved["auto_map"]})
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")

    # -- provenance: training config and results ------------------------------------------------------------
    training_config = progress = conversion = None
    if (model_dir / CONVERSION_CONFIG).is_file():
        conversion = yaml.safe_load((model_dir / CONVERSION_CONFIG).read_text()) or None
    if (model_dir / TRAINING_CONFIG).is_file():
        # without the run's local paths (output_dir, absolute data folders): they mean nothing on the Hub
        training_config = public_config(yaml.safe_load((model_dir / TRAINING_CONFIG).read_text()) or {}) or None
        (output_dir / TRAINING_CONFIG).write_text(yaml.safe_dump(training_config, sort_keys=False))
    if (model_dir / TRAINING_PROGRESS).is_file():
        shutil.copyfile(model_dir / TRAINING_PROGRESS, output_dir / TRAINING_PROGRESS)
        progress = json.loads((model_dir / TRAINING_PROGRESS).read_text())
    records = [public_config(r) for r in records]  # the copies and the card without local paths
    for i, record in enumerate(records):
        dataset = re.sub(r"[^\w.-]+", "_", record["dataset"]["name"])
        target = output_dir / "results" / f"{i:02d}_{record['task']}_{dataset}.json"
        target.parent.mkdir(exist_ok=True)
        target.write_text(json.dumps(record, indent=2, default=str) + "\n")

    # -- card -----------------------------------------------------------------------------------------------
    sparsity = measure_sparsity(model, processor) if measure else None
    files = repository_files(output_dir) + ["README.md"]
    card = build_card(CardInputs(
        repo_id=repo_id or f"{PLACEHOLDER_OWNER}/{output_dir.resolve().name}", repo_id_is_placeholder=not repo_id,
        training_progress=progress, model_config=model.config.to_dict(),
        num_parameters=sum(p.numel() for p in model.parameters()), sparsity=sparsity, results=records,
        training_config=training_config, segmentation_head=head.config.to_dict() if head is not None else None,
        base_model=find_base_model(model_dir, raw_config), conversion=conversion, license=license,
        datasets=find_datasets(training_config, records), files=files,
    ))
    card.save(output_dir / "README.md")
    assembled = AssembledRepository(folder=output_dir, files=sorted(files), metadata=card.data.to_dict(),
                                    sparsity=sparsity, results=records)
    if verify:
        images = [im for _, im in sample_images()[:2]]
        assembled.verification = verify_repository(output_dir, model, processor, images, head=head)
    return assembled
