"""Semantic-diffusion analysis of one or more EntmaxViT models (see docs/analysis.md).

    python scripts/analyze.py --model runs/entmax/final_model --compare runs/softmax/final_model \
        --dataset embedded --num_images 16 --output_dir outputs/analysis
"""

from entmax_vit.analysis.run import cli

if __name__ == "__main__":
    cli()
