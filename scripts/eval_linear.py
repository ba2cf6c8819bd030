"""Linear classification probe of a frozen backbone (DINO protocol; a grid of learning rates in one pass).

    python scripts/eval_linear.py --model PATH_OR_HUB_ID --dataset SOURCE [--key value ...]
    python scripts/eval_linear.py --model ... --dataset ... --mode augmented --n_last_blocks 1,4
    accelerate launch scripts/eval_linear.py --model ... --dataset ILSVRC/imagenet-1k

Writes OUTPUT_DIR/results_linear.json (best head), grid.json (every head), linear_grid.png and the resolved
config. Keys: see entmax_vit.evaluation.linear_probe.LinearEvalConfig.
"""

import logging
import sys

from entmax_vit.cli.config import ConfigError, parse_config
from entmax_vit.evaluation.linear_probe import LinearEvalConfig, main
from entmax_vit.evaluation.segmentation_probe import PRESET_DIR

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_config(LinearEvalConfig, sys.argv[1:], preset_dir=PRESET_DIR)
    except ConfigError as err:
        sys.exit(f"eval_linear: {err}")
    main(cfg)
