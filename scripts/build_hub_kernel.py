"""Build the entmax-attention kernel repository (Hub kernels layout) from modeling/'s attention code.

    python scripts/build_hub_kernel.py --output-dir hub_kernel
    python scripts/build_hub_kernel.py --output-dir hub_kernel --repo-id OWNER/entmax-attention --overwrite

The folder is what scripts/push_kernel_to_hub.py uploads: README.md (the kernel card) and build/torch-cpu/,
build/torch-cuda/ with copies of modeling/attention.py and the files it imports, a generated __init__.py
exporting entmax15, sparsemax and entmax_bisect, and metadata.json with a sha256 digest of every file
(hub_release/kernel_repo.py says why each piece is there). Try it without the Hub:

    LOCAL_KERNELS=OWNER/entmax-attention=hub_kernel python -c "from transformers import Dinov2Model, Dinov2Config; \\
        Dinov2Model(Dinov2Config(), attn_implementation='OWNER/entmax-attention:entmax15')"
"""

import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from entmax_vit.cli import entry_point


@dataclass
class BuildKernelConfig:
    # Folder to write the kernel repository into (must be empty or missing, unless --overwrite).
    output_dir: str = ""
    # OWNER/NAME the card's usage snippets name (default a YOUR_USERNAME placeholder).
    repo_id: Optional[str] = None
    # Replace a non-empty --output-dir.
    overwrite: bool = False


def main(cfg: BuildKernelConfig) -> dict:
    from entmax_vit.data.config_io import ConfigError
    from entmax_vit.hub_release.kernel_repo import build_kernel_repository

    if not cfg.output_dir:
        raise ConfigError("Give the folder to build into: build_hub_kernel.py --output-dir DIR")
    build = build_kernel_repository(cfg.output_dir, repo_id=cfg.repo_id, overwrite=cfg.overwrite)
    print(f"[build_hub_kernel] {build.folder}: variants {', '.join(build.variants)}; copied from modeling/: "
          f"{', '.join(build.sources)}; {len(build.files)} files")
    return {"folder": str(build.folder), "variants": build.variants, "sources": build.sources, "files": build.files}


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Command line -> exit status: 0, or 2 with the message on stderr."""
    return entry_point.exit_status(main, BuildKernelConfig, "build_hub_kernel", argv=argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(cli())
