"""A mini reproduction of the paper on CPU: softmax vs entmax-1.5 (optionally sparsemax), several seeds each.

    python scripts/reproduce_mini.py --docs_dir docs                  # 3 seeds x 2 transforms (time: docs/reproduce_mini_results.md)
    python scripts/reproduce_mini.py --long --docs_dir docs           # dense degradation (~75-80 min of one thread)
    python scripts/reproduce_mini.py --attentions softmax entmax15 sparsemax --seeds 0 1 2 3
    python scripts/reproduce_mini.py --tiny --seeds 0 1 --output_dir /tmp/repro   # smoke run of the machinery

Every run is the main job's stages with the same budget (only the transform and the seed differ); the report
gives mean ± std [min, max] over seeds, the per-seed numbers, a bar chart with error bars, and calls a
difference noise when it is not larger than the seed spread. Resumable; ``--force`` starts over.
Keys: entmax_vit.jobs.reproduce_mini.ReproduceMiniConfig.
"""

from entmax_vit.cli.entry_point import run
from entmax_vit.jobs import degradation, reproduce_mini
from entmax_vit.jobs.reproduce_mini import ReproduceMiniConfig


def main(cfg: ReproduceMiniConfig) -> dict:
    return degradation.main(cfg) if cfg.long else reproduce_mini.main(cfg)


if __name__ == "__main__":
    run(main, ReproduceMiniConfig, "reproduce_mini", description=__doc__)
