"""Upload an assembled repository folder to the Hub in ONE commit (or one pull request) with huggingface_hub."""

import logging
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from entmax_vit.data.config_io import ConfigError

logger = logging.getLogger(__name__)

# Local records (.push/ with the resolved options and summary, .cache/) never leave the machine: any path with a
# component that starts with "." (fnmatch's "*" also matches "/"). Added to the library's own ignore list (.git).
LOCAL_ONLY_PATTERNS = [".*", "*/.*"]


@dataclass
class UploadResult:
    repo_url: str
    commit_url: str
    commit_oid: str
    pr_url: Optional[str]
    revision: str                      # branch (or PR ref) the commit was made from
    files: list[str]
    pr_revision: Optional[str] = None  # "refs/pr/N" of an opened pull request: pass it as revision to add to it


def repository_files(folder: Path) -> list[str]:
    """Files to upload, relative to ``folder`` (POSIX paths), selected with huggingface_hub's
    ``filter_repo_objects`` as ``upload_folder`` selects them; hidden entries stay local."""
    folder = Path(folder)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=LOCAL_ONLY_PATTERNS + DEFAULT_IGNORE_PATTERNS))


def should_upload(upload: Optional[bool], repo_id: Optional[str], output_dir: Optional[str]) -> bool:
    """The push scripts' ``--upload``: None = yes when ``repo_id`` is given and HF_HUB_OFFLINE is not set; without
    an upload there must be an ``output_dir`` to keep the folder in."""
    if upload and not repo_id:
        raise ConfigError("--upload True needs --repo-id OWNER/NAME")
    if upload is None:
        upload = bool(repo_id) and not constants.is_offline_mode()
        if repo_id and not upload:
            logger.warning("HF_HUB_OFFLINE is set: not uploading (pass --upload True to force the upload)")
    if not upload and not output_dir:
        raise ConfigError("Nothing to do: give --repo-id OWNER/NAME to upload, or --output-dir DIR to keep the folder")
    return upload


@contextmanager
def work_folder(output_dir: Optional[str], prefix: str) -> Iterator[Path]:
    """``output_dir`` (kept), or an empty temporary folder deleted on exit."""
    if output_dir:
        yield Path(output_dir)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp) / "repo"


def prepare_folder(folder: Path, overwrite: bool) -> None:
    """Create ``folder`` empty: a non-empty one is refused unless ``overwrite``, then replaced."""
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise ValueError(f"{folder} is not empty: choose another folder or pass --overwrite to replace it")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)


def open_repository(repo_id: str, repo_type: str, private: bool, token: Optional[str]) -> tuple[HfApi, str]:
    """An ``HfApi`` and the URL of ``repo_id``, created when missing."""
    if "/" not in repo_id:
        raise ValueError(f"repo_id must look like OWNER/NAME, got {repo_id!r}")
    api = HfApi(token=token)
    # private=None (not False) when not asked for: a new repository then gets the account's default visibility.
    return api, str(api.create_repo(repo_id, repo_type=repo_type, private=True if private else None, exist_ok=True))


def additions(folder: Path, files: list[str]) -> list[CommitOperationAdd]:
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]


def upload_repository(folder: str | Path, repo_id: str, *, private: bool = False, create_pr: bool = False,
                      revision: Optional[str] = None, token: Optional[str] = None,
                      commit_message: Optional[str] = None) -> UploadResult:
    """Create the model repo if needed, then commit every file of ``folder`` in one commit. ``revision``: the branch
    to commit to (created from main when missing), or an open pull request's ``refs/pr/N`` to add a commit to it.
    ``create_pr``: open a pull request against that branch instead. ``private``: create the repository private; an
    existing public repository is refused rather than silently receiving the files. Token: HF_TOKEN / the login."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "README.md").is_file():
        raise ValueError(f"{folder} is not an assembled repository (needs config.json and README.md)")
    branch = revision or constants.DEFAULT_REVISION
    is_pr_ref = branch.startswith("refs/pr/")
    if is_pr_ref and create_pr:
        raise ValueError(f"revision {branch!r} is already a pull request: drop create_pr to add a commit to it")

    api, repo_url = open_repository(repo_id, "model", private, token)
    if private and not api.model_info(repo_id).private:
        raise ValueError(f"{repo_id} already exists and is public: private applies only to a new repository. "
                         "Make it private on the Hub first, or upload without private.")
    if branch != constants.DEFAULT_REVISION and not is_pr_ref:
        api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True)

    files = repository_files(folder)
    message = commit_message or f"Upload EntmaxViT ({len(files)} files) with scripts/push_to_hub.py"
    # create_commit, not upload_folder: in huggingface_hub 2.x with hf_xet installed, upload_folder streams large
    # folders as several commits, skips the README metadata check the Hub would otherwise reject late, and
    # refuses create_pr with a branch. create_commit makes one atomic commit (or PR against `branch`) and
    # validates README.md's YAML before any file is sent.
    info = api.create_commit(repo_id, operations=additions(folder, files), commit_message=message, repo_type="model",
                             revision=branch, create_pr=create_pr)
    logger.info("Committed %d files to %s@%s: %s", len(files), repo_id, branch, info.pr_url or info.commit_url)
    return UploadResult(repo_url=repo_url, commit_url=info.commit_url, commit_oid=info.oid,
                        pr_url=info.pr_url, revision=branch, files=files, pr_revision=info.pr_revision)
