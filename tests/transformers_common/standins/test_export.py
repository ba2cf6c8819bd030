"""Stand-in (our code) for transformers' tests/exporters/test_export.py, which the sdist lacks.

``ExportTesterMixin.test_torch_export``: every model class exports with ``torch.export`` and the exported
program gives the eager outputs (1e-5), when the tester sets ``test_torch_exportable``.
"""

import copy

import torch


def _tensors(output):
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


class ExportTesterMixin:
    test_torch_exportable = False

    def test_torch_export(self):
        if not self.test_torch_exportable:
            self.skipTest("test_torch_exportable is False")
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            with self.subTest(model_class.__name__):
                model = model_class(copy.deepcopy(config)).eval()
                inputs = self._prepare_for_class(inputs_dict, model_class)
                with torch.no_grad():
                    eager = _tensors(model(**inputs))
                    program = torch.export.export(model, args=(), kwargs=inputs, strict=False)
                    exported = _tensors(program.module()(**inputs))
                self.assertEqual(len(exported), len(eager))
                for got, want in zip(exported, eager):
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
