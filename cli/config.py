"""The command line of every entry point, parsed by tyro: a config dataclass, a YAML preset as the default instance,
``--section.key value`` overrides (docs/configuration.md).

    cfg = parse_config(DinoConfig, argv, preset_dir=Path(__file__).parent / "configs")

Added to tyro: ``--config|--preset NAME_OR_YAML``, a dict field as one YAML mapping, the annotated bounds checked.
"""

import contextlib
import io
import re
import sys
import typing
from pathlib import Path
from typing import Optional, Sequence, TypeVar

import typeguard
import tyro
import yaml
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, PrimitiveTypeInfo

from entmax_vit.data.config_io import ALL_ITEMS, ConfigError, check_values, load_preset

T = TypeVar("T")
REGISTRY = ConstructorRegistry()


@REGISTRY.primitive_rule
def _dict_rule(info: PrimitiveTypeInfo) -> Optional[PrimitiveConstructorSpec]:
    """A dict field is one YAML mapping, ``--model.backbone_overrides "{hidden_size: 96}"``, whatever its default
    (tyro would otherwise turn a preset's keys into options of their own and refuse any other key)."""
    if info.type is not dict and info.type_origin is not dict:
        return None

    def parse(tokens: list[str]) -> dict:
        value = yaml.safe_load(tokens[0]) or {}
        if not isinstance(value, dict):
            raise ValueError(f"expected a YAML mapping such as '{{key: value}}', got {tokens[0]!r}")
        try:  # every key and value: YAML reads '{224:8}' (no space) as {13448: None}
            return typeguard.check_type(value, info.type, collection_check_strategy=ALL_ITEMS)
        except typeguard.TypeCheckError as err:
            hint = " (YAML needs a space after each ':')" if re.search(r":\S", tokens[0]) else ""
            raise ValueError(f"{tokens[0]!r} read as {value!r}: {err}{hint}") from None

    return PrimitiveConstructorSpec(
        nargs=1, metavar="'{KEY: VALUE, ...}'", instance_from_str=parse, is_instance=lambda x: isinstance(x, dict),
        str_from_instance=lambda x: [yaml.safe_dump(x, default_flow_style=True, width=10**6).strip()],
    )


def _one_line(text: str) -> str:
    """tyro's boxed error as one line (the box drawing and the "run --help" footer dropped)."""
    lines = [line.strip() for line in text.split("For full helptext")[0].splitlines()]
    lines = [line.strip("╭╮╰╯─+- ") if line[:1] in "╭╰+" else line.strip(" │|") for line in lines if line]
    return " ".join(line for line in lines if line.strip("─-"))


def _split_preset(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """``--config X`` / ``--preset X`` (or ``=X``) and the remaining arguments."""
    preset, rest, args = None, [], iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in ("--config", "--preset"):
            preset = value if eq else next(args, "")
        else:
            rest.append(arg)
    return preset, rest


def parse_config(cls: type[T], argv: Optional[Sequence[str]] = None, preset_dir: Optional[Path] = None,
                 default_preset: Optional[str] = None, description: Optional[str] = None,
                 prog: Optional[str] = None) -> T:
    """``[--config|--preset PRESET_OR_YAML] [--key value ...]`` -> a checked ``cls`` (defaults, then the preset, then
    the overrides); ConfigError carries tyro's message on one line. ``--help`` shows the preset's values as defaults
    and lists the presets (description: the running script's docstring by default), and exits 0."""
    preset, rest = _split_preset(sys.argv[1:] if argv is None else argv)
    preset = preset or default_preset
    base = load_preset(cls, preset, preset_dir) if preset else cls()
    text = (description or getattr(sys.modules.get("__main__"), "__doc__", None) or cls.__doc__ or "").strip()
    if preset_dir is not None and Path(preset_dir).is_dir():
        names = ", ".join(sorted(p.stem for p in Path(preset_dir).glob("*.yaml")))
        text += f"\n\nPresets (--config NAME or --preset NAME, or a FILE.yaml): {names}"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            cfg = tyro.cli(cls, args=rest, default=base, prog=prog, description=text, use_underscores=True,
                           registry=REGISTRY)
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help
            raise
        raise ConfigError(_one_line(stderr.getvalue()) or f"invalid arguments {rest}") from None
    except (TypeError, ValueError) as err:  # a dataclass __post_init__ refusing a value
        raise ConfigError(str(err)) from None
    check_values(cfg)
    return cfg


def positionals_to_options(cls: type, argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """``[... A B ...]`` -> ``[... --names[0] A --names[1] B]``: positional arguments as the keys they stand for. A
    token is an option's value when the option takes one: a flag none, a list every following non-option token."""
    hints = typing.get_type_hints(cls)
    options: list[str] = []
    positionals: list[str] = []
    takes = 0  # values the last option still takes (-1: any number)
    for token in argv:
        if token.startswith("--"):
            key, eq, _ = token[2:].replace("-", "_").partition("=")
            tp = hints.get(key)
            flag = tp is bool or (key.startswith("no_") and hints.get(key[3:]) is bool)
            takes = 0 if eq or flag else -1 if typing.get_origin(tp) in (list, tuple) else 1
            options.append(token)
        elif takes:
            options.append(token)
            takes -= takes > 0
        else:
            positionals.append(token)
    if len(positionals) > len(names):
        raise ConfigError(f"Expected at most {' and '.join(n.upper() for n in names)} as positional arguments, "
                          f"got {positionals}")
    return options + [x for name, value in zip(names, positionals) for x in (f"--{name}", value)]

