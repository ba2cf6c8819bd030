"""Every option of every command line has its own help text.

tyro takes a field's help from its source comment: the inline comment, else the comment lines directly above it.
A field WITHOUT a comment of its own that directly follows (no blank line) a commented field silently inherits
that comment (tyro's "grouped comments" rule), so one missing comment made ``--data.split`` show data.source's
text and every section of ``training/dino.py --help`` read "Seed of everything". These tests hold each field of
every entry point's config (nested sections included) to: a comment of its own, exactly what tyro shows, and no
section heading (``# --- metrics``) leaking into it.

The config classes are found from the code: every ``entry_point.run(main, Config, ...)``, evaluation's
``run(Config, main, ...)`` and ``parse_config(Config, ...)`` call under the package folders and scripts/
(parsed with ``ast``); ``EXPECTED`` is a floor that keeps the discovery itself honest.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import re
import runpy
import sys
import tokenize
import typing
from pathlib import Path

import pytest
from tyro._docstrings import get_field_docstring

ROOT = Path(__file__).resolve().parents[1]
# Folders whose .py files may define or call an entry point (scripts/ are files, the rest package modules).
SCAN_DIRS = ("scripts", "cli", "conversion", "jobs", "analysis", "evaluation", "training", "hub_release")
# Call shapes that parse a command line, and the positional index of the config class in each.
RUN_MODULES = {"entmax_vit.cli.entry_point": 1}
RUN_FUNCTIONS = ("run", "exit_status")  # the entry_point functions that parse a command line
# Config classes that must be found (a floor for the discovery; new entry points are found without this list).
EXPECTED = {
    "DinoConfig", "KNNEvalConfig", "LinearEvalConfig", "SegmentationEvalConfig", "AnalyzeConfig", "ConvertConfig",
    "ExportConfig", "PushConfig", "BuildKernelConfig", "PushKernelConfig", "GpuCheckConfig", "BenchAttentionConfig",
    "BenchModelConfig", "BenchConfig", "MainJobConfig", "ReproduceMiniConfig",
}
HEADING = re.compile(r"^\s*(-{2,}|={2,}|#)")


def load_file(path: Path):
    """A scripts/ file as a module (not run as __main__), once."""
    name = f"_cli_help_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def module_of(path: Path):
    if path.parent.name == "scripts":
        return load_file(path)
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return importlib.import_module(".".join(["entmax_vit", *parts]))


class CallFinder(ast.NodeVisitor):
    """(name, the module it was imported from or None, lineno) of the config argument of every command-line
    parsing call in one file. Imports are resolved per function scope (a module may import a different
    ``run`` in each function); names that are parameters of an enclosing function (a helper forwarding its
    ``config_cls``) are left out."""

    def __init__(self, package: str, module: str = "") -> None:
        self.package = package  # for relative imports
        self.module = module  # a name neither imported nor a parameter is this module's own (cli.entry_point's run)
        self.scopes: list[dict[str, str]] = [{}]  # local name -> "module.name" it was imported as
        self.params: list[set[str]] = []
        self.found: list[tuple[str, str | None, int]] = []

    def lookup(self, name: str) -> str | None:
        return next((scope[name] for scope in reversed(self.scopes) if name in scope), None)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = ".".join(self.package.split(".")[:len(self.package.split(".")) + 1 - node.level]) if node.level else ""
        module = ".".join(p for p in (base, node.module) if p)
        for alias in node.names:
            self.scopes[-1][alias.asname or alias.name] = f"{module}.{alias.name}"

    def visit_FunctionDef(self, node) -> None:
        a = node.args
        self.params.append({x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]})
        self.scopes.append({})
        self.generic_visit(node)
        self.scopes.pop()
        self.params.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def config_index(self, func: ast.expr) -> int | None:
        if isinstance(func, ast.Name):  # parse_config(C, ...) or run(...) imported from an entry_point module
            target = self.lookup(func.id) or f"{self.module}.{func.id}"
            if func.id == "parse_config" or target.endswith(".parse_config"):
                return 0
            module, _, name = target.rpartition(".")
            return RUN_MODULES.get(module) if name in RUN_FUNCTIONS else None
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):  # entry_point.run(...)
            if func.attr == "parse_config":
                return 0
            if func.attr in RUN_FUNCTIONS:
                return RUN_MODULES.get(self.lookup(func.value.id) or "")
        return None

    def visit_Call(self, node: ast.Call) -> None:
        index = self.config_index(node.func)
        if index is not None:
            arg = node.args[index] if len(node.args) > index else None
            assert isinstance(arg, ast.Name), f"line {node.lineno}: the config class must be passed by name"
            if not any(arg.id in p for p in self.params):
                target = self.lookup(arg.id)
                self.found.append((arg.id, target.rpartition(".")[0] if target else None, node.lineno))
        self.generic_visit(node)


def discover() -> dict[str, type]:
    classes: dict[str, type] = {}
    for folder in SCAN_DIRS:
        for path in sorted((ROOT / folder).glob("*.py")):
            finder = CallFinder(f"entmax_vit.{folder}", f"entmax_vit.{folder}.{path.stem}")
            finder.visit(ast.parse(path.read_text(), str(path)))
            for name, module, lineno in finder.found:
                where = f"{path.relative_to(ROOT)}:{lineno}"
                cls = getattr(importlib.import_module(module) if module else module_of(path), name, None)
                assert dataclasses.is_dataclass(cls), f"{where}: {name} is not a dataclass"
                assert classes.get(name, cls) is cls, f"{where}: two config classes named {name}"
                classes[name] = cls
    return classes


CONFIGS = discover()


def own_comment(cls: type, name: str) -> str:
    """The comment written for field ``name`` of ``cls``: its inline comment, else the contiguous comment lines
    directly above it (what tyro should show), whitespace-normalised."""
    source = inspect.getsource(cls)
    tree = ast.parse(source)
    (classdef,) = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    (node,) = [n for n in classdef.body
               if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == name]
    comments = {tok.start[0]: tok for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    inline = comments.get(node.lineno)  # a comment on the field's (first) line
    if inline is not None:
        return " ".join(inline.string.lstrip("#:").split())
    above: list[str] = []
    line = node.lineno - 1
    while line >= 1 and lines[line - 1].lstrip().startswith("#"):
        above.insert(0, lines[line - 1].strip().lstrip("#:"))
        line -= 1
    return " ".join(" ".join(above).split())


def walk(cls: type, prefix: str = ""):
    """(class, the class whose source defines the field, dotted key, field name) of every field, nested dataclass
    sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        owner = next(c for c in cls.__mro__ if f.name in vars(c).get("__annotations__", {}))
        yield cls, owner, prefix + f.name, f.name
        kind = hints[f.name]
        candidates = typing.get_args(kind) if typing.get_origin(kind) is typing.Union else (kind,)
        for sub in candidates:
            if isinstance(sub, type) and dataclasses.is_dataclass(sub):
                yield from walk(sub, f"{prefix}{f.name}.")


def test_every_entry_point_config_is_found():
    assert EXPECTED <= set(CONFIGS), f"not discovered: {sorted(EXPECTED - set(CONFIGS))}"


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_every_field_has_its_own_help(config):
    problems = []
    for cls, owner, key, name in walk(CONFIGS[config]):
        own = own_comment(owner, name)
        raw = get_field_docstring(cls, name, ()) or ""  # what tyro's --help shows
        shown = " ".join(raw.split())
        if not own:
            problems.append(f"{key}: no comment of its own (tyro shows {shown[:60]!r})")
        elif own != shown:
            problems.append(f"{key}: tyro shows {shown[:60]!r}, not its comment {own[:60]!r}")
        if HEADING.match(shown):
            problems.append(f"{key}: help starts with a heading marker: {shown[:60]!r}")
        # tyro keeps a line break before a comment line that starts with a non-letter ("(", a digit, a quote)
        if (cut := re.search(r"[^\n]\n[^\n]", raw)) is not None:
            problems.append(f"{key}: help broken at {raw[max(0, cut.start() - 30):cut.end() + 30]!r}: rewrap the "
                            "comment so that no continuation line starts with a non-letter")
    assert not problems, f"{config}:\n" + "\n".join(problems)


def test_training_help_end_to_end(monkeypatch):
    """``training/dino.py --help`` as a user runs it (in-process): the seed's help is the seed's alone, and
    ``--data.split`` does not repeat data.source's text."""
    from entmax_vit.training.config import DataConfig

    monkeypatch.setattr(sys, "argv", [str(ROOT / "training" / "dino.py"), "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "training" / "dino.py"), run_name="__main__")
    assert exit_.value.code in (0, None)
    text = out.getvalue()
    assert text.count("Seed of everything") == 1, text
    options = re.split(r"\n\s+(?=--)", text)
    (split,) = [o for o in options if o.startswith("--data.split ")]
    (source,) = [o for o in options if o.startswith("--data.source ")]
    source_help = " ".join(get_field_docstring(DataConfig, "source", ()).split())
    assert source_help[:40] in " ".join(source.split()) and source_help[:40] not in " ".join(split.split()), split
