"""Issue 24, items 4, 5 and 8: what an entry point says before it does anything. A local-looking model path that
does not exist gets one line, whatever its form, and so does a Hub id offline mode cannot reach; a bad value anywhere
in the config (transform, kernel, preset, dataset source) is refused before data loads or a file is written; an
unknown key names the key it probably meant."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from entmax_vit.cli import entry_point
from entmax_vit.cli.config import ConfigError, parse_config
from entmax_vit.evaluation.knn import KNNEvalConfig
from entmax_vit.training.config import DinoConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "training" / "configs"


def _never(cfg):
    raise AssertionError("main ran")


def _exit_message(argv, cls=KNNEvalConfig, **kwargs) -> str:
    with pytest.raises(SystemExit) as info:
        entry_point.run(_never, cls, "prog", argv=argv, log_format=None, **kwargs)
    return str(info.value.code)


def _script(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ENTMAX_VIT_TRACEBACK", None)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- item 4: model paths that do not exist
@pytest.mark.parametrize("form", ["runs/tiny", "./tiny", "../tiny", "ABSOLUTE", "~/no_such_model_folder_24",
                                  "a/b/c", "owner/name"])
def test_a_missing_model_is_one_line_whatever_its_form(form, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = str(tmp_path / "no" / "such") if form == "ABSOLUTE" else form
    message = _exit_message(["--model", name], model_fields=("model",))
    assert message.startswith(f"prog: model folder not found: {name}") and "\n" not in message
    if form == "owner/name":  # a possible Hub id: offline mode is why it cannot be found
        assert "offline" in message


def test_relative_run_folder_beside_its_parent_is_local(tmp_path, monkeypatch):
    """``runs/tiny`` when ``runs/`` exists is a local path even online: never sent to the Hub."""
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    (tmp_path / "runs").mkdir()
    message = _exit_message(["--model", "runs/tiny"], model_fields=("model",))
    assert message == "prog: model folder not found: runs/tiny (no such file or directory)"


def test_eval_knn_script_relative_path_is_one_line(tmp_path):
    """The issue's command, as a user runs it: no traceback, nothing written."""
    proc = _script(str(ROOT / "scripts" / "eval_knn.py"), "--model", "runs/tiny", "--output_dir", "out", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "eval_knn: model folder not found: runs/tiny (no such file or directory; as a Hub id it is not in the local "
        "Hugging Face cache, and offline mode (HF_HUB_OFFLINE=1) cannot download it)"]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- item 5: the whole config checked first
@pytest.mark.parametrize("override, key", [
    (["--model.attention", "entmax2"], "model"),
    (["--model.preset", "vit_huge_patch14"], "model"),
    (["--model.attn_implementation", "flash"], "model.attn_implementation"),
    (["--model.attention", "softmax", "--model.attn_implementation", "tiled"], "model.attn_implementation"),
    (["--model.backbone_overrides", "{num_attention_heads: 5}"], "model"),
    (["--data.source", "imagefolder:/no/such/folder"], "data.source"),
    (["--data.source", "imagefoldr:/data"], "data.source"),
    (["--data.source", "embedded:size=32"], "data.source"),
])
def test_training_config_is_checked_at_parse_time(override, key, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(DinoConfig, ["--config", "tiny_cpu", "--output_dir", str(out), *override], preset_dir=CONFIG_DIR)
    assert not out.exists()


def test_a_bad_transform_stops_training_before_data_or_files(tmp_path):
    """``--model.attention entmax2`` through training/dino.py: refused with the valid names before the dataset
    loads (a data source that would fail to load is named too) and before the output folder exists."""
    out = tmp_path / "run"
    proc = _script(str(ROOT / "training" / "dino.py"), "--config", "tiny_cpu", "--output_dir", str(out),
                   "--model.attention", "entmax2", cwd=tmp_path)
    assert proc.returncode != 0
    assert "entmax2" in proc.stderr and "entmax15" in proc.stderr and "Traceback" not in proc.stderr
    assert "dataset" not in proc.stderr.lower() and not out.exists()


def test_presets_still_build():
    for preset in sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")):
        parse_config(DinoConfig, ["--config", preset], preset_dir=CONFIG_DIR)


def test_failed_evaluation_writes_no_config(tmp_path):
    """A bad dataset source is refused before the model loads; a dataset that fails while loading leaves no
    config file (nor results) behind."""
    from entmax_vit.cli.entry_point import eval_knn
    from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel

    model = tmp_path / "model"
    EntmaxViTModel(EntmaxViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=64)).save_pretrained(model)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="--dataset: .*unknown kind"):
        eval_knn(["--model", str(model), "--dataset", "imgfolder:/x", "--output_dir", str(out)])
    with pytest.raises(SystemExit, match="cannot load dataset"):
        eval_knn(["--model", str(model), "--dataset", "owner/no_such_dataset_24", "--output_dir", str(out)])
    assert not (out / "eval_knn_config.yaml").exists() and not (out / "results_knn.json").exists()


# ---------------------------------------------------------------- item 8: unknown keys
def test_unknown_key_names_the_key_it_probably_meant():
    """``--data.batch_size``: tyro's suggestion names batch_size_per_device."""
    with pytest.raises(ConfigError) as info:
        parse_config(DinoConfig, ["--config", "tiny_cpu", "--data.batch_size", "8"], preset_dir=CONFIG_DIR)
    assert "Perhaps you meant: --data.batch_size_per_device" in str(info.value)


def test_conversion_refuses_an_occupied_output_before_reading_its_input(tmp_path):
    """convert_checkpoint: an output folder that already holds a model is refused before the input is read (here
    an input that does not exist, which would otherwise be the error)."""
    from entmax_vit.conversion.convert import ConvertConfig, main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a model"):
        main(ConvertConfig(input=str(tmp_path / "missing.pth"), output_dir=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="No output_dir"):
        main(ConvertConfig(input=str(tmp_path / "missing.pth")))


def test_console_commands_return_none(monkeypatch):
    # A console script's wrapper calls sys.exit(command()): a returned results dict or Path would be printed and
    # turn a successful run into exit status 1.
    from entmax_vit.cli import entry_point
    from entmax_vit.training import dino

    monkeypatch.setattr(entry_point, "run", lambda *args, **kwargs: {"top1": 50.0})
    for command in (entry_point.eval_knn, entry_point.eval_linear, entry_point.eval_segmentation, dino.cli):
        assert command([]) is None
