"""DINO's pieces against values worked out by hand from the official formulas (main_dino.py / utils.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from entmax_vit.data.config_io import to_dict
from entmax_vit.training.checkpointing import (
    latest_checkpoint, list_checkpoints, load_teacher, remove_incomplete, save_teacher,
)
from entmax_vit.training.config import DinoConfig, breaking_differences
from entmax_vit.training.dino_data import EpochPermutationSampler, sample_seed
from entmax_vit.training.networks import DINOHead, MultiCropWrapper, WeightNormLinear
from entmax_vit.training.dino_loss import DINOLoss
from entmax_vit.training.optim import (
    cancel_last_layer_gradients, clip_gradients_per_parameter, ema_update, param_groups,
)
from entmax_vit.recipe import scaled_lr
from entmax_vit.training.schedules import cosine_schedule, teacher_temp_schedule


# ------------------------------------------------------------------------------------------- schedules
def test_cosine_schedule_by_hand():
    # 2 epochs x 2 iters, 1 warmup epoch: warmup linspace(0, 1, 2) = [0, 1]; then 2 cosine iterations
    # i = 0: 0 + 0.5 * 1 * (1 + cos 0) = 1;  i = 1: 0.5 * (1 + cos(pi / 2)) = 0.5
    np.testing.assert_allclose(cosine_schedule(1.0, 0.0, 2, 2, warmup_epochs=1), [0.0, 1.0, 1.0, 0.5], atol=1e-12)
    # no warmup, 4 iterations from 0.04 to 0.4: 0.4 + 0.5 * (-0.36) * (1 + cos(pi i / 4))
    expected = [0.4 - 0.18 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    np.testing.assert_allclose(cosine_schedule(0.04, 0.4, 1, 4), expected)
    assert cosine_schedule(0.04, 0.4, 1, 4)[0] == pytest.approx(0.04)


def test_official_lr_and_momentum_values():
    assert scaled_lr(5e-4, 8 * 64) == pytest.approx(1e-3)  # official ViT-S/16: 8 GPUs x 64
    lr = cosine_schedule(scaled_lr(5e-4, 512), 1e-6, 100, 2502, warmup_epochs=10)
    assert len(lr) == 250200 and lr[0] == 0.0
    assert lr[10 * 2502 - 1] == pytest.approx(1e-3)  # end of warmup reaches the peak
    assert lr[-1] == pytest.approx(1e-6, abs=1e-9)
    momentum = cosine_schedule(0.996, 1.0, 100, 2502)
    assert momentum[0] == pytest.approx(0.996) and momentum[-1] == pytest.approx(1.0, abs=1e-9)
    assert np.all(np.diff(momentum) >= 0)


def test_teacher_temp_schedule_by_hand():
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.07, 3, 5), [0.04, 0.055, 0.07, 0.07, 0.07])
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.04, 0, 2), [0.04, 0.04])
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs"):
        teacher_temp_schedule(0.04, 0.07, 30, 10)


def test_defaults_are_official_dino():
    cfg = DinoConfig()
    assert (cfg.optim.lr_base, cfg.optim.min_lr, cfg.optim.warmup_epochs) == (5e-4, 1e-6, 10)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.clip_grad) == (0.04, 0.4, 3.0)
    assert (cfg.optim.momentum_teacher, cfg.optim.freeze_last_layer, cfg.optim.epochs) == (0.996, 1, 100)
    assert (cfg.loss.student_temp, cfg.loss.teacher_temp, cfg.loss.center_momentum) == (0.1, 0.04, 0.9)
    assert (cfg.model.out_dim, cfg.model.head_hidden_dim, cfg.model.head_bottleneck_dim) == (65536, 2048, 256)
    assert cfg.model.drop_path_rate == 0.1 and cfg.data.batch_size_per_device == 64
    # multi-crop: 2 global 224 crops at scale (0.4, 1), 8 local 96 crops at (0.05, 0.4)
    c = cfg.crops
    assert (c.global_size, c.local_size, c.local_crops_number) == (224, 96, 8)
    assert tuple(c.global_crops_scale) == (0.4, 1.0) and tuple(c.local_crops_scale) == (0.05, 0.4)
    assert (c.global1_blur_p, c.global2_blur_p, c.local_blur_p, c.global2_solarize_p) == (1.0, 0.1, 0.5, 0.2)


# ------------------------------------------------------------------------------------------------ loss
def test_dino_loss_by_hand():
    # K = 2 classes, B = 1 image, 3 crops (2 global + 1 local), student temp 0.5, teacher temp 1, center 0
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    teacher = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    loss_fn = DINOLoss(out_dim=2, num_crops=3, student_temp=0.5, center_momentum=0.9)
    loss = loss_fn(student, teacher, teacher_temp=1.0)

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    def cross_entropy(q, s):  # -sum q log softmax(s / 0.5)
        p = softmax([x / 0.5 for x in s])
        return -sum(qi * math.log(pi) for qi, pi in zip(q, p))

    q0, q1 = softmax([2.0, 0.0]), softmax([0.0, 0.0])
    s0, s1, s2 = [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]
    # pairs (teacher view, student view) with different views: (0,1) (0,2) (1,0) (1,2)
    expected = (cross_entropy(q0, s1) + cross_entropy(q0, s2) + cross_entropy(q1, s0) + cross_entropy(q1, s2)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # center <- 0.9 * 0 + 0.1 * mean(teacher) = 0.1 * [1, 0]
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.1, 0.0]]))
    # the second call subtracts the center: teacher softmax((t - c) / T)
    loss_fn(student, teacher, teacher_temp=1.0)
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.9 * 0.1 + 0.1 * 1.0, 0.0]]))


def test_dino_loss_without_local_crops_equals_official():
    """crops.local_crops_number 0: the 2 global crops alone, 2 loss terms, as official DINOLoss with ncrops=2
    (pairs iq != v over teacher chunk iq and student chunk v, summed, divided by n_loss_terms = 2)."""
    torch.manual_seed(0)
    batch, k, student_temp, teacher_temp = 3, 5, 0.1, 0.04
    student = torch.randn(2 * batch, k)
    teacher = torch.randn(2 * batch, k)
    center = torch.randn(1, k) * 0.1
    loss_fn = DINOLoss(out_dim=k, num_crops=2, student_temp=student_temp, center_momentum=0.9)
    loss_fn.center.copy_(center)
    loss = loss_fn(student, teacher, teacher_temp)

    # written out: q_t = softmax((teacher_t - c) / T_t), log p_s = log_softmax(student_s / T_s), per image
    def cross_entropy(t: int, s: int) -> float:
        total = 0.0
        for b in range(batch):
            logits_t = [(teacher[t * batch + b, j] - center[0, j]).item() / teacher_temp for j in range(k)]
            top = max(logits_t)
            q = [math.exp(x - top) for x in logits_t]
            q = [x / sum(q) for x in q]
            logits_s = [student[s * batch + b, j].item() / student_temp for j in range(k)]
            top = max(logits_s)
            log_norm = top + math.log(sum(math.exp(x - top) for x in logits_s))
            total += -sum(qj * (x - log_norm) for qj, x in zip(q, logits_s))
        return total / batch

    expected = (cross_entropy(0, 1) + cross_entropy(1, 0)) / 2  # n_loss_terms = 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="at least"):
        DINOLoss(out_dim=k, num_crops=1)


def test_dino_loss_center_uses_reduced_batch():
    loss_fn = DINOLoss(out_dim=3, num_crops=4, center_momentum=0.5)
    teacher = torch.ones(4, 3)
    # a fake all-reduce doubling the sum, as two ranks with equal outputs would
    loss_fn(torch.zeros(8, 3), teacher, 0.04, reduce_sum=lambda t: 2 * t, world_size=2)
    torch.testing.assert_close(loss_fn.center, torch.full((1, 3), 0.5))
    assert "center" in loss_fn.state_dict()


def test_dino_loss_gradient_only_through_student():
    student = torch.randn(8, 16, requires_grad=True)
    teacher = torch.randn(4, 16, requires_grad=True)
    DINOLoss(16, num_crops=4)(student, teacher, 0.04).backward()
    assert student.grad is not None and teacher.grad is None


# ------------------------------------------------------------------------------------- head, optimizer
def test_head_last_layer_is_weight_normed_with_fixed_norm():
    head = DINOHead(32, out_dim=64, hidden_dim=48, bottleneck_dim=16)
    assert not head.last_layer.weight_g.requires_grad
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(64))
    x = torch.randn(5, 32)
    z = nn.functional.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), z @ (head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)).T)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert DINOHead(32, 64, 48, 16, norm_last_layer=False).last_layer.weight_g.requires_grad


def test_weight_norm_linear_matches_torch_weight_norm():
    ours = WeightNormLinear(6, 4)
    with torch.no_grad():
        ours.weight_g.copy_(torch.rand(4, 1) + 0.5)
    ref = nn.Linear(6, 4, bias=False)
    ref.weight.data.copy_(ours.weight_v.data)
    ref = torch.nn.utils.parametrizations.weight_norm(ref)
    ref.parametrizations.weight.original0.data.copy_(ours.weight_g.data)
    x = torch.randn(3, 6)
    torch.testing.assert_close(ours(x), ref(x))


def test_param_groups_no_decay_on_biases_and_1d():
    head = DINOHead(8, 16, 12, 4, norm_last_layer=True)
    groups = param_groups(head)
    names = {id(p): n for n, p in head.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert decayed == {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight", "last_layer.weight_v"}
    assert plain == {"mlp.0.bias", "mlp.2.bias", "mlp.4.bias"}  # weight_g is frozen: in no group
    assert groups[1]["weight_decay"] == 0.0


def test_per_parameter_clipping_by_hand():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([6.0, 0.0])  # norm 6 > 3: scaled by 3 / (6 + 1e-6)
    b.grad = torch.tensor([1.0, 0.0, 0.0])  # norm 1 <= 3: untouched (a global clip would scale it too)
    total = clip_gradients_per_parameter([a, b], 3.0)
    assert total.item() == pytest.approx(math.sqrt(37))
    assert a.grad[0].item() == pytest.approx(3.0 * 6 / (6 + 1e-6))
    torch.testing.assert_close(b.grad, torch.tensor([1.0, 0.0, 0.0]))


def test_foreach_clipping_equals_official_loop_bitwise():
    """The device-side (no host sync) clipping gives official DINO's per-parameter loop bit for bit."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) * scale for s, scale in (((7, 5), 4.0), ((3,), 0.1), ((4, 4), 1.0), ((2,), 9.0))]
    params = [nn.Parameter(torch.zeros_like(t)) for t in grads]
    for p, t in zip(params, grads):
        p.grad = t.clone()
    total = clip_gradients_per_parameter(params, 3.0)
    norms = []
    for t in grads:  # official utils.clip_gradients
        norm = t.norm(2)
        norms.append(norm.item())
        clip_coef = 3.0 / (norm + 1e-6)
        if clip_coef < 1:
            t.mul_(clip_coef)
    for p, t in zip(params, grads):
        assert torch.equal(p.grad, t)
    assert total.item() == pytest.approx(math.sqrt(sum(n * n for n in norms)))


def test_last_layer_frozen_in_first_epoch():
    head = DINOHead(8, 16, 12, 4, norm_last_layer=False)
    for p in head.parameters():
        p.grad = torch.ones_like(p)
    cancel_last_layer_gradients(head, epoch=0, freeze_last_layer=1)
    assert head.last_layer.weight_v.grad is None and head.last_layer.weight_g.grad is None
    assert head.mlp[0].weight.grad is not None
    head.last_layer.weight_v.grad = torch.ones_like(head.last_layer.weight_v)
    cancel_last_layer_gradients(head, epoch=1, freeze_last_layer=1)
    assert head.last_layer.weight_v.grad is not None


# ---------------------------------------------------------------------------------------- multi-crop
def test_resolution_groups_and_wrapper(tiny_config_kwargs):
    from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel

    crops = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16) for _ in range(3)]
    backbone = EntmaxViTModel(EntmaxViTConfig(**tiny_config_kwargs)).eval()
    wrapper = MultiCropWrapper(backbone, DINOHead(32, 64, 48, 16)).eval()
    batches = []  # one backbone pass per resolution group: crops [0, 2) and [2, 5)
    handle = backbone.register_forward_hook(
        lambda module, args, kwargs, output: batches.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    out = wrapper(crops)
    handle.remove()
    assert batches == [2 * 2, 3 * 2]
    assert out.shape == (10, 64)  # crop-major: 5 crops x 2 images
    one_by_one = torch.cat([wrapper.head(backbone(pixel_values=c).pooler_output) for c in crops])
    torch.testing.assert_close(out, one_by_one, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- EMA, data order, resume
def test_ema_update_formula():
    student, teacher = nn.Linear(2, 2), nn.Linear(2, 2)
    nn.init.zeros_(student.weight), nn.init.ones_(teacher.weight)
    m = 0.9
    with torch.no_grad():  # the three lines of dino.py
        for q, k in zip(student.parameters(), teacher.parameters()):
            k.data.mul_(m).add_((1 - m) * q.detach().data)
    torch.testing.assert_close(teacher.weight, torch.full((2, 2), 0.9))
    g = torch.Generator().manual_seed(1)
    q = [torch.randn(5, 3, generator=g), torch.randn(4, generator=g)]
    k = [torch.randn(5, 3, generator=g), torch.randn(4, generator=g)]
    k_loop = [t.clone() for t in k]
    for a, b in zip(q, k_loop):
        b.mul_(0.996).add_((1 - 0.996) * a)
    ema_update(k, q, 0.996)  # the loop's foreach version
    for a, b in zip(k, k_loop):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_epoch_order_is_seeded_permutation():
    sampler = EpochPermutationSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and list(sampler) == first
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(10)) and list(sampler) != first
    assert sample_seed(0, 0, 1) != sample_seed(0, 0, 2) != sample_seed(0, 1, 1)


def test_breaking_config_changes_are_named():
    base = to_dict(DinoConfig())
    changed = to_dict(DinoConfig())
    changed["model"]["backbone_overrides"] = {"hidden_size": 64}
    changed["optim"]["epochs"] = 50
    changed["logging"]["every_steps"] = 1
    changed["checkpoint"]["resume"] = "auto"
    changed["data"]["num_workers"] = 2
    diff = breaking_differences(base, changed)
    assert set(diff) == {"model.backbone_overrides.hidden_size", "optim.epochs"}


def test_checkpoint_listing_ignores_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step_0000002", True), ("step_0000004", True), ("step_0000006", False)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "trainer_state.json").write_text("{}")
    (root / ".tmp_step_0000008").mkdir()
    assert [p.name for p in list_checkpoints(root)] == ["step_0000002", "step_0000004"]
    assert latest_checkpoint(root).name == "step_0000004"
    removed = {p.name for p in remove_incomplete(root)}
    assert removed == {"step_0000006", ".tmp_step_0000008"}


def test_teacher_file_round_trip_and_mismatch(tmp_path):
    teacher, center = DINOHead(8, 16, 12, 4), torch.randn(1, 16)
    save_teacher(tmp_path / "t.safetensors", teacher, center)
    other, other_center = DINOHead(8, 16, 12, 4), torch.zeros(1, 16)
    load_teacher(tmp_path / "t.safetensors", other, other_center)
    torch.testing.assert_close(other_center, center)
    torch.testing.assert_close(other.mlp[0].weight, teacher.mlp[0].weight)
    with pytest.raises(ValueError, match="mlp.0.weight"):
        load_teacher(tmp_path / "t.safetensors", DINOHead(10, 16, 12, 4), torch.zeros(1, 16))


@pytest.mark.parametrize("attention", ["softmax", "entmax15"])
def test_attention_support_size(tiny_config_kwargs, attention):
    from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel
    from entmax_vit.training.metrics_log import attention_support_size

    model = EntmaxViTModel(EntmaxViTConfig(**tiny_config_kwargs, attention=attention)).eval()
    with torch.no_grad():  # sharpen the scores so that entmax-1.5 has to drop tokens (not for softmax: with
        # score gaps above ~100 its float32 exp underflows to exact zeros, a rounding effect, not sparsity)
        model.encoder.layer[-1].attention.qkv.weight.mul_(30.0 if attention != "softmax" else 1.0)
    x = torch.randn(3, 3, 32, 32)
    tokens = 1 + (32 // 8) ** 2
    probs = model(pixel_values=x, output_attentions=True).attentions[-1]  # (B, H, N, N)
    support = attention_support_size(model, x)
    assert support == pytest.approx((probs > 0).sum(-1).float().mean().item())
    if attention == "softmax":
        assert support == tokens
    else:
        assert 1 <= support < tokens


def test_presets_load_and_the_paper_pair_differs_only_in_attention():
    from entmax_vit.cli.config import parse_config
    from entmax_vit.training.config import flatten
    from entmax_vit.training.dino import CONFIG_DIR

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"tiny_cpu", "dino_vits16_100ep", "vits16_entmax15_200ep", "vits16_softmax_200ep"} <= set(names)
    cfgs = {n: flatten(to_dict(parse_config(DinoConfig, ["--config", n], preset_dir=CONFIG_DIR))) for n in names}
    entmax, softmax = cfgs["vits16_entmax15_200ep"], cfgs["vits16_softmax_200ep"]
    # The method differs only in the transform; both take the device's default kernel (triton for entmax-1.5 and
    # SDPA for softmax on CUDA), chosen for speed, the same math as eager.
    from entmax_vit.modeling.attention import default_kernel

    assert {k for k in entmax if entmax[k] != softmax[k]} == {"output_dir", "model.attention"}
    assert entmax["model.attn_implementation"] == softmax["model.attn_implementation"] == "auto"
    assert (default_kernel("entmax15", "cuda"), default_kernel("softmax", "cuda")) == ("triton", "sdpa")
    assert cfgs["dino_vits16_100ep"]["model.attention"] == "softmax"  # the literal official recipe
    assert entmax["optim.epochs"] == 200 and entmax["data.source"] == "ILSVRC/imagenet-1k"
    assert cfgs["dino_vits16_100ep"]["optim.epochs"] == 100 and cfgs["tiny_cpu"]["data.source"] == "embedded"
    # the 200-epoch presets are official DINO's vanilla defaults (dino_vits16_100ep) with epochs = 200; the
    # vanilla preset says attn_implementation auto too
    vanilla = cfgs["dino_vits16_100ep"]
    assert vanilla["model.attn_implementation"] == "auto" and resolved_kernel("dino_vits16_100ep")["model.attn_implementation"] == "sdpa"
    assert {k for k in softmax if softmax[k] != vanilla[k]} == {"output_dir", "optim.epochs"}
    # auto follows the transform and the device: the vanilla recipe with entmax15 runs tiled on CPU, triton on CUDA
    entmax_vanilla = resolved_kernel("dino_vits16_100ep", "--model.attention", "entmax15")
    assert entmax_vanilla["model.attn_implementation"] == "auto"
    assert (default_kernel("entmax15", "cpu"), default_kernel("entmax15", "cuda:0")) == ("tiled", "triton")


def resolved_kernel(preset: str, *overrides: str) -> dict:
    """A training preset, flattened, with ``model.attn_implementation`` as training resolves it (checked against
    the transform; auto: sdpa for softmax, else "auto", the model's per-call device-aware default)."""
    from entmax_vit.cli.config import parse_config
    from entmax_vit.training.config import flatten
    from entmax_vit.training.dino import CONFIG_DIR
    from entmax_vit.training.networks import attention_kernel

    cfg = parse_config(DinoConfig, ["--config", preset, *overrides], preset_dir=CONFIG_DIR)
    return {**flatten(to_dict(cfg)), "model.attn_implementation": attention_kernel(cfg)}


def test_boosted_300_epoch_pair_is_official_readme_recipe():
    """Official DINO README's longer ViT-S/16 recipe (--epochs 300 --teacher_temp 0.07
    --warmup_teacher_temp_epochs 30 --norm_last_layer false) as a softmax / entmax-1.5 pair."""
    from entmax_vit.cli.config import parse_config
    from entmax_vit.training.config import flatten
    from entmax_vit.training.dino import CONFIG_DIR

    def load(name: str) -> dict:
        return flatten(to_dict(parse_config(DinoConfig, ["--config", name], preset_dir=CONFIG_DIR)))

    entmax, softmax = load("vits16_entmax15_300ep_boosted"), load("vits16_softmax_300ep_boosted")
    vanilla = load("dino_vits16_100ep")
    assert {k for k in entmax if entmax[k] != softmax[k]} == {"output_dir", "model.attention"}
    assert (entmax["model.attention"], entmax["model.attn_implementation"]) == ("entmax15", "auto")
    assert (softmax["model.attention"], softmax["model.attn_implementation"]) == ("softmax", "auto")
    # exactly the README's four flags on top of main_dino.py's defaults
    assert {k for k in softmax if softmax[k] != vanilla[k]} == {
        "output_dir", "optim.epochs", "loss.teacher_temp", "loss.warmup_teacher_temp_epochs", "model.norm_last_layer"}
    assert (softmax["optim.epochs"], softmax["loss.teacher_temp"], softmax["loss.warmup_teacher_temp_epochs"],
            softmax["model.norm_last_layer"], softmax["loss.warmup_teacher_temp"]) == (300, 0.07, 30, False, 0.04)
    # 2 nodes x 8 GPUs x 64 images: total batch 1024, peak lr 5e-4 x 1024 / 256
    assert softmax["data.batch_size_per_device"] * 16 == 1024
    assert scaled_lr(softmax["optim.lr_base"], 1024) == pytest.approx(2e-3)
