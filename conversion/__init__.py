"""Checkpoint conversion into EntmaxViT: official DINO (backbone or full training checkpoints), transformers
ViT (both key namings) and timm VisionTransformer state dicts. See docs/conversion.md."""

from .convert import ConversionResult, ConvertConfig, convert, main, save_converted, verify_against

__all__ = ["ConversionResult", "ConvertConfig", "convert", "main", "save_converted", "verify_against"]
