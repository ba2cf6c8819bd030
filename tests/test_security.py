"""Security rules that hold across the whole project (issue 8)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Hub code may use what transformers itself relies on for vision models, and nothing else.
HUB_ALLOWED = {"torch", "transformers", "safetensors", "huggingface_hub", "numpy", "PIL"}
PROJECT_DIRS = ["modeling", "training", "evaluation", "analysis", "data", "hub_release", "conversion", "cli", "scripts", "tests"]


def _python_files(dirs) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py") if ".venv" not in p.parts)


# triton comes with torch's CUDA builds; it may be imported only by the Triton kernel's own module, which the rest
# of modeling/ imports lazily (inside a function run for CUDA tensors), so CPU-only and macOS users never import it.
LAZY_ONLY = {"triton_attention.py": {"triton"}}


@pytest.mark.parametrize("path", sorted((ROOT / "modeling").glob("*.py")), ids=lambda p: p.name)
def test_hub_code_imports_only_the_allowed_libraries(path: Path) -> None:
    """Everything in modeling/ may be copied to the Hub: absolute imports must be the standard library, torch,
    transformers, safetensors, huggingface_hub, numpy or PIL (and triton in the lazily imported Triton module)."""
    tree = ast.parse(path.read_text())
    allowed = HUB_ALLOWED | LAZY_ONLY.get(path.name, set())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0:  # relative: a flat sibling file, copied with it
                continue
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top not in allowed and top not in sys.stdlib_module_names and top != "__future__":
                bad.append(name)
    assert not bad, f"{path.name} imports {bad}: Hub code may import only the standard library and {sorted(allowed)}"


def test_modules_that_import_triton_are_imported_only_lazily() -> None:
    """No module-level import (relative or absolute) of a module in LAZY_ONLY anywhere in modeling/: importing the
    model, its config or the attention kernels on a machine without triton must work."""
    lazy = {name.removesuffix(".py") for name in LAZY_ONLY}
    eager = []
    for path in sorted((ROOT / "modeling").glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only; imports inside functions are lazy
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n.split(".")[-1] in lazy for n in names):
                eager.append(f"{path.name}:{node.lineno}")
    assert not eager, f"module-level imports of the Triton module at {eager}: import it inside the CUDA path"
    # And a machine without triton runs the model: a subprocess in which importing triton fails (transformers itself
    # imports triton when it is installed, so "not in sys.modules" would test nothing here).
    code = """
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTriton())
import torch
from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel
config = EntmaxViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         image_size=32, patch_size=16, attention="entmax15")
out = EntmaxViTModel(config)(torch.randn(1, 3, 32, 32)).last_hidden_state
assert torch.isfinite(out).all() and "triton" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def _trees(source: str):
    """The module's syntax tree, then that of every string constant that is Python code itself (scripts that
    tests run in a subprocess), so a rule holds for embedded code too."""
    tree = ast.parse(source)
    yield tree
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "\n" in node.value:
            try:
                yield ast.parse(node.value)
            except SyntaxError:
                continue


def test_no_torch_load_without_weights_only() -> None:
    offenders = []
    for path in _python_files(PROJECT_DIRS):
        for node in (n for tree in _trees(path.read_text()) for n in ast.walk(tree)):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
                if name == "load" and owner == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    ok = "weights_only" in kw and isinstance(kw["weights_only"], ast.Constant) and kw["weights_only"].value is True
                    if not ok:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True at {offenders}"


def test_weights_are_written_only_as_safetensors() -> None:
    """No pickled weights are written by project code: no torch.save call outside tests and no
    safe_serialization=False (a call may opt out with ``# noqa: security`` on its line, e.g. a tensor handed
    between processes)."""
    offenders = []
    for path in _python_files([d for d in PROJECT_DIRS if d != "tests"]):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.Call) or "noqa: security" in lines[node.lineno - 1]:
                continue
            func = node.func
            is_save = isinstance(func, ast.Attribute) and func.attr == "save" and getattr(func.value, "id", "") == "torch"
            unsafe = any(k.arg == "safe_serialization" and isinstance(k.value, ast.Constant) and k.value.value is False
                         for k in node.keywords)
            if is_save or unsafe:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"pickle-based weight writing at {offenders}"
