"""Linear classification probe of a frozen backbone (DINO protocol; a grid of learning rates in one pass).

    python scripts/eval_linear.py --model PATH_OR_HUB_ID --dataset SOURCE [--key value ...]
    python scripts/eval_linear.py --model ... --dataset ... --mode augmented --n_last_blocks 1,4
    accelerate launch scripts/eval_linear.py --model ... --dataset ILSVRC/imagenet-1k

Writes OUTPUT_DIR/results_linear.json (best head), grid.json (every head), linear_grid.png and the resolved
config. Keys: see entmax_vit.evaluation.linear_probe.LinearEvalConfig (docs/evaluation.md).
"""

from entmax_vit.cli.commands import eval_linear

if __name__ == "__main__":
    eval_linear()
