"""Weighted k-NN evaluation of a frozen backbone (official DINO protocol).

    python scripts/eval_knn.py --model PATH_OR_HUB_ID --dataset SOURCE [--key value ...]
    accelerate launch scripts/eval_knn.py --model ... --dataset ILSVRC/imagenet-1k

Writes OUTPUT_DIR/results_knn.json, the resolved config and a feature cache. Keys: see
entmax_vit.evaluation.knn.KNNEvalConfig (docs/evaluation.md).
"""

from entmax_vit.cli.entry_point import eval_knn

if __name__ == "__main__":
    eval_knn()
