"""Test setup for transformers' common tests: fetching them (cached) happens when this conftest is loaded, at
collection, before the test modules that subclass their mixins are imported."""

import transformers_upstream  # noqa: F401  (prepares hf_common_tests or records why it cannot)
