"""Analyses of pairs of models: SVD of weight matching ([A], svd.py) and LEWC vs LLFC ([B], lewc.py).

Pure functions on state dicts and models, named as SCIENCE.md names them, plus one entry point per
analysis that reads checkpoints and writes a results directory (`analyze_svd_checkpoints`,
`lewc_checkpoints`), used by `lmcx analyze-svd`, `lmcx lewc` and the experiment runner.
"""
from .lewc import (
    LAMBDA_CONVENTION,
    AlphaBeta,
    cosine_similarity,
    fit_alpha_beta,
    lewc_analysis,
    lewc_checkpoints,
    lewc_coefficients,
    lewc_prediction,
    llfc_coefficients,
    llfc_prediction,
    reciprocal_orthogonality,
    relative_error,
    weak_additivity_error,
)
from .svd import (
    alignment_R,
    analyze_svd_checkpoints,
    layer_matrix,
    max_relative_sv_difference,
    num_top,
    singular_values,
    svd_analysis,
    svd_factors,
    weight_layers,
)

__all__ = [
    "LAMBDA_CONVENTION", "AlphaBeta", "cosine_similarity", "fit_alpha_beta", "lewc_analysis", "lewc_checkpoints",
    "lewc_coefficients", "lewc_prediction", "llfc_coefficients", "llfc_prediction", "reciprocal_orthogonality",
    "relative_error", "weak_additivity_error",
    "alignment_R", "analyze_svd_checkpoints", "layer_matrix", "max_relative_sv_difference", "num_top",
    "singular_values", "svd_analysis", "svd_factors", "weight_layers",
]
