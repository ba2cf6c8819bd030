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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from jinja2 import Template

from entmax_vit.modeling.thresholds import SPARSE_TRANSFORMS

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

    AutoModel.from_pretrained(repo, attn_implementation="OWNER/{KERNEL_NAME}:entmax15")   # or :sparsemax, :entmax_bisect

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
    return f'''"""Compatibility entry point of {KERNEL_NAME} for kernels releases that import build/<variant>/{PACKAGE}/."""

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
            raise FileExistsError(f"{folder} is not empty: pass --overwrite true to replace it")
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


__all__ = ["FUNCTIONS", "KERNEL_NAME", "KERNEL_VERSION", "KernelBuild", "VARIANTS", "build_kernel_repository",
           "kernel_sources", "render_kernel_card", "variant_digest"]
