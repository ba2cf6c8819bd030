"""scripts/push_to_hub.py end to end through the REAL huggingface_hub client code, offline: an httpx2
MockTransport plays the Hub (repo creation, YAML validation, preupload, branch, NDJSON commit). The committed
files are written to a folder and loaded in a fresh process that cannot import this project: model,
processor and both pipelines must reproduce the source model, and the feature-extraction pipeline must be ours
(odd images given by path reach the model decoded by the project's decoder). The card's YAML must match the
results JSONs."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx2
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.utils import set_client_factory
from huggingface_hub.utils._http import default_client_factory
from PIL import Image

from entmax_vit.evaluation.results import make_results, weights_fingerprint, write_results
from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel, make_image_processor
from entmax_vit.modeling.pipeline_entmax_vit import CUSTOM_PIPELINES, EntmaxViTSegmentationPipeline
from entmax_vit.modeling.segmentation_head import LinearSegmentationHead, SegmentationHeadConfig

from card_helpers import parse_card_metadata  # tests/ is on sys.path under pytest

REPO = Path(__file__).resolve().parents[1]
REPO_ID = "tester/entmax-vit-tiny"


def _load_script():
    spec = importlib.util.spec_from_file_location("push_to_hub_script", REPO / "scripts" / "push_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


push_to_hub = _load_script()


# ----------------------------------------------------------------------------------------------------------
# A fake Hub behind the real client
# ----------------------------------------------------------------------------------------------------------
class FakeHub:
    """Answers the endpoints HfApi.create_repo / model_info / create_branch / create_commit use; records every
    request (method, path, query) and every repo creation, branch and commit. ``existing`` maps repo ids that
    exist before the test to their visibility ("public" / "private")."""

    def __init__(self, existing: dict[str, str] | None = None) -> None:
        self.requests: list[tuple[str, str, dict]] = []
        self.repos: list[dict] = []
        self.visibility: dict[str, str] = dict(existing or {})
        self.branches: list[tuple[str, str]] = []
        self.commits: list[dict] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path, params = request.url.path, dict(request.url.params)
        self.requests.append((request.method, path, params))
        assert request.headers.get("authorization") == "Bearer hf_fake_token_for_tests"
        if request.method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            self.repos.append(body)
            repo = f"{body['organization']}/{body['name']}"
            url = f"https://huggingface.co/{repo}"
            if repo in self.visibility:
                return httpx2.Response(409, json={"error": "You already created this model repo", "url": url})
            self.visibility[repo] = body.get("visibility", "public")  # the account default here: public
            return httpx2.Response(200, json={"url": url})
        if request.method == "POST" and path == "/api/validate-yaml":
            content = json.loads(request.content)["content"]
            parse_card_metadata(content)  # the front matter must parse, as the Hub requires
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if m := re.fullmatch(r"/api/models/(.+)/preupload/(.+)", path):
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if m := re.fullmatch(r"/api/models/(.+)/branch/(.+)", path):
            self.branches.append((m.group(1), m.group(2)))
            return httpx2.Response(200, json={})
        if m := re.fullmatch(r"/api/models/(.+)/commit/(.+)", path):
            lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
            files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                     for item in lines if item["key"] == "file"}
            header = next(item["value"] for item in lines if item["key"] == "header")
            create_pr = params.get("create_pr") == "1"
            self.commits.append({"repo": m.group(1), "revision": m.group(2), "files": files, "header": header,
                                 "create_pr": create_pr})
            url = f"https://huggingface.co/{m.group(1)}"
            return httpx2.Response(200, json={
                "commitUrl": f"{url}/commit/{'b' * 40}", "commitOid": "b" * 40,
                "pullRequestUrl": f"{url}/discussions/1" if create_pr else None,
            })
        if request.method == "GET" and (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)", path)):
            if m.group(1) not in self.visibility:
                return httpx2.Response(404, json={"error": "Repository not found"})
            return httpx2.Response(200, json={"id": m.group(1), "sha": "a" * 40,
                                              "private": self.visibility[m.group(1)] == "private"})
        return httpx2.Response(404, json={"error": f"unexpected {request.method} {path}"})


@contextmanager
def serving(hub: FakeHub) -> Iterator[FakeHub]:
    """Route every huggingface_hub request of this process to ``hub``."""
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    try:
        yield hub
    finally:
        set_client_factory(default_client_factory)  # the real client again for everything else


@pytest.fixture
def fake_hub(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    with serving(FakeHub()) as hub:
        yield hub


# ----------------------------------------------------------------------------------------------------------
# A tiny trained-looking model folder, results and a segmentation head
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def release_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    torch.manual_seed(0)
    config = EntmaxViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=64, attention="entmax15")
    model = EntmaxViTModel(config).eval()
    model_dir = root / "final_model"
    model.save_pretrained(model_dir)
    make_image_processor(resize=36, crop=32).save_pretrained(model_dir)
    training = {"model": {"preset": "tiny", "attention": "entmax15"},
                "data": {"dataset": "embedded", "image_size": 32},
                "optim": {"epochs": 2, "lr": 0.0005, "batch_size": 8}}
    (model_dir / "training_config.yaml").write_text(yaml.safe_dump(training))

    head = LinearSegmentationHead(SegmentationHeadConfig(
        num_labels=3, hidden_size=32, layers=[-1], use_cls_token=True, input_size=32,
        id2label={0: "background", 1: "circle", 2: "square"}))
    torch.nn.init.normal_(head.conv.weight, std=2.0)  # confident, varied predictions
    head_dir = head.save(root / "segmentation_head")

    model_config = model.config.to_dict()
    knn = make_results(task="knn", model_name_or_path=str(model_dir), model_config=model_config,
                       dataset={"name": "embedded", "split": "validation", "num_samples": 64, "num_classes": 8},
                       protocol={"name": "dino_knn", "k": 20}, metrics={"top1_k20": 41.25, "top5_k20": 80.5},
                       config={"k": [20]}, weights_sha256=weights_fingerprint(model))
    seg = make_results(task="segmentation", model_name_or_path=str(model_dir), model_config=model_config,
                       dataset={"name": "embedded", "split": "validation", "num_samples": 32, "num_classes": 3},
                       protocol={"name": "neco_embedded"}, metrics={"miou": 33.3, "pixel_accuracy": 71.0},
                       config={"input_size": 32}, weights_sha256=weights_fingerprint(model))
    results = [write_results(knn, root / "knn.json"), write_results(seg, root / "seg.json")]
    return {"model_dir": model_dir, "head_dir": head_dir, "results": results, "model": model, "head": head}


def _push(release_inputs, **options) -> dict:
    """push_to_hub's main(cfg), as orchestrators call it (the command line is tested separately)."""
    cfg = push_to_hub.PushConfig(
        model_dir=str(release_inputs["model_dir"]), repo_id=REPO_ID, results=list(map(str, release_inputs["results"])),
        seg_head=str(release_inputs["head_dir"]), upload=True, verify=False, measure_sparsity=False, **options)
    return push_to_hub.main(cfg)


def _images() -> list[Image.Image]:
    from skimage import data as skdata

    astronaut = Image.fromarray(skdata.astronaut()).resize((60, 44))
    gray = Image.fromarray(skdata.camera()).resize((41, 53))  # mode "L": converted to RGB on the way
    return [astronaut, gray]


def _odd_cases() -> list:
    """16-bit RGB and RGBA PNGs from the odd-image corpus: transformers' load_image clips / flattens both."""
    from odd_images import odd_images

    return [c for c in odd_images() if c.name in ("rgb_16bit_png", "rgba_png")]


# Runs in a fresh interpreter: no project on the path, cwd an empty folder. argv: REPO_DIR WORK_DIR
FRESH = r'''
import json, sys
from pathlib import Path
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModel, pipeline
repo, work = sys.argv[1], Path(sys.argv[2])
images = [Image.open(p) for p in sorted(work.glob("img_*.png"))]
processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
out = {}
with torch.no_grad():
    inputs = processor(images, return_tensors="pt")
    result = model(**inputs)
    out["pooler_output"] = result.pooler_output
    out["last_hidden_state"] = result.last_hidden_state
extractor = pipeline("image-feature-extraction", model=repo, trust_remote_code=True)
segmenter = pipeline("image-segmentation", model=repo, trust_remote_code=True)
try:
    pipeline(model=repo, trust_remote_code=True)  # two custom tasks: transformers asks for one
    no_task = None
except RuntimeError as err:
    no_task = str(err)
report = {"model_module": type(model).__module__, "segmenter": type(segmenter).__name__,
          "extractor": type(extractor).__name__, "no_task_error": no_task, "segments": []}
# Odd images by path: the pixel_values the model receives from the feature-extraction pipeline.
seen = []
extractor.model.embeddings.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
for path in sorted(work.glob("odd_*")):
    seen.clear()
    extractor(str(path))
    out[f"pixels_{path.stem}"] = seen[0]
for i, image in enumerate(images):
    out[f"tokens_{i}"] = torch.tensor(extractor(image))
    out[f"pooled_{i}"] = torch.tensor(extractor(image, pool=True))
    segments = segmenter(image)
    report["segments"].append([[s["label"], s["score"], s["mask"].mode, list(s["mask"].size)] for s in segments])
    for s in segments:
        out[f"mask_{i}_{s['label']}"] = torch.frombuffer(bytearray(s["mask"].tobytes()), dtype=torch.uint8)
save_file({k: v.contiguous() for k, v in out.items()}, str(work / "out.safetensors"))
report["project_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "entmax_vit")
(work / "report.json").write_text(json.dumps(report))
'''


def _run_fresh(repo_dir: Path, work: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    for i, image in enumerate(_images()):
        image.save(work / f"img_{i}.png")
    for case in _odd_cases():
        (work / f"odd_{case.name}{case.suffix}").write_bytes(case.data)
    (work / "fresh.py").write_text(FRESH)
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(work / "fresh.py"), str(repo_dir), str(work)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "report.json").read_text()), load_file(str(work / "out.safetensors"))


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------
def test_push_commits_a_repository_that_loads_without_the_project(release_inputs, fake_hub, tmp_path):
    summary = _push(release_inputs)

    # One repo creation, one commit to main with everything in it.
    assert [r["name"] for r in fake_hub.repos] == ["entmax-vit-tiny"]
    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert commit["repo"] == REPO_ID and commit["revision"] == "main" and not commit["create_pr"]
    expected = {"README.md", "config.json", "model.safetensors", "preprocessor_config.json",
                "configuration_entmax_vit.py", "modeling_entmax_vit.py", "attention.py",
                "pipeline_entmax_vit.py", "segmentation_head.py", "segmentation_head.json",
                "segmentation_head.safetensors", "training_config.yaml"}
    assert expected <= set(commit["files"]), set(commit["files"])
    assert not any(name.startswith(".") for name in commit["files"])  # local records stay local
    assert summary["upload"]["commit_oid"] == "b" * 40

    # The committed files, written out, are a working repository in a process without the project.
    repo_dir = tmp_path / "downloaded"
    for name, content in commit["files"].items():
        (repo_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / name).write_bytes(content)
    config = json.loads((repo_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_entmax_vit.EntmaxViTModel"
    assert config["custom_pipelines"] == CUSTOM_PIPELINES  # both pipelines, from their one home
    assert config["custom_pipelines"]["image-segmentation"]["impl"] == "pipeline_entmax_vit.EntmaxViTSegmentationPipeline"
    work = tmp_path / "fresh"
    work.mkdir()
    report, remote = _run_fresh(repo_dir, work)
    assert report["project_modules"] == []
    assert report["model_module"].startswith("transformers_modules.")
    assert report["segmenter"] == "EntmaxViTSegmentationPipeline"
    assert report["extractor"] == "EntmaxViTFeatureExtractionPipeline"
    assert "image-feature-extraction" in report["no_task_error"] and "image-segmentation" in report["no_task_error"]

    # Same outputs as the source model and the project's own pipeline, here.
    from transformers import AutoImageProcessor, pipeline

    model, head, images = release_inputs["model"], release_inputs["head"], _images()
    processor = AutoImageProcessor.from_pretrained(release_inputs["model_dir"], trust_remote_code=True)
    with torch.no_grad():
        inputs = processor(images, return_tensors="pt")
        local = model(**inputs)
    torch.testing.assert_close(remote["pooler_output"], local.pooler_output)
    torch.testing.assert_close(remote["last_hidden_state"], local.last_hidden_state)
    extractor = pipeline("image-feature-extraction", model=model, image_processor=processor)
    segmenter = EntmaxViTSegmentationPipeline(model=model, image_processor=processor, segmentation_head=head)
    for i, image in enumerate(images):
        torch.testing.assert_close(remote[f"tokens_{i}"], torch.tensor(extractor(image)))
        torch.testing.assert_close(remote[f"pooled_{i}"], torch.tensor(extractor(image, pool=True)))
        segments = segmenter(image)
        assert [s[0] for s in report["segments"][i]] == [s["label"] for s in segments]
        for s, (_, score, mode, size) in zip(segments, report["segments"][i]):
            assert mode == "L" and tuple(size) == image.size
            assert score == pytest.approx(s["score"], abs=1e-5)
            assert torch.equal(remote[f"mask_{i}_{s['label']}"], torch.frombuffer(bytearray(s["mask"].tobytes()), dtype=torch.uint8))
    assert sum(len(s) for s in report["segments"]) > len(images)  # the head really separates classes

    # Odd images by path: the repository's feature-extraction pipeline feeds the model what the image processor
    # makes of the decoded image (the corpus reference), not what transformers' load_image would have left.
    from transformers.image_utils import load_image

    for case in _odd_cases():
        want = processor(Image.fromarray(case.reference), return_tensors="pt")["pixel_values"]
        assert torch.equal(remote[f"pixels_odd_{case.name}"], want), case.name
        path = work / f"odd_{case.name}{case.suffix}"
        clipped = processor(load_image(str(path)), return_tensors="pt")["pixel_values"]
        assert not torch.equal(clipped, want), case.name  # the built-in pipeline's decode would differ


def test_card_metadata_matches_results(release_inputs, fake_hub):
    _push(release_inputs)
    files = fake_hub.commits[0]["files"]
    card = files["README.md"].decode()
    meta = parse_card_metadata(card)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-feature-extraction"
    assert {"entmax", "sparse-attention", "dino", "vision-transformer"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0"
    assert "base_model" not in meta  # trained here, not converted

    # model-index: every metric of every results file, with the file's value, task and dataset.
    entries = meta["model-index"][0]["results"]
    assert meta["model-index"][0]["name"] == REPO_ID.split("/")[1]
    assert len(entries) == len(release_inputs["results"])
    for path, entry in zip(release_inputs["results"], entries):
        record = json.loads(Path(path).read_text())
        assert entry["dataset"]["name"] == record["dataset"]["name"]
        assert entry["dataset"]["split"] == record["dataset"]["split"]
        assert entry["task"]["type"] == {"knn": "image-classification", "segmentation": "image-segmentation"}[record["task"]]
        values = {m["name"].split(" ")[0]: m["value"] for m in entry["metrics"]}
        assert values == pytest.approx(record["metrics"])
        types = {m["name"].split(" ")[0]: m["type"] for m in entry["metrics"]}
        assert types.get("miou", "mean_iou") == "mean_iou" and types.get("top1_k20", "accuracy") == "accuracy"
    # The committed README read back by huggingface_hub: one EvalResult per metric of every results file.
    records = [json.loads(Path(path).read_text()) for path in release_inputs["results"]]
    loaded = ModelCard(card).data.eval_results
    assert sorted((e.dataset_name, e.dataset_split, e.metric_name.split(" ")[0], e.metric_value) for e in loaded) == \
        sorted((r["dataset"]["name"], r["dataset"]["split"], k, v) for r in records for k, v in r["metrics"].items())

    # Sections filled from the folder, not typed by hand.
    assert "@article{su2026entmaxvit" in card and "arXiv:2605.23868" in card
    assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in card
    assert f'pipeline("image-feature-extraction", model="{REPO_ID}"' in card
    assert f'pipeline("image-segmentation", model="{REPO_ID}"' in card
    assert "| `optim.lr` | `0.0005` |" in card  # training recipe from training_config.yaml
    assert "| knn | embedded | validation | dino_knn | 64 | top1_k20 | 41.25 |" in card
    assert "$" not in card.split("```bibtex")[0].replace("$ ", "")  # no unfilled template placeholders
    assert "{{" not in card and "{#" not in card


def test_create_pr_revision_and_private_from_the_command_line(release_inputs, fake_hub, tmp_path):
    out = tmp_path / "hub"
    code = push_to_hub.cli([str(release_inputs["model_dir"]), "--repo-id", REPO_ID, "--output-dir", str(out),
                            "--results", *map(str, release_inputs["results"]),
                            "--seg-head", str(release_inputs["head_dir"]), "--upload", "True", "--no-verify",
                            "--no-measure-sparsity",
                            "--create-pr", "--revision", "dev", "--commit-message", "Add weights", "--private"])
    assert code == 0
    summary = json.loads((out / ".push" / "summary.json").read_text())
    assert fake_hub.repos[-1]["visibility"] == "private"
    assert fake_hub.branches == [(REPO_ID, "dev")]
    commit = fake_hub.commits[-1]
    assert commit["revision"] == "dev" and commit["create_pr"]
    assert commit["header"]["summary"] == "Add weights"
    assert summary["upload"]["pr_url"] == f"https://huggingface.co/{REPO_ID}/discussions/1"
    assert summary["upload"]["pr_revision"] == "refs/pr/1"
    preuploads = [r for r in fake_hub.requests if "/preupload/" in r[1]]
    assert preuploads and all(r[1].endswith("/preupload/dev") and r[2].get("create_pr") == "1" for r in preuploads)
    # Registering our pipeline while saving did not replace transformers' own image-segmentation pipeline.
    from transformers.pipelines import PIPELINE_REGISTRY

    impl = PIPELINE_REGISTRY.supported_tasks["image-segmentation"]["impl"]
    assert str(impl).endswith("image_segmentation.ImageSegmentationPipeline"), impl


# ----------------------------------------------------------------------------------------------------------
# upload_repository, option by option: what the Hub receives
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assembled(release_inputs, tmp_path_factory):
    from entmax_vit.hub_release.assemble import assemble_repository

    folder = tmp_path_factory.mktemp("assembled") / "repo"
    assemble_repository(release_inputs["model_dir"], folder, repo_id=REPO_ID, results=release_inputs["results"],
                        verify=False, measure=False)
    (folder / ".push").mkdir()
    (folder / ".push" / "summary.json").write_text("{}")
    (folder / "results" / ".scratch.json").write_text("{}")  # hidden anywhere: stays local
    return folder


def _calls(hub: FakeHub) -> list[tuple[str, str]]:
    """(method, endpoint kind) in order, e.g. ("POST", "create"), ("POST", "commit")."""
    kinds = []
    for method, path, _ in hub.requests:
        kind = ("create" if path == "/api/repos/create" else "validate" if path == "/api/validate-yaml" else
                next((k for k in ("preupload", "branch", "commit") if f"/{k}/" in path), "info"))
        kinds.append((method, kind))
    return kinds


def _upload(folder, hub: FakeHub, **options):
    from entmax_vit.hub_release.upload import upload_repository

    with serving(hub):
        return upload_repository(folder, REPO_ID, token="hf_fake_token_for_tests", **options)


def test_upload_defaults_commit_everything_to_main(assembled):
    from entmax_vit.hub_release.upload import repository_files

    hub = FakeHub()
    result = _upload(assembled, hub)
    assert hub.repos == [{"name": "entmax-vit-tiny", "organization": "tester", "type": "model"}]  # no visibility:
    assert _calls(hub) == [("POST", "create"), ("POST", "validate"), ("POST", "preupload"), ("POST", "commit")]
    commit = hub.commits[0]
    assert commit["repo"] == REPO_ID and commit["revision"] == "main" and not commit["create_pr"]
    assert all(r[2] == {} for r in hub.requests)  # no create_pr query anywhere
    on_disk = {p.relative_to(assembled).as_posix() for p in assembled.rglob("*") if p.is_file()}
    assert set(commit["files"]) == {f for f in on_disk if not any(part.startswith(".") for part in f.split("/"))}
    assert set(commit["files"]) == set(repository_files(assembled)) == set(result.files)
    assert "results/.scratch.json" in on_disk and ".push/summary.json" in on_disk
    assert commit["files"]["README.md"] == (assembled / "README.md").read_bytes()
    assert result.revision == "main" and result.pr_url is None and result.pr_revision is None
    assert commit["header"]["summary"].startswith(f"Upload EntmaxViT ({len(result.files)} files)")


def test_without_a_head_the_repository_serves_our_feature_extraction_pipeline(assembled):
    config = json.loads((assembled / "config.json").read_text())
    assert config["custom_pipelines"] == {"image-feature-extraction": CUSTOM_PIPELINES["image-feature-extraction"]}
    for name in ("pipeline_entmax_vit.py", "image_decoding.py", "segmentation_head.py"):  # its code + imports
        assert (assembled / name).is_file(), name
    assert not (assembled / "segmentation_head.safetensors").exists()


def test_upload_create_pr_opens_a_pull_request_against_main(assembled):
    hub = FakeHub()
    result = _upload(assembled, hub, create_pr=True)
    assert hub.branches == []
    commit = hub.commits[0]
    assert commit["revision"] == "main" and commit["create_pr"]
    assert [r[2] for r in hub.requests if "/preupload/" in r[1] or "/commit/" in r[1]] == [{"create_pr": "1"}] * 2
    assert result.pr_url == f"https://huggingface.co/{REPO_ID}/discussions/1" and result.pr_revision == "refs/pr/1"


def test_upload_revision_creates_the_branch_and_commits_to_it(assembled):
    hub = FakeHub()
    result = _upload(assembled, hub, revision="dev", commit_message="Weights for dev")
    assert _calls(hub) == [("POST", "create"), ("POST", "branch"), ("POST", "validate"), ("POST", "preupload"),
                           ("POST", "commit")]
    assert hub.branches == [(REPO_ID, "dev")]
    assert [r[1] for r in hub.requests if "/preupload/" in r[1]] == [f"/api/models/{REPO_ID}/preupload/dev"]
    commit = hub.commits[0]
    assert commit["revision"] == "dev" and not commit["create_pr"] and commit["header"]["summary"] == "Weights for dev"
    assert result.revision == "dev" and result.pr_url is None


def test_upload_to_an_open_pull_request_adds_a_commit_without_a_branch(assembled):
    hub = FakeHub()
    result = _upload(assembled, hub, revision="refs/pr/1")
    assert hub.branches == []
    assert hub.commits[0]["revision"] == "refs/pr/1" and not hub.commits[0]["create_pr"]
    assert result.revision == "refs/pr/1"
    with pytest.raises(ValueError, match="already a pull request"):
        _upload(assembled, FakeHub(), revision="refs/pr/1", create_pr=True)


def test_upload_private_creates_a_private_repository(assembled):
    hub = FakeHub()
    _upload(assembled, hub, private=True)
    assert hub.repos[0]["visibility"] == "private"
    assert ("GET", f"/api/models/{REPO_ID}", {}) in hub.requests  # visibility checked before committing
    assert len(hub.commits) == 1
    # An existing private repository: creation answers 409, the commit still goes in.
    hub = FakeHub(existing={REPO_ID: "private"})
    _upload(assembled, hub, private=True)
    assert len(hub.commits) == 1


def test_upload_private_refuses_an_existing_public_repository(assembled):
    hub = FakeHub(existing={REPO_ID: "public"})
    with pytest.raises(ValueError, match="already exists and is public"):
        _upload(assembled, hub, private=True)
    assert hub.commits == [] and _calls(hub) == [("POST", "create"), ("GET", "info")]  # nothing sent
    hub = FakeHub(existing={REPO_ID: "public"})
    _upload(assembled, hub)  # without private, an existing public repository is the target as usual
    assert len(hub.commits) == 1


def test_upload_refuses_a_folder_that_is_not_a_repository(tmp_path):
    from entmax_vit.hub_release.upload import upload_repository

    with pytest.raises(ValueError, match="not an assembled repository"):
        upload_repository(tmp_path, REPO_ID)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n")
    with pytest.raises(ValueError, match="OWNER/NAME"):
        upload_repository(tmp_path, "no-owner")


def test_offline_assembly_only_and_verified(release_inputs, tmp_path, monkeypatch):
    """The main job's call: --output-dir, offline. Nothing is uploaded; the fresh-process check runs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    out = tmp_path / "hub"
    code = push_to_hub.cli([str(release_inputs["model_dir"]), "--repo-id", REPO_ID, "--output-dir", str(out),
                            "--seg-head", str(release_inputs["head_dir"]),
                            "--results", str(release_inputs["results"][1])])
    assert code == 0
    summary = json.loads((out / ".push" / "summary.json").read_text())
    assert summary["upload"] is None
    verification = summary["verification"]
    assert verification["segments_match"] is True
    assert max(verification["max_abs_diff"].values()) <= 1e-4
    assert verification["model_class"].startswith("transformers_modules.")
    assert verification["extractor_class"] == "EntmaxViTFeatureExtractionPipeline"
    assert verification["segmenter_class"] == "EntmaxViTSegmentationPipeline"
    assert len(verification["remote_segments"]) == 4  # two photographs and their RGBA / 16-bit variants
    sparsity = summary["sparsity"]
    assert sparsity["attention"] == "entmax15" and len(sparsity["zero_fraction_per_layer"]) == 2
    assert all(0.0 <= z < 1.0 for z in sparsity["zero_fraction_per_layer"])
    assert (out / ".push" / "push_config.yaml").is_file()
    assert "Measured on" in (out / "README.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--repo-id", REPO_ID], "model folder"),
    (["MODEL"], "Nothing to do"),
    (["MODEL", "--output-dir", "OUT", "--no-such-option", "1"], "no-such-option"),
])
def test_cli_errors_name_the_problem(argv, message, release_inputs, tmp_path, capsys):
    argv = [str(release_inputs["model_dir"]) if a == "MODEL" else str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert push_to_hub.cli(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_inputs_raise_value_errors(release_inputs, tmp_path):
    from entmax_vit.hub_release.assemble import assemble_repository

    with pytest.raises(ValueError, match="no config.json"):
        assemble_repository(tmp_path, tmp_path / "out", verify=False, measure=False)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something/else"}))
    with pytest.raises(ValueError, match="schema"):
        assemble_repository(release_inputs["model_dir"], tmp_path / "out", results=[bad], verify=False, measure=False)
    wrong = LinearSegmentationHead(SegmentationHeadConfig(num_labels=2, hidden_size=48, input_size=32))
    with pytest.raises(ValueError, match="hidden_size"):
        assemble_repository(release_inputs["model_dir"], tmp_path / "out", seg_head=wrong.save(tmp_path / "h"),
                            verify=False, measure=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        assemble_repository(release_inputs["model_dir"], tmp_path / "full", verify=False, measure=False)
