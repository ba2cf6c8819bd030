"""Upload an assembled repository folder to the Hub in ONE commit (or one pull request) with huggingface_hub."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)


@dataclass
class UploadResult:
    repo_url: str
    commit_url: str
    commit_oid: str
    pr_url: Optional[str]
    revision: str
    files: list[str]


def repository_files(folder: Path) -> list[str]:
    """Files to upload, relative to ``folder``; hidden entries (``.push/`` records, ``.cache``) stay local."""
    return sorted(
        str(p.relative_to(folder)) for p in Path(folder).rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def upload_repository(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    create_pr: bool = False,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    commit_message: Optional[str] = None,
) -> UploadResult:
    """Create the model repo if needed (and the branch ``revision`` if it is not main), then commit every file
    of ``folder``. The token defaults to HF_TOKEN / the cached login, as everywhere in huggingface_hub."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "README.md").is_file():
        raise ValueError(f"{folder} is not an assembled repository (needs config.json and README.md)")
    if "/" not in repo_id:
        raise ValueError(f"repo_id must look like OWNER/NAME, got {repo_id!r}")
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    branch = revision or "main"
    if branch != "main":
        api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True)
    files = repository_files(folder)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    message = commit_message or f"Upload EntmaxViT ({len(files)} files) with scripts/push_to_hub.py"
    info = api.create_commit(
        repo_id, operations=operations, commit_message=message, repo_type="model", revision=branch,
        create_pr=create_pr,
    )
    logger.info("Committed %d files to %s@%s: %s", len(files), repo_id, branch, info.pr_url or info.commit_url)
    return UploadResult(repo_url=str(repo_url), commit_url=info.commit_url, commit_oid=info.oid,
                        pr_url=info.pr_url, revision=branch, files=files)


__all__ = ["UploadResult", "repository_files", "upload_repository"]
