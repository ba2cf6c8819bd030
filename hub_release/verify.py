"""Check an assembled repository the way a Hub user meets it: load it with trust_remote_code in a fresh Python
process that cannot see this project, run the model, the processor and both pipelines, and compare every
output with the source model run in this process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

# Runs in the fresh process. argv: REPO_FOLDER WORK_DIR. Reads WORK_DIR/images/*.png, writes WORK_DIR/remote.json
# and WORK_DIR/remote.safetensors. It must not import entmax_vit: the last lines assert that.
REMOTE_SCRIPT = r'''
import json, sys
from pathlib import Path
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModel, pipeline

repo, work = sys.argv[1], Path(sys.argv[2])
images = [Image.open(p) for p in sorted((work / "images").glob("*.png"))]
processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
tensors, report = {}, {"model_class": type(model).__module__ + "." + type(model).__name__,
                       "processor_class": type(processor).__name__}
with torch.no_grad():
    inputs = processor(images, return_tensors="pt")
    out = model(**inputs)
tensors["pixel_values"] = inputs["pixel_values"].contiguous()
tensors["last_hidden_state"] = out.last_hidden_state.contiguous()
tensors["pooler_output"] = out.pooler_output.contiguous()
extractor = pipeline("image-feature-extraction", model=repo, trust_remote_code=True)
report["extractor_class"] = type(extractor).__name__
for i, image in enumerate(images):
    tensors[f"pipe_tokens_{i}"] = torch.tensor(extractor(image))
    tensors[f"pipe_pooled_{i}"] = torch.tensor(extractor(image, pool=True))
config = json.loads((Path(repo) / "config.json").read_text())
if "image-segmentation" in config.get("custom_pipelines", {}):
    segmenter = pipeline("image-segmentation", model=repo, trust_remote_code=True)
    report["segmenter_class"] = type(segmenter).__name__
    report["segments"] = []
    for i, image in enumerate(images):
        segments = segmenter(image)
        report["segments"].append([{"label": s["label"], "score": s["score"], "size": list(s["mask"].size),
                                    "mode": s["mask"].mode} for s in segments])
        for j, s in enumerate(segments):
            tensors[f"seg_{i}_{j}"] = torch.frombuffer(bytearray(s["mask"].tobytes()), dtype=torch.uint8)
save_file(tensors, str(work / "remote.safetensors"))
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "entmax_vit")
report["leaked_modules"] = leaked
(work / "remote.json").write_text(json.dumps(report))
if leaked:
    raise SystemExit(f"the project leaked into the fresh process: {leaked}")
'''


@dataclass
class VerificationReport:
    """What the fresh process loaded and how far its outputs are from the source model's."""

    model_class: str
    segmenter_class: Optional[str]
    extractor_class: Optional[str] = None
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    segments_match: Optional[bool] = None
    remote_segments: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def fresh_env() -> dict[str, str]:
    """Environment for a process that cannot import the project from the source tree (PYTHONPATH emptied)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ""
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def run_remote(folder: Path, images: list[Image.Image], timeout: float = 600) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load ``folder`` in a fresh interpreter (cwd = an empty temp dir) and return its report and tensors."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="entmax_vit_verify_") as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        for i, image in enumerate(images):
            image.save(work / "images" / f"{i:02d}.png")
        script = work / "check_remote.py"
        script.write_text(REMOTE_SCRIPT)
        proc = subprocess.run(
            [sys.executable, str(script), str(Path(folder).resolve()), str(work)],
            cwd=work, env=fresh_env(), capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"Loading the assembled repository in a fresh process failed:\n{proc.stderr[-4000:]}")
        return json.loads((work / "remote.json").read_text()), load_file(str(work / "remote.safetensors"))


def odd_variants(image: Image.Image) -> list[Image.Image]:
    """An RGBA copy of ``image`` (alpha ramping 0 -> 255 left to right) and a 16-bit grey one (x * 257): inputs
    that transformers' own load_image would flatten (alpha dropped) or clip (16-bit -> white), so the fresh
    process's outputs match ours only if the repository's pipelines decode with the project's decoder."""
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    alpha = np.rint(np.linspace(0, 255, width))[None, :].repeat(height, axis=0).astype(np.uint8)
    grey16 = np.asarray(image.convert("L")).astype(np.uint16) * 257
    return [Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), Image.fromarray(grey16)]


@torch.no_grad()
def local_outputs(model, processor, images: list[Image.Image], head=None) -> tuple[dict[str, torch.Tensor], list]:
    """The same outputs from the source model and the project's own classes, in this process."""
    from entmax_vit.modeling.pipeline_entmax_vit import (EntmaxViTFeatureExtractionPipeline,
                                                         EntmaxViTSegmentationPipeline)

    model.eval()
    inputs = processor(images, return_tensors="pt")
    out = model(**inputs)
    tensors = {"pixel_values": inputs["pixel_values"], "last_hidden_state": out.last_hidden_state,
               "pooler_output": out.pooler_output}
    extractor = EntmaxViTFeatureExtractionPipeline(model=model, image_processor=processor)
    for i, image in enumerate(images):
        tensors[f"pipe_tokens_{i}"] = torch.tensor(extractor(image))
        tensors[f"pipe_pooled_{i}"] = torch.tensor(extractor(image, pool=True))
    segments = []
    if head is not None:
        segmenter = EntmaxViTSegmentationPipeline(model=model, image_processor=processor, segmentation_head=head)
        for i, image in enumerate(images):
            result = segmenter(image)
            segments.append([{"label": s["label"], "score": s["score"], "size": list(s["mask"].size),
                              "mode": s["mask"].mode} for s in result])
            for j, s in enumerate(result):
                tensors[f"seg_{i}_{j}"] = torch.frombuffer(bytearray(s["mask"].tobytes()), dtype=torch.uint8)
    return tensors, segments


def verify_repository(folder: Path, model, processor, images: list[Image.Image], head=None,
                      atol: float = 1e-4) -> VerificationReport:
    """Compare the fresh-process outputs of ``folder`` with ``model``'s on ``images`` plus the
    :func:`odd_variants` of the first; raise RuntimeError on any mismatch."""
    images = list(images) + odd_variants(images[0])
    remote_report, remote = run_remote(folder, images)
    local, local_segments = local_outputs(model, processor, images, head)
    problems = []
    diffs = {}
    for key, value in local.items():
        if key.startswith("seg_"):
            continue
        if key not in remote or remote[key].shape != value.shape:
            problems.append(f"{key}: shape {tuple(value.shape)} here vs "
                            f"{tuple(remote[key].shape) if key in remote else 'missing'} in the fresh process")
            continue
        diffs[key] = float((remote[key].float() - value.float()).abs().max())
        if diffs[key] > atol:
            problems.append(f"{key}: max |diff| {diffs[key]:.2e} > {atol}")
    segments_match = None
    if head is not None:
        remote_segments = remote_report.get("segments", [])
        labels_here = [[s["label"] for s in img] for img in local_segments]
        labels_there = [[s["label"] for s in img] for img in remote_segments]
        seg_keys = [k for k in local if k.startswith("seg_")]
        same_masks = all(k in remote and torch.equal(remote[k], local[k]) for k in seg_keys)
        segments_match = labels_here == labels_there and same_masks
        if not segments_match:
            problems.append(f"segmentation differs: labels {labels_here} here vs {labels_there} in the fresh process")
        if remote_report.get("segmenter_class") != "EntmaxViTSegmentationPipeline":
            problems.append(f"pipeline('image-segmentation', model=repo) gave {remote_report.get('segmenter_class')}, "
                            "not EntmaxViTSegmentationPipeline")
    if remote_report.get("extractor_class") != "EntmaxViTFeatureExtractionPipeline":
        problems.append(f"pipeline('image-feature-extraction', model=repo) gave {remote_report.get('extractor_class')}, "
                        "not EntmaxViTFeatureExtractionPipeline (inputs would skip the project's decoder)")
    if not remote_report["model_class"].startswith("transformers_modules."):
        problems.append(f"AutoModel gave {remote_report['model_class']}, not the repository's own code")
    if problems:
        raise RuntimeError("The assembled repository does not reproduce the source model:\n- " + "\n- ".join(problems))
    report = VerificationReport(
        model_class=remote_report["model_class"], segmenter_class=remote_report.get("segmenter_class"),
        extractor_class=remote_report.get("extractor_class"),
        max_abs_diff=diffs, segments_match=segments_match, remote_segments=remote_report.get("segments", []),
    )
    logger.info("Fresh-process check passed: %s", {k: f"{v:.1e}" for k, v in diffs.items()})
    return report
