"""The configuration library facade (entmax_vit.cli.config over tyro) and the entry-point helper
(entmax_vit.cli.entry_point): value spellings, presets checked like overrides, bad keys and values refused by
name, and every user error reported as its message alone with a non-zero exit (issue 12, issue 14 item 4)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import pytest
import yaml
from annotated_types import Ge, Gt

from entmax_vit.cli import entry_point
from entmax_vit.cli.config import parse_config, positionals_to_options
from entmax_vit.data.config_io import ConfigError, KeysOf, check_values, flatten, from_dict, save_config, to_dict
from entmax_vit.training.config import DinoConfig
from entmax_vit.training.dino import CONFIG_DIR, main as dino_main

from cli_helpers import usage  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]
PRESET_DIRS = [ROOT / "training" / "configs", ROOT / "evaluation" / "configs", ROOT / "analysis" / "configs"]


@dataclasses.dataclass
class Inner:
    # Learning rate (must be positive).
    lr: Annotated[float, Gt(0)] = 0.1
    steps: Annotated[int, Ge(1)] = 3


class Target:
    def __init__(self, width: int = 1, depth: int = 2) -> None:
        self.width, self.depth = width, depth


@dataclasses.dataclass
class Toy:
    """A toy entry point."""

    name: str = "toy"  # what the run is called
    flag: bool = False
    mode: Literal["fast", "exact"] = "fast"
    limit: Optional[int] = None
    sizes: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    pair: tuple[float, float] = (0.5, 1.0)
    extra: Annotated[dict, KeysOf(Target)] = dataclasses.field(default_factory=dict)
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_value_spellings():
    for argv, expected in [
        (["--flag"], dict(flag=True)), (["--flag", "--no_flag"], dict(flag=False)), (["--no-flag"], dict(flag=False)),
        (["--sizes", "4", "5"], dict(sizes=[4, 5])), (["--sizes"], dict(sizes=[])),
        (["--limit", "None"], dict(limit=None)), (["--limit", "7"], dict(limit=7)),
        (["--pair", "0.1", "0.9"], dict(pair=(0.1, 0.9))), (["--extra", "{width: 4}"], dict(extra={"width": 4})),
        (["--inner.lr", "0.5", "--inner.steps", "2"], dict(inner=Inner(0.5, 2))),
        (["--mode", "exact"], dict(mode="exact")),
    ]:
        assert parse_config(Toy, argv) == dataclasses.replace(Toy(), **expected), argv


@pytest.mark.parametrize("argv, names", [
    (["--nmae", "x"], ["nmae", "name"]),                       # unknown key: named, with the valid ones
    (["--inner.lrr", "1"], ["inner.lrr", "inner.lr"]),
    (["--inner.steps", "abc"], ["inner.steps", "abc"]),         # not an integer
    (["--mode", "slow"], ["mode", "slow", "fast", "exact"]),    # not one of the Literal's choices
    (["--pair", "1"], ["pair"]),                                # wrong tuple length
    (["--inner.lr", "-1"], ["inner.lr", "-1", "> 0"]),          # out of range
    (["--inner.steps", "0"], ["inner.steps", ">= 1"]),
    (["--extra", "{widht: 3}"], ["extra", "widht", "width"]),   # typo inside a dict-valued field
    (["--extra", "[1, 2]"], ["extra", "mapping"]),
    (["--flag", "maybe"], ["maybe"]),                           # a flag takes no value
])
def test_bad_keys_and_values_are_refused_by_name(argv, names):
    with pytest.raises(ConfigError) as info:
        parse_config(Toy, argv)
    for name in names:
        assert name in str(info.value), (name, str(info.value))


def test_presets_are_checked_like_overrides(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"flag": True, "sizes": [7], "inner": {"lr": 0.25}}))
    cfg = parse_config(Toy, ["--config", str(good), "--inner.steps", "5"])
    assert (cfg.flag, cfg.sizes, cfg.inner) == (True, [7], Inner(0.25, 5))
    assert parse_config(Toy, ["--preset", str(good), "--no_flag"]).flag is False  # the override wins
    for bad, name in [({"inner": {"lrr": 1}}, "inner.lrr"), ({"inner": {"lr": -2}}, "inner.lr"),
                      ({"extra": {"hight": 1}}, "hight"), ({"limit": "many"}, "limit")]:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=name):
            parse_config(Toy, ["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(ConfigError, match=r"^preset nope: No preset or YAML file 'nope'; presets: \['bad', 'good'\]$"):
        parse_config(Toy, ["--config", "nope"], preset_dir=tmp_path)


@pytest.mark.parametrize("preset", [p for d in PRESET_DIRS for p in sorted(d.glob("*.yaml"))], ids=lambda p: p.stem)
def test_every_preset_parses_and_round_trips(preset):
    from entmax_vit.analysis.run import AnalyzeConfig
    from entmax_vit.evaluation.segmentation_probe import SegmentationEvalConfig

    cls = {"training": DinoConfig, "evaluation": SegmentationEvalConfig, "analysis": AnalyzeConfig}[preset.parent.parent.name]
    cfg = parse_config(cls, ["--config", preset.stem], preset_dir=preset.parent)
    assert from_dict(cls, to_dict(cfg)) == cfg  # the saved form reads back to the same config
    assert flatten(yaml.safe_load(preset.read_text())).items() <= flatten(to_dict(cfg)).items()


def test_training_values_are_checked():
    for argv, name in [(["--model.backbone_overrides", "{hiden: 1}"], "hiden"),
                       (["--optim.lr_base", "-1"], "optim.lr_base"), (["--optim.epochs", "-3"], "optim.epochs"),
                       (["--optim.lrr", "0.1"], "optim.lrr"), (["--optim.epochs", "abc"], "optim.epochs")]:
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
            parse_config(DinoConfig, ["--config", "tiny_cpu", *argv], preset_dir=CONFIG_DIR)
    with pytest.raises(ConfigError, match="hidden_size"):  # the closest valid key is suggested
        parse_config(DinoConfig, ["--model.backbone_overrides", "{hiden: 1}"], preset_dir=CONFIG_DIR)


def test_check_values_covers_configs_built_in_python():
    """Bounds and Literal choices hold for a config built in Python (no tyro, no YAML), nested ones by their path."""
    check_values(Toy())
    with pytest.raises(ConfigError, match=r"^mode: 'slow' is not one of \('fast', 'exact'\)$"):
        check_values(Toy(mode="slow"))
    with pytest.raises(ConfigError, match=r"^inner\.steps: 0 is out of range \(must be >= 1\)$"):
        check_values(Toy(inner=Inner(steps=0)))
    cfg = parse_config(DinoConfig, ["--config", "tiny_cpu"], preset_dir=CONFIG_DIR)
    cfg.optim.mixed_precision = "fp8"
    with pytest.raises(ConfigError, match=r"^optim\.mixed_precision: 'fp8' is not one of \('no', 'fp16', 'bf16'\)$"):
        check_values(cfg)


@dataclasses.dataclass
class Sizes:
    sizes: dict[int, int] = dataclasses.field(default_factory=lambda: {224: 8})  # image size -> batch


def test_dict_values_are_type_checked():
    """A YAML mapping override is checked against the field's key and value types; '{224:8}' (no space after the
    colon) is YAML 1.1's base-60 key 13448 with no value, refused by name instead of running with it."""
    assert parse_config(Sizes, ["--sizes", "{448: 2, 896: 1}"]).sizes == {448: 2, 896: 1}
    with pytest.raises(ConfigError, match=r"--sizes.*read as \{13448: None\}.*YAML needs a space after each ':'"):
        parse_config(Sizes, ["--sizes", "{224:8}"])
    with pytest.raises(ConfigError, match=r"--sizes.*read as \{224: 8, 26882: None\}.*YAML needs a space"):
        parse_config(Sizes, ["--sizes", "{224: 8, 448:2}"])  # every entry is checked, not only the first
    no_hint = (r"--sizes: '\{224: big\}' read as \{224: 'big'\}: "
               r"value of key 224 of dict is not an instance of int Argument")
    with pytest.raises(ConfigError, match=no_hint):
        parse_config(Sizes, ["--sizes", "{224: big}"])  # spaced right: no hint about spaces
    with pytest.raises(ConfigError, match="value of key 26882 of dict is not an instance of int"):
        from_dict(Sizes, {"sizes": {224: 8, 26882: None}})  # presets and saved configs too


def test_help_comes_from_field_comments_and_lists_presets():
    text = usage(DinoConfig, "DINO training", CONFIG_DIR)
    assert "--optim.lr_base" in text and "Official 5e-4" in text and "tiny_cpu" in text
    assert "what the run is called" in usage(Toy)


def test_save_config_round_trip(tmp_path):
    cfg = parse_config(Toy, ["--sizes", "3", "--extra", "{depth: 5}", "--pair", "0.2", "0.3"])
    path = save_config(cfg, tmp_path / "c.yaml")
    assert from_dict(Toy, yaml.safe_load(path.read_text())) == cfg


def test_save_config_from_two_processes_into_one_path(tmp_path):
    """Two jobs saving the same config path at once (parallel lanes of the mini reproduction share an output
    folder) each complete: neither renames the other's temporary file away."""
    code = ("import sys; from entmax_vit.data.config_io import save_config; from entmax_vit.training.config import DinoConfig\n"
            "for _ in range(200): save_config(DinoConfig(), sys.argv[1])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "c.yaml")], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert from_dict(DinoConfig, yaml.safe_load((tmp_path / "c.yaml").read_text())) == DinoConfig()
    assert not list(tmp_path.glob(".*.tmp"))


def test_flatten_is_the_single_implementation():
    from entmax_vit.training import config as training_config

    assert training_config.flatten is flatten
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": None}) == {"a.b": 1, "a.c.d": [2], "e": None}


def test_positionals_to_options():
    from entmax_vit.conversion.convert import ConvertConfig

    assert positionals_to_options(ConvertConfig, ["--overwrite", "in.pth", "out"], ("input", "output_dir")) == [
        "--overwrite", "--input", "in.pth", "--output_dir", "out"]
    assert positionals_to_options(Toy, ["x", "--sizes", "1", "2", "--flag"], ("name",)) == [
        "--sizes", "1", "2", "--flag", "--name", "x"]
    with pytest.raises(ConfigError, match="at most NAME"):
        positionals_to_options(Toy, ["a", "b"], ("name",))


# ------------------------------------------------------------------------------- entry points (issue 14.4)
def _exit_message(argv, cls=Toy, main=lambda cfg: cfg, **kwargs) -> str:
    with pytest.raises(SystemExit) as info:
        entry_point.run(main, cls, "toy", argv=argv, log_format=None, **kwargs)
    assert isinstance(info.value.code, str)  # the message is the exit code: printed alone, status 1
    return info.value.code


def test_entry_point_reports_user_errors_without_traceback(tmp_path):
    assert _exit_message(["--inner.lrr", "1"]).startswith("toy:")

    def refuses(cfg):
        raise ValueError("Cannot resume: optim.lr_base changed")

    assert _exit_message([], main=refuses) == "toy: Cannot resume: optim.lr_base changed"

    class Bug(Exception):
        pass

    def buggy(cfg):
        raise Bug("a programming error keeps its traceback")

    with pytest.raises(Bug):
        entry_point.run(buggy, Toy, "toy", argv=[], log_format=None)
    with pytest.raises(SystemExit) as info:
        entry_point.run(lambda cfg: (_ for _ in ()).throw(Bug("x")), Toy, "toy", argv=[], log_format=None,
                        exit_codes={Bug: 3})
    assert info.value.code == 3


@dataclasses.dataclass
class ModelArgs:
    model: str = ""
    compare: list[str] = dataclasses.field(default_factory=list)


def test_model_paths_missing_folder_and_truncated_weights(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from safetensors.torch import save_file
    import torch

    message = _exit_message(["--model", str(tmp_path / "no" / "such" / "folder")], ModelArgs, model_fields=("model",))
    assert "model folder not found" in message and str(tmp_path / "no" / "such" / "folder") in message
    assert "Repo id" not in message
    assert "./nowhere" in _exit_message(["--compare", "./nowhere"], ModelArgs, model_fields=("model", "compare"))
    # online, a Hub id stays a Hub id (nothing is downloaded here: main receives it unchanged)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert entry_point.run(lambda c: c.model, ModelArgs, "toy", argv=["--model", "owner/name"],
                           model_fields=("model",), log_format=None) == "owner/name"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline and not in the cache: one line (issue 24)
    message = _exit_message(["--model", "owner/name"], ModelArgs, model_fields=("model",))
    assert "model folder not found: owner/name" in message and "offline" in message and "\n" not in message
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": torch.zeros(64, 64)}, str(folder / "model.safetensors"))
    assert entry_point.run(lambda c: c.model, ModelArgs, "toy", argv=["--model", str(folder)],
                           model_fields=("model",), log_format=None) == str(folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    message = _exit_message(["--model", str(folder)], ModelArgs, model_fields=("model",))
    assert str(folder / "model.safetensors") in message and "truncated" in message


# ---------------------------------------------------------------- the real scripts, as a user runs them
def _script(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
    env.pop("ENTMAX_VIT_TRACEBACK", None)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished tiny training run (checkpoints + final_model) for the resume and model-path cases."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from training_helpers import make_image_dataset, tiny_args
    finally:
        sys.path.pop(0)
    root = tmp_path_factory.mktemp("cli_run")
    data = make_image_dataset(root, num_images=8)
    args = tiny_args(data, root / "run", **{"optim.epochs": 1, "logging.attention_support_images": 0,
                                            "logging.tensorboard": False})
    dino_main(parse_config(DinoConfig, args, preset_dir=CONFIG_DIR))
    return {"root": root, "out": root / "run", "args": args}


def _assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


TRAINING_ERRORS = [
    (["--optim.lrr", "0.1"], ["optim.lrr"]),
    (["--optim.epochs", "abc"], ["optim.epochs", "abc"]),
    (["--optim.lr_base", "-1"], ["optim.lr_base", "out of range"]),
    (["--model.backbone_overrides", "{hiden: 1}"], ["model.backbone_overrides", "hiden"]),
    (["--model.attention", "nonsense"], ["nonsense"]),
    (["--model.backbone_overrides", "{hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 3}"],
     ["num_attention_heads"]),
    (["--crops.global_size", "36"], ["36"]),
    (["--optim.epochs", "2", "--optim.lr_base", "0.001"], ["Cannot resume", "optim.epochs", "optim.lr_base"]),
]


@pytest.mark.parametrize("extra, needles", TRAINING_ERRORS)
def test_training_errors_exit_with_the_message(tiny_run, extra, needles):
    """dino.py's __main__ (entry_point.run) in-process: each bad config or refused resume exits with its message."""
    saved = (tiny_run["out"] / "training_config.yaml").read_text()
    with pytest.raises(SystemExit) as info:
        entry_point.run(dino_main, DinoConfig, "dino", preset_dir=CONFIG_DIR, argv=[*tiny_run["args"], *extra],
                        log_format=None)
    assert isinstance(info.value.code, str) and info.value.code.startswith("dino: ")
    for needle in needles:
        assert needle in info.value.code, (needle, info.value.code)
    assert (tiny_run["out"] / "training_config.yaml").read_text() == saved  # the run is left untouched


@pytest.mark.slow  # one fresh interpreter per case (~30 s each on 2 busy cores); the in-process test above is fast
@pytest.mark.parametrize("extra, needles", TRAINING_ERRORS)
def test_training_errors_print_the_message_alone(tiny_run, extra, needles):
    """The same as a user runs it: no traceback on stderr, non-zero exit."""
    proc = _script(str(ROOT / "training" / "dino.py"), *tiny_run["args"], *extra, cwd=tiny_run["root"])
    _assert_clean_failure(proc, *needles)


def test_eval_knn_names_a_missing_model_folder(tmp_path):
    missing = str(tmp_path / "no" / "such" / "folder")
    proc = _script(str(ROOT / "scripts" / "eval_knn.py"), "--model", missing, "--dataset", "embedded", cwd=tmp_path)
    _assert_clean_failure(proc, "model folder not found", missing)
    assert "Repo id" not in proc.stderr


@pytest.mark.slow
def test_eval_scripts_name_missing_folders_and_damaged_files(tiny_run, tmp_path):
    missing = str(tmp_path / "no" / "such" / "folder")
    for script in ("eval_knn.py", "eval_linear.py", "eval_segmentation.py", "analyze.py"):
        proc = _script(str(ROOT / "scripts" / script), "--model", missing, "--dataset", "embedded", cwd=tmp_path)
        _assert_clean_failure(proc, "model folder not found", missing)
        assert "Repo id" not in proc.stderr
    proc = _script(str(ROOT / "scripts" / "push_to_hub.py"), missing, "--output-dir", str(tmp_path / "o"), cwd=tmp_path)
    _assert_clean_failure(proc, "model folder not found")
    proc = _script(str(ROOT / "scripts" / "export_checkpoint.py"), missing, str(tmp_path / "e"), cwd=tmp_path)
    _assert_clean_failure(proc, "not found", missing)
    proc = _script(str(ROOT / "scripts" / "convert_checkpoint.py"), "--source", "hf-vit", missing,
                   str(tmp_path / "c"), cwd=tmp_path)
    _assert_clean_failure(proc, "model folder not found")

    model = tmp_path / "model"
    shutil.copytree(tiny_run["out"] / "final_model", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = _script(str(ROOT / "scripts" / "eval_knn.py"), "--model", str(model), "--dataset", "embedded", cwd=tmp_path)
    _assert_clean_failure(proc, str(weights))

    shutil.rmtree(model)
    shutil.copytree(tiny_run["out"] / "final_model", model)
    config = json.loads((model / "config.json").read_text())
    config["num_attention_heads"] = 3  # an edited config.json: 3 heads do not divide hidden size 32
    (model / "config.json").write_text(json.dumps(config))
    proc = _script(str(ROOT / "scripts" / "eval_knn.py"), "--model", str(model), "--dataset", "embedded", cwd=tmp_path)
    _assert_clean_failure(proc, "num_attention_heads")
