"""Semantic-diffusion analysis: per-layer attention and token metrics (``per_layer.analyze_model``), figures
(``figures``), writing and comparing runs (``run``), the paper's claims (``claims.measure``)."""
