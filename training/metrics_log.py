"""Training metrics: always a JSONL file (one flushed line per log step), optionally Accelerate trackers
(tensorboard), a loss-curve PNG, and the attention-support metric of the last block."""

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch

from entmax_vit.modeling.attention import support_size


class MetricsLog:
    """Appends ``{"step": ..., **metrics}`` lines to ``path`` (main process only) and forwards them to
    ``accelerator.log`` when trackers are on. A fresh run (``resume_step`` None) starts without the file; a resumed
    one drops the lines written after its checkpoint by the interrupted run, so the file reads like one
    uninterrupted run."""

    def __init__(self, path: str | os.PathLike, accelerator: Any, use_trackers: bool,
                 resume_step: Optional[int]) -> None:
        self.path, self.accelerator, self.use_trackers = Path(path), accelerator, use_trackers
        if not accelerator.is_main_process:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            kept = [line for line in read_metrics(self.path) if line.get("step", -1) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(line) + "\n" for line in kept))
            os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
                f.flush()
        if self.use_trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Parsed JSONL lines; a torn last line (killed while writing) is ignored; no file (a run stopped before
    its first log step) reads as no lines."""
    out = []
    for line in Path(path).read_text().splitlines() if Path(path).is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def plot_loss_curve(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Optional[Path]:
    """Loss (and learning rate) against the optimizer step as a PNG; None when there is nothing to plot."""
    rows = [r for r in read_metrics(metrics_path) if "loss" in r and math.isfinite(r["loss"])]
    if not rows:
        return None
    from matplotlib.figure import Figure  # no pyplot: see analysis/figures.py

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue", label="DINO loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss", color="tab:blue")
    if all("lr" in r for r in rows):
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:orange", alpha=0.6)
        ax2.set_ylabel("learning rate", color="tab:orange")
    ax.set_title("DINO training loss")
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=120)
    return png_path


@torch.no_grad()
def attention_support_size(backbone: torch.nn.Module, pixel_values: torch.Tensor) -> float:
    """Mean number of non-zero attention weights per query row in the last block, averaged over images,
    heads and rows. Softmax gives the full token count; entmax/sparsemax give fewer (exact zeros).

    The probabilities are taken from the last attention module's own output by a forward hook, not from
    ``outputs.attentions``: transformers' output capture (a context variable its hooks read) stops recording
    for every model once another one has run under torch.compile (the compiled student, ``model.compile``)."""
    attention_class = type(backbone)._can_record_outputs["attentions"]
    last = [m for m in backbone.modules() if isinstance(m, attention_class)][-1]
    captured: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda module, args, output: captured.append(output[1]))
    was_training = backbone.training
    backbone.eval()
    try:
        backbone(pixel_values=pixel_values, output_attentions=True)
    finally:
        handle.remove()
        backbone.train(was_training)
    return support_size(captured[-1]).float().mean().item()  # (B, H, N, N) -> the project's one definition

