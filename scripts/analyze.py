"""Semantic-diffusion analysis of one or more EntmaxViT models (see docs/analysis.md).

    python scripts/analyze.py --model runs/entmax/final_model --compare runs/softmax/final_model \
        --dataset embedded --num_images 16 --output_dir outputs/analysis
    python scripts/analyze.py --preset quick --model runs/entmax/final_model

Keys: entmax_vit.analysis.run.AnalyzeConfig (``--help`` lists them); presets in analysis/configs/.
"""

from typing import Optional, Sequence

from entmax_vit.analysis.run import PRESET_DIR, AnalyzeConfig, main


def cli(argv: Optional[Sequence[str]] = None) -> dict:
    """The command line: ``--help`` prints every key with its default and comment, and the presets."""
    from entmax_vit.cli.entry_point import run

    # main configures its own log format
    return run(main, AnalyzeConfig, "analyze", preset_dir=PRESET_DIR, argv=argv, model_fields=("model", "compare"),
               log_format=None, description=__doc__)


if __name__ == "__main__":
    cli()
