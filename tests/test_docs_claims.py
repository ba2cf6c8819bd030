"""Issue 24, item 8: limitations the README states about the installed libraries are checked against them, so an
upgrade that lifts one makes this test fail until the README is corrected."""

import re
from pathlib import Path

import pytest
import transformers

from entmax_vit.modeling import EntmaxViTBackbone, EntmaxViTConfig, EntmaxViTModel

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_autobackbone_on_a_local_folder_fails_as_the_readme_says(tmp_path):
    from transformers import AutoBackbone

    claim = re.search(r"`AutoBackbone.from_pretrained` on a local folder fails in transformers ([\d.]+) to ([\d.]+)",
                      README)
    assert claim, "README no longer states the AutoBackbone limitation"
    installed = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    newest_checked = tuple(int(x) for x in claim.group(2).split(".")[:2])
    assert installed <= newest_checked, (f"transformers {transformers.__version__} is newer than the README's "
                                         f"'{claim.group(0)}': check it again and update the README")
    EntmaxViTModel(EntmaxViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="Repo id"):
        AutoBackbone.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert isinstance(EntmaxViTBackbone.from_pretrained(str(tmp_path)), EntmaxViTBackbone)  # the README's workaround
