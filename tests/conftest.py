"""Shared test setup: offline, deterministic, small thread count."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The Triton kernels run on CPU tensors through triton's interpreter (tests/test_triton_attention.py). triton
# reads this when a kernel is decorated, i.e. when modeling/triton_attention.py is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def rank_state():
    """The ``dump_rank_state`` test hook (tests/training_hooks.py) for a whole test module, module-scoped
    training fixtures included: in-process runs write OUTPUT_DIR/debug/rank{R}.jsonl (sample indices per batch,
    digests of teacher, center and student after every epoch)."""
    from training_hooks import install

    with pytest.MonkeyPatch.context() as mp:
        install({"dump_rank_state": True}, mp.setattr)
        yield


@pytest.fixture
def tiny_config_kwargs() -> dict:
    """Tiny EntmaxViT (image 32, patch 8, hidden 32, 2 layers, 4 heads) as in transformers' model tests."""
    return dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64)
