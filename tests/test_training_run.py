"""End-to-end DINO training on tiny generated images: loss falls, export loads, resume equals an uninterrupted
run, changed configs are refused by name, a non-finite loss stops the run, SIGTERM and SIGKILL lose no work."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entmax_vit.cli.config import parse_config
from entmax_vit.training.checkpointing import list_checkpoints, read_trainer_state
from entmax_vit.training.config import DinoConfig
from entmax_vit.training.dino import CONFIG_DIR, NonFiniteLossError, main
from training_hooks import install
from training_helpers import (
    RANK_STATE, REPO, env, final_digests, losses, make_image_dataset, run_dino, start_dino, tiny_args,
)

pytestmark = pytest.mark.usefixtures("rank_state")  # in-process runs dump per-rank indices and digests


def cfg_of(args: list[str]) -> DinoConfig:
    return parse_config(DinoConfig, args, preset_dir=CONFIG_DIR)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_dataset(tmp_path_factory.mktemp("dino_data"), num_images=16)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    """The reference run: 2 epochs x 4 steps, checkpoints every 2 steps, in-process."""
    out = tmp_path_factory.mktemp("dino_a") / "run"
    assert main(cfg_of(tiny_args(data, out))) == out / "final_model"
    return out


def test_run_writes_outputs_and_loadable_export(uninterrupted, tmp_path):
    out = uninterrupted
    assert sorted(losses(out)) == list(range(1, 9)) and all(math.isfinite(v) for v in losses(out).values())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "lr", "wd", "momentum", "teacher_temp", "grad_norm", "img_per_s",
                "attention_support_last_block"):
        assert key in rows[-1], key
    # entmax-1.5 in the teacher's last block: support <= tokens (16 patches + [CLS] at 32 px / patch 8)
    assert 1 <= rows[-1]["attention_support_last_block"] <= 17
    assert rows[0]["lr"] == 0.0 and rows[-1]["momentum"] > rows[0]["momentum"]
    assert (out / "loss_curve.png").stat().st_size > 0 and (out / "training_config.yaml").is_file()
    export = out / "final_model"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "training_config.yaml",
                 "modeling_entmax_vit.py"):
        assert (export / name).is_file(), name
    # the exported weights are the teacher's (the final checkpoint's teacher.safetensors)
    teacher = load_file(str(list_checkpoints(out / "checkpoints")[-1] / "teacher.safetensors"))
    exported = load_file(str(export / "model.safetensors"))
    for key, value in exported.items():
        torch.testing.assert_close(value, teacher[f"teacher.backbone.{key}"])
    # loadable through the Hub path in a fresh process that does not import the project
    code = ("import sys, torch; from transformers import AutoModel, AutoImageProcessor;"
            "m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval();"
            "assert type(m).__module__.startswith('transformers_modules'), type(m).__module__;"
            "assert m.config.attention == 'entmax15' and m.config.drop_path_rate == 0.0;"
            "AutoImageProcessor.from_pretrained(sys.argv[1], trust_remote_code=True);"
            "print(m(pixel_values=torch.randn(1, 3, 32, 32)).pooler_output.shape)")
    proc = subprocess.run([sys.executable, "-c", code, str(export)], cwd=tmp_path, capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.Size([1, 32])" in proc.stdout


def test_student_distills_a_fixed_teacher(data, tmp_path):
    """With the teacher EMA and the center frozen (momentum 1), the whole loop (multi-crop data, forward,
    backward, clipping, AdamW) must pull the student towards the teacher: the loss falls."""
    out = tmp_path / "run"
    args = tiny_args(data, out, **{"data.batch_size_per_device": 8, "optim.epochs": 6, "optim.warmup_epochs": 1,
                                   "optim.lr_base": 0.01, "optim.freeze_last_layer": 0,
                                   "optim.momentum_teacher": 1.0, "loss.center_momentum": 1.0,
                                   "checkpoint.every_steps": 0, "checkpoint.at_epoch_end": False,
                                   "logging.attention_support_images": 0})
    main(cfg_of(args))
    curve = [losses(out)[s] for s in sorted(losses(out))]
    assert len(curve) == 12
    first, last = sum(curve[:3]) / 3, sum(curve[-3:]) / 3
    assert last < 0.9 * first, curve


def test_bf16_accumulation_and_gradient_checkpointing(data, tmp_path):
    """Mixed precision, gradient accumulation (the lr scales with the accumulated batch) and gradient
    checkpointing run through Accelerate on CPU."""
    out = tmp_path / "run"
    args = tiny_args(data, out, **{"optim.mixed_precision": "bf16", "optim.gradient_accumulation_steps": 2,
                                   "model.gradient_checkpointing": True, "optim.epochs": 1, "optim.warmup_epochs": 0,
                                   "logging.tensorboard": True})
    main(cfg_of(args))
    curve = losses(out)
    assert sorted(curve) == [1, 2] and all(math.isfinite(v) for v in curve.values())  # 4 batches / 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == pytest.approx(0.0005 * 8 / 256)  # total batch 4 x 2 accumulation steps
    assert list((out / "dino").glob("events.out.tfevents.*")), "no tensorboard events written"


def test_resume_equals_uninterrupted(uninterrupted, data, tmp_path):
    out = tmp_path / "run"
    assert main(cfg_of(tiny_args(data, out, **{"debug.max_steps": 3}))) is None  # stops mid-epoch 0
    assert read_trainer_state(list_checkpoints(out / "checkpoints")[-1])["global_step"] == 3
    main(cfg_of(tiny_args(data, out)))  # --checkpoint.resume auto is the default
    assert losses(out) == losses(uninterrupted)
    assert final_digests(out) | {"global_step": 8} == final_digests(uninterrupted)
    a, b = load_file(str(out / "final_model/model.safetensors")), load_file(str(uninterrupted / "final_model/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_of_a_finished_run_trains_nothing_and_keeps_its_state(uninterrupted, data, tmp_path):
    """Launching a finished run again (a kill after its last checkpoint, or a repeated command) resumes at the
    end: no step is trained again, the export and the end-of-run state are the same."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "debug")
    assert main(cfg_of(tiny_args(data, out))) == out / "final_model"
    assert losses(out) == losses(uninterrupted)
    assert final_digests(out) == final_digests(uninterrupted)  # global_step 8 and the same weights
    rows = [json.loads(line) for line in (out / "debug" / "rank0.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "indices" in r]  # no batch drawn


def test_streaming_needs_epoch_length(data, tmp_path):
    with pytest.raises(ValueError, match="streaming_num_samples"):
        main(cfg_of(tiny_args(data, tmp_path / "run", **{"data.streaming": True})))


@pytest.mark.slow
def test_streaming_run_resumes_exactly(data, tmp_path):
    """A streamed dataset (this rank's shard, buffer-shuffled per epoch) trains and resumes bit-exactly."""
    extra = {"data.streaming": True, "data.streaming_num_samples": 16}
    main(cfg_of(tiny_args(data, tmp_path / "a", **extra)))
    main(cfg_of(tiny_args(data, tmp_path / "b", **extra, **{"debug.max_steps": 3})))
    main(cfg_of(tiny_args(data, tmp_path / "b", **extra)))
    assert sorted(losses(tmp_path / "a")) == list(range(1, 9))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert final_digests(tmp_path / "a")["teacher_digest"] == final_digests(tmp_path / "b")["teacher_digest"]


def test_resume_with_breaking_config_change_names_keys(uninterrupted, data, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    bad = tiny_args(data, out, **{"model.backbone_overrides": "{hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2}",
                                  "optim.epochs": 3})
    saved_config = (out / "training_config.yaml").read_text()
    with pytest.raises(ValueError, match=r"model\.backbone_overrides\.hidden_size: 32 -> 64.*optim\.epochs: 2 -> 3"):
        main(cfg_of(bad))
    assert (out / "training_config.yaml").read_text() == saved_config  # a refused config leaves no trace
    # allowed changes (logging interval, checkpoint cadence) pass: the finished run just re-exports
    assert main(cfg_of(tiny_args(data, out, **{"logging.every_steps": 2, "checkpoint.every_steps": 3}))) is not None
    fresh = tiny_args(data, out, **{"checkpoint.resume": ""})
    with pytest.raises(ValueError, match="already holds checkpoints"):
        main(cfg_of(fresh))


def test_nonfinite_loss_stops_with_message(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    install({"nonfinite_at_step": 3}, monkeypatch.setattr)
    with pytest.raises(NonFiniteLossError, match=r"Loss is nan at step 3 \(epoch 0, batch 3\).*step_0000002"):
        main(cfg_of(tiny_args(data, out)))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000002"]
    assert not (out / "final_model").exists()


@pytest.mark.slow
def test_cli_nonfinite_exit_code(data, tmp_path):
    proc = run_dino(tiny_args(data, tmp_path / "run"), check=False, hooks={"nonfinite_at_step": 0})
    assert proc.returncode == 3 and "Loss is nan at step 0" in proc.stderr


@pytest.mark.slow
def test_sigterm_writes_checkpoint_and_exits_cleanly(data, tmp_path):
    out = tmp_path / "run"
    proc = start_dino(tiny_args(data, out, **{"optim.epochs": 50, "checkpoint.every_steps": 1000,
                                              "checkpoint.at_epoch_end": False}), hooks={"sleep_per_step": 0.3})
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file() or len(losses(out)) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
    stderr = proc.stderr.read()
    assert rc == 0, stderr[-3000:]
    ckpts = list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 1 and read_trainer_state(ckpts[0])["global_step"] >= 2
    assert "received signal" in stderr and not (out / "final_model").exists()


def chaos(data: Path, out: Path, reference: Path, kills: int, seed: int) -> None:
    """SIGKILL at random moments and while checkpoints are written, pruned or exported, resume each time:
    equal to ``reference``."""
    from chaos import compare, kill_and_resume

    args = tiny_args(data, out, **{"checkpoint.every_steps": 1, "checkpoint.keep_last": 2})
    report = compare(out, reference, kill_and_resume(args, kills=kills, seed=seed, env=env()))
    assert report.identical, report
    assert any(k["during_checkpoint"] for k in report.kills) == (kills > 1)


@pytest.fixture(scope="module")
def uninterrupted_cli(data, tmp_path_factory) -> Path:
    """The reference run through the command line (same thread settings as the killed runs)."""
    out = tmp_path_factory.mktemp("dino_cli") / "run"
    run_dino(tiny_args(data, out), hooks=RANK_STATE)
    return out


@pytest.mark.slow
def test_sigkill_then_resume_finishes_identically(uninterrupted_cli, data, tmp_path):
    chaos(data, tmp_path / "run", uninterrupted_cli, kills=1, seed=0)


@pytest.mark.slow
def test_chaos_five_sigkills_finish_identically(uninterrupted_cli, data, tmp_path):
    chaos(data, tmp_path / "run", uninterrupted_cli, kills=5, seed=1)


SYNC_METHODS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")


def test_at_most_one_host_sync_per_optimizer_step(data, tmp_path, monkeypatch):
    """Counts the host-syncing Tensor calls (item/tolist/numpy/__bool__/__float__/__int__) made directly by
    training code (training/*.py, the data pipeline excluded) during each optimizer step of a tiny in-process
    run: at most 1 per step outside log and checkpoint steps (on one process: none). The EMA no longer unwraps
    the prepared student (that dropped DDP's no_sync under torch.compile)."""
    import sys as _sys

    import accelerate

    from entmax_vit.training import loop_stats

    training_dir = str(Path(loop_stats.__file__).parent)  # as imported (a symlinked checkout has another path)
    excluded = ("dino_data.py", "multicrop.py")
    current = {"step": None}
    per_step: dict = {}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, **kwargs):
            caller = _sys._getframe(1).f_code.co_filename
            if current["step"] is not None and caller.startswith(training_dir) and not caller.endswith(excluded):
                per_step[current["step"]] = per_step.get(current["step"], 0) + 1
            return original(self, *args, **kwargs)
        return wrapped

    for name in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    record = loop_stats.Run.record

    def recording(self, loss, step, *args, **kwargs):
        current["step"] = step  # the optimizer step this micro-batch belongs to (0-based)
        return record(self, loss, step, *args, **kwargs)

    monkeypatch.setattr(loop_stats.Run, "record", recording)
    unwraps = []
    monkeypatch.setattr(accelerate.Accelerator, "unwrap_model",
                        lambda self, model, *a, **k: unwraps.append(current["step"]) or model)
    out = tmp_path / "run"
    args = tiny_args(data, out, **{"logging.every_steps": 3, "checkpoint.every_steps": 4,
                                   "checkpoint.at_epoch_end": False, "optim.gradient_accumulation_steps": 1})
    main(cfg_of(args))
    current["step"] = None
    log_or_checkpoint = {s - 1 for s in range(1, 9) if s % 3 == 0 or s % 4 == 0 or s == 8}
    plain = {s: per_step.get(s, 0) for s in range(8) if s not in log_or_checkpoint}
    assert plain and all(n <= 1 for n in plain.values()), plain
    assert sum(plain.values()) == 0  # one process: not even the stop vote syncs
    assert all(per_step.get(s, 0) >= 1 for s in log_or_checkpoint)  # the counter does see the log syncs
    assert [s for s in unwraps if s is not None and s < 7] == []


def test_stop_before_the_first_metrics_line_exits_cleanly_and_says_how_to_go_on(data, tmp_path, caplog):
    """debug.max_steps before the first log step (issue 24): no metrics.jsonl crash, a checkpoint, and a last
    line naming the resume and the export command; debug.max_steps counts per launch."""
    import logging

    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="entmax_vit.training.dino"):
        assert main(cfg_of(tiny_args(data, out, **{"debug.max_steps": 2, "logging.every_steps": 100}))) is None
    assert not (out / "metrics.jsonl").exists() and not (out / "final_model").exists()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_0000002"]
    line = [r.getMessage() for r in caplog.records if "stopped at step 2" in r.getMessage()][-1]
    assert "run the same command again" in line and "scripts/export_checkpoint.py" in line and "step_0000002" in line
    main(cfg_of(tiny_args(data, out, **{"debug.max_steps": 2, "logging.every_steps": 100})))  # 2 more: step 4
    assert read_trainer_state(list_checkpoints(out / "checkpoints")[-1])["global_step"] == 4
    from entmax_vit.cli.entry_point import eval_knn

    with pytest.raises(SystemExit, match=r"no final_model.*scripts/export_checkpoint\.py"):  # eval names the export
        eval_knn(["--model", str(out), "--output_dir", str(tmp_path / "knn")])


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(uninterrupted, data, tmp_path, monkeypatch):
    """ENOSPC while step 4's checkpoint is written: the run stops with an error naming the intact step 2, no
    half-written folder stays, and a relaunch resumes from step 2 and ends like the uninterrupted run."""
    import errno

    from entmax_vit.training import checkpointing as ckpt

    real_save_teacher, calls = ckpt.save_teacher, []

    def full_disk(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint (step 4): half its files are written
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save_teacher(path, *args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(ckpt, "save_teacher", full_disk)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"step_0000004.*No space left.*step_0000002 is intact"):
        main(cfg_of(tiny_args(data, out)))
    monkeypatch.setattr(ckpt, "save_teacher", real_save_teacher)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002"]  # no .tmp_ folder left
    assert ckpt.verify_checkpoint(out / "checkpoints" / "step_0000002") == []
    main(cfg_of(tiny_args(data, out)))
    assert losses(out) == losses(uninterrupted)
    assert final_digests(out) | {"global_step": 8} == final_digests(uninterrupted)


@pytest.mark.slow
def test_sigterm_at_step_2_before_any_metrics_line_exits_0(data, tmp_path):
    """Issue 24: SIGTERM at step 2 of a one-process run that has not written metrics.jsonl yet: exit 0, one
    checkpoint, and the line with the resume and export commands (no "No such file" crash)."""
    out = tmp_path / "run"
    proc = start_dino(tiny_args(data, out, **{"optim.epochs": 50, "logging.every_steps": 1000,
                                              "checkpoint.every_steps": 1000, "checkpoint.at_epoch_end": False}),
                      hooks={**RANK_STATE, "sleep_per_step": 0.3})
    dump, deadline = out / "debug" / "rank0.jsonl", time.time() + 300
    while not dump.is_file() or not any(json.loads(r).get("step", -1) >= 2 for r in dump.read_text().splitlines()):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "no step 2 within the hang guard"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    rc, stderr = proc.wait(timeout=300), proc.stderr.read()
    assert rc == 0, stderr[-3000:]
    assert "stopped at step" in stderr and "scripts/export_checkpoint.py" in stderr and "Traceback" not in stderr
    assert len(list_checkpoints(out / "checkpoints")) == 1 and not (out / "metrics.jsonl").exists()
