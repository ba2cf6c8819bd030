"""Publish the entmax-attention kernel on the Hugging Face Hub: build it from modeling/, check it loads in a fresh
process, upload it as a kernel repository.

    python scripts/push_kernel_to_hub.py --repo-id OWNER/entmax-attention
    python scripts/push_kernel_to_hub.py --repo-id OWNER/entmax-attention --output-dir hub_kernel --upload False

The repository (scripts/build_hub_kernel.py builds the same folder) goes up in one commit on main; the version
branch v1, which transformers loads for ``attn_implementation="OWNER/entmax-attention:entmax15"``, is created
from that commit, or gets the same files in one commit when it exists. Files of an earlier build that this one
lacks are deleted (kernels checks every file of a variant against its digest). Token: HF_TOKEN or
`hf auth login`. Users then load it with ``allow_all_kernels=True`` (docs/hub.md: trusting a kernel).
"""

import json
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from entmax_vit.cli import entry_point


@dataclass
class PushKernelConfig:
    # OWNER/NAME of the kernel repository (named in the card's usage); required to upload.
    repo_id: Optional[str] = None
    # Where to build the repository (kept). Default: a temporary folder, deleted after the upload.
    output_dir: Optional[str] = None
    # Upload? None = yes when --repo-id is given and HF_HUB_OFFLINE is not set; false = build (and check) only.
    upload: Optional[bool] = None
    # Create the repository private (an existing repository keeps its visibility).
    private: bool = False
    # Commit title (default names the version and the file count).
    commit_message: Optional[str] = None
    # Load the built folder through transformers + kernels in a fresh process first (recommended, ~10 s).
    verify: bool = True
    # Replace a non-empty --output-dir.
    overwrite: bool = False


def main(cfg: PushKernelConfig) -> dict:
    from entmax_vit.hub_release.kernel_repo import (build_kernel_repository, upload_kernel_repository,
                                                    verify_kernel_repository)
    from entmax_vit.hub_release.upload import should_upload, work_folder

    upload = should_upload(cfg.upload, cfg.repo_id, cfg.output_dir)
    with work_folder(cfg.output_dir, "entmax_attention_kernel_") as folder:
        build = build_kernel_repository(folder, repo_id=cfg.repo_id, overwrite=cfg.overwrite)
        summary = {"folder": str(folder) if cfg.output_dir else None, "files": build.files,
                   "verification": verify_kernel_repository(folder) if cfg.verify else None, "upload": None}
        if upload:
            result = upload_kernel_repository(folder, cfg.repo_id, private=cfg.private,
                                              commit_message=cfg.commit_message)
            summary["upload"] = dict(result.__dict__)
    where = f" in {summary['folder']}" if summary["folder"] else ""
    print(f"[push_kernel_to_hub] {len(summary['files'])} files{where}")
    if summary["verification"]:
        print(f"[push_kernel_to_hub] fresh-process check passed: {json.dumps(summary['verification'])}")
    if summary["upload"]:
        u = summary["upload"]
        print(f"[push_kernel_to_hub] uploaded to {u['repo_url']}: main {u['main_commit']}, {u['version_branch']} "
              f"{u['version_commit']}" + (f"; deleted {', '.join(u['deleted'])}" if u["deleted"] else ""))
    return summary


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Command line -> exit status: 0, or 2 with the message on stderr."""
    return entry_point.exit_status(main, PushKernelConfig, "push_kernel_to_hub", argv=argv, description=__doc__)


if __name__ == "__main__":
    sys.exit(cli())
