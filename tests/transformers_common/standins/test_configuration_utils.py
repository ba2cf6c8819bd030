"""Stand-in (our code) for transformers' tests/utils/test_configuration_utils.py, which the sdist lacks:
``config_common_kwargs`` maps common PreTrainedConfig fields to non-default values; ConfigTester checks that the
model's config accepts and keeps each of them."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["EntmaxViTModel"],
    "id2label": {0: "cat", 1: "dog"},
    "label2id": {"cat": 0, "dog": 1},
    "problem_type": "multi_label_classification",
}
