"""Linear classification probe of a frozen backbone: official DINO eval_linear by default.

    python scripts/eval_linear.py --model PATH_OR_HUB_ID --dataset SOURCE [--key value ...]
    python scripts/eval_linear.py --model ... --dataset ... --protocol cached_grid --n_last_blocks 1 4
    accelerate launch scripts/eval_linear.py --model ... --dataset ILSVRC/imagenet-1k

``--protocol dino`` (the default) is official DINO eval_linear: augmented crops every epoch, one lr, the best
epoch reported. ``--protocol cached_grid`` is the fast option, not DINO's protocol: centre-crop features
cached once and a grid of heads (n_last_blocks x avgpool x lr) trained side by side.

Writes OUTPUT_DIR/results_linear.json (best head), grid.json (every head), linear_grid.png (when several heads) and the resolved
config. Keys: see entmax_vit.evaluation.linear_probe.LinearEvalConfig (docs/evaluation.md).
"""

from entmax_vit.cli.entry_point import eval_linear

if __name__ == "__main__":
    eval_linear()
