"""The results JSON every evaluation writes (schema ``entmax_vit.results/v1``, one file per run), and its reader.

    {"schema", "task": knn | linear | segmentation | analysis,
     "model": {"name_or_path", "attention", "config", "weights_sha256" (optional)},
     "dataset": {"name", "split", "num_samples", "num_classes", ...}, "protocol": {"name", ...},
     "metrics": {name: float (percent)}, "config": {...}, "versions": {...}, "created": ISO time}
"""

import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Optional

SCHEMA = "entmax_vit.results/v1"
TASKS = ("knn", "linear", "segmentation", "analysis")
_REQUIRED = {"schema": str, "task": str, "model": dict, "dataset": dict, "protocol": dict, "metrics": dict,
             "config": dict, "versions": dict, "created": str}


def library_versions() -> dict[str, str]:
    out = {}
    for pkg in ("entmax-vit", "torch", "transformers", "datasets", "accelerate"):
        try:
            out[pkg.replace("-", "_")] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg.replace("-", "_")] = "unknown"
    return out


def weights_fingerprint(model: Any) -> str:
    """SHA-256 of every state-dict entry's name, dtype, shape and bytes: matches a results file to the weights it
    was measured on, whatever their folder or Hub id (``hub_release.assemble`` refuses a mismatch)."""
    import torch

    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def validate_results(data: Any, source: str = "results") -> dict:
    """Check ``data`` against the schema; raise ValueError naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{source}: schema is {data.get('schema')!r}, expected {SCHEMA!r}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{source}: missing keys {missing}")
    wrong = [k for k, t in _REQUIRED.items() if not isinstance(data[k], t)]
    if wrong:
        raise ValueError(f"{source}: wrong types for {wrong} (expected {[ _REQUIRED[k].__name__ for k in wrong]})")
    if data["task"] not in TASKS:
        raise ValueError(f"{source}: task {data['task']!r} not one of {TASKS}")
    for section, key in (("model", "name_or_path"), ("model", "attention"), ("dataset", "name"), ("protocol", "name")):
        if not isinstance(data[section].get(key), str):
            raise ValueError(f"{source}: {section}.{key} must be a string")
    for name, value in data["metrics"].items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{source}: metric {name!r} must be a finite number, got {value!r}")
    return data


def make_results(*, task: str, model_name_or_path: str, model_config: Mapping[str, Any], dataset: Mapping[str, Any],
                 protocol: Mapping[str, Any], metrics: Mapping[str, float], config: Mapping[str, Any],
                 weights_sha256: Optional[str] = None) -> dict:
    """A validated record; ``weights_sha256``: :func:`weights_fingerprint` of the evaluated model."""
    record = {
        "schema": SCHEMA,
        "task": task,
        "model": {
            "name_or_path": str(model_name_or_path),
            "attention": str(model_config.get("attention", "softmax")),
            "config": dict(model_config),
            **({"weights_sha256": weights_sha256} if weights_sha256 else {}),
        },
        "dataset": dict(dataset),
        "protocol": dict(protocol),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "config": dict(config),
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return validate_results(record)


def write_results(record: Mapping[str, Any], path: str | os.PathLike) -> Path:
    validate_results(dict(record), str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_results_")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2, default=str)
    os.replace(tmp, path)
    return path


def load_results(path: str | os.PathLike) -> dict:
    """Read and validate a results JSON; wrong schema raises ValueError naming the file and the problem."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    return validate_results(data, str(path))


def finish_run(task: str, cfg: Any, model: Any, accelerator: Any, *, dataset: Mapping[str, Any],
               protocol: Mapping[str, Any], metrics: Mapping[str, float]) -> dict:
    """The record of an evaluation entry point (``dataset``: its sizes, after cfg's name and splits); the main rank
    writes ``eval_<task>_config.yaml`` and ``results_<task>.json`` into ``cfg.output_dir`` (a failed run: neither)."""
    from entmax_vit.data.config_io import save_config, to_dict

    dataset = {"name": cfg.dataset, "split": cfg.eval_split, "train_split": cfg.train_split, **dataset}
    record = make_results(task=task, model_name_or_path=cfg.model, model_config=model.config.to_dict(),
                          dataset=dataset, protocol=protocol, metrics=metrics, config=to_dict(cfg),
                          weights_sha256=weights_fingerprint(model))
    if accelerator.is_main_process:
        save_config(cfg, Path(cfg.output_dir) / f"eval_{task}_config.yaml")
        write_results(record, Path(cfg.output_dir) / f"results_{task}.json")
    return record
