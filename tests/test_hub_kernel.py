"""The entmax-attention Hub kernel (issue 23): scripts/build_hub_kernel.py's repository, loaded the way users load
it, ``AutoModel.from_pretrained(..., attn_implementation="OWNER/entmax-attention:entmax15")``, through
transformers and kernels with ``LOCAL_KERNELS`` pointing at the built folder, in a fresh interpreter that
cannot import this project (no site-packages .pth files, so no editable finder; checked).

transformers' ``Dinov2Model`` and ``ViTModel`` (tiny, random weights) with ``:entmax15``, ``:sparsemax`` and
``:entmax_bisect`` must give attentions equal to the ``entmax`` package on their own scores (1e-6), outputs and
gradients equal to the in-project ``attn_implementation="entmax15"`` etc. (1e-5). The contract with the installed
transformers and kernels is pinned too: what each side requires of the module, so that an upgrade that changes it
fails here with the reason. Kernel loading happens only in subprocesses: the kernel's attention.py registers the
transforms' names with AttentionInterface, which would replace this process's registrations."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import entmax
import pytest
import torch
from kernels import Metadata
from kernels._rust import Digest
from safetensors.torch import load_file, save_file
from transformers import AutoModel, Dinov2Config, Dinov2Model, ViTConfig, ViTModel

import entmax_vit.modeling  # noqa: F401 - registers "entmax15", "sparsemax", "entmax_bisect" (the in-project reference)
from entmax_vit.hub_release.kernel_repo import (FUNCTIONS, KERNEL_NAME, KERNEL_VERSION, KERNELS_MINVER, MODELING_DIR,
                                              PACKAGE, VARIANTS, build_kernel_repository, kernel_id, kernel_sources,
                                              variant_digest)
from entmax_vit.hub_release.verify import standalone_env

REPO = Path(__file__).resolve().parents[1]
REPO_ID = f"tester/{KERNEL_NAME}"
TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64)
ALPHA = 1.3  # entmax_bisect reads config.attention_alpha
MODELS = {"dinov2": (Dinov2Model, Dinov2Config), "vit": (ViTModel, ViTConfig)}


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _fresh(script: str, work: Path, local_kernels: dict[str, Path], *args: str) -> dict:
    """Run ``script`` in an interpreter without site processing: site-packages on the path, not the editable
    install's finder, not this repository (cwd is ``work``). Returns its JSON report."""
    (work / "fresh.py").write_text(script)
    proc = subprocess.run([sys.executable, "-S", str(work / "fresh.py"), *args], cwd=work,
                          env=standalone_env(local_kernels),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((work / "report.json").read_text())


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kernel") / "entmax-attention"
    build = _load_script("build_hub_kernel")
    assert build.cli(["--output-dir", str(folder), "--repo-id", REPO_ID]) == 0
    return folder


# ----------------------------------------------------------------------------------------------------------
# The repository: layout, copies, metadata, digest
# ----------------------------------------------------------------------------------------------------------
def test_repository_is_generated_from_modeling(kernel_dir: Path) -> None:
    sources = kernel_sources()
    # attention.py and what it imports relatively, the lazily imported Triton kernel included
    assert {"attention.py", "thresholds.py", "tiled_attention.py", "triton_attention.py"} <= set(sources)
    assert sorted(p.name for p in (kernel_dir / "build").iterdir()) == sorted(VARIANTS)
    for variant, backend in VARIANTS.items():
        target = kernel_dir / "build" / variant
        for name in sources:  # byte-for-byte copies, never a hand-kept fork
            assert (target / name).read_bytes() == (MODELING_DIR / name).read_bytes(), (variant, name)
        metadata = Metadata.read_from_file(target / "metadata.json")  # kernels' own parser
        assert str(metadata.name) == KERNEL_NAME and metadata.name.python_name == PACKAGE
        assert metadata.version == KERNEL_VERSION and str(metadata.kernels_minver) == KERNELS_MINVER
        assert str(metadata.backend.backend_type).lower() == backend["type"]
        assert metadata.id.isidentifier() and metadata.python_depends == []
        # kernels hashes the variant its own way; it must agree with the recorded digest (raises otherwise)
        metadata.digest.validate(Digest.hash_variant(metadata.digest.algorithm, target))
        assert (target / PACKAGE / "__init__.py").is_file()  # the compatibility package of older kernels
    ids = {json.loads((kernel_dir / "build" / v / "metadata.json").read_text())["id"] for v in VARIANTS}
    assert len(ids) == len(VARIANTS)  # one id per build: kernels refuses two builds under one id
    card = (kernel_dir / "README.md").read_text()
    assert f'attn_implementation="{REPO_ID}:entmax15"' in card
    assert all(f"`{f}`" in card for f in FUNCTIONS)


def test_build_refuses_a_non_empty_folder_and_rebuilds_identically(kernel_dir: Path, tmp_path: Path) -> None:
    build = _load_script("build_hub_kernel")
    assert build.cli(["--output-dir", str(kernel_dir)]) == 2
    again = build_kernel_repository(tmp_path / "again", repo_id=REPO_ID)
    for name in again.files:  # deterministic: same sources, same files, same ids and digests
        assert (tmp_path / "again" / name).read_bytes() == (kernel_dir / name).read_bytes(), name


def test_card_speed_figures_are_the_measured_ones(kernel_dir: Path) -> None:
    """The card quotes docs/performance.md; each figure must still be there (one source of truth)."""
    card = (kernel_dir / "README.md").read_text()
    speed = card.split("## Speed", 1)[1].split("## Files", 1)[0]
    performance = (REPO / "docs" / "performance.md").read_text().split("### Earlier results", 1)[0]  # not superseded
    figures = re.findall(r"\d+\.\d+x", speed)
    assert len(figures) == 9
    for figure in figures:
        assert figure in performance, figure
    assert "pending" in speed  # no GPU figure claimed


def test_transformers_asks_for_this_version_and_parses_the_name() -> None:
    from transformers.integrations.hub_kernels import get_attn_kernel_version, is_kernel

    # Without "@REV" transformers loads version 1 of a repository it does not know: our branch v1.
    assert get_attn_kernel_version(REPO_ID) == KERNEL_VERSION
    for function in FUNCTIONS:
        assert is_kernel(f"{REPO_ID}:{function}") and is_kernel(f"{REPO_ID}@{'a' * 40}:{function}")


# ----------------------------------------------------------------------------------------------------------
# transformers' models with the kernel, in a process without the project
# ----------------------------------------------------------------------------------------------------------
FRESH_MODELS = r'''
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
report = {}
try:
    import entmax_vit  # noqa: F401
    report["project_importable"] = True
except ImportError:
    report["project_importable"] = False
from transformers import AutoModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

repo_id, work = sys.argv[1], Path(sys.argv[2])
cases = json.loads((work / "cases.json").read_text())
x = load_file(str(work / "pixels.safetensors"))["pixels"]
out, kinds = {}, {}
for case in cases:
    impl = f"{repo_id}:{case['function']}"
    model = AutoModel.from_pretrained(case["folder"], attn_implementation=impl).eval()
    kinds[case["name"]] = [model.config._attn_implementation, type(model).__name__]
    kernel_fn = ALL_ATTENTION_FUNCTIONS[impl]
    scores = []

    def recording(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scores.append((query @ key.transpose(-1, -2)) * scaling)  # (B, H, N, N): the model's own scores
        return kernel_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register(impl, recording)
    with torch.no_grad():
        result = model(pixel_values=x, output_attentions=True)
    ALL_ATTENTION_FUNCTIONS.register(impl, kernel_fn)
    name = case["name"]
    out[f"{name}/hidden_weights"] = result.last_hidden_state
    for i, (probs, own) in enumerate(zip(result.attentions, scores)):
        out[f"{name}/attention{i}"] = probs
        out[f"{name}/scores{i}"] = own
    hidden = model(pixel_values=x).last_hidden_state  # no weights asked: the fused/tiled path
    out[f"{name}/hidden"] = hidden.detach()
    hidden.square().mean().backward()
    for pname, p in model.named_parameters():
        if p.grad is not None:
            out[f"{name}/grad/{pname}"] = p.grad
save_file({k: v.contiguous() for k, v in out.items()}, str(work / "out.safetensors"))
report["kinds"] = kinds
report["kernel_modules"] = sorted({m.split(".")[0] for m in sys.modules if m.startswith("_entmax_attention_")})
report["project_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "entmax_vit")
(work / "report.json").write_text(json.dumps(report))
'''


def _peaked(model: torch.nn.Module, factor: float = 6.0) -> None:
    """Larger query/key weights: peaked scores, so the sparse transforms give exact zeros."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "query.weight", "key.weight")):
                p.mul_(factor)


def _reference(folder: Path, function: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """In-project run: transformers' own model with the AttentionInterface name this project registers."""
    model = AutoModel.from_pretrained(folder, attn_implementation=function).eval()
    with torch.no_grad():
        weights = model(pixel_values=x, output_attentions=True)
    hidden = model(pixel_values=x).last_hidden_state
    hidden.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"hidden_weights": weights.last_hidden_state, "hidden": hidden.detach(), "grads": grads,
            "attentions": weights.attentions}


PACKAGE_TRANSFORMS = {
    "entmax15": lambda s: entmax.entmax15(s, dim=-1),
    "sparsemax": lambda s: entmax.sparsemax(s, dim=-1),
    "entmax_bisect": lambda s: entmax.entmax_bisect(s, alpha=ALPHA, dim=-1),
}


def test_dinov2_and_vit_run_the_hub_kernel_without_the_project(kernel_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    save_file({"pixels": x}, str(tmp_path / "pixels.safetensors"))
    cases = []
    for model_name, (model_cls, config_cls) in MODELS.items():
        config = config_cls(**TINY)
        config.attention_alpha = ALPHA  # saved with the config; read by entmax_bisect only
        model = model_cls(config)
        _peaked(model)
        model.save_pretrained(tmp_path / model_name)
        for function in FUNCTIONS:
            cases.append({"name": f"{model_name}-{function}", "model": model_name, "function": function,
                          "folder": str(tmp_path / model_name)})
    (tmp_path / "cases.json").write_text(json.dumps(cases))

    report = _fresh(FRESH_MODELS, tmp_path, {REPO_ID: kernel_dir}, REPO_ID, str(tmp_path))
    assert report["project_importable"] is False and report["project_modules"] == []
    assert len(report["kernel_modules"]) == 1  # loaded once, under its build id
    out = load_file(str(tmp_path / "out.safetensors"))

    for case in cases:
        name, function = case["name"], case["function"]
        assert report["kinds"][name] == [f"{REPO_ID}:{function}", MODELS[case["model"]][0].__name__]
        reference = _reference(tmp_path / case["model"], function, x)
        probs_all = []
        for i in range(TINY["num_hidden_layers"]):
            probs, scores = out[f"{name}/attention{i}"], out[f"{name}/scores{i}"]
            torch.testing.assert_close(probs, PACKAGE_TRANSFORMS[function](scores), atol=1e-6, rtol=0,
                                       msg=lambda m: f"{name} layer {i} vs the entmax package: {m}")
            torch.testing.assert_close(probs, reference["attentions"][i], atol=1e-6, rtol=0)
            probs_all.append(probs.flatten())
        assert (torch.cat(probs_all) == 0).any(), name  # genuinely sparse
        torch.testing.assert_close(out[f"{name}/hidden_weights"], reference["hidden_weights"], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[f"{name}/hidden"], reference["hidden"], atol=1e-5, rtol=0)
        grads = {k.split("/grad/", 1)[1]: v for k, v in out.items() if k.startswith(f"{name}/grad/")}
        assert grads.keys() == reference["grads"].keys() and len(grads) > 10, name
        for pname, grad in grads.items():
            assert torch.isfinite(grad).all(), (name, pname)
            torch.testing.assert_close(grad, reference["grads"][pname], atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{name} grad {pname}: {m}")
        query_grads = [g for p, g in grads.items() if p.endswith(("q_proj.weight", "query.weight"))]
        assert query_grads and all(g.abs().sum() > 0 for g in query_grads), name  # through the transform


# ----------------------------------------------------------------------------------------------------------
# The contract, pinned: what transformers and kernels require of the module
# ----------------------------------------------------------------------------------------------------------
FRESH_CONTRACT = r'''
import importlib.util, json, sys
from pathlib import Path
import torch
from kernels import get_kernel
from transformers import Dinov2Config, Dinov2Model
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

repo_id, work, functions = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
config = Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=64)
report = {}

def outcome(impl):
    try:
        Dinov2Model._from_config(config, attn_implementation=impl)
        return {"ok": True, "registered": getattr(ALL_ATTENTION_FUNCTIONS[impl], "__name__", None)}
    except Exception as err:
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}

# kernels: the CPU variant (a CPU-only torch) exports the same API as the one this torch build picks
cpu = get_kernel(repo_id, version=1, backend="cpu")
default = get_kernel(repo_id, version=1)
report["cpu_file"] = cpu.__file__
report["default_file"] = default.__file__
report["exports"] = {"cpu": sorted(cpu.__all__), "default": sorted(default.__all__)}
report["supports_flash_attn"] = hasattr(default, "supports_flash_attn")
q = torch.randn(1, 4, 9, 8)
module = torch.nn.Module()
report["cpu_matches"] = all(torch.equal(getattr(cpu, f)(module, q, q, q, None, scaling=0.5)[0],
                                        getattr(default, f)(module, q, q, q, None, scaling=0.5)[0]) for f in functions)
try:
    default.entmax15(module, q, q, q, torch.ones(1, 9, dtype=torch.bool), scaling=0.5)
    report["padding_mask"] = "accepted"
except ValueError as err:
    report["padding_mask"] = str(err)

# the compatibility package (build/<variant>/<package>/__init__.py) imports on its own
compat = Path(cpu.__file__).parent / sys.argv[4] / "__init__.py"
spec = importlib.util.spec_from_file_location("entmax_attention_compat", compat)
module_compat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module_compat)
report["compat_exports"] = sorted(module_compat.__all__)

# transformers: ":FUNC" picks the function; the variants below are the same build with one change each
for function in functions:
    report[f"ours:{function}"] = outcome(f"{repo_id}:{function}")
report["no_function"] = outcome(repo_id)
report["without_flash_attn_forward"] = outcome("tester/without-flash-attn-forward:sparsemax")
report["with_supports_flash_attn"] = outcome("tester/with-supports-flash-attn:sparsemax")
report["tampered"] = outcome("tester/tampered:entmax15")
(work / "report.json").write_text(json.dumps(report))
'''


def _variant_copy(kernel_dir: Path, target: Path, edit, *, redigest: bool = True) -> Path:
    """A copy of the repository whose variants' __init__.py is ``edit``ed (and re-digested, with a new id)."""
    shutil.copytree(kernel_dir, target)
    for variant, backend in VARIANTS.items():
        folder = target / "build" / variant
        init = folder / "__init__.py"
        init.write_text(edit(init.read_text()))
        if redigest:
            metadata = json.loads((folder / "metadata.json").read_text())
            metadata["digest"]["files"] = variant_digest(folder)
            metadata["id"] = kernel_id(metadata["digest"]["files"], backend["type"])
            (folder / "metadata.json").write_text(json.dumps(metadata))
    return target


def test_contract_with_transformers_and_kernels(kernel_dir: Path, tmp_path: Path) -> None:
    forward_line = "flash_attn_forward = entmax15"
    assert forward_line in (kernel_dir / "build" / "torch-cpu" / "__init__.py").read_text()
    others = {
        "tester/without-flash-attn-forward": _variant_copy(kernel_dir, tmp_path / "a", lambda s: s.replace(
            forward_line, "").replace(', "flash_attn_forward"', "")),
        "tester/with-supports-flash-attn": _variant_copy(kernel_dir, tmp_path / "b",
                                                         lambda s: s + "\nsupports_flash_attn = True\n"),
        "tester/tampered": _variant_copy(kernel_dir, tmp_path / "c", lambda s: s + "\n# edited\n", redigest=False),
    }
    report = _fresh(FRESH_CONTRACT, tmp_path, {REPO_ID: kernel_dir, **others}, REPO_ID, str(tmp_path),
                    json.dumps(list(FUNCTIONS)), PACKAGE)

    # kernels picks torch-cpu for a CPU-only torch and torch-<this torch's backend> here; same API in both
    assert Path(report["cpu_file"]).parent.name == "torch-cpu"
    assert Path(report["default_file"]).parent.name in VARIANTS
    api = sorted([*FUNCTIONS, "flash_attn_forward"])
    assert report["exports"] == {"cpu": api, "default": api} and report["compat_exports"] == api
    assert report["cpu_matches"] and report["supports_flash_attn"] is False
    assert "padding mask" in report["padding_mask"]

    # transformers registers the function ":FUNC" names ...
    for function in FUNCTIONS:
        assert report[f"ours:{function}"] == {"ok": True, "registered": f"{function}_attention_forward"}, function
    # ... but only because the module also has flash_attn_forward: transformers 5.x sends every Hub attention kernel
    # through its flash-attention loader, which refuses a module without a flash-attention entry point. If this
    # starts passing, transformers accepts plain attention-function kernels: drop flash_attn_forward from
    # hub_release/kernel_repo.py's generated __init__.py.
    refused = report["without_flash_attn_forward"]
    assert not refused["ok"] and "Could not find the currently requested flash attention" in refused["error"], refused
    # With supports_flash_attn as well, transformers would register flash_attn_forward whatever ":FUNC" says
    # (entmax15 for ":sparsemax"): the reason the module must not define it.
    assert report["with_supports_flash_attn"] == {"ok": True, "registered": "entmax15_attention_forward"}
    # Without ":FUNC" there is nothing to register (the card says to always name one).
    assert not report["no_function"]["ok"]
    # kernels checks the digest: a file changed after the build does not load.
    tampered = report["tampered"]
    assert not tampered["ok"] and "do not match the digest" in tampered["error"], tampered
