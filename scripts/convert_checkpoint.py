"""Convert a DINO / transformers-ViT / timm checkpoint into an EntmaxViT model folder.

    python scripts/convert_checkpoint.py --source dino dino_deitsmall16_pretrain.pth out/dino_vits16
    python scripts/convert_checkpoint.py --source dino dino_vits16_full_checkpoint.pth out/x --which student
    python scripts/convert_checkpoint.py --source hf-vit facebook/dino-vits16 out/hf_dino_vits16
    python scripts/convert_checkpoint.py --source timm vit_small_patch16_224.dino.safetensors out/timm \
        --timm_arch vit_small_patch16_224
    python scripts/convert_checkpoint.py --source dino ckpt.pth out/entmax_init --attention entmax15

INPUT and OUTPUT_DIR may also be given as --input / --output_dir; every field of ConvertConfig
(entmax_vit.conversion.convert) is a --key value option, and --config YAML loads a file of them.
"""

from pathlib import Path

from entmax_vit.cli import entry_point
from entmax_vit.data.model_path import check_model_path
from entmax_vit.data.config_io import ConfigError
from entmax_vit.conversion.convert import ConvertConfig, main


def checked(cfg: ConvertConfig) -> ConvertConfig:
    """INPUT and OUTPUT_DIR given; INPUT exists (a Hub id is fine for --source hf-vit)."""
    if not cfg.input or not cfg.output_dir:
        raise ConfigError("Usage: convert_checkpoint.py --source {dino,hf-vit,timm} INPUT OUTPUT_DIR [--attention softmax]")
    if cfg.source == "hf-vit":
        check_model_path(cfg.input)
    elif not Path(cfg.input).expanduser().exists():
        raise FileNotFoundError(f"checkpoint file not found: {cfg.input}")
    return cfg


if __name__ == "__main__":
    entry_point.run(lambda cfg: main(checked(cfg)), ConvertConfig, "convert_checkpoint",
                    positionals=("input", "output_dir"), description=__doc__, log_format="[convert] %(message)s")
