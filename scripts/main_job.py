"""The main job (README quick start, first command).

For now: build a tiny EntmaxViT, run a real photograph (shipped with scikit-image) through DINO's evaluation
preprocessing and the model, save it as a Hub-ready folder and reload it with AutoModel(trust_remote_code).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
from skimage import data as skdata
from PIL import Image

from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel, make_image_processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="outputs/main_job")
    args = parser.parse_args()
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    config = EntmaxViTConfig.from_preset("vit_tiny_patch16", num_hidden_layers=4, attention="entmax15")
    model = EntmaxViTModel(config).eval()
    processor = make_image_processor()
    image = Image.fromarray(skdata.astronaut())
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, output_attentions=True)
    zeros = (outputs.attentions[-1] == 0).float().mean().item()
    print(f"[main_job] features {tuple(outputs.last_hidden_state.shape)}; last-layer attention exact zeros {zeros:.1%}")

    model_dir = out / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    # Reload in a fresh process that does not import this project, as a Hub user would.
    check = (
        "import torch, sys; from transformers import AutoModel, AutoImageProcessor; from PIL import Image; "
        "from skimage import data; "
        f"m = AutoModel.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval(); "
        f"p = AutoImageProcessor.from_pretrained({str(model_dir)!r}); "
        "x = p(images=Image.fromarray(data.astronaut()), return_tensors='pt'); "
        "o = m(**x).pooler_output; torch.save(o, sys.argv[1])"
    )
    ref = out / "reloaded_pooler.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", check, str(ref)], check=True, env=env, cwd=out)
    reloaded = torch.load(ref, weights_only=True)
    diff = (reloaded - outputs.pooler_output).abs().max().item()
    print(f"[main_job] saved {model_dir}; reloaded with AutoModel(trust_remote_code=True): max |diff| = {diff:.2e}")
    if diff > 1e-5:
        raise SystemExit("reloaded model does not reproduce the outputs")


if __name__ == "__main__":
    main()
