"""``python -m entmax_vit.conversion --source {dino,hf-vit,timm} INPUT OUTPUT_DIR [--attention entmax15]``:
convert an official DINO / transformers ViT / timm checkpoint into an EntmaxViT model folder (the command
``EntmaxViTModel.from_pretrained`` names for an unconverted checkpoint). Every field of ``ConvertConfig`` is a
``--key value`` option; see docs/conversion.md."""

from entmax_vit.cli import entry_point

from .convert import ConvertConfig, main

if __name__ == "__main__":
    entry_point.run(main, ConvertConfig, "python -m entmax_vit.conversion", positionals=("input", "output_dir"),
                    description=__doc__, log_format="[convert] %(message)s")
