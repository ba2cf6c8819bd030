"""Model-card helpers only the tests need (hub_release/card.py builds the card as a huggingface_hub ``ModelCard``)."""

from huggingface_hub import ModelCard
from huggingface_hub.repocard import REGEX_YAML_BLOCK

from entmax_vit.hub_release.card import CardInputs, build_card


def render_card(inputs: CardInputs) -> str:
    """The README.md text: YAML front matter (written by huggingface_hub) + sections."""
    return str(build_card(inputs))


def parse_card_metadata(text: str) -> dict:
    """The YAML front matter of a card, read through ``ModelCard`` (raises ValueError when missing or invalid)."""
    if not REGEX_YAML_BLOCK.search(text):  # ModelCard would only log a warning and return empty metadata
        raise ValueError("Card has no YAML front matter")
    card = ModelCard(text)  # a non-mapping block or an unparsable model-index raises ValueError
    return card.data.to_dict()
