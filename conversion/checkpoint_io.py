"""Reading checkpoints safely (docs/conversion.md, "Safety"): safetensors, pickled .pth files (weights only, plus
the ``argparse.Namespace`` official DINO full checkpoints store as ``args``), save_pretrained folders and Hub
repositories, and unwrapping the containers training code puts around a state dict."""

import argparse
import json
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
SAFETENSORS_SUFFIX = ".safetensors"
# Weight files a save_pretrained / timm Hub folder may hold, in order of preference.
FOLDER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
FOLDER_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class LoadedCheckpoint:
    """What came out of an input: the raw object (state dict or training container), its config.json (for
    folders / Hub repositories) and where it came from."""

    obj: Any
    config: Optional[dict] = None
    origin: str = ""


def load_weights_file(path: str | Path) -> Any:
    """Load one ``.safetensors`` or pickled (``.pth``/``.pt``/``.bin``/``.ckpt``) file without executing code."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Checkpoint file {str(path)!r} does not exist")
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"Unsupported checkpoint file type {path.suffix!r} ({path}); expected .safetensors or one "
                         f"of {list(PICKLE_SUFFIXES)}")
    try:
        # DINO's full checkpoints pickle their argparse.Namespace; allow exactly that class, nothing else.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds Python objects beyond tensors and argparse.Namespace, so it cannot be read with "
            f"torch.load(weights_only=True) ({str(err).splitlines()[0]}). Re-save its state dict only "
            "(torch.save(model.state_dict(), ...)) or as .safetensors."
        ) from None
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {err}") from None


def load_folder(folder: str | Path) -> LoadedCheckpoint:
    """A save_pretrained-style folder: config.json (optional) plus model weights (single file or shards)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    for name in FOLDER_WEIGHT_FILES:
        if (folder / name).is_file():
            return LoadedCheckpoint(load_weights_file(folder / name), config, str(folder))
    for name in FOLDER_INDEX_FILES:
        if (folder / name).is_file():
            shards = sorted(set(json.loads((folder / name).read_text()).get("weight_map", {}).values()))
            state = {k: v for shard in shards for k, v in load_weights_file(folder / shard).items()}
            return LoadedCheckpoint(state, config, str(folder))
    candidates = sorted(p.name for p in folder.iterdir() if p.suffix in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES))
    if len(candidates) == 1:
        return LoadedCheckpoint(load_weights_file(folder / candidates[0]), config, str(folder))
    raise ValueError(f"Folder {str(folder)!r} has no weights file I can choose: expected one of "
                     f"{list(FOLDER_WEIGHT_FILES + FOLDER_INDEX_FILES)}, found {candidates or 'none'}")


def download_url(url: str, cache_dir: Optional[str] = None) -> Path:
    """Download a checkpoint URL (e.g. DINO's dl.fbaipublicfiles.com files) once into ``cache_dir`` (default:
    torch hub's checkpoints folder) and return the local file."""
    from urllib.parse import urlparse

    name = Path(urlparse(url).path).name
    if not name:
        raise ValueError(f"URL {url!r} does not end in a file name")
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    target = folder / name
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        logger.info("Downloading %s to %s", url, target)
        try:
            torch.hub.download_url_to_file(url, str(target), progress=True)
        except OSError as err:  # URLError / HTTPError are OSErrors
            raise ValueError(f"Could not download {url}: {err}") from None
    return target


def load_input(source: str, cache_dir: Optional[str] = None) -> LoadedCheckpoint:
    """Resolve a local file, a URL (http, https, file), a local folder or a Hub repository id (``owner/name``,
    downloaded with huggingface_hub: config.json and the weights only) into a :class:`LoadedCheckpoint`."""
    if source.startswith(("http://", "https://", "file://")):
        local = download_url(source, cache_dir)
        return LoadedCheckpoint(load_weights_file(local), None, source)
    path = Path(source).expanduser()
    if path.is_file():
        return LoadedCheckpoint(load_weights_file(path), None, str(path))
    if path.is_dir():
        return load_folder(path)
    if _HUB_ID.match(source):
        from huggingface_hub import snapshot_download

        logger.info("Downloading %s from the Hub (config.json and weights only)", source)
        try:
            local = snapshot_download(source, cache_dir=cache_dir, allow_patterns=[
                "config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json"])
        except Exception as err:  # the hub raises many types (offline, gated, missing)
            raise ValueError(f"{source!r} is neither a local path nor a downloadable Hub repository: {err}") from None
        loaded = load_folder(local)
        loaded.origin = source
        return loaded
    raise ValueError(f"Input {source!r} does not exist (expected a checkpoint file, a folder or a Hub repo id)")


# Containers around the state dict
_TRAINING_KEYS = ("teacher", "student")
_WRAPPER_KEYS = ("state_dict", "model", "module")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def unwrap_state_dict(obj: Any, which: str = "teacher") -> tuple[dict[str, torch.Tensor], list[str], Any]:
    """``(state dict, notes on what was unwrapped, the args Namespace of a DINO full checkpoint or None)``: a DINO
    training checkpoint ({"student", "teacher", "optimizer", "epoch", "args", ...}) gives the network named by
    ``which``; timm/Lightning-style {"state_dict": ...} or {"model": ...} wrappers are opened."""
    notes: list[str] = []
    if not isinstance(obj, Mapping):
        raise ValueError(f"Checkpoint holds a {type(obj).__name__}, not a state dict (a mapping of name -> tensor)")
    namespace = obj["args"] if isinstance(obj.get("args"), argparse.Namespace) else None
    if any(k in obj for k in _TRAINING_KEYS) and not _is_state_dict(obj):
        if which not in _TRAINING_KEYS:
            raise ValueError(f"which must be one of {list(_TRAINING_KEYS)}, got {which!r}")
        if which not in obj:
            raise ValueError(f"Training checkpoint has no {which!r} entry; it has {sorted(map(str, obj))}")
        args, epoch = obj.get("args"), obj.get("epoch")
        notes.append(
            f"DINO training checkpoint: using the {which}"
            + (f" (epoch {epoch})" if epoch is not None else "")
            + (f", arch {getattr(args, 'arch', '?')}, patch {getattr(args, 'patch_size', '?')}"
               if args is not None else ""))
        obj = obj[which]
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and not _is_state_dict(obj) and isinstance(obj.get(key), Mapping):
            notes.append(f"opened the {key!r} entry of the checkpoint")
            obj = obj[key]
    if not _is_state_dict(obj):
        kinds = {str(k): type(v).__name__ for k, v in list(obj.items())[:8]} if isinstance(obj, Mapping) else {}
        raise ValueError("Could not find a state dict (name -> tensor) in the checkpoint; top-level entries: "
                         f"{kinds or type(obj).__name__}")
    return dict(obj), notes, namespace


def strip_prefixes(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove each prefix in order where (and only where) a key starts with it: DDP's ``module.``, DINO's
    ``backbone.`` wrapper, ``vit.`` of ViTForImageClassification."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    return state
