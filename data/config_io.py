"""Config dataclasses as YAML files and the checks declared in field annotations. At the bottom of the package
graph, so every package can use it; ``cli`` builds on it.
"""

import dataclasses
import difflib
import inspect
import os
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TypeVar

import annotated_types
import typeguard
import yaml

T = TypeVar("T")
# typeguard checks only a collection's first item by default; a config is small, check every one
ALL_ITEMS = typeguard.CollectionCheckStrategy.ALL_ITEMS


class ConfigError(ValueError):
    """A config key or value that does not fit the dataclass."""


@dataclasses.dataclass(frozen=True)
class KeysOf:
    """Annotation of a dict field whose keys must be constructor arguments (or default attributes) of ``target``:
    a typo is refused with the closest valid key instead of being silently ignored."""

    target: Any

    def valid_keys(self) -> set[str]:
        keys = {name for name, p in inspect.signature(self.target.__init__).parameters.items()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name != "self"}
        instance = self.target()
        return keys | set(instance.to_dict() if hasattr(instance, "to_dict") else vars(instance))


_BOUNDS = {annotated_types.Gt: (">", lambda v, b: v > b), annotated_types.Ge: (">=", lambda v, b: v >= b),
           annotated_types.Lt: ("<", lambda v, b: v < b), annotated_types.Le: ("<=", lambda v, b: v <= b)}


def _did_you_mean(name: str, valid: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(str(name), sorted(valid), n=3)
    return f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""


def _check_value(key: str, value: Any, metadata: Sequence[Any]) -> None:
    for item in metadata:
        if isinstance(item, annotated_types.Interval):
            _check_value(key, value, list(item))
        elif type(item) in _BOUNDS and value is not None:
            symbol, ok = _BOUNDS[type(item)]
            bound = next(iter(dataclasses.asdict(item).values()))
            if not ok(value, bound):
                raise ConfigError(f"{key}: {value!r} is out of range (must be {symbol} {bound})")
        elif isinstance(item, KeysOf) and isinstance(value, Mapping):
            for name in set(value) - item.valid_keys():
                raise ConfigError(f"{key}: unknown key {name!r} for {item.target.__name__}"
                                  f"{_did_you_mean(name, item.valid_keys())}")


def check_values(cfg: Any, prefix: str = "") -> None:
    """Apply the fields' ``Annotated[...]`` checks (annotated-types bounds, :class:`KeysOf`) and ``Literal`` choices,
    recursively (tyro and YAML loading check choices too; this also covers configs built in Python)."""
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            check_values(value, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is typing.Annotated:
            _check_value(prefix + f.name, value, hint.__metadata__)
        elif typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
            raise ConfigError(f"{prefix}{f.name}: {value!r} is not one of {typing.get_args(hint)}")


def _build(cls: type[T], data: Any, prefix: str) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix[:-1] or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix}{key}{_did_you_mean(key, names, prefix)} "
                              f"(valid keys: {', '.join(prefix + n for n in names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
            continue
        if typing.get_origin(tp) is tuple and isinstance(value, list):  # YAML has no tuples
            value = tuple(value)
        try:
            kwargs[key] = typeguard.check_type(value, tp, collection_check_strategy=ALL_ITEMS)
        except typeguard.TypeCheckError as err:
            raise ConfigError(f"{prefix}{key}: {value!r} is not a valid value ({err})") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # a __post_init__ refusing a value
        raise ConfigError(str(err)) from None


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """``cls`` from a nested mapping (missing keys keep their defaults), type- and range-checked."""
    cfg = _build(cls, data, "")
    check_values(cfg)
    return cfg


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value


def to_dict(cfg: Any) -> dict:
    """``dataclasses.asdict`` as plain YAML/JSON values (tuples become lists, paths strings)."""
    return _plain(dataclasses.asdict(cfg))


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b": value}``."""
    if isinstance(data, Mapping):
        return {k: v for key, value in data.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


def load_preset(cls: type[T], name_or_path: str, preset_dir: Optional[Path] = None) -> T:
    """``preset_dir/NAME.yaml`` for a bare name, else a YAML path (a saved config is one too), as a checked ``cls``."""
    path = Path(name_or_path)
    if not path.suffix and preset_dir is not None:
        path = Path(preset_dir) / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in Path(preset_dir).glob("*.yaml")) if preset_dir else []
        raise ConfigError(f"preset {name_or_path}: No preset or YAML file {name_or_path!r}; presets: {available}")
    try:
        return from_dict(cls, yaml.safe_load(path.read_text()) or {})
    except ConfigError as err:
        raise ConfigError(f"preset {name_or_path}: {err}") from None


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic, under a name of this process: two jobs saving into one folder must not rename each other's file away
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
    return path

