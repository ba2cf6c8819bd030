"""Stand-in (our code) for transformers' tests/generation/test_utils.py, which the sdist lacks. Vision encoders
do not generate; ModelTesterMixin only checks that such a model's tester does NOT inherit this mixin."""


class GenerationTesterMixin:
    pass
