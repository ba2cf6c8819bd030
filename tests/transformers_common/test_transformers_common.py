"""transformers' own common tests (ModelTesterMixin, ConfigTester, BackboneTesterMixin of the installed
version, fetched at setup: see transformers_upstream.py) run against EntmaxViT for softmax and entmax-1.5,
set up as upstream's Dinov2 tests are. Every skip below names a reason that applies to in-library vision
models too."""

from __future__ import annotations

import unittest

import pytest
import torch
from transformers_upstream import require_upstream

require_upstream()

from hf_common_tests.test_backbone_common import BackboneTesterMixin  # noqa: E402
from hf_common_tests.test_configuration_common import ConfigTester  # noqa: E402
from hf_common_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

from entmax_vit.modeling import (  # noqa: E402
    EntmaxViTBackbone,
    EntmaxViTConfig,
    EntmaxViTForImageClassification,
    EntmaxViTModel,
)

# In-library models are listed in transformers' *_MAPPING_NAMES tables, which the mixins read to decide which
# classes get labels, are trained, or are backbones. List ours there for these tests, as if in-library.
_TABLES = {
    "MODEL_MAPPING_NAMES": "EntmaxViTModel",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": "EntmaxViTForImageClassification",
    "MODEL_FOR_BACKBONE_MAPPING_NAMES": "EntmaxViTBackbone",
}


@pytest.fixture(autouse=True, scope="module")
def _listed_in_transformers_tables():
    for table, name in _TABLES.items():
        getattr(modeling_auto, table)[EntmaxViTConfig.model_type] = name
    yield
    for table in _TABLES:
        getattr(modeling_auto, table).pop(EntmaxViTConfig.model_type, None)


class EntmaxViTModelTester:
    """Tiny config and inputs, as upstream's Dinov2ModelTester."""

    def __init__(self, parent, attention: str, batch_size=4, image_size=16, patch_size=4, num_channels=3,
                 is_training=True, use_labels=True, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                 type_sequence_label_size=10, initializer_range=0.02, attn_implementation="eager"):
        self.parent = parent
        self.attention = attention
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.is_training = is_training
        self.use_labels = use_labels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.type_sequence_label_size = type_sequence_label_size
        self.initializer_range = initializer_range
        self.attn_implementation = attn_implementation
        # sequence: [CLS] + patches
        self.seq_length = (image_size // patch_size) ** 2 + 1

    def get_config(self) -> EntmaxViTConfig:
        return EntmaxViTConfig(
            image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels,
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act, hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob, initializer_range=self.initializer_range,
            attention=self.attention, attn_implementation=self.attn_implementation,
            num_labels=self.type_sequence_label_size,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.type_sequence_label_size) if self.use_labels else None
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}

    def create_and_check_model(self, config, pixel_values, labels):
        model = EntmaxViTModel(config).eval()
        result = model(pixel_values)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))

    def create_and_check_backbone(self, config, pixel_values, labels):
        side = self.image_size // self.patch_size
        model = EntmaxViTBackbone(config).eval()
        result = model(pixel_values)
        self.parent.assertEqual(len(result.feature_maps), len(config.out_indices))
        self.parent.assertListEqual(list(result.feature_maps[0].shape), [self.batch_size, model.channels[0], side, side])
        self.parent.assertEqual(len(model.channels), len(config.out_indices))
        config.out_indices = None  # the last stage
        model = EntmaxViTBackbone(config).eval()
        result = model(pixel_values)
        self.parent.assertEqual(len(result.feature_maps), 1)
        self.parent.assertEqual(model.out_features, [f"stage{self.num_hidden_layers}"])

    def create_and_check_for_image_classification(self, config, pixel_values, labels):
        model = EntmaxViTForImageClassification(config).eval()
        result = model(pixel_values, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.type_sequence_label_size))
        config.num_channels = 1  # greyscale
        model = EntmaxViTForImageClassification(config).eval()
        result = model(floats_tensor([self.batch_size, 1, self.image_size, self.image_size]))
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.type_sequence_label_size))


class _EntmaxViTModelTest(ModelTesterMixin):
    """Shared body of the per-transform test classes below (not collected itself: not a TestCase)."""

    attention = "softmax"
    all_model_classes = (EntmaxViTModel, EntmaxViTForImageClassification, EntmaxViTBackbone)
    test_resize_embeddings = False
    test_torch_exportable = True
    has_attentions = True

    def setUp(self):
        self.model_tester = EntmaxViTModelTester(self, self.attention)
        # hidden_size 36 (upstream's ViT/Dinov2 use 37): our config checks hidden_size % num_attention_heads (6)
        self.config_tester = ConfigTester(self, config_class=EntmaxViTConfig, has_text_modality=False, hidden_size=36,
                                          attention=self.attention)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_backbone(self):
        self.model_tester.create_and_check_backbone(*self.model_tester.prepare_config_and_inputs())

    def test_for_image_classification(self):
        self.model_tester.create_and_check_for_image_classification(*self.model_tester.prepare_config_and_inputs())

    def test_model_get_set_embeddings(self):
        """As upstream's Dinov2/ViT tests: the input embedding of a vision model is its patch embedding module."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            output = model.get_output_embeddings()
            self.assertTrue(output is None or isinstance(output, torch.nn.Linear))

    @unittest.skip(reason="Vision model without inputs_embeds (as ViT/Dinov2)")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="Vision model without inputs_embeds (as ViT/Dinov2)")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    @unittest.skip(reason="No feed-forward chunking (as Dinov2)")
    def test_feed_forward_chunking(self):
        pass

    @pytest.mark.slow  # ~10 s: loads the model in every dtype spelling
    def test_bc_torch_dtype(self):
        super().test_bc_torch_dtype()


class EntmaxViTSoftmaxModelTest(_EntmaxViTModelTest, unittest.TestCase):
    attention = "softmax"


_NO_SDPA = ("SDPA computes softmax only, so an entmax-1.5 model refuses attn_implementation='sdpa', as in-library "
            "models without SDPA support (_supports_sdpa=False), for which this test skips too")


class EntmaxViTEntmax15ModelTest(_EntmaxViTModelTest, unittest.TestCase):
    attention = "entmax15"

    @unittest.skip(reason=_NO_SDPA)
    def test_sdpa_can_dispatch_non_composite_models(self):
        pass

    @unittest.skip(reason=_NO_SDPA)
    def test_can_set_attention_dynamically(self):
        pass

    @pytest.mark.slow  # ~45 s: tracing the certified fallback (torch.cond + sort) of three model classes
    def test_torch_export(self):
        super().test_torch_export()


class _EntmaxViTBackboneTest(BackboneTesterMixin):
    attention = "softmax"
    all_model_classes = (EntmaxViTBackbone,)
    config_class = EntmaxViTConfig
    has_attentions = True

    def setUp(self):
        self.model_tester = EntmaxViTModelTester(self, self.attention)


class EntmaxViTSoftmaxBackboneTest(_EntmaxViTBackboneTest, unittest.TestCase):
    attention = "softmax"


class EntmaxViTEntmax15BackboneTest(_EntmaxViTBackboneTest, unittest.TestCase):
    attention = "entmax15"
