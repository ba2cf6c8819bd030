"""The published method this project reproduces, in one place at the bottom of the import graph (it imports
nothing of the project): the paper (title, citation, headline numbers) and the rule of official DINO that
training and the linear probe share. The model card, the mini reproduction and the training loop import it."""

PAPER_TITLE = "Vision Transformers Need Better Token Interaction"
PAPER_ARXIV = "2605.23868"
PAPER_AUTHOR = "Su, Linxiang"
# The citation, character for character the README's (tests/test_hub_card.py checks README contains it).
BIBTEX = (
    "@article{su2026entmaxvit,\n"
    f"  title         = {{{PAPER_TITLE}}},\n"
    f"  author        = {{{PAPER_AUTHOR}}},\n"
    f"  journal       = {{arXiv preprint arXiv:{PAPER_ARXIV}}},\n"
    f"  eprint        = {{{PAPER_ARXIV}}},\n"
    "  archivePrefix = {arXiv},\n"
    "  primaryClass  = {cs.CV},\n"
    "  year          = {2026}\n"
    "}"
)
# The paper's headline numbers (DINOv1 ViT-S/16, 200 epochs, linear segmentation probe mIoU, softmax -> entmax-1.5).
PAPER_RESULTS = {"VOC": (42.80, 48.78), "ADE20K": (19.85, 21.97), "Cityscapes": (36.79, 37.87)}


def scaled_lr(lr_base: float, total_batch: int) -> float:
    """Linear scaling rule of official DINO (training and eval_linear alike): ``lr_base * total_batch / 256``
    (5e-4 at 8 x 64 -> 1e-3)."""
    return lr_base * total_batch / 256.0

