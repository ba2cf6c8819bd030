"""The Hub release: model card (card.py, prose in templates/), measured sparsity, repository assembly, fresh-process
verification, upload, and the attention kernel repository (kernel_repo.py). Entry points: scripts/push_to_hub.py,
scripts/build_hub_kernel.py, scripts/push_kernel_to_hub.py."""

from .assemble import assemble_repository
from .upload import upload_repository
