"""The Hub release: the model card built with huggingface_hub's ModelCard / ModelCardData / EvalResult (card.py,
its prose in templates/), measured attention sparsity (sparsity.py), repository assembly (assemble.py),
fresh-process verification (verify.py), upload with HfApi (upload.py) and the attention kernel repository
(kernel_repo.py). Entry points: scripts/push_to_hub.py, scripts/build_hub_kernel.py, scripts/push_kernel_to_hub.py."""

from .assemble import AssembledRepository, assemble_repository
from .card import CardInputs, build_card, build_metadata, card_data, eval_results, parse_card_metadata, render_card
from .sparsity import SparsityReport, measure_sparsity
from .upload import UploadResult, upload_repository
from .verify import VerificationReport, verify_repository

__all__ = [
    "AssembledRepository", "CardInputs", "SparsityReport", "UploadResult", "VerificationReport",
    "assemble_repository", "build_card", "build_metadata", "card_data", "eval_results", "measure_sparsity",
    "parse_card_metadata", "render_card", "upload_repository", "verify_repository",
]
