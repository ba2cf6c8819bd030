"""One way to name image data, through Hugging Face ``datasets`` (the source forms: docs/data.md). In distributed
runs use :func:`shard_for_rank` OR Accelerate's ``prepare()`` of the DataLoader, never both.
"""

import contextlib
import glob
import logging
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import datasets
from datasets import Dataset, DatasetDict, IterableDataset

logger = logging.getLogger(__name__)

AnyDataset = Union[Dataset, IterableDataset]
EMBEDDED = "embedded"
_EMBEDDED_OPTIONS = ("image_size", "num_train", "num_validation", "seed")
# Shards of a streamed local dataset: enough for DataLoader workers and ranks to split by shard.
_LOCAL_STREAM_SHARDS = 64


class DatasetLoadError(ValueError):
    """A dataset source that cannot be loaded (unknown path, missing split, gated or offline Hub dataset)."""


def load_image_dataset(source: str, split: str = "train", *, streaming: bool = False,
                       cache_dir: Optional[str | os.PathLike] = None) -> AnyDataset:
    """One split of ``source`` (docs/data.md; any other local path goes to ``datasets.load_dataset`` as is)."""
    check_source(source)
    source = source.strip()
    kind, sep, rest = source.partition(":")
    cache = str(cache_dir) if cache_dir is not None else None
    if kind == EMBEDDED:
        from .synthetic_scenes import load_synthetic_scenes  # lazy: generated data, only when asked for

        return _local_split(load_synthetic_scenes(**_embedded_options(rest), cache_dir=cache_dir), split, streaming,
                            EMBEDDED)
    if sep and kind == "imagefolder":
        return _load_dataset("imagefolder", split, streaming, cache, data_dir=str(Path(rest).expanduser()))
    if sep and kind == "webdataset":
        files = webdataset_shards(rest, split)
        return _load_dataset("webdataset", split, streaming, cache, data_files={split: files})
    path = Path(source).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _local_split(datasets.load_from_disk(str(path)), split, streaming, str(path))
    return _load_dataset(source, split, streaming, cache)


def check_source(source: str) -> None:
    """The syntax of a dataset source, checked without loading anything (configs call it); a Hub id or local
    folder is only found when loaded."""
    if not isinstance(source, str) or not source.strip():
        raise DatasetLoadError(f"dataset source must be a non-empty string, got {source!r}")
    source = source.strip()
    kind, sep, rest = source.partition(":")
    if source == EMBEDDED or (sep and kind == EMBEDDED):
        _embedded_options(rest)
    elif sep and kind == "imagefolder":
        if not Path(rest).expanduser().is_dir():
            raise DatasetLoadError(f"imagefolder: {rest or '(empty)'} is not a directory")
    elif sep and kind == "webdataset":
        if not rest.strip():
            raise DatasetLoadError("webdataset: give a folder or a glob of .tar shards ('webdataset:DIR')")
    elif sep and not Path(source).expanduser().exists():
        raise DatasetLoadError(f"dataset source {source!r}: unknown kind {kind!r}; use a Hub id (OWNER/NAME), "
                               "imagefolder:..., webdataset:..., a save_to_disk folder or "
                               f"'{EMBEDDED}'")


def webdataset_shards(pattern: str, split: str) -> list[str]:
    """The ``.tar`` shards for ``split`` (the lookup order: docs/data.md)."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        for candidate in (sorted((path / split).glob("*.tar")), sorted(path.glob(f"{split}*.tar"))):
            if candidate:
                return [str(p) for p in candidate]
        every = sorted(path.glob("*.tar"))
        if every and split == "train":
            return [str(p) for p in every]
        raise DatasetLoadError(
            f"webdataset: no .tar shards for split {split!r} in {path} (looked for {split}/*.tar and "
            f"{split}*.tar; folder has {[p.name for p in every][:10]}). Name the files with a glob: "
            f"'webdataset:{path}/NAME-*.tar'"
        )
    files = sorted(glob.glob(str(path), recursive=True))
    if not files:
        raise DatasetLoadError(f"webdataset: no files match {pattern!r}")
    return files


def _local_split(loaded: Dataset | DatasetDict, split: str, streaming: bool, where: str) -> AnyDataset:
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise DatasetLoadError(f"{where}: no split {split!r}; splits: {sorted(loaded)}")
        loaded = loaded[split]
    elif loaded.split is not None and str(loaded.split) != split:
        logger.warning("%s holds one dataset saved as split %r; using it for split %r", where, str(loaded.split), split)
    if not streaming:
        return loaded
    return loaded.to_iterable_dataset(num_shards=max(1, min(len(loaded), _LOCAL_STREAM_SHARDS)))


def _embedded_options(options: str) -> dict[str, Any]:
    """``image_size=32,num_train=64`` -> ``{"image_size": 32, "num_train": 64}``."""
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in _EMBEDDED_OPTIONS:
            raise DatasetLoadError(f"embedded: bad option {item!r}; use key=value with keys {list(_EMBEDDED_OPTIONS)}")
        try:
            kwargs[key.strip()] = int(value)
        except ValueError:
            raise DatasetLoadError(f"embedded: option {key.strip()} must be an integer, got {value!r}") from None
    return kwargs


def _load_dataset(path: str, split: str, streaming: bool, cache_dir: Optional[str], **kwargs: Any) -> AnyDataset:
    try:
        return datasets.load_dataset(path, split=split, streaming=streaming, cache_dir=cache_dir, **kwargs)
    except ValueError as err:
        if "split" in str(err).lower():
            raise DatasetLoadError(f"{path}: no split {split!r} ({err})") from err
        raise DatasetLoadError(f"{path}: {err}") from err
    except Exception as err:  # noqa: BLE001 - DatasetNotFoundError, FileNotFoundError, ConnectionError, HTTP, ...
        raise DatasetLoadError(_hub_hint(path, err)) from err


def _hub_hint(path: str, err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    hints = []
    if "gated" in text.lower() or "authenticat" in text.lower() or "401" in text or "403" in text:
        hints.append("this dataset is gated: accept its terms on huggingface.co and set HF_TOKEN (or `hf auth login`)")
    elif "imagenet" in path.lower():
        hints.append("ILSVRC/imagenet-1k is gated: accept its terms on huggingface.co and set HF_TOKEN")
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        hints.append("offline mode is on (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE): only cached or local data loads")
    hints.append("local data: use 'imagefolder:DIR', 'webdataset:GLOB_OR_DIR', a save_to_disk folder or 'embedded'")
    return f"cannot load dataset {path!r} ({text}). " + "; ".join(hints)


_IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values", "picture", "photo")
_LABEL_NAMES = ("label", "labels", "cls", "class", "target", "fine_label", "class_id", "category")
_MASK_WORDS = ("mask", "annotation", "segmentation", "semantic", "seg", "gt", "label")


def find_column(ds: Any, kind: Literal["image", "label", "mask"] = "image", name: Optional[str] = None) -> str:
    """Name of the ``kind`` column of ``ds``; ``name`` forces and checks one (the rules: docs/data.md)."""
    features = getattr(ds, "features", None)
    if features is None and isinstance(ds, IterableDataset):  # no declared features: peek the first example
        with contextlib.suppress(Exception):
            features = ds._resolve_features().features
        if features is None:
            features = {k: type(v).__name__ for k, v in next(iter(ds)).items()}
    if features is None:
        raise ValueError(f"cannot list the columns of a {type(ds).__name__}")
    features = dict(features)
    available = ", ".join(f"{k} ({v if isinstance(v, str) else type(v).__name__})" for k, v in features.items())
    if name is not None:
        if name not in features:
            raise ValueError(f"no column {name!r} for {kind}; available columns: {available}")
        return name
    if kind not in ("image", "label", "mask"):
        raise ValueError(f"kind must be 'image', 'label' or 'mask', got {kind!r}")
    images = [k for k, v in features.items() if isinstance(v, datasets.Image)]
    if kind == "image":
        plain = [k for k in images if not _is_mask_name(k)] or images
        # no Image feature (undeclared features, e.g. peeked dicts): go by name
        found = _by_name(plain, _IMAGE_NAMES) or (plain[0] if plain else _by_name(list(features), _IMAGE_NAMES))
    elif kind == "label":
        class_labels = [k for k, v in features.items() if isinstance(v, datasets.ClassLabel)]
        ints = [k for k, v in features.items() if isinstance(v, datasets.Value) and v.dtype.startswith(("int", "uint"))]
        found = _by_name(class_labels, _LABEL_NAMES) or (class_labels[0] if class_labels else None)
        found = found or _by_name(ints, _LABEL_NAMES)
    else:
        image_col = _by_name([k for k in images if not _is_mask_name(k)], _IMAGE_NAMES)
        masks = [k for k in images if _is_mask_name(k) and k != image_col]
        found = masks[0] if masks else None
    if found is None:
        raise ValueError(f"no {kind} column found; available columns: {available}. Name it explicitly.")
    return found


def _is_mask_name(name: str) -> bool:
    low = name.lower().replace(".", "_").replace("-", "_")
    parts = set(low.split("_")) | {low}
    return any(word in parts or low.startswith(word) for word in _MASK_WORDS)


def _by_name(candidates: list[str], preferred: tuple[str, ...]) -> Optional[str]:
    lowered = {c.lower(): c for c in candidates}
    return next((lowered[want] for want in preferred if want in lowered), None)


def undecoded_images(ds: Any, *columns: str, keep: Optional[tuple[str, ...]] = None) -> Any:
    """``ds`` with the Image ``columns`` read as raw ``{"bytes", "path"}`` (reduced to them + ``keep`` when given),
    so every cell goes through the one decoder (``data.images``) that checks and counts bad files."""
    features = getattr(ds, "features", None)
    for column in columns:
        if features is not None and column not in features:
            raise ValueError(f"no image column {column!r}; columns: {list(features)}")
    if keep is not None and hasattr(ds, "select_columns"):
        ds = ds.select_columns([*columns, *[k for k in keep if k not in columns]])
    for column in columns:
        if features is not None and isinstance(features[column], datasets.Image) and features[column].decode:
            ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def open_dataset(source: str, split: str, cache_dir: Optional[str] = None, max_samples: Optional[int] = None,
                 streaming: bool = False, accelerator: Any = None) -> AnyDataset:
    """One split cut to its first ``max_samples`` rows (None or <= 0: all). With an ``accelerator`` the main
    process of each node loads (downloads, caches) it first and the other ranks then read that cache."""
    first = accelerator.main_process_first() if accelerator is not None and not streaming else contextlib.nullcontext()
    with first:
        ds = load_image_dataset(source, split=split, streaming=streaming, cache_dir=cache_dir)
    limit = max_samples if max_samples is not None and max_samples > 0 else None
    if streaming:
        return ds.take(limit) if limit else ds
    if limit and len(ds) > limit:
        ds = ds.select(range(limit))
    if len(ds) == 0:
        raise DatasetLoadError(f"{source} split {split!r} is empty")
    return ds


def shard_for_rank(ds: AnyDataset, rank: int, world_size: int) -> AnyDataset:
    """Rank sizes can differ by one sample: drop the last incomplete batch, or DDP waits forever."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if world_size == 1:
        return ds
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(ds, rank=rank, world_size=world_size)

