"""The entmax attention kernel repository for the Hub, generated from ``modeling/`` (issue 23).

transformers loads an attention function from a Hub kernel repository with
``attn_implementation="OWNER/entmax-attention:entmax15"`` (``integrations/hub_kernels.load_and_register_attn_kernel``,
through the ``kernels`` library). This module writes that repository from the attention code the model ships,
never from a hand-kept copy:

    README.md                          the kernel card (usage, what it computes, exactness, speed)
    build/torch-cpu/                   variant picked by a CPU-only torch
    build/torch-cuda/                  variant picked by a CUDA build of torch (with or without a GPU)
        __init__.py                    generated: entmax15, sparsemax, entmax_bisect (+ flash_attn_forward)
        attention.py, thresholds.py,   byte-for-byte copies of modeling/'s files: attention.py and every file
        tiled_attention.py,            it imports relatively (found by reading its imports, lazy ones included)
        triton_attention.py
        entmax_attention/__init__.py   the compatibility package older ``kernels`` releases import
        metadata.json                  id, name, version, license, python-depends, backend, kernels-minver,
                                       digest (sha256 of every file, which ``kernels`` checks on load)

Both variants are pure Python ("noarch") and identical but for ``backend``: the functions pick the Triton
kernel for CUDA tensors and the tiled kernel elsewhere, per call (``attention.default_kernel``).

The contract with transformers and kernels (pinned by tests/test_hub_kernel.py):

- kernels resolves ``build/<variant>/`` (``torch-<backend>``), checks metadata.json (its ``digest`` against the
  files; a missing digest only warns) and imports ``<variant>/__init__.py`` as a package named by ``id``, so
  the copies' relative imports (``from .thresholds import ...``) resolve inside the variant;
- transformers asks kernels for ``version=1`` (branch ``v1`` on the Hub) unless the string pins ``@REV``; for a
  module with no flash-attention entry points it registers ``getattr(module, FUNC)`` as the attention function,
  called like an eager attention function: ``fn(module, query, key, value, attention_mask, scaling=...,
  dropout=..., **kwargs) -> (out (B, N, H, d), weights or None)``;
- but transformers 5.x then runs its flash-attention checks on every Hub attention kernel and refuses a module
  that has none of ``flash_attn_varlen_func``, ``sparse_atten_func``, ``flash_attn_forward``. The module
  therefore also exports ``flash_attn_forward`` (the entmax-1.5 function, in the same signature) and
  deliberately NOT ``supports_flash_attn``: with both, transformers registers ``flash_attn_forward`` whatever
  ``:FUNC`` names. Without ``:FUNC`` transformers has no function to register: always name one.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from jinja2 import Template

from entmax_vit.modeling.thresholds import SPARSE_TRANSFORMS

logger = logging.getLogger(__name__)

KERNEL_NAME = "entmax-attention"             # the Hub repository's name and the kernel's `name`
PACKAGE = KERNEL_NAME.replace("-", "_")      # kernels' python name of the kernel
KERNEL_VERSION = 1                            # major version: branch v1 on the Hub; transformers asks for 1
KERNELS_MINVER = "0.19.1"                     # the kernels release this layout was checked with
LICENSE = "Apache-2.0"
# Noarch variants: kernels picks torch-<backend of the installed torch>. Same files, per-call device dispatch.
VARIANTS: dict[str, dict] = {"torch-cpu": {"type": "cpu"}, "torch-cuda": {"type": "cuda"}}
# The functions the kernel exports, each the device-aware default kernel (`auto`) of one sparse transform.
FUNCTIONS: tuple[str, ...] = SPARSE_TRANSFORMS
ENTRY_FILE = "attention.py"
MODELING_DIR = Path(__file__).resolve().parents[1] / "modeling"
CARD_TEMPLATE = Path(__file__).resolve().parent / "templates" / "kernel_card.md"


def kernel_sources(modeling_dir: Path = MODELING_DIR, entry: str = ENTRY_FILE) -> list[str]:
    """``entry`` and every modeling file it imports relatively, directly or not, lazy imports included (read from
    the code, so a new helper file travels without a list to keep)."""
    found, todo = [], [entry]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.append(name)
        tree = ast.parse((modeling_dir / name).read_text(), filename=name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module is None or "." in node.module:
                    raise ValueError(f"{name}: 'from . import' or a nested relative import cannot be copied flat")
                todo.append(f"{node.module}.py")
    return sorted(found)


def init_source(version: int = KERNEL_VERSION) -> str:
    """The generated ``__init__.py`` of a variant."""
    functions = "\n".join(f'{f} = _checked(attention_function("{f}", "auto"))' for f in FUNCTIONS)
    exported = ", ".join(f'"{name}"' for name in (*FUNCTIONS, "flash_attn_forward"))
    return f'''"""{KERNEL_NAME} (version {version}): exact sparse attention for transformers models.

Generated by EntmaxViT's scripts/build_hub_kernel.py from its modeling/ files; do not edit.

    AutoModel.from_pretrained(repo, attn_implementation="OWNER/{KERNEL_NAME}:entmax15")  # :sparsemax, :entmax_bisect

Each function has transformers' attention-function signature and runs the device-aware default kernel (fused
Triton kernels on CUDA tensors, the tiled kernel elsewhere); with output_attentions it returns the exact
probabilities. entmax_bisect reads alpha from module.config.attention_alpha (a float, default 1.5).
"""

import functools

from .attention import attention_function


def _checked(fn):
    """Refuse a 2-D padding mask (what transformers builds for flash-attention kernels): the kernels take an
    additive or boolean mask broadcastable to (B, H, N, N). Vision encoders (ViT, DINOv2, DINOv3) pass none."""

    @functools.wraps(fn)
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if attention_mask is not None and attention_mask.dim() != 4:
            raise ValueError(
                f"{KERNEL_NAME} takes an attention mask broadcastable to (batch, heads, queries, keys); got one of "
                f"shape {{tuple(attention_mask.shape)}} (a padding mask): use it with models without padding masks"
            )
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


{functions}

# transformers 5.x checks every Hub attention kernel for a flash-attention entry point and accepts a module that
# ships its own under this name; ":FUNC" still picks the function because supports_flash_attn is absent.
flash_attn_forward = entmax15

__all__ = [{exported}]
'''


def compat_init_source() -> str:
    """``<variant>/<package>/__init__.py``: older kernels releases import this package instead of the variant's
    ``__init__.py``; it loads the variant's one under its own name (the copies' relative imports need it)."""
    return f'''"""{KERNEL_NAME} for kernels releases that import build/<variant>/{PACKAGE}/ (compatibility)."""

import importlib.util
import sys
from pathlib import Path

_variant = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(f"{{__name__}}._variant", _variant / "__init__.py",
                                               submodule_search_locations=[str(_variant)])
_module = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _module
_spec.loader.exec_module(_module)

__all__ = list(_module.__all__)
globals().update({{name: getattr(_module, name) for name in __all__}})
'''


def file_digest(path: Path) -> str:
    """base64 of the file's sha256, as kernels' ``Digest`` records it."""
    return base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()


def variant_digest(variant_dir: Path) -> dict[str, str]:
    """Every file of the variant but metadata.json (and bytecode), relative POSIX path -> digest."""
    return {p.relative_to(variant_dir).as_posix(): file_digest(p) for p in sorted(variant_dir.rglob("*"))
            if p.is_file() and p.name != "metadata.json" and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def kernel_id(digest: dict[str, str], backend: str) -> str:
    """A module name unique to this build: kernels imports each build under its id and refuses a second build
    with the same id, so it carries a hash of the files."""
    content = hashlib.sha256(json.dumps(digest, sort_keys=True).encode()).hexdigest()[:10]
    return f"_{PACKAGE}_{backend}_{content}"


@dataclass
class KernelBuild:
    folder: Path
    variants: list[str]
    sources: list[str]       # modeling files copied into each variant
    files: list[str]         # every file of the repository, relative POSIX paths


def build_kernel_repository(output_dir: str | Path, *, repo_id: Optional[str] = None, overwrite: bool = False,
                            modeling_dir: Path = MODELING_DIR) -> KernelBuild:
    """Write the kernel repository into ``output_dir`` (refused when it is not empty, unless ``overwrite``)."""
    folder = Path(output_dir)
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{folder} is not empty: pass --overwrite to replace it")
        shutil.rmtree(folder)
    sources = kernel_sources(modeling_dir)
    for variant, backend in VARIANTS.items():
        target = folder / "build" / variant
        (target / PACKAGE).mkdir(parents=True)
        for name in sources:
            shutil.copyfile(modeling_dir / name, target / name)
        (target / "__init__.py").write_text(init_source())
        (target / PACKAGE / "__init__.py").write_text(compat_init_source())
        digest = variant_digest(target)
        metadata = {
            "id": kernel_id(digest, backend["type"]),
            "name": KERNEL_NAME,
            "version": KERNEL_VERSION,
            "license": LICENSE,
            "python-depends": [],
            "kernels-minver": KERNELS_MINVER,
            "backend": backend,
            "digest": {"algorithm": "sha256", "files": digest},
        }
        (target / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (folder / "README.md").write_text(render_kernel_card(repo_id))
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return KernelBuild(folder=folder, variants=list(VARIANTS), sources=sources, files=files)


def render_kernel_card(repo_id: Optional[str] = None) -> str:
    """README.md of the kernel repository (``templates/kernel_card.md``)."""
    return Template(CARD_TEMPLATE.read_text(), keep_trailing_newline=True).render(
        repo_id=repo_id or f"YOUR_USERNAME/{KERNEL_NAME}", name=KERNEL_NAME, version=KERNEL_VERSION,
        functions=FUNCTIONS, variants=list(VARIANTS), kernels_minver=KERNELS_MINVER, license=LICENSE.lower(),
    )


# Runs in a fresh interpreter without site processing (no editable install of this project) and LOCAL_KERNELS
# pointing at the folder. argv: REPO_ID FUNCTIONS_JSON. Prints a JSON report.
VERIFY_SCRIPT = r'''
import json, sys
import torch
from transformers import Dinov2Config, Dinov2Model
try:
    import entmax_vit  # noqa: F401
    sys.exit("the project is importable: the check would not show that the kernel stands alone")
except ImportError:
    pass
repo_id, functions = sys.argv[1], json.loads(sys.argv[2])
torch.manual_seed(0)
config = Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64)
x = torch.randn(2, 3, 32, 32)
report = {}
for function in functions:
    model = Dinov2Model._from_config(config, attn_implementation=f"{repo_id}:{function}").eval()
    with torch.no_grad():
        weights = model(pixel_values=x, output_attentions=True)   # the explicit kernel, with probabilities
        fused = model(pixel_values=x).last_hidden_state           # the device's default kernel
    rows = torch.stack([(p.sum(-1) - 1).abs().max() for p in weights.attentions]).max().item()
    report[function] = {"row_sum_error": rows,
                        "max_abs_diff": (weights.last_hidden_state - fused).abs().max().item(),
                        "finite": bool(torch.isfinite(fused).all())}
print(json.dumps(report))
'''


def standalone_env(local_kernels: dict[str, Path]) -> dict[str, str]:
    """Environment of a ``python -S`` interpreter that has this one's site-packages but not the project (no .pth
    files run, so no editable install; no PYTHONPATH), is offline, and maps Hub kernel ids to local folders
    through ``LOCAL_KERNELS``. TRITON_INTERPRET is dropped: the kernel then picks by device as a user's would."""
    import os
    import sys

    site_dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "LOCAL_KERNELS")}
    env.update(PYTHONPATH=os.pathsep.join(site_dirs), HF_HUB_OFFLINE="1",
               LOCAL_KERNELS=":".join(f"{repo}={Path(path).resolve()}" for repo, path in local_kernels.items()))
    return env


def verify_kernel_repository(folder: str | Path, repo_id: str = f"local/{KERNEL_NAME}") -> dict:
    """Load the built folder through transformers and kernels (``LOCAL_KERNELS``) in a fresh interpreter that
    cannot import this project, run a tiny ``Dinov2Model`` with each function, and check rows sum to 1 and the
    explicit and default kernels agree (1e-5). Returns the per-function report; raises RuntimeError otherwise."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-S", "-c", VERIFY_SCRIPT, repo_id, json.dumps(list(FUNCTIONS))],
                          env=standalone_env({repo_id: Path(folder)}), cwd=Path(folder).resolve(),
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the kernel repository did not load in a fresh process:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {f: r for f, r in report.items()
           if not (r["finite"] and r["row_sum_error"] < 1e-5 and r["max_abs_diff"] < 1e-5)}
    if bad:
        raise RuntimeError(f"the kernel repository loaded but computed wrong attention: {bad}")
    return report


@dataclass
class KernelUpload:
    repo_url: str
    main_commit: str                # commit of the files on main
    version_branch: str             # v<KERNEL_VERSION>: what transformers and get_kernel(version=...) load
    version_commit: str             # the version branch's commit (main's when the branch was created from it)
    files: list[str]
    deleted: list[str]              # files of an earlier build that this one no longer has (e.g. a removed helper)


def upload_kernel_repository(folder: str | Path, repo_id: str, *, private: bool = False, token: Optional[str] = None,
                             commit_message: Optional[str] = None) -> KernelUpload:
    """Commit a built kernel repository to the Hub as a ``kernel`` repository: one commit on main, and the same
    files on the version branch ``v<KERNEL_VERSION>`` (created from that commit when missing, else one commit on
    it). Files of an earlier build that this build lacks are deleted in the same commit: kernels checks every file
    of a variant against its digest, so a stale file would make the variant fail to load."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    from .upload import repository_files

    folder = Path(folder)
    if not (folder / "README.md").is_file() or not list(folder.glob("build/*/metadata.json")):
        raise ValueError(f"{folder} is not a built kernel repository (needs README.md and build/*/metadata.json)")
    if "/" not in repo_id:
        raise ValueError(f"repo_id must look like OWNER/NAME, got {repo_id!r}")
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, repo_type="kernel", private=True if private else None, exist_ok=True)
    files = repository_files(folder)
    message = commit_message or f"{KERNEL_NAME} v{KERNEL_VERSION} ({len(files)} files), scripts/push_kernel_to_hub.py"
    branch = f"v{KERNEL_VERSION}"
    has_branch = branch in {b.name for b in api.list_repo_refs(repo_id, repo_type="kernel").branches}
    deleted: set[str] = set()

    def commit(revision: str) -> str:
        stale = sorted(f for f in api.list_repo_files(repo_id, repo_type="kernel", revision=revision)
                       if f.startswith("build/") and f not in files)
        deleted.update(stale)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
        operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
        return api.create_commit(repo_id, operations=operations, commit_message=message, repo_type="kernel",
                                 revision=revision).oid

    main_commit = commit("main")
    if has_branch:
        version_commit = commit(branch)
    else:
        api.create_branch(repo_id, branch=branch, revision=main_commit, repo_type="kernel")
        version_commit = main_commit
    logger.info("Committed %d files to %s (main %s, %s %s)", len(files), repo_id, main_commit, branch, version_commit)
    return KernelUpload(repo_url=str(repo_url), main_commit=main_commit, version_branch=branch,
                        version_commit=version_commit, files=files, deleted=sorted(deleted))
