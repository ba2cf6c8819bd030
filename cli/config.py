"""Typed configs for entry points: a dataclass with commented defaults, YAML presets, ``--key value``
overrides checked against the dataclass (dotted keys reach nested dataclasses), and the resolved config
written beside the outputs.

    cfg = parse_config(DinoConfig, argv, preset_dir=Path(__file__).parent / "configs")
    save_config(cfg, out_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that does not fit the dataclass."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} does not fit {tp}: {'; '.join(errors)}")
    if origin is typing.Literal:
        if isinstance(value, str):
            for choice in args:
                if str(choice) == value:
                    return choice
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        seq = [_coerce(v, inner, key) for v in value]
        return tuple(seq) if (origin is tuple or tp is tuple) else seq
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a (nested) mapping; unknown keys raise ConfigError listing the valid ones."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"Unknown config key(s) {[prefix + k for k in unknown]}; valid keys: {sorted(prefix + n for n in names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) for YAML/JSON."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return plain(cfg)


def apply_overrides(cfg: T, overrides: Mapping[str, Any]) -> T:
    """Return a copy of ``cfg`` with dotted-key overrides applied and type-checked."""
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.replace("-", "_").split(".")
        cls: Any = type(cfg)
        for i, part in enumerate(parts):
            hints = _field_types(cls) if _is_dataclass_type(cls) else {}
            if part not in hints:
                where = ".".join(parts[:i]) or "the config"
                raise ConfigError(f"Unknown config key {dotted!r}: {where} has keys {sorted(hints)}")
            if i == len(parts) - 1:
                node[part] = _coerce(value, hints[part], dotted)
                if dataclasses.is_dataclass(node[part]):
                    node[part] = to_dict(node[part])
            else:
                cls = hints[part]
                node = node[part]
    return from_dict(type(cfg), data)


def load_preset(name_or_path: str, preset_dir: Optional[Path] = None) -> dict:
    """Load a YAML preset by name (``preset_dir/NAME.yaml``) or by path."""
    path = Path(name_or_path)
    if not path.suffix and preset_dir is not None:
        path = Path(preset_dir) / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in Path(preset_dir).glob("*.yaml")) if preset_dir else []
        raise ConfigError(f"No preset or YAML file {name_or_path!r}; presets: {available}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a YAML mapping")
    return data


def parse_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """``--a.b value``, ``--a.b=value`` and ``--flag`` (true) into a dict of dotted keys."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"Unexpected argument {arg!r}; overrides look like --key value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 1
        else:
            value = "true"
        out[key] = value
        i += 1
    return out


def field_comments(cls: type, prefix: str = "") -> dict[str, str]:
    """The ``# comment`` after each field of a config dataclass (nested ones under dotted keys): the
    documented defaults that ``--help`` prints."""
    import inspect
    import re

    field_line = re.compile(r"^\s+(\w+)\s*:[^#=]*(?:=[^#]*)?(?:#\s*(.+))?$")
    out: dict[str, str] = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        source = ""
    above: list[str] = []  # comment lines directly above a field document it, as does a trailing comment
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = field_line.match(line)
        if match and not stripped.startswith(("def ", "class ", "@", "return")):
            note = match.group(2) or " ".join(above)
            if note:
                out[prefix + match.group(1)] = note.strip()
        above = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if _is_dataclass_type(hints.get(f.name)):
            out.update(field_comments(hints[f.name], prefix=f"{prefix}{f.name}."))
    return out


def usage(cls: type, description: Optional[str] = None, preset_dir: Optional[Path] = None) -> str:
    """``--help`` text: the description, the presets, and every (dotted) key with its default and comment."""
    lines = [(description or cls.__doc__ or "").strip(), ""]
    if preset_dir is not None and Path(preset_dir).is_dir():
        lines += ["Presets (--config NAME, or --config FILE.yaml): "
                  + ", ".join(sorted(p.stem for p in Path(preset_dir).glob("*.yaml"))), ""]
    lines.append("Options (--key value; nested keys as --section.key value):")
    comments = field_comments(cls)

    def walk(klass: type, defaults: Mapping[str, Any], prefix: str = "") -> None:
        hints = _field_types(klass)
        for f in dataclasses.fields(klass):
            if _is_dataclass_type(hints.get(f.name)) and isinstance(defaults.get(f.name), dict):
                walk(hints[f.name], defaults[f.name], f"{prefix}{f.name}.")
                continue
            value = defaults.get(f.name, "(required)")
            note = comments.get(prefix + f.name, "")
            lines.append(f"  --{prefix + f.name:<28} {value!r:<24} {note}".rstrip())

    try:
        defaults = to_dict(cls())
    except TypeError:  # required fields without defaults
        defaults = {}
    walk(cls, defaults)
    return "\n".join(lines)


def parse_config(
    cls: type[T],
    argv: Optional[Sequence[str]] = None,
    preset_dir: Optional[Path] = None,
    default_preset: Optional[str] = None,
    description: Optional[str] = None,
) -> T:
    """``[--config PRESET_OR_YAML] [--key value ...]`` -> a validated ``cls`` instance.

    ``-h`` / ``--help`` prints :func:`usage` (description defaults to the running script's docstring) and
    exits 0."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        main_doc = getattr(sys.modules.get("__main__"), "__doc__", None)
        print(usage(cls, description or main_doc, preset_dir))
        raise SystemExit(0)
    overrides = parse_overrides(argv)
    preset = overrides.pop("config", default_preset)
    base = load_preset(preset, preset_dir) if preset else {}
    cfg = from_dict(cls, base)
    return apply_overrides(cfg, overrides)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
    return path


__all__ = ["ConfigError", "apply_overrides", "field_comments", "from_dict", "load_preset", "parse_config", "parse_overrides", "save_config", "to_dict", "usage"]
