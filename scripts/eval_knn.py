"""Weighted k-NN evaluation of a frozen backbone (official DINO protocol).

    python scripts/eval_knn.py --model PATH_OR_HUB_ID --dataset SOURCE [--key value ...]
    accelerate launch scripts/eval_knn.py --model ... --dataset ILSVRC/imagenet-1k

Writes OUTPUT_DIR/results_knn.json, the resolved config and a feature cache. Keys: see
entmax_vit.evaluation.knn.KNNEvalConfig.
"""

import logging
import sys

from entmax_vit.cli.config import ConfigError, parse_config
from entmax_vit.evaluation.knn import KNNEvalConfig, main
from entmax_vit.evaluation.segmentation_probe import PRESET_DIR

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_config(KNNEvalConfig, sys.argv[1:], preset_dir=PRESET_DIR)
    except ConfigError as err:
        sys.exit(f"eval_knn: {err}")
    main(cfg)
