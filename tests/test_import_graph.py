"""Issue 26: no import cycle between the project's files or packages, lazy imports (inside functions) included.
A package's ``__init__`` re-exporting its submodules is not an edge back (importing a submodule runs its
package first by Python's rules, not by a choice of ours)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "entmax_vit"  # the repository root is the package (pyproject.toml's package-dir)


def product_modules() -> dict[str, Path]:
    modules = {}
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("tests", "scripts", "outputs") or rel.parts[0].startswith("."):
            continue
        modules[".".join((PACKAGE, *rel.with_suffix("").parts)).removesuffix(".__init__")] = path
    return modules


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``name`` imports anywhere in its file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            module = ".".join([*base[: len(base) - node.level + 1], *([node.module] if node.module else [])]) \
                if node.level else node.module or ""
            submodules = {f"{module}.{alias.name}" for alias in node.names} & modules.keys()
            found |= submodules or {module}
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` (a path that returns to its start), or []."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return []

    return next((found for node in sorted(graph) if node not in state and (found := visit(node, [node]))), [])


def test_no_import_cycle_between_files_or_packages():
    modules = product_modules()
    files = {name: imported(name, path, modules) for name, path in modules.items()}
    assert cycle(files) == []
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731 - entmax_vit.<package>
    packages: dict[str, set[str]] = {}
    for name, targets in files.items():
        packages.setdefault(top(name), set()).update(top(t) for t in targets if top(t) != top(name))
    assert cycle(packages) == []


def test_the_check_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) == []
