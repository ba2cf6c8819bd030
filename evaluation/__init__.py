"""Evaluation of frozen backbones: cached features, DINO k-NN, linear probe, linear segmentation probe, metrics,
results JSON (one module each)."""
