"""Semantic-diffusion analysis: per-layer attention and token metrics, and figures.

    from entmax_vit.analysis import analyze_model, save_attention_maps, save_pca_image, plot_layer_curves
    per_layer = analyze_model(model, pixel_values, masks=None)      # {layer: {metric: value}}

The paper's two analysis claims (per-block foreground alignment vs per-block probes; [CLS] complementarity)
are measured by ``entmax_vit.analysis.claims.measure`` (imported from there: it trains probes).
"""

from .attention_metrics import attention_metrics, patch_distance_matrix, row_entropy
from .figures import pca_rgb, plot_head_distances, plot_layer_curves, save_attention_maps, save_pca_image
from .foreground import jaccard, mass_threshold_mask
from .pipeline import analyze_and_save, save_comparison
from .per_layer import PerLayerMetrics, analyze_model, flatten_metrics, unflatten_metrics
from .token_metrics import high_norm_outliers, high_norm_threshold, norm_metrics, similarity_metrics

__all__ = [
    "PerLayerMetrics",
    "analyze_and_save",
    "analyze_model",
    "attention_metrics",
    "flatten_metrics",
    "high_norm_outliers",
    "high_norm_threshold",
    "jaccard",
    "mass_threshold_mask",
    "norm_metrics",
    "patch_distance_matrix",
    "pca_rgb",
    "plot_head_distances",
    "plot_layer_curves",
    "row_entropy",
    "save_attention_maps",
    "save_comparison",
    "save_pca_image",
    "similarity_metrics",
    "unflatten_metrics",
]
