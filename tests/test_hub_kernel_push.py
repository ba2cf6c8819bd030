"""scripts/push_kernel_to_hub.py through the REAL huggingface_hub client, offline: tests/test_hub_push.py's fake
Hub (an httpx2 MockTransport) extended with the kernel-repository endpoints (/api/kernels/...: refs, tree,
preupload, commit, branch). A new repository gets one commit on main and its version branch v1 from it; an existing
one gets the files on main and on v1, with the previous build's stale files deleted (kernels checks every file
of a variant against the digest, so a leftover would stop the variant from loading)."""

from __future__ import annotations

import json
import re
from contextlib import ExitStack

import httpx2
import pytest
from test_hub_push import FakeHub, serving
from test_hub_kernel import _load_script

from entmax_vit.hub_release.kernel_repo import FUNCTIONS, KERNEL_VERSION, VARIANTS

REPO_ID = "tester/entmax-attention"
push = _load_script("push_kernel_to_hub")


class KernelHub(FakeHub):
    """FakeHub for kernel repositories: ``remote`` maps a branch to the files it already has."""

    def __init__(self, remote: dict[str, list[str]] | None = None) -> None:
        super().__init__()
        self.remote = dict(remote or {})
        self.deleted: list[tuple[str, list[str]]] = []         # (revision, paths) per commit
        self.branch_starts: list[tuple[str, str | None]] = []  # (branch, starting commit)
        self.model_calls: list[str] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        if path.startswith("/api/models/"):
            self.model_calls.append(path)  # a kernel repository must never be addressed as a model
        if not path.startswith(f"/api/kernels/{REPO_ID}/"):
            return super().__call__(request)
        rest = path[len(f"/api/kernels/{REPO_ID}/"):]
        if request.method == "GET" and rest == "refs":
            self.requests.append((request.method, path, dict(request.url.params)))
            return httpx2.Response(200, json={"branches": [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": "c" * 40} for b in self.remote], "converts": [],
                "tags": []})
        if request.method == "GET" and (m := re.fullmatch(r"tree/([^/]+)", rest)):
            self.requests.append((request.method, path, dict(request.url.params)))
            return httpx2.Response(200, json=[{"type": "file", "path": p, "size": 1, "oid": "d" * 40}
                                              for p in self.remote.get(m.group(1), [])])
        if m := re.fullmatch(r"commit/(.+)", rest):
            lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
            self.deleted.append((m.group(1), [i["value"]["path"] for i in lines if i["key"] == "deletedFile"]))
        if m := re.fullmatch(r"branch/(.+)", rest):
            self.branch_starts.append((m.group(1), json.loads(request.content or b"{}").get("startingPoint")))
        # preupload, commit and branch answer as for a model repository
        models_url = str(request.url).replace("/api/kernels/", "/api/models/", 1)
        return super().__call__(httpx2.Request(request.method, models_url, headers=request.headers,
                                               content=request.content))


@pytest.fixture
def kernel_hub(monkeypatch):
    """A factory: ``kernel_hub(remote)`` serves a new KernelHub to this process until the test ends."""
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    with ExitStack() as stack:
        yield lambda remote=None: stack.enter_context(serving(KernelHub(remote)))


def test_push_creates_the_kernel_repository_and_its_version_branch(kernel_hub, tmp_path) -> None:
    hub = kernel_hub()
    summary = push.main(push.PushKernelConfig(repo_id=REPO_ID, output_dir=str(tmp_path / "repo"), upload=True))

    assert [(r["name"], r.get("type")) for r in hub.repos] == [("entmax-attention", "kernel")]
    assert hub.model_calls == []
    assert len(hub.commits) == 1 and hub.commits[0]["revision"] == "main"
    files = hub.commits[0]["files"]
    assert sorted(files) == summary["files"]
    for name, content in files.items():  # the built folder, byte for byte
        assert (tmp_path / "repo" / name).read_bytes() == content, name
    for variant in VARIANTS:
        assert f"build/{variant}/metadata.json" in files and f"build/{variant}/__init__.py" in files
    assert f'"{REPO_ID}:entmax15"' in files["README.md"].decode()
    # transformers loads version 1: the branch is created from the commit just made
    assert hub.branch_starts == [(f"v{KERNEL_VERSION}", "b" * 40)]
    upload = summary["upload"]
    assert upload["version_branch"] == f"v{KERNEL_VERSION}" and upload["version_commit"] == upload["main_commit"]
    assert upload["deleted"] == []
    # the folder was loaded through transformers + kernels in a fresh process before anything was sent
    assert sorted(summary["verification"]) == sorted(FUNCTIONS)


def test_push_to_an_existing_repository_updates_v1_and_deletes_stale_files(kernel_hub, tmp_path) -> None:
    stale = "build/torch-cpu/old_helper.py"
    old = [stale, "build/torch-cpu/attention.py", "README.md"]
    hub = kernel_hub({"main": old, f"v{KERNEL_VERSION}": old})
    summary = push.main(push.PushKernelConfig(repo_id=REPO_ID, output_dir=str(tmp_path / "repo"), upload=True,
                                              verify=False))

    assert [c["revision"] for c in hub.commits] == ["main", f"v{KERNEL_VERSION}"]
    assert hub.commits[0]["files"] == hub.commits[1]["files"]
    assert hub.deleted == [("main", [stale]), (f"v{KERNEL_VERSION}", [stale])]
    assert hub.branch_starts == []
    assert summary["upload"]["deleted"] == [stale]


def test_push_needs_a_repo_id_or_a_folder(tmp_path, capsys) -> None:
    assert push.cli([]) == 2
    assert "Nothing to do" in capsys.readouterr().err
    assert push.cli(["--output-dir", str(tmp_path / "k"), "--no-verify"]) == 0  # build only
    assert (tmp_path / "k" / "build" / "torch-cpu" / "metadata.json").is_file()
    assert push.cli(["--output-dir", str(tmp_path / "k"), "--no-verify"]) == 2  # not empty
