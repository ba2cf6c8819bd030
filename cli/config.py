"""Typed configs for entry points, parsed by `tyro <https://brentyi.github.io/tyro/>`_: a dataclass with
commented defaults, YAML presets, ``--section.key value`` overrides checked against the dataclass, and the
resolved config written beside the outputs (docs/configuration.md says why tyro).

    cfg = parse_config(DinoConfig, argv, preset_dir=Path(__file__).parent / "configs")
    save_config(cfg, out_dir / "config.yaml")

tyro builds the parser from the type hints (Literal, Optional, list, tuple, nested dataclasses), takes the help
text from the comments above or beside each field and refuses unknown keys with the closest valid ones. This
module adds what tyro leaves to its users, through tyro's own extension points:

- value spellings kept from earlier versions of the project (``ConstructorRegistry`` rules): ``--flag`` alone
  or ``--flag true|false``; lists as ``a b``, ``a,b`` or ``[a, b]``; ``none``/``null`` for Optional fields;
  dict fields as a YAML mapping ``"{key: value}"``;
- YAML presets (``--config NAME`` / ``--preset NAME`` or a file), read through the same tyro parser as the
  command line, so a preset is checked exactly like an override;
- value checks declared in the field's annotation and applied after parsing, naming the dotted key:
  ``annotated_types`` bounds (``Annotated[float, Gt(0)]``) and :class:`KeysOf` for dict fields whose keys
  must be arguments of some class (``Annotated[dict, KeysOf(EntmaxViTConfig)]``).
"""

from __future__ import annotations

import argparse
import collections.abc
import contextlib
import dataclasses
import difflib
import inspect
import io
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TypeVar

import annotated_types
import tyro
import yaml
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, PrimitiveTypeInfo

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that does not fit the dataclass."""


# ============ value spellings (tyro constructor rules) ============

REGISTRY = ConstructorRegistry()
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
_NONE = {"none", "null", "~"}


def _parse_bool(args: list[str]) -> bool:
    if not args:  # a bare --flag
        return True
    if len(args) == 1 and args[0].lower() in _TRUE | _FALSE:
        return args[0].lower() in _TRUE
    raise ValueError(f"expected true/false, got {' '.join(args)!r}")


@REGISTRY.primitive_rule
def _bool_rule(info: PrimitiveTypeInfo) -> Optional[PrimitiveConstructorSpec]:
    """``--flag`` alone means true; ``--flag true|false|yes|no|1|0`` sets it (tyro's default would be a
    ``--flag/--no-flag`` pair, which breaks every command line and preset written so far)."""
    if info.type is not bool:
        return None
    return PrimitiveConstructorSpec(nargs="*", metavar="[true|false]", instance_from_str=_parse_bool,
                                    is_instance=lambda x: isinstance(x, bool),
                                    str_from_instance=lambda x: [str(x).lower()])


def _element_spec(tp: Any, info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec:
    spec = ConstructorRegistry.get_primitive_spec(PrimitiveTypeInfo.make(tp, info.markers))
    if not isinstance(spec, PrimitiveConstructorSpec):
        raise ValueError(f"unsupported element type {tp}")
    return spec


@REGISTRY.primitive_rule
def _sequence_rule(info: PrimitiveTypeInfo) -> Optional[PrimitiveConstructorSpec]:
    """Lists and tuples of primitives: ``--ks 10 20``, ``--ks 10,20`` or ``--ks "[10, 20]"`` (``[]`` = empty)."""
    origin = info.type_origin
    if origin not in (list, tuple, collections.abc.Sequence) and info.type not in (list, tuple):
        return None
    args = typing.get_args(info.type)
    fixed = origin is tuple and bool(args) and args[-1] is not Ellipsis
    element_types = list(args) if fixed else [args[0] if args else str]
    if any(dataclasses.is_dataclass(t) for t in element_types):
        return None
    specs = [_element_spec(t, info) for t in element_types]

    def parse(tokens: list[str]) -> Any:
        if len(tokens) == 1 and tokens[0].strip().startswith("["):
            loaded = yaml.safe_load(tokens[0])
            items = ["none" if v is None else str(v) for v in (loaded or [])]
        elif len(tokens) == 1 and "," in tokens[0]:
            items = [v.strip() for v in tokens[0].split(",") if v.strip() != ""]
        else:
            items = list(tokens)
        if fixed and len(items) != len(specs):
            raise ValueError(f"expected {len(specs)} values, got {len(items)}: {items}")
        values = [(specs[i] if fixed else specs[0]).instance_from_str([v]) for i, v in enumerate(items)]
        return tuple(values) if (origin is tuple or info.type is tuple) else values

    def render(value: Any) -> list[str]:
        return [x for i, v in enumerate(value) for x in (specs[i] if fixed else specs[0]).str_from_instance(v)]

    return PrimitiveConstructorSpec(
        nargs="*", metavar="VALUE [VALUE ...]" if not fixed else " ".join(s.metavar for s in specs),
        instance_from_str=parse, is_instance=lambda x: isinstance(x, (list, tuple)), str_from_instance=render,
    )


@REGISTRY.primitive_rule
def _optional_rule(info: PrimitiveTypeInfo) -> Optional[PrimitiveConstructorSpec]:
    """``Optional[X]``: ``none``, ``null`` or ``None`` give None, anything else is parsed as X."""
    if info.type_origin not in (typing.Union, types.UnionType):
        return None
    args = typing.get_args(info.type)
    others = [a for a in args if a is not type(None)]
    if type(None) not in args or len(others) != 1:
        return None
    inner = ConstructorRegistry.get_primitive_spec(PrimitiveTypeInfo.make(others[0], info.markers))
    if not isinstance(inner, PrimitiveConstructorSpec):
        return None

    def parse(tokens: list[str]) -> Any:
        if len(tokens) == 1 and tokens[0].lower() in _NONE:
            return None
        return inner.instance_from_str(tokens)

    return PrimitiveConstructorSpec(
        nargs="*" if inner.nargs != 1 else 1, metavar=f"{inner.metavar}|none", instance_from_str=parse,
        is_instance=lambda x: x is None or inner.is_instance(x),
        str_from_instance=lambda x: ["none"] if x is None else inner.str_from_instance(x),
    )


@REGISTRY.primitive_rule
def _dict_rule(info: PrimitiveTypeInfo) -> Optional[PrimitiveConstructorSpec]:
    """A dict field takes one YAML mapping: ``--model.backbone_overrides "{hidden_size: 96}"``."""
    if info.type is not dict and info.type_origin is not dict:
        return None

    def parse(tokens: list[str]) -> dict:
        value = yaml.safe_load(tokens[0]) if tokens[0].strip() else {}
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"expected a YAML mapping such as '{{key: value}}', got {tokens[0]!r}")
        return value

    return PrimitiveConstructorSpec(
        nargs=1, metavar="'{KEY: VALUE, ...}'", instance_from_str=parse, is_instance=lambda x: isinstance(x, dict),
        str_from_instance=lambda x: [yaml.safe_dump(x, default_flow_style=True, width=10**6).strip()],
    )


# ============ value checks declared in annotations ============

@dataclasses.dataclass(frozen=True)
class KeysOf:
    """Annotation for a dict field whose keys must be constructor arguments (or default attributes) of
    ``target``: ``backbone_overrides: Annotated[dict, KeysOf(EntmaxViTConfig)]``. A typo such as ``hiden``
    is refused with the closest valid key, instead of being passed on and silently ignored."""

    target: Any

    def valid_keys(self) -> set[str]:
        keys = {name for name, p in inspect.signature(self.target.__init__).parameters.items()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name != "self"}
        try:
            instance = self.target()
            keys |= set(instance.to_dict() if hasattr(instance, "to_dict") else vars(instance))
        except Exception:  # a class without a default instance: its signature alone
            pass
        return keys


_BOUNDS = {annotated_types.Gt: (">", lambda v, b: v > b), annotated_types.Ge: (">=", lambda v, b: v >= b),
           annotated_types.Lt: ("<", lambda v, b: v < b), annotated_types.Le: ("<=", lambda v, b: v <= b)}


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
            valid = item.valid_keys()
            for name in value:
                if name not in valid:
                    close = difflib.get_close_matches(str(name), sorted(valid), n=3)
                    hint = f"; did you mean {' or '.join(close)}?" if close else ""
                    raise ConfigError(f"{key}: unknown key {name!r} for {item.target.__name__}{hint}")


def check_values(cfg: Any, prefix: str = "") -> None:
    """Apply the checks in the fields' ``Annotated[...]`` metadata (bounds, :class:`KeysOf`), recursively;
    ConfigError names the dotted key."""
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_values(value, f"{prefix}{f.name}.")
            continue
        hint = hints.get(f.name)
        if typing.get_origin(hint) is typing.Annotated:
            _check_value(prefix + f.name, value, hint.__metadata__)


# ============ parsing ============

def _description(cls: type, description: Optional[str], preset_dir: Optional[Path]) -> str:
    text = (description or cls.__doc__ or "").strip()
    if preset_dir is not None and Path(preset_dir).is_dir():
        names = ", ".join(sorted(p.stem for p in Path(preset_dir).glob("*.yaml")))
        text += f"\n\nPresets (--config NAME or --preset NAME, or a FILE.yaml): {names}"
    return text


def _tyro(cls: type[T], args: Sequence[str], default: Optional[T] = None, prog: Optional[str] = None,
          description: Optional[str] = None) -> T:
    """One tyro parse; a parse error becomes ConfigError carrying tyro's message (which names the key and
    suggests the closest valid ones) instead of tyro printing it and exiting."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return tyro.cli(cls, args=list(args), default=default, prog=prog, description=description,
                            use_underscores=True, registry=REGISTRY, config=(tyro.conf.FlagConversionOff,))
    except SystemExit as exit_:
        if exit_.code in (0, None):
            raise
        message = stderr.getvalue().strip() or f"invalid arguments {list(args)}"
        raise ConfigError("\n".join([message, *_unknown_key_notes(cls, args)])) from None
    except (TypeError, ValueError) as err:  # a dataclass __post_init__ refusing a value
        raise ConfigError(str(err)) from None


def _keys(cls: type, prefix: str = "") -> dict[str, list[str]]:
    """{section: [its keys]} for a config dataclass, sections as dotted prefixes ("" = the top level)."""
    hints = typing.get_type_hints(cls)
    out = {prefix: []}
    for f in dataclasses.fields(cls):
        out[prefix].append(f.name)
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.update(_keys(tp, f"{prefix}{f.name}."))
    return out


def closest_keys(name: str, valid: Sequence[str]) -> list[str]:
    """Valid keys a mistyped ``name`` may mean: difflib's closest, and keys equal to it or containing it once
    underscores are ignored (``batchsize`` -> ``batch_size_per_device``, which difflib alone misses)."""
    def bare(key: str) -> str:
        return key.replace("_", "").lower()

    close = difflib.get_close_matches(name, list(valid), n=3)
    close += [k for k in valid if bare(name) and (bare(name) in bare(k) or bare(k) in bare(name)) and k not in close]
    return close[:3]


def _unknown_key_notes(cls: type, args: Sequence[str]) -> list[str]:
    """For each ``--key`` that is not a config key: the closest keys of its section (tyro suggests some only when
    its own matcher finds them) and all the keys the section has."""
    sections = _keys(cls)
    notes = []
    for arg in args:
        if not arg.startswith("--"):
            continue
        key = arg[2:].split("=", 1)[0].replace("-", "_")
        section, _, name = key.rpartition(".")
        section = f"{section}." if section else ""
        if name in sections.get(section, []):
            continue
        where = f"section {section[:-1]!r}" if section in sections and section else "the config"
        valid = sections.get(section) or sections[""]
        close = closest_keys(name, valid)
        hint = f"did you mean {' or '.join('--' + section + k for k in close)}? " if close else ""
        notes.append(f"{key}: not a config key; {hint}{where} has keys {valid}")
    return notes


def _render(value: Any) -> str:
    """A YAML value as one command-line token for tyro (see the constructor rules above)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple, dict)):
        return yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True,
                              width=10**6).strip()
    return str(value)


def _tokens(cls: type, data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """A (nested) mapping -> ``--a.b=value`` tokens; unknown keys raise ConfigError listing the valid ones."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix[:-1] or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    out: list[str] = []
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"Unknown config key {prefix + str(key)!r}; valid keys: {[prefix + n for n in names]}")
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if dataclasses.is_dataclass(value):
                value = to_dict(value)
            out += _tokens(tp, value, f"{prefix}{key}.")
        else:
            out.append(f"--{prefix}{key}={_render(value)}")
    return out


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a (nested) mapping (a YAML preset, a saved config), checked by the same tyro parser
    as the command line; unknown keys and values that do not fit raise ConfigError."""
    cfg = _tyro(cls, _tokens(cls, data, prefix))
    check_values(cfg)
    return cfg


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


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b": value}`` (the one implementation: resume checks, trackers, cards, the main job)."""
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


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


def usage(cls: type, description: Optional[str] = None, preset_dir: Optional[Path] = None,
          default: Any = None, prog: Optional[str] = None) -> str:
    """``--help`` text (tyro's): the description, the presets, and every dotted key with its type, default
    (``default``'s values, e.g. a preset's, else the dataclass's) and the comment that documents it."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.suppress(SystemExit):
        tyro.cli(cls, args=["--help"], description=_description(cls, description, preset_dir), default=default,
                 prog=prog,
                 use_underscores=True, registry=REGISTRY, config=(tyro.conf.FlagConversionOff,))
    return stdout.getvalue()


def positionals_to_options(cls: type, argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """``[... A B ...]`` -> ``[... --names[0] A --names[1] B]``: an entry point's positional arguments as the
    config keys they stand for (tyro's positional fields could not also be given as ``--key`` or in a preset).

    An option takes the following token as its value unless that token is an option; a boolean option takes it
    only when it is a boolean word (``--overwrite IN OUT`` keeps IN positional), a list option takes every
    following non-option token."""
    hints = typing.get_type_hints(cls)
    options: list[str] = []
    positionals: list[str] = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            positionals.append(token)
            i += 1
            continue
        options.append(token)
        key = token[2:].replace("-", "_")
        tp = hints.get(key)
        values_follow = "=" not in token
        while values_follow and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            if tp is bool and argv[i + 1].lower() not in _TRUE | _FALSE:
                break
            options.append(argv[i + 1])
            i += 1
            if typing.get_origin(tp) not in (list, tuple):
                break
        i += 1
    if len(positionals) > len(names):
        raise ConfigError(f"Expected at most {' and '.join(n.upper() for n in names)} as positional arguments, "
                          f"got {positionals}")
    for name, value in zip(names, positionals):
        options += [f"--{name}", value]
    return options


def _split_preset(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """``--config X`` / ``--preset X`` (either spelling, ``=`` or not) and the remaining arguments."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config", "--preset", dest="preset", default=None)
    known, rest = parser.parse_known_args(list(argv))
    return known.preset, rest


def parse_config(
    cls: type[T],
    argv: Optional[Sequence[str]] = None,
    preset_dir: Optional[Path] = None,
    default_preset: Optional[str] = None,
    description: Optional[str] = None,
    prog: Optional[str] = None,
) -> T:
    """``[--config|--preset PRESET_OR_YAML] [--key value ...]`` -> a checked ``cls`` instance: the dataclass
    defaults, then the preset, then the overrides.

    ``-h`` / ``--help`` prints tyro's help with the preset's values as defaults (description defaults to the
    running script's docstring) and exits 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    preset, rest = _split_preset(argv)
    preset = preset or default_preset
    try:
        base = from_dict(cls, load_preset(preset, preset_dir)) if preset else cls()
    except ConfigError as err:
        raise ConfigError(f"preset {preset}: {err}") from None
    if any(a in ("-h", "--help") for a in rest):
        main_doc = getattr(sys.modules.get("__main__"), "__doc__", None)
        print(usage(cls, description or main_doc, preset_dir, default=base, prog=prog))
        raise SystemExit(0)
    cfg = _tyro(cls, rest, default=base, prog=prog)
    check_values(cfg)
    return cfg


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary name of this process: two jobs saving into one folder (parallel reproduction lanes) must not
    # rename each other's half-written file away
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
    return path


__all__ = ["REGISTRY", "ConfigError", "KeysOf", "check_values", "flatten", "from_dict",
           "load_preset", "parse_config", "positionals_to_options", "save_config", "to_dict", "usage"]
