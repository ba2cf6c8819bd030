"""Check an assembled repository the way a Hub user meets it: load it with trust_remote_code in a fresh Python
process that cannot see this project, run the model, the processor and both pipelines (remote_check.py), and
compare every output with the source model run in this process."""

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from . import remote_check

logger = logging.getLogger(__name__)


@dataclass
class VerificationReport:
    """What the fresh process loaded and how far its outputs are from the source model's."""

    model_class: str
    segmenter_class: Optional[str]
    extractor_class: Optional[str] = None
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    segments_match: Optional[bool] = None
    remote_segments: list = field(default_factory=list)


def standalone_env(local_kernels: Optional[dict[str, Path]] = None) -> dict[str, str]:
    """Environment of a ``python -S`` interpreter that has this one's site-packages but not the project (no .pth
    files run, so no editable install; no PYTHONPATH), is offline, and maps Hub kernel ids to local folders
    through ``LOCAL_KERNELS``. TRITON_INTERPRET is dropped: kernels then pick by device as a user's would."""
    site_dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "LOCAL_KERNELS")}
    env.update(PYTHONPATH=os.pathsep.join(site_dirs), HF_HUB_OFFLINE="1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if local_kernels:
        env["LOCAL_KERNELS"] = ":".join(f"{repo}={Path(path).resolve()}" for repo, path in local_kernels.items())
    return env


def run_standalone(args: Sequence[str], cwd: Path, what: str,
                   local_kernels: Optional[dict[str, Path]] = None) -> subprocess.CompletedProcess:
    """Run ``python -S ARGS`` in :func:`standalone_env`; RuntimeError naming ``what`` when it fails."""
    proc = subprocess.run([sys.executable, "-S", *args], env=standalone_env(local_kernels), cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed in a fresh process:\n{proc.stderr[-4000:]}")
    return proc


def run_remote(folder: Path, images: list[Image.Image]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Run remote_check.py on ``folder`` in a fresh interpreter (cwd = an empty temp dir): its report and tensors."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="entmax_vit_verify_") as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        for i, image in enumerate(images):
            image.save(work / "images" / f"{i:02d}.png")
        shutil.copyfile(remote_check.__file__, work / "check_remote.py")
        run_standalone(["check_remote.py", str(Path(folder).resolve()), str(work)], work,
                       "Loading the assembled repository")
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


def verify_repository(folder: Path, model, processor, images: list[Image.Image], head=None,
                      atol: float = 1e-4) -> VerificationReport:
    """Compare the fresh-process outputs of ``folder`` with ``model``'s on ``images`` plus the
    :func:`odd_variants` of the first; raise RuntimeError on any mismatch."""
    images = list(images) + odd_variants(images[0])
    remote_report, remote = run_remote(folder, images)
    from entmax_vit.modeling.pipeline_entmax_vit import (EntmaxViTFeatureExtractionPipeline,
                                                         EntmaxViTSegmentationPipeline)

    model.eval()
    extractor = EntmaxViTFeatureExtractionPipeline(model=model, image_processor=processor)
    segmenter = (EntmaxViTSegmentationPipeline(model=model, image_processor=processor, segmentation_head=head)
                 if head is not None else None)
    local, local_segments = remote_check.collect(model, processor, extractor, segmenter, images)
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
        labels_here = [[s["label"] for s in img] for img in local_segments]
        labels_there = [[s["label"] for s in img] for img in remote_report["segments"]]
        seg_keys = [k for k in local if k.startswith("seg_")]
        same_masks = all(k in remote and torch.equal(remote[k], local[k]) for k in seg_keys)
        segments_match = labels_here == labels_there and same_masks
        if not segments_match:
            problems.append(f"segmentation differs: labels {labels_here} here vs {labels_there} in the fresh process")
        if remote_report["segmenter_class"] != "EntmaxViTSegmentationPipeline":
            problems.append(f"pipeline('image-segmentation', model=repo) gave {remote_report['segmenter_class']}, "
                            "not EntmaxViTSegmentationPipeline")
    if remote_report["extractor_class"] != "EntmaxViTFeatureExtractionPipeline":
        problems.append(f"pipeline('image-feature-extraction', model=repo) gave {remote_report['extractor_class']}, "
                        "not EntmaxViTFeatureExtractionPipeline (inputs would skip the project's decoder)")
    if not remote_report["model_class"].startswith("transformers_modules."):
        problems.append(f"AutoModel gave {remote_report['model_class']}, not the repository's own code")
    if problems:
        raise RuntimeError("The assembled repository does not reproduce the source model:\n- " + "\n- ".join(problems))
    logger.info("Fresh-process check passed: %s", {k: f"{v:.1e}" for k, v in diffs.items()})
    return VerificationReport(
        model_class=remote_report["model_class"], segmenter_class=remote_report["segmenter_class"],
        extractor_class=remote_report["extractor_class"], max_abs_diff=diffs, segments_match=segments_match,
        remote_segments=remote_report["segments"])
