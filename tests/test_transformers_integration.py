"""EntmaxViT as a transformers model, and the sparse transforms inside transformers' own vision models:
AttentionInterface registration (ViTModel, Dinov2Model, Dinov2WithRegistersModel, DINOv3 ViT), gradient
checkpointing through transformers' API, config.problem_type, set_attn_implementation, weights materialised
from the meta device, torch.compile(fullgraph=True), and EntmaxViT as the backbone of UperNet."""

from __future__ import annotations

import entmax
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoBackbone,
    AutoModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    ViTConfig,
    ViTModel,
)

from entmax_vit.conversion.converted_state import load_strict
from entmax_vit.conversion.converted_state import convert_hf_vit_keys
from entmax_vit.modeling import (
    EntmaxViTBackbone,
    EntmaxViTConfig,
    EntmaxViTForImageClassification,
    EntmaxViTModel,
)
from entmax_vit.modeling.attention import kernels_for, resolve_kernel, support_size

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64)


def _peaked(model: torch.nn.Module, factor: float = 20.0) -> None:
    """Scale query/key projections so the attention scores are peaked (sparse transforms then give zeros)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "query.weight", "key.weight", "qkv.weight")):
                p.mul_(factor)


# ---------------------------------------------------------------------------------------------- transformers' models
def test_vit_with_entmax15_equals_converted_entmax_vit_and_the_entmax_package() -> None:
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(**TINY, layer_norm_eps=1e-6, attn_implementation="entmax15"),
                   add_pooling_layer=False).eval()
    _peaked(vit, 6.0)
    ours = EntmaxViTModel(EntmaxViTConfig(**TINY, attention="entmax15")).eval()
    load_strict(ours, convert_hf_vit_keys(vit.state_dict()))
    x = torch.randn(2, 3, 32, 32)
    scores = []

    def own_scores(module, args):
        (hidden,) = args[:1]
        b, n, _ = hidden.shape
        q = module.q_proj(hidden).view(b, n, -1, module.head_dim).transpose(1, 2)
        k = module.k_proj(hidden).view(b, n, -1, module.head_dim).transpose(1, 2)
        scores.append(q @ k.transpose(-1, -2) * module.scaling)

    hooks = [layer.attention.register_forward_pre_hook(own_scores) for layer in vit.layers]
    with torch.no_grad():
        theirs = vit(x, output_attentions=True)
        mine = ours(x, output_attentions=True)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(theirs.last_hidden_state, mine.last_hidden_state, atol=1e-5, rtol=0)
    assert len(theirs.attentions) == 2
    for probs, own, reference in zip(theirs.attentions, scores, mine.attentions):
        torch.testing.assert_close(probs, entmax.entmax15(own, dim=-1), atol=1e-6, rtol=0)
        torch.testing.assert_close(probs, reference, atol=1e-5, rtol=0)
    assert (torch.cat([p.flatten() for p in theirs.attentions]) == 0).any()  # genuinely sparse


@pytest.mark.parametrize("name", ["entmax15", "sparsemax", "entmax_bisect"])
def test_dinov2_runs_sparse_attention_forward_and_backward(name: str) -> None:
    config = Dinov2Config(**TINY, attn_implementation=name)
    if name == "entmax_bisect":
        config.attention_alpha = 1.3  # alpha-entmax reads config.attention_alpha (default 1.5)
    model = Dinov2Model(config).train()
    _peaked(model)
    out = model(torch.randn(2, 3, 32, 32), output_attentions=True)
    for probs in out.attentions:
        assert (probs == 0).any() and (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=0)
    if name == "entmax_bisect":  # the chosen alpha is used: alpha-entmax 1.3 of the layer's scores is denser
        assert support_size(out.attentions[0]).float().mean() > 1
    out.last_hidden_state.square().mean().backward()
    # every parameter but the mask token (used only with bool_masked_pos) gets a finite gradient
    grads = {n: p.grad for n, p in model.named_parameters() if n != "embeddings.mask_token"}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert model.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


def test_per_head_alpha_from_a_transformers_config() -> None:
    """config.attention_alpha may hold one alpha per head (a list): each head's attention is that alpha-entmax."""
    config = Dinov2Config(**TINY, attn_implementation="entmax_bisect")
    alphas = [1.2, 1.5, 2.0, 3.0][: config.num_attention_heads]
    config.attention_alpha = alphas
    model = Dinov2Model(config).eval()
    _peaked(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        probs = model(x, output_attentions=True).attentions[0]  # (1, H, N, N)
        for head, alpha in enumerate(alphas):  # head h equals the same model with the scalar alpha of head h
            model.config.attention_alpha = alpha
            single = model(x, output_attentions=True).attentions[0]
            torch.testing.assert_close(probs[0, head], single[0, head], atol=1e-6, rtol=0)
    support = support_size(probs)[0].float().mean(-1)  # (H,): the support shrinks as alpha grows
    assert (support[:-1] >= support[1:]).all(), support
    with pytest.raises(ValueError, match="4-D"):
        from entmax_vit.modeling.attention import eager_kernel

        q = torch.randn(1, 2, 5, 8)
        eager_kernel(q, q, q, torch.ones(1, 5, dtype=torch.bool), transform="entmax15", scaling=1.0)


@pytest.mark.parametrize("cls, config_cls", [(Dinov2WithRegistersModel, Dinov2WithRegistersConfig),
                                             (DINOv3ViTModel, DINOv3ViTConfig)])
def test_dinov2_registers_and_dinov3_accept_entmax15(cls, config_cls) -> None:
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                  patch_size=8)
    model = cls(config_cls(**kwargs, attn_implementation="entmax15")).eval()
    _peaked(model)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), output_attentions=True)
    probs = out.attentions[-1]
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=0)
    assert (probs == 0).any()


def test_automodel_from_pretrained_dinov2_folder_with_entmax15(tmp_path) -> None:
    Dinov2Model(Dinov2Config(**TINY)).save_pretrained(tmp_path / "dinov2")
    model = AutoModel.from_pretrained(tmp_path / "dinov2", attn_implementation="entmax15").eval()
    assert model.config._attn_implementation == "entmax15"
    _peaked(model)
    with torch.no_grad():
        assert (model(torch.randn(1, 3, 32, 32), output_attentions=True).attentions[0] == 0).any()


# ---------------------------------------------------------------------------------------------- EntmaxViT itself
def test_attention_kernel_names_say_what_runs_and_switch_at_runtime() -> None:
    x = torch.randn(2, 3, 32, 32)
    softmax = EntmaxViTModel(EntmaxViTConfig(**TINY, attention="softmax")).eval()
    assert softmax.config._attn_implementation == "sdpa"  # transformers' automatic choice
    with torch.no_grad():
        sdpa = softmax(x).last_hidden_state
        softmax.set_attn_implementation("eager")
        assert softmax.config._attn_implementation == "eager"
        out = softmax(x, output_attentions=True)
    torch.testing.assert_close(out.last_hidden_state, sdpa, atol=1e-5, rtol=1e-5)
    model = EntmaxViTModel(EntmaxViTConfig(**TINY, attention="entmax15")).eval()
    default = model.config._attn_implementation  # transformers' automatic choice: a kernel that runs entmax-1.5
    assert default == resolve_kernel("entmax15") and default in kernels_for("entmax15") and default != "sdpa"
    with pytest.raises(ValueError, match="'sdpa' does not run attention='entmax15'"):
        model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match='Specified `attn_implementation="flash_attention_2"` is not supported'):
        model.set_attn_implementation("flash_attention_2")
    with pytest.raises(ValueError, match="'sdpa' does not run"):
        EntmaxViTModel._from_config(EntmaxViTConfig(**TINY, attention="sparsemax"), attn_implementation="sdpa")
    with torch.no_grad():
        reference = model(x).last_hidden_state
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        torch.testing.assert_close(model(x).last_hidden_state, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_switching_to_the_compiled_kernel_at_runtime() -> None:
    model = EntmaxViTModel(EntmaxViTConfig(**TINY, attention="entmax15")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x).last_hidden_state
        model.set_attn_implementation("compiled")
        assert model.config._attn_implementation == "compiled"
        torch.testing.assert_close(model(x).last_hidden_state, eager, atol=1e-5, rtol=1e-5)


def test_switching_to_the_triton_kernel_at_runtime() -> None:
    """set_attn_implementation takes kernel names and AttentionInterface names of the model's transform."""
    model = EntmaxViTModel(EntmaxViTConfig(**TINY, attention="entmax15")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        default = model(x).last_hidden_state
        for name, kernel in [("triton", "triton"), ("entmax15_eager", "eager"), ("entmax15", "auto")]:
            model.set_attn_implementation(name)
            assert model.config._attn_implementation == kernel
            torch.testing.assert_close(model(x).last_hidden_state, default, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="another attention transform"):
            model.set_attn_implementation("sparsemax")


@pytest.mark.parametrize("attention", ["softmax", "entmax15"])
def test_gradient_checkpointing_through_transformers_api(attention: str) -> None:
    """transformers' arguments (as the Trainer passes them) and config.gradient_checkpointing both work."""
    torch.manual_seed(0)
    config = EntmaxViTConfig(**TINY, attention=attention)
    model = EntmaxViTModel(config).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).last_hidden_state.square().mean().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    for kwargs in ({"use_reentrant": True}, {"use_reentrant": False}):
        model.zero_grad()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        assert all(layer.gradient_checkpointing for layer in model.encoder.layer)
        model(x).last_hidden_state.square().mean().backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, reference[n], msg=n)
        model.gradient_checkpointing_disable()
    from_config = EntmaxViTModel(EntmaxViTConfig(**TINY, attention=attention, gradient_checkpointing=True))
    assert all(layer.gradient_checkpointing for layer in from_config.encoder.layer)


def test_trainer_with_gradient_checkpointing(tmp_path) -> None:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = EntmaxViTForImageClassification(EntmaxViTConfig(**TINY, num_labels=3))
    data = Dataset.from_dict({"pixel_values": torch.randn(4, 3, 32, 32).tolist(), "labels": [0, 1, 2, 0]})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             gradient_checkpointing=True, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, disable_tqdm=True)
    before = model.classifier.weight.detach().clone()
    result = Trainer(model=model, args=args, train_dataset=data.with_format("torch")).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert model.entmax_vit.encoder.layer[0].gradient_checkpointing
    assert not torch.equal(model.classifier.weight.detach(), before)


@pytest.mark.parametrize("problem_type", ["regression", "single_label_classification", "multi_label_classification"])
def test_classifier_loss_follows_problem_type(problem_type: str) -> None:
    model = EntmaxViTForImageClassification(EntmaxViTConfig(**TINY, num_labels=3, problem_type=problem_type)).eval()
    x = torch.randn(4, 3, 32, 32)
    labels = {
        "regression": torch.randn(4, 3),
        "single_label_classification": torch.tensor([0, 2, 1, 0]),
        "multi_label_classification": torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]]),
    }[problem_type]
    out = model(x, labels=labels)
    expected = {
        "regression": lambda z: F.mse_loss(z, labels),
        "single_label_classification": lambda z: F.cross_entropy(z, labels),
        "multi_label_classification": lambda z: F.binary_cross_entropy_with_logits(z, labels),
    }[problem_type](out.logits)
    torch.testing.assert_close(out.loss, expected)
    as_tuple = model(x, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)  # can_return_tuple: (loss, logits)
    torch.testing.assert_close(as_tuple[1], out.logits)


def test_weights_materialised_from_meta_are_all_initialised(tmp_path) -> None:
    """A checkpoint without the patch convolution (or anything else) initialises it as DINO does (PyTorch's
    kaiming-uniform default), not with whatever memory the meta tensor was materialised into."""
    from safetensors.torch import load_file, save_file

    config = EntmaxViTConfig(**TINY, num_register_tokens=1)
    EntmaxViTModel(config).save_pretrained(tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    dropped = [k for k in state if k.startswith("embeddings.patch_embeddings") or k.endswith("norm1.weight")]
    save_file({k: v for k, v in state.items() if k not in dropped}, str(tmp_path / "m" / "model.safetensors"),
              metadata={"format": "pt"})
    model, info = EntmaxViTModel.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(dropped)
    conv = model.embeddings.patch_embeddings.projection
    bound = 1 / (3 * 8 * 8) ** 0.5  # kaiming_uniform(a=sqrt(5)) and the bias both use 1/sqrt(fan_in)
    assert torch.isfinite(conv.weight).all() and 0 < conv.weight.abs().max() <= bound
    assert 0 < conv.bias.abs().max() <= bound
    assert conv.weight.std() > bound / 4  # spread over the range, not constant
    assert torch.equal(model.encoder.layer[0].norm1.weight, torch.ones(32))


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["softmax", "entmax15", "sparsemax", "entmax_bisect"])
def test_model_compiles_with_fullgraph_and_exports(attention: str) -> None:
    torch._dynamo.reset()
    model = EntmaxViTModel(EntmaxViTConfig(**TINY, attention=attention)).eval()
    _peaked(model, 6.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x).last_hidden_state
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x).last_hidden_state
        exported = torch.export.export(model, (x,), strict=False).module()(x).last_hidden_state
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exported, eager, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- as a backbone
def test_entmax_vit_is_the_backbone_of_upernet() -> None:
    backbone_config = EntmaxViTConfig(**{**TINY, "num_hidden_layers": 4}, attention="entmax15",
                                      out_indices=[1, 2, 3, -1])
    config = UperNetConfig(backbone_config=backbone_config, hidden_size=16, auxiliary_in_channels=32,
                           auxiliary_channels=16, num_labels=5, use_auxiliary_head=True)
    model = UperNetForSemanticSegmentation(config).train()
    assert isinstance(model.backbone, EntmaxViTBackbone)
    assert model.backbone.out_features == ["stage1", "stage2", "stage3", "stage4"]
    x = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 5, (2, 32, 32))
    out = model(pixel_values=x, labels=labels)
    assert out.logits.shape == (2, 5, 32, 32) and torch.isfinite(out.loss)
    out.loss.backward()
    qkv = model.backbone.encoder.layer[0].attention.qkv.weight
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0
    assert isinstance(AutoBackbone.from_config(backbone_config), EntmaxViTBackbone)


def test_backbone_config_fields_as_transformers_backbones() -> None:
    config = EntmaxViTConfig(**{**TINY, "num_hidden_layers": 3}, out_indices=[-3, -1])
    assert config.stage_names == ["stem", "stage1", "stage2", "stage3"]
    assert config.out_features == ["stage1", "stage3"]
    backbone = EntmaxViTBackbone(config).eval()
    assert backbone.out_feature_channels == {name: 32 for name in config.stage_names}
    assert backbone.channels == [32, 32]
    assert EntmaxViTConfig(**TINY).out_features == ["stage2"]  # None: the last stage
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = backbone(x)
        assert plain.hidden_states is None and plain.attentions is None
        backbone.config.output_hidden_states = True  # honoured from the config
        backbone.set_attn_implementation("eager")  # transformers' config allows output_attentions with eager only
        backbone.config.output_attentions = True
        full = backbone(x)
    assert len(full.hidden_states) == 4 and len(full.attentions) == 3
    for got, want in zip(full.feature_maps, plain.feature_maps):
        torch.testing.assert_close(got, want)
    assert backbone.get_input_embeddings() is backbone.embeddings.patch_embeddings
    backbone.out_features = ["stem", "stage2"]  # setters keep features and indices aligned
    assert backbone.out_indices == [0, 2]
    with pytest.raises(ValueError, match="out_features"):
        EntmaxViTConfig(**TINY, out_features=["stage2", "stage1"])
