"""Packaging (issue 16): the wheel carries every data file the packages read at run time (presets, card
templates), and an installed, NON-editable copy runs a command with a preset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_dirs() -> dict[str, str]:
    """{installed package name: repository folder}, e.g. {"entmax_vit.evaluation": "evaluation"}."""
    return dict(PYPROJECT["tool"]["setuptools"]["package-dir"])


def _data_files() -> list[str]:
    """Every non-Python file inside the package folders, as its path inside the wheel."""
    out = []
    for package, folder in _package_dirs().items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts:
                out.append(f"{package.replace('.', '/')}/{path.relative_to(ROOT / folder).as_posix()}")
    return sorted(out)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (an in-tree build would leave build/ in the shared tree)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in set(_package_dirs().values()):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True, text=True, timeout=600)
    (path,) = dist.glob("entmax_vit-*.whl")
    return path


def test_every_preset_and_data_file_ships(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(ROOT.glob("*/configs/*.yaml"))
    assert {"evaluation", "analysis", "training"} <= {p.parent.parent.name for p in presets}
    expected = _data_files()
    assert [p for p in presets if f"entmax_vit/{p.parent.parent.name}/configs/{p.name}" not in names] == []
    assert [f for f in expected if f not in names] == []
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in PYPROJECT["project"]["scripts"]:
        assert script in text


@pytest.mark.slow  # pip install + a fresh interpreter importing torch: ~40 s on 2 busy cores
def test_installed_copy_runs_a_preset_command(wheel, tmp_path):
    """pip install --target (no editable finder, no repository on the path): the console script
    entmax-vit-eval-segmentation finds the voc preset inside the installed package."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, text=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = target / "bin" / "entmax-vit-eval-segmentation"
    check = ("import runpy, sys, entmax_vit.evaluation as e; "
             f"assert e.__file__.startswith({str(target)!r}), e.__file__; "
             f"sys.argv = [{str(script)!r}, '--preset', 'voc', '--help']; runpy.run_path({str(script)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--num_classes" in proc.stdout and "(default: 21)" in proc.stdout  # the voc preset's 21 classes
