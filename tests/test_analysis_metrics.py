"""Analysis metrics on constructed attention matrices, token sets and maps with known answers, and
``analyze_model`` invariants on tiny in-memory models."""

import math

import pytest
import torch

from entmax_vit.analysis.per_layer import analyze_model, flatten_metrics, unflatten_metrics
from entmax_vit.analysis.attention_metrics import (
    attention_statistics,
    median_from_histogram,
    patch_distance_matrix,
    row_entropy,
)
from entmax_vit.analysis.foreground import foreground_statistics, jaccard, mass_threshold_mask, summarize_heads
from entmax_vit.analysis.attention_metrics import finalize
from entmax_vit.analysis.token_metrics import high_norm_threshold, norm_metrics, similarity_statistics
from entmax_vit.modeling import EntmaxViTConfig, EntmaxViTModel


def attention_metrics(attn, grid, prefix=1):
    """One batch of one layer as numbers, as analyze_model finalises them."""
    stats, hist = attention_statistics(attn, grid, prefix)
    return {**finalize(stats), "support_median": median_from_histogram(hist)}


def similarity_metrics(features, grid, prefix=1):
    return finalize(similarity_statistics(features, grid, prefix))


def high_norm_outliers(norms, k=6.0):
    return norms > high_norm_threshold(norms, k)

GRID = (3, 4)  # h, w: 12 patches
N = GRID[0] * GRID[1]


def _mean_pairwise_distance(h: int, w: int) -> float:
    pos = [(r, c) for r in range(h) for c in range(w)]
    total = sum(math.dist(a, b) for a in pos for b in pos)
    return total / len(pos) ** 2


# ------------------------------------------------------------------------------------------- attention
def test_patch_distance_matrix_geometry():
    d = patch_distance_matrix(*GRID)
    assert d.shape == (N, N)
    assert torch.allclose(d, d.T) and torch.all(d.diagonal() == 0)
    # patch 0 is (0, 0); patch 5 is (1, 1); patch 11 is (2, 3)
    assert d[0, 5].item() == pytest.approx(math.sqrt(2))
    assert d[0, 11].item() == pytest.approx(math.sqrt(4 + 9))


@pytest.mark.parametrize("prefix", [1, 3])
def test_uniform_attention(prefix):
    t = prefix + N
    attn = torch.full((2, 3, t, t), 1.0 / t)
    m = attention_metrics(attn, GRID, prefix)
    assert m["attention_zero_share"] == 0.0 and m["cls_zero_share"] == 0.0
    assert m["support_mean"] == t and m["support_median"] == t and m["cls_support_mean"] == t
    assert m["entropy"] == pytest.approx(math.log(t), abs=1e-5)
    assert m["cls_entropy"] == pytest.approx(math.log(t), abs=1e-5)
    assert m["patch_to_prefix_mass"] == pytest.approx(prefix / t, abs=1e-6)
    assert m["attention_distance"] == pytest.approx(_mean_pairwise_distance(*GRID), abs=1e-5)
    for h in range(3):
        assert m[f"attention_distance_head_{h}"] == pytest.approx(m["attention_distance"], abs=1e-5)


def test_one_hot_attention():
    t = 1 + N
    attn = torch.eye(t).expand(2, 4, t, t).clone()  # every token attends to itself only
    m = attention_metrics(attn, GRID, 1)
    assert m["entropy"] == 0.0 and m["cls_entropy"] == 0.0
    assert m["support_mean"] == 1 and m["support_median"] == 1
    assert m["attention_zero_share"] == pytest.approx(1 - 1 / t)
    assert m["cls_zero_share"] == pytest.approx(1 - 1 / t) and m["cls_support_mean"] == 1
    assert m["attention_distance"] == 0.0
    assert m["patch_to_prefix_mass"] == 0.0


def _neighbour_attention(h: int, w: int, prefix: int = 1, self_weight: float = 0.0) -> torch.Tensor:
    """Each patch attends uniformly to its 4-connected neighbours (and ``self_weight`` to itself)."""
    t = prefix + h * w
    attn = torch.zeros(t, t)
    attn[:prefix, :prefix] = torch.eye(prefix)
    for r in range(h):
        for c in range(w):
            i = prefix + r * w + c
            neigh = [(r + dr, c + dc) for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0)) if 0 <= r + dr < h and 0 <= c + dc < w]
            for rr, cc in neigh:
                attn[i, prefix + rr * w + cc] = (1 - self_weight) / len(neigh)
            attn[i, i] += self_weight
    return attn[None, None]


def test_local_attention_distance():
    m = attention_metrics(_neighbour_attention(*GRID), GRID, 1)
    assert m["attention_distance"] == pytest.approx(1.0, abs=1e-6)
    m = attention_metrics(_neighbour_attention(*GRID, self_weight=0.5), GRID, 1)
    assert m["attention_distance"] == pytest.approx(0.5, abs=1e-6)
    # Each patch at distance exactly 2 to the right (where it exists), else itself -> known mean.
    t = 1 + N
    attn = torch.zeros(1, 1, t, t)
    attn[0, 0, 0, 0] = 1
    expected = []
    for r in range(GRID[0]):
        for c in range(GRID[1]):
            i = 1 + r * GRID[1] + c
            j = i + 2 if c + 2 < GRID[1] else i
            attn[0, 0, i, j] = 1
            expected.append(2.0 if j != i else 0.0)
    assert attention_metrics(attn, GRID, 1)["attention_distance"] == pytest.approx(sum(expected) / len(expected))


def test_distance_ignores_prefix_mass_and_skips_rows_without_patch_mass():
    t = 1 + N
    attn = _neighbour_attention(*GRID).clone()
    attn[0, 0, 1:, 0] = 1.0  # add [CLS] mass to every patch row, then renormalise
    attn = attn / attn.sum(-1, keepdim=True)
    attn[0, 0, 1] = 0
    attn[0, 0, 1, 0] = 1.0  # patch 0 attends only to [CLS]: no patch-to-patch distance for it
    m = attention_metrics(attn, GRID, 1)
    assert m["attention_distance"] == pytest.approx(1.0, abs=1e-6)
    assert 0.5 < m["patch_to_prefix_mass"] < 1.0


def test_support_median_and_entropy_of_known_rows():
    # rows with supports 1, 2, 2, 4 (+ [CLS] uniform) -> lower median over 5 rows = 2... computed exactly
    attn = torch.zeros(1, 1, 5, 5)
    attn[0, 0, 0] = 0.2
    attn[0, 0, 1, 1] = 1
    attn[0, 0, 2, :2] = 0.5
    attn[0, 0, 3, 2:4] = 0.5
    attn[0, 0, 4, :4] = 0.25
    m = attention_metrics(attn, (2, 2), 1)
    assert m["support_median"] == 2
    assert m["support_mean"] == pytest.approx((5 + 1 + 2 + 2 + 4) / 5)
    ent = row_entropy(attn)[0, 0]
    assert torch.allclose(ent, torch.tensor([math.log(5), 0, math.log(2), math.log(2), math.log(4)]), atol=1e-6)
    assert median_from_histogram(torch.tensor([0, 3, 1, 0, 10])) == 4
    assert math.isnan(median_from_histogram(torch.zeros(4, dtype=torch.long)))


def test_attention_shape_errors():
    with pytest.raises(ValueError, match="prefix"):
        attention_metrics(torch.full((1, 1, 10, 10), 0.1), GRID, 1)
    with pytest.raises(ValueError, match="batch, heads"):
        attention_metrics(torch.full((1, 13, 13), 1 / 13), GRID, 1)


# ------------------------------------------------------------------------------------------- tokens
def test_identical_tokens_have_similarity_one():
    x = torch.randn(1, 1, 16).expand(2, 1 + N, 16).clone()
    m = similarity_metrics(x, GRID, 1)
    for k in ("cos_to_cls", "cos_neighbors", "cos_pairwise"):
        assert m[k] == pytest.approx(1.0, abs=1e-5)
    assert m["locality_contrast"] == pytest.approx(0.0, abs=1e-5)


def test_similarity_of_orthogonal_and_striped_tokens():
    # patches alternate between two orthogonal directions by column: horizontal neighbours 0, vertical 1
    e = torch.eye(4)
    h, w = GRID
    patches = torch.stack([e[c % 2] for r in range(h) for c in range(w)])  # (N, 4)
    x = torch.cat([e[2:3], patches])[None]  # [CLS] orthogonal to every patch
    m = similarity_metrics(x, GRID, 1)
    assert m["cos_to_cls"] == pytest.approx(0.0, abs=1e-6)
    horiz, vert = h * (w - 1), (h - 1) * w
    assert m["cos_neighbors"] == pytest.approx(vert / (horiz + vert), abs=1e-6)
    same_pairs = 2 * (6 * 5)  # two groups of 6 patches, ordered pairs i != j
    assert m["cos_pairwise"] == pytest.approx(same_pairs / (N * (N - 1)), abs=1e-6)


def test_planted_high_norm_token_is_detected():
    g = torch.Generator().manual_seed(0)
    norms = 10 + 0.2 * torch.randn(4, 64, generator=g)
    norms[2, 17] = 60.0
    mask = high_norm_outliers(norms, k=6.0)
    assert mask.sum() == 1 and mask[2, 17]
    m = norm_metrics(norms, torch.ones(4), k=6.0)
    assert m["outlier_count"] == pytest.approx(1 / 4)
    assert m["outlier_share"] == pytest.approx(1 / 256)
    assert m["outlier_norm_ratio"] == pytest.approx(60.0 / norms.median().item(), rel=1e-5)
    clean = norm_metrics(10 + 0.2 * torch.randn(4, 64, generator=g), torch.ones(4))
    assert clean["outlier_count"] == 0 and clean["outlier_norm_ratio"] == 0
    with pytest.raises(ValueError, match="k must be > 0"):
        high_norm_outliers(norms, k=0)


# ------------------------------------------------------------------------------------------- foreground
def test_mass_threshold_mask_keeps_smallest_top_set():
    w = torch.tensor([[0.3, 0.5, 0.0, 0.2], [1.0, 1.0, 1.0, 1.0]])
    keep = mass_threshold_mask(w, 0.6)
    assert keep[0].tolist() == [True, True, False, False]
    assert keep[1].sum() == 3  # 0.25 each: 0, 0.25, 0.5 before < 0.6
    assert mass_threshold_mask(w, 1.0)[0].tolist() == [True, True, False, True]  # never an exact zero
    with pytest.raises(ValueError, match="mass"):
        mass_threshold_mask(w, 0.0)


def test_jaccard_on_constructed_maps():
    pred = torch.zeros(8, 8, dtype=torch.bool)
    target = torch.zeros(8, 8, dtype=torch.bool)
    pred[0:4, 0:4] = True  # 16 px
    target[2:6, 0:4] = True  # 16 px, overlap 8 -> IoU 8 / 24
    assert jaccard(pred, target).item() == pytest.approx(1 / 3)
    valid = torch.ones(8, 8, dtype=torch.bool)
    valid[0:2] = False  # ignoring the pred-only rows leaves 8 / 16
    assert jaccard(pred, target, valid).item() == pytest.approx(0.5)
    assert jaccard(pred, pred).item() == 1.0
    assert math.isnan(jaccard(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)).item())


def test_foreground_jaccard_per_head_and_best_head():
    h, w, p = 2, 2, 4  # 2x2 patches of 4x4 pixels
    t = 1 + h * w
    attn = torch.full((1, 2, t, t), 1.0 / t)
    attn[0, 0, 0] = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0])  # head 0: top row of patches
    attn[0, 1, 0] = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5])  # head 1: bottom row
    masks = torch.zeros(1, h * p, w * p, dtype=torch.long)
    masks[0, :p] = 3  # foreground = top row
    masks[0, -1, :] = 255  # ignored pixels count nowhere
    stats = foreground_statistics(attn, masks, (h, w), 1, mass=0.9)
    m = finalize(stats)
    assert m["fg_jaccard_head_0"] == pytest.approx(1.0)
    assert m["fg_jaccard_head_1"] == pytest.approx(0.0)
    s = summarize_heads(m)
    assert s["fg_jaccard_best_head"] == 1.0 and s["fg_jaccard_best_head_index"] == 0
    assert s["fg_jaccard_mean_head"] == pytest.approx(0.5)
    # an image without foreground is skipped, not scored 0
    empty = foreground_statistics(attn, torch.zeros_like(masks), (h, w), 1)
    assert empty["fg_jaccard_head_0"] == (0.0, 0.0)


# ------------------------------------------------------------------------------------------- analyze_model
def _tiny(attention: str, tiny_config_kwargs, **kw) -> EntmaxViTModel:
    torch.manual_seed(0)
    return EntmaxViTModel(EntmaxViTConfig(**tiny_config_kwargs, attention=attention, **kw)).eval()


def test_analyze_model_matches_direct_metrics_and_is_batch_invariant(tiny_config_kwargs):
    model = _tiny("entmax15", tiny_config_kwargs, num_register_tokens=2)
    x = torch.randn(3, 3, 32, 32)
    masks = torch.zeros(3, 32, 32, dtype=torch.long)
    masks[:, 8:24, 8:24] = 1
    full = analyze_model(model, x, masks, batch_size=3)
    split = analyze_model(model, x, masks, batch_size=2)
    assert sorted(full) == [0, 1]
    for layer in full:
        assert full[layer].keys() == split[layer].keys()
        for k in full[layer]:
            assert full[layer][k] == pytest.approx(split[layer][k], rel=1e-5, abs=1e-6), k
    with torch.no_grad():
        out = model(pixel_values=x, output_attentions=True)
    direct = attention_metrics(out.attentions[1], (4, 4), prefix=3)
    for k, v in direct.items():
        assert full[1][k] == pytest.approx(v, rel=1e-5), k
    assert "fg_jaccard_best_head" in full[1] and 0 <= full[1]["fg_jaccard_best_head"] <= 1
    assert unflatten_metrics(flatten_metrics(full)) == full
    assert "layer_1/attention_zero_share" in flatten_metrics(full)


def test_sparse_attention_shows_exact_zeros_softmax_does_not(tiny_config_kwargs):
    x = torch.randn(2, 3, 32, 32)
    results = {}
    for attention in ("softmax", "entmax15"):
        model = _tiny(attention, tiny_config_kwargs)
        with torch.no_grad():  # sharpen the scores so entmax-1.5 truncates (same weights for both)
            for block in model.encoder.layer:
                block.attention.qkv.weight.mul_(8.0)
        results[attention] = analyze_model(model, x)
    for layer in (0, 1):
        assert results["softmax"][layer]["attention_zero_share"] == 0.0
        assert results["entmax15"][layer]["attention_zero_share"] > 0.1
        assert results["entmax15"][layer]["support_mean"] < results["softmax"][layer]["support_mean"]
        assert results["entmax15"][layer]["entropy"] < results["softmax"][layer]["entropy"]


def test_analyze_model_input_errors(tiny_config_kwargs):
    model = _tiny("entmax15", tiny_config_kwargs)
    with pytest.raises(ValueError, match="pixel_values"):
        analyze_model(model, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="masks"):
        analyze_model(model, torch.randn(2, 3, 32, 32), torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="batch_size"):
        analyze_model(model, torch.randn(2, 3, 32, 32), batch_size=0)


def test_analyze_model_on_transformers_vit_and_non_square_inputs(tiny_config_kwargs):
    """Official DINO checkpoints in transformers' ViT format work as well (eager attention returns weights);
    a wrapper model is resolved to its encoder; non-square inputs use the right patch grid."""
    from transformers import ViTConfig, ViTModel

    from entmax_vit.modeling import EntmaxViTForImageClassification

    vit = ViTModel(ViTConfig(**tiny_config_kwargs, attn_implementation="eager"), add_pooling_layer=False).eval()
    x = torch.randn(2, 3, 32, 32)
    m = analyze_model(vit, x)
    assert m[1]["support_mean"] == 17 and m[1]["attention_zero_share"] == 0.0
    sdpa = ViTModel(ViTConfig(**tiny_config_kwargs, attn_implementation="sdpa"), add_pooling_layer=False).eval()
    with pytest.raises(ValueError, match="eager"):
        analyze_model(sdpa, x)
    clf = EntmaxViTForImageClassification(EntmaxViTConfig(**tiny_config_kwargs, num_labels=3)).eval()
    wide = analyze_model(clf, torch.randn(2, 3, 32, 48))  # 4 x 6 patches
    assert wide[0]["support_mean"] <= 25
    assert 0 < wide[0]["attention_distance"] < math.dist((0, 0), (3, 5))


def test_analyze_model_on_a_bfloat16_model_keeps_its_mode(tiny_config_kwargs):
    model = _tiny("entmax15", tiny_config_kwargs).to(torch.bfloat16).train()
    x = torch.randn(2, 3, 32, 32)
    low = analyze_model(model, x)
    assert model.training  # restored
    ref = analyze_model(model.float(), x)
    assert low[1]["cos_neighbors"] == pytest.approx(ref[1]["cos_neighbors"], abs=0.05)
    assert low[1]["entropy"] == pytest.approx(ref[1]["entropy"], rel=0.02)
