"""The outputs verify.py compares: model, processor and pipelines run on a few images. verify.py calls
:func:`collect` on the project's own classes and runs this file as a script in a fresh process on the assembled
folder, so it imports nothing from the project.

    python remote_check.py REPO_FOLDER WORK_DIR    # reads WORK_DIR/images/*.png, writes remote.json/.safetensors
"""

import json
import sys
from pathlib import Path

import torch


@torch.no_grad()
def collect(model, processor, extractor, segmenter, images) -> tuple[dict[str, torch.Tensor], list]:
    """Named output tensors and, with a segmenter, each image's segments (label, score, mask size and mode)."""
    inputs = processor(images, return_tensors="pt")
    out = model(**inputs)
    tensors = {"pixel_values": inputs["pixel_values"], "last_hidden_state": out.last_hidden_state,
               "pooler_output": out.pooler_output}
    for i, image in enumerate(images):
        tensors[f"pipe_tokens_{i}"] = torch.tensor(extractor(image))
        tensors[f"pipe_pooled_{i}"] = torch.tensor(extractor(image, pool=True))
    segments = []
    for i, image in enumerate(images if segmenter is not None else []):
        result = segmenter(image)
        segments.append([{"label": s["label"], "score": s["score"], "size": list(s["mask"].size),
                          "mode": s["mask"].mode} for s in result])
        for j, s in enumerate(result):
            tensors[f"seg_{i}_{j}"] = torch.frombuffer(bytearray(s["mask"].tobytes()), dtype=torch.uint8)
    return tensors, segments


if __name__ == "__main__":
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor, AutoModel, pipeline

    repo, work = sys.argv[1], Path(sys.argv[2])
    images = [Image.open(p) for p in sorted((work / "images").glob("*.png"))]
    processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
    model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
    extractor = pipeline("image-feature-extraction", model=repo, trust_remote_code=True)
    segmenter = None
    if "image-segmentation" in json.loads((Path(repo) / "config.json").read_text()).get("custom_pipelines", {}):
        segmenter = pipeline("image-segmentation", model=repo, trust_remote_code=True)
    tensors, segments = collect(model, processor, extractor, segmenter, images)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(work / "remote.safetensors"))
    leaked = sorted(m for m in sys.modules if m.split(".")[0] == "entmax_vit")
    (work / "remote.json").write_text(json.dumps({
        "model_class": type(model).__module__ + "." + type(model).__name__,
        "processor_class": type(processor).__name__, "extractor_class": type(extractor).__name__,
        "segmenter_class": segmenter and type(segmenter).__name__, "segments": segments, "leaked_modules": leaked}))
    if leaked:
        raise SystemExit(f"the project leaked into the fresh process: {leaked}")
