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

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Optional, Sequence

from entmax_vit.cli.config import ConfigError, parse_config, usage
from entmax_vit.conversion.convert import ConvertConfig, main

_BOOL_FIELDS = {f.name for f in dataclasses.fields(ConvertConfig) if f.type in (bool, "bool")}
_BOOL_WORDS = {"true", "false", "1", "0", "yes", "no", "on", "off"}


def split_positionals(argv: Sequence[str]) -> list[str]:
    """Turn ``[... INPUT OUTPUT_DIR ...]`` into ``--input INPUT --output_dir OUTPUT_DIR`` for parse_config.
    A ``--key`` takes the next token as its value unless the next token is an option; a boolean flag takes it
    only when it is a boolean word (``--verify false``), so ``--overwrite IN OUT`` still works."""
    options: list[str] = []
    positionals: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--"):
            options.append(token)
            key = token[2:].replace("-", "_")
            has_next = "=" not in token and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if has_next and (key not in _BOOL_FIELDS or argv[i + 1].lower() in _BOOL_WORDS):
                options.append(argv[i + 1])
                i += 1
        else:
            positionals.append(token)
        i += 1
    if len(positionals) > 2:
        raise ConfigError(f"Expected at most INPUT and OUTPUT_DIR as positional arguments, got {positionals}")
    for name, value in zip(("--input", "--output_dir"), positionals):
        options += [name, value]
    return options


def run(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage(ConvertConfig, __doc__))
        return
    cfg = parse_config(ConvertConfig, split_positionals(argv))
    if not cfg.input or not cfg.output_dir:
        raise ConfigError("Usage: convert_checkpoint.py --source {dino,hf-vit,timm} INPUT OUTPUT_DIR [--attention softmax]")
    main(cfg)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[convert] %(message)s")
    try:
        run()
    except ValueError as err:  # ConfigError included: a clear message, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
