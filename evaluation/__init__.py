"""Evaluation of frozen backbones: k-NN, linear and segmentation probes, metrics, results JSON (docs/evaluation.md)."""
