"""Test-only fault injection for DINO training, by monkeypatching: the product code carries no test hooks.

    install({"nonfinite_at_step": 3}, monkeypatch.setattr)      # in-process (pytest undoes it)
    python tests/training_hooks.py '{"pause_in_checkpoint": 0.3}' --config tiny_cpu ...
        # a subprocess: installs the hooks, then runs training/dino.py as __main__ (its CLI and exit codes)

Hooks (seconds for the pauses):
    nonfinite_at_step   the loss of this optimizer step (counted from 0 in this process: the global step of a
                        fresh run without gradient accumulation) is NaN
    sleep_per_step      sleep after every loss computation, so kill tests can strike in every phase
    pause_in_checkpoint sleep while a checkpoint is half-written (its .tmp_step_* folder exists)
    pause_in_pruning    sleep after a pruned checkpoint was renamed .tmp_old_step_* and before it is deleted
    pause_in_export     sleep inside the final export, after OUTPUT_DIR/final_model was created
    compile_backend     torch.compile's backend for model.compile (e.g. "eager": compiles in seconds, still
                        wraps the student in an OptimizedModule, which is what the DDP/no_sync test needs)
    dump_rank_state     (true) append to OUTPUT_DIR/debug/rank{R}.jsonl the sample indices of every batch
                        ({"epoch", "batch", "step", "indices"}) and, when training returns, digests of the
                        teacher, loss center and student ({"final", "global_step", "*_digest"}, and
                        "student_inner": the module a compiled student wraps): the
                        sharding and rank-agreement checks of the tests
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

HOOKS = ("nonfinite_at_step", "sleep_per_step", "pause_in_checkpoint", "pause_in_pruning", "pause_in_export",
         "compile_backend", "dump_rank_state")


def _setattr(obj: Any, name: str, value: Any) -> None:
    setattr(obj, name, value)


def tensor_digest(tensors: Any) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class _RecordingData:
    """TrainingData that appends every batch's sample indices to ``file`` (everything else passes through)."""

    def __init__(self, data: Any, file: Any, state: Any) -> None:
        self._data, self._file, self._state = data, file, state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)

    def epoch(self, epoch: int, start: int = 0) -> Any:
        for batch, item in enumerate(self._data.epoch(epoch, start), start=start):
            # yielded before the step runs: state.global_step is this batch's optimizer step
            self._file.write(json.dumps({"epoch": epoch, "batch": batch, "step": self._state.global_step,
                                         "indices": item[1].tolist()}) + "\n")
            yield item


def _dumping_rank_state(dino: Any, patch: Callable[[Any, str, Any], None]) -> None:
    """Per-batch indices from ``train_one_epoch``; the digests when ``train`` returns (every invocation, also a
    resume of a finished run that trains no epoch), from what ``train`` built: the networks, the loss, the
    prepared student and the ``Run``."""
    import accelerate

    built: dict = {}

    def rank_file(run: Any) -> Path:
        folder = Path(run.cfg.output_dir) / "debug"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"rank{run.accelerator.process_index}.jsonl"

    def recording(name: str, cls: Any) -> Any:
        class Recorded(cls):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                built[name] = self
        return Recorded

    build_fn, epoch_fn, train_fn = dino.build_networks, dino.train_one_epoch, dino.train
    prepare_fn = accelerate.Accelerator.prepare

    def build_networks(*args: Any, **kwargs: Any) -> Any:
        built["student"], built["teacher"] = build_fn(*args, **kwargs)
        return built["student"], built["teacher"]

    def prepare(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = prepare_fn(self, *args, **kwargs)
        if args and args[0] is built.get("student"):  # what torch.compile wraps (DDP when distributed)
            built["prepared"] = out[0]
        return out

    def train_one_epoch(*args: Any) -> bool:
        run = args[-1]
        with open(rank_file(run), "a", buffering=1) as file:
            return epoch_fn(*args[:4], _RecordingData(args[4], file, run.state), *args[5:])

    def train(*args: Any, **kwargs: Any) -> Any:
        built.clear()
        result = train_fn(*args, **kwargs)
        run = built["run"]
        with open(rank_file(run), "a") as file:
            file.write(json.dumps({
                "final": True, "global_step": run.state.global_step,
                "student_inner": type(built["prepared"]).__name__,
                "teacher_digest": tensor_digest(built["teacher"].state_dict().values()),
                "center_digest": tensor_digest([built["loss"].center]),
                "student_digest": tensor_digest(built["student"].state_dict().values()),
            }) + "\n")
        return result

    patch(dino, "Run", recording("run", dino.Run))
    patch(dino, "DINOLoss", recording("loss", dino.DINOLoss))
    patch(dino, "build_networks", build_networks)
    patch(accelerate.Accelerator, "prepare", prepare)
    patch(dino, "train_one_epoch", train_one_epoch)
    patch(dino, "train", train)


class _PausingShutil:
    """checkpointing's ``shutil``, pausing before it deletes a pruned (renamed) checkpoint."""

    def __init__(self, seconds: float, prefix: str) -> None:
        self.seconds, self.prefix = seconds, prefix

    def __getattr__(self, name: str) -> Any:
        return getattr(shutil, name)

    def rmtree(self, path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).name.startswith(self.prefix):
            time.sleep(self.seconds)
        shutil.rmtree(path, *args, **kwargs)


def install(hooks: dict, setattr_: Optional[Callable[[Any, str, Any], None]] = None) -> None:
    """Patch the training modules (and names ``training.dino`` imported from them) with ``hooks``."""
    import entmax_vit.training.checkpointing as ckpt
    import entmax_vit.training.dino as dino
    import entmax_vit.training.dino_loss as dino_loss
    import entmax_vit.training.export as export

    patch = setattr_ or _setattr
    unknown = set(hooks) - set(HOOKS)
    if unknown:
        raise ValueError(f"unknown test hooks {sorted(unknown)}; known: {HOOKS}")

    nonfinite_at = hooks.get("nonfinite_at_step")
    sleep = float(hooks.get("sleep_per_step", 0))
    if nonfinite_at is not None or sleep > 0:
        base = dino_loss.DINOLoss

        class HookedDINOLoss(base):  # type: ignore[misc, valid-type]
            def forward(self, *args: Any, **kwargs: Any):
                loss = super().forward(*args, **kwargs)
                calls = getattr(self, "_hook_calls", 0)
                self._hook_calls = calls + 1
                if sleep > 0:
                    time.sleep(sleep)
                return loss * float("nan") if calls == nonfinite_at else loss

        for module in (dino_loss, dino):
            patch(module, "DINOLoss", HookedDINOLoss)

    def pausing(fn: Callable, seconds: float, before: Optional[Callable] = None) -> Callable:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before(*args, **kwargs)
            time.sleep(seconds)
            return fn(*args, **kwargs)
        return wrapped

    if hooks.get("pause_in_checkpoint"):  # write_manifest runs inside .tmp_step_*, before its rename
        patch(ckpt, "write_manifest", pausing(ckpt.write_manifest, float(hooks["pause_in_checkpoint"])))
    if hooks.get("pause_in_pruning"):  # between the rename to .tmp_old_step_* and its deletion
        patch(ckpt, "shutil", _PausingShutil(float(hooks["pause_in_pruning"]), ckpt.PRUNED_PREFIX))
    if hooks.get("pause_in_export"):
        def make_dir(backbone: Any, out_dir: Any, *rest: Any, **kwargs: Any) -> None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
        hooked = pausing(export.export_backbone, float(hooks["pause_in_export"]), before=make_dir)
        for module in (export, dino):
            patch(module, "export_backbone", hooked)
    if hooks.get("compile_backend"):
        import functools

        import torch

        patch(torch, "compile", functools.partial(torch.compile, backend=hooks["compile_backend"]))
    if hooks.get("dump_rank_state"):
        _dumping_rank_state(dino, patch)


if __name__ == "__main__":
    install(json.loads(sys.argv[1]))
    # the patched module's own command line: runpy.run_path(training/dino.py) would run an unpatched copy of it
    import entmax_vit.training.dino as dino_module

    dino_module.cli(sys.argv[2:])
