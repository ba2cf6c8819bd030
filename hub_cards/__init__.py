"""Hub release: model-card renderer (card.py + templates/), measured attention sparsity (sparsity.py),
repository assembly (assemble.py), fresh-process verification (verify.py) and upload (upload.py).
Entry point: scripts/push_to_hub.py."""

from .assemble import AssembledRepository, assemble_repository
from .card import BIBTEX, CardInputs, build_metadata, parse_card_metadata, render_card
from .sparsity import SparsityReport, measure_sparsity
from .upload import UploadResult, upload_repository
from .verify import VerificationReport, verify_repository

__all__ = [
    "AssembledRepository", "BIBTEX", "CardInputs", "SparsityReport", "UploadResult", "VerificationReport",
    "assemble_repository", "build_metadata", "measure_sparsity", "parse_card_metadata", "render_card",
    "upload_repository", "verify_repository",
]
