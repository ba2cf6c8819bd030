"""Fetch transformers' own common model tests for the installed transformers version (test setup only).

They ship in the source distribution on PyPI, not in the wheel, so the first run downloads the sdist with pip
(``pip download --no-deps --no-binary :all: transformers==VERSION``) into ``~/.cache/entmax_vit/transformers-tests/``
(outside the work tree, so upstream code never sits in the repository; ``ENTMAX_VIT_TEST_CACHE`` overrides it) and extracts the three files we use into a package
``hf_common_tests``. Nothing of theirs is committed here. Three helper modules they import are not in the sdist;
``standins/`` holds our own minimal versions, copied beside them on every run:

* ``utils/test_configuration_utils.py``: ``config_common_kwargs`` (PreTrainedConfig fields with non-default
  values, for ConfigTester.check_config_arguments_init),
* ``exporters/test_export.py``: ``ExportTesterMixin`` (our torch.export test of every model class),
* ``generation/test_utils.py``: ``GenerationTesterMixin`` (empty: vision encoders do not generate).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Optional

import transformers

VERSION = transformers.__version__
PACKAGE = "hf_common_tests"
UPSTREAM_FILES = ("test_modeling_common.py", "test_configuration_common.py", "test_backbone_common.py")
STANDINS = {
    "utils/test_configuration_utils.py": "test_configuration_utils.py",
    "exporters/test_export.py": "test_export.py",
    "generation/test_utils.py": "generation_test_utils.py",
}
_HERE = Path(__file__).resolve().parent
_CACHE = Path(os.environ.get("ENTMAX_VIT_TEST_CACHE", Path.home() / ".cache" / "entmax_vit" / "transformers-tests")) / VERSION


def _download_sdist(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(folder.glob(f"transformers-{VERSION}.tar.gz"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "--quiet", f"transformers=={VERSION}", "-d", str(folder)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    found = sorted(folder.glob(f"transformers-{VERSION}.tar.gz"))
    if run.returncode != 0 or not found:
        raise RuntimeError(f"`{' '.join(cmd[2:])}` failed (is PyPI reachable?): {(run.stderr or run.stdout)[-500:]}")
    return found[0]


def prepare() -> Path:
    """Make ``hf_common_tests`` importable (downloading the sdist once); returns the folder put on sys.path."""
    package = _CACHE / PACKAGE
    if not all((package / name).is_file() for name in UPSTREAM_FILES):
        sdist = _download_sdist(_CACHE / "sdist")
        package.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            for name in UPSTREAM_FILES:
                member = tar.extractfile(f"transformers-{VERSION}/tests/{name}")
                if member is None:
                    raise RuntimeError(f"{sdist.name} has no tests/{name}")
                (package / name).write_bytes(member.read())
    (package / "__init__.py").write_text("")
    for target, source in STANDINS.items():
        (package / target).parent.mkdir(exist_ok=True)
        (package / target).parent.joinpath("__init__.py").write_text("")
        shutil.copyfile(_HERE / "standins" / source, package / target)
    if str(_CACHE) not in sys.path:
        sys.path.insert(0, str(_CACHE))
    return _CACHE


_ERROR: Optional[str] = None
try:
    prepare()
except Exception as error:  # network, disk or a changed sdist layout: reported as the skip reason
    _ERROR = f"transformers' common tests (sdist of transformers=={VERSION}) unavailable: {error}"


def require_upstream() -> None:
    """Skip the calling test module, with the reason, when the upstream tests could not be fetched."""
    if _ERROR is not None:
        import pytest

        pytest.skip(_ERROR, allow_module_level=True)
