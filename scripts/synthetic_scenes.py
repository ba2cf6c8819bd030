"""The embedded benchmark (entmax_vit.data.synthetic_scenes): render or load it, look at it, and measure what raw
pixels alone score on it.

    python scripts/synthetic_scenes.py --preview scenes.png --pixel_baselines

Keys: entmax_vit.data.synthetic_scenes.ScenesConfig.
"""

from entmax_vit.cli.entry_point import run
from entmax_vit.data.synthetic_scenes import ScenesConfig, main

if __name__ == "__main__":
    run(main, ScenesConfig, "synthetic_scenes", log_format="%(message)s")
