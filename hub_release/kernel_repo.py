"""The entmax attention kernel repository for the Hub, generated from ``modeling/`` (issue 23): README.md (the
kernel card) and two noarch variants, build/torch-cpu/ and build/torch-cuda/ (identical files; the functions pick
Triton on CUDA tensors and the tiled kernel elsewhere, per call). Each holds byte-for-byte copies of
modeling/attention.py and every file it imports relatively, a generated ``__init__.py``, the ``entmax_attention/``
package older kernels releases import, and metadata.json with the sha256 digest of every file.

What transformers and kernels require of the module (why it exports ``flash_attn_forward`` but NOT
``supports_flash_attn``): docs/hub.md, pinned by tests/test_hub_kernel.py.
"""

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

from .card import PLACEHOLDER_OWNER
from .upload import additions, open_repository, prepare_folder, repository_files
from .verify import run_standalone

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
MODELING_DIR = Path(__file__).resolve().parents[1] / "modeling"
TEMPLATES = Path(__file__).resolve().parent / "templates"


def kernel_sources(modeling_dir: Path = MODELING_DIR) -> list[str]:
    """attention.py and every modeling file it imports relatively, directly or not, lazy imports included (read from
    the code, so a new helper file travels without a list to keep)."""
    found, todo = [], ["attention.py"]
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


def render(template: str, **values) -> str:
    """A generated file's text from its template in templates/."""
    text = (TEMPLATES / template).read_text()
    return Template(text, keep_trailing_newline=True, trim_blocks=True).render(**values)


def variant_digest(variant_dir: Path) -> dict[str, str]:
    """Every file of the variant but metadata.json (and bytecode), relative POSIX path -> base64 of its sha256 (as
    kernels' ``Digest`` records it)."""
    return {p.relative_to(variant_dir).as_posix(): base64.b64encode(hashlib.sha256(p.read_bytes()).digest()).decode()
            for p in sorted(variant_dir.rglob("*"))
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


def build_kernel_repository(output_dir: str | Path, *, repo_id: Optional[str] = None,
                            overwrite: bool = False) -> KernelBuild:
    """Write the kernel repository into ``output_dir`` (see :func:`upload.prepare_folder`)."""
    folder = Path(output_dir)
    prepare_folder(folder, overwrite)
    sources = kernel_sources()
    for variant, backend in VARIANTS.items():
        target = folder / "build" / variant
        (target / PACKAGE).mkdir(parents=True)
        for name in sources:
            shutil.copyfile(MODELING_DIR / name, target / name)
        (target / "__init__.py").write_text(render("kernel_init.py.jinja", name=KERNEL_NAME, version=KERNEL_VERSION,
                                                   functions=FUNCTIONS))
        # older kernels releases import this package instead; it loads the variant's __init__.py under its own name
        (target / PACKAGE / "__init__.py").write_text(render("kernel_compat_init.py.jinja", name=KERNEL_NAME,
                                                             package=PACKAGE))
        digest = variant_digest(target)
        metadata = {"id": kernel_id(digest, backend["type"]), "name": KERNEL_NAME, "version": KERNEL_VERSION,
                    "license": LICENSE, "python-depends": [], "kernels-minver": KERNELS_MINVER, "backend": backend,
                    "digest": {"algorithm": "sha256", "files": digest}}
        (target / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (folder / "README.md").write_text(render(
        "kernel_card.md", repo_id=repo_id or f"{PLACEHOLDER_OWNER}/{KERNEL_NAME}", name=KERNEL_NAME,
        version=KERNEL_VERSION, functions=FUNCTIONS, variants=list(VARIANTS), kernels_minver=KERNELS_MINVER,
        license=LICENSE.lower()))
    return KernelBuild(folder=folder, variants=list(VARIANTS), sources=sources, files=repository_files(folder))


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


def verify_kernel_repository(folder: str | Path, repo_id: str = f"local/{KERNEL_NAME}") -> dict:
    """Load the built folder through transformers and kernels (``LOCAL_KERNELS``) in a fresh interpreter that
    cannot import this project, run a tiny ``Dinov2Model`` with each function, and check rows sum to 1 and the
    explicit and default kernels agree (1e-5). Returns the per-function report; raises RuntimeError otherwise."""
    proc = run_standalone(["-c", VERIFY_SCRIPT, repo_id, json.dumps(list(FUNCTIONS))], Path(folder).resolve(),
                          "Loading the kernel repository", local_kernels={repo_id: Path(folder)})
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
    from huggingface_hub import CommitOperationDelete

    folder = Path(folder)
    if not (folder / "README.md").is_file() or not list(folder.glob("build/*/metadata.json")):
        raise ValueError(f"{folder} is not a built kernel repository (needs README.md and build/*/metadata.json)")
    api, repo_url = open_repository(repo_id, "kernel", private, token)
    files = repository_files(folder)
    message = commit_message or f"{KERNEL_NAME} v{KERNEL_VERSION} ({len(files)} files), scripts/push_kernel_to_hub.py"
    branch = f"v{KERNEL_VERSION}"
    has_branch = branch in {b.name for b in api.list_repo_refs(repo_id, repo_type="kernel").branches}
    deleted: set[str] = set()

    def commit(revision: str) -> str:
        stale = sorted(f for f in api.list_repo_files(repo_id, repo_type="kernel", revision=revision)
                       if f.startswith("build/") and f not in files)
        deleted.update(stale)
        operations = additions(folder, files) + [CommitOperationDelete(path_in_repo=name) for name in stale]
        return api.create_commit(repo_id, operations=operations, commit_message=message, repo_type="kernel",
                                 revision=revision).oid

    main_commit = commit("main")
    if has_branch:
        version_commit = commit(branch)
    else:
        api.create_branch(repo_id, branch=branch, revision=main_commit, repo_type="kernel")
        version_commit = main_commit
    logger.info("Committed %d files to %s (main %s, %s %s)", len(files), repo_id, main_commit, branch, version_commit)
    return KernelUpload(repo_url=repo_url, main_commit=main_commit, version_branch=branch,
                        version_commit=version_commit, files=files, deleted=sorted(deleted))
