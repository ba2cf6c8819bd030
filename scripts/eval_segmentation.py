"""Linear semantic-segmentation probe on a frozen backbone.

    python scripts/eval_segmentation.py --preset voc --model PATH_OR_HUB_ID --dataset SOURCE [--key value ...]
    accelerate launch scripts/eval_segmentation.py --preset ade20k_dinov2 --model ... --dataset ...

Presets (evaluation/configs): voc, ade20k, cityscapes (NeCo/Leopart protocol), voc_dinov2, ade20k_dinov2,
cityscapes_dinov2 (DINOv2 linear protocol), embedded (bundled synthetic scenes; the default).
``--preset NAME`` is an alias of ``--config NAME``; a YAML path works too. Writes OUTPUT_DIR/
results_segmentation.json, segmentation_head/ (for the Hub), per_class_iou.{json,png}, train_log.json and
the resolved config. Keys: see entmax_vit.evaluation.segmentation_probe.SegmentationEvalConfig.
"""

import logging
import sys

from entmax_vit.cli.config import ConfigError, parse_config
from entmax_vit.evaluation.segmentation_probe import PRESET_DIR, SegmentationEvalConfig, main


def preset_alias(argv: list[str]) -> list[str]:
    """``--preset X`` / ``--preset=X`` -> ``--config X``."""
    return [("--config" + a[len("--preset"):]) if a == "--preset" or a.startswith("--preset=") else a for a in argv]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_config(SegmentationEvalConfig, preset_alias(sys.argv[1:]), preset_dir=PRESET_DIR, default_preset="embedded")
    except ConfigError as err:
        sys.exit(f"eval_segmentation: {err}")
    main(cfg)
