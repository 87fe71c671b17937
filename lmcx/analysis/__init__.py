"""Analyses of pairs of models: SVD of weight matching ([A]) and LEWC vs LLFC ([B]).

Pure functions on state dicts and models, named as SCIENCE.md names them, plus one entry point per
analysis that reads checkpoints and writes a results directory, used by `lmcx analyze-svd`, `lmcx lewc`
and the experiment runner:
  pair.py      what both analyses share: π(B) from a permutation file, a permuted checkpoint or weight
               matching on the fly (`permuted_b`), and the models' description
  svd.py       the SVD definitions, `svd_analysis` on state dicts, `analyze_svd_checkpoints`
  lewc.py      the LEWC / LLFC definitions (predictions, cosine, relative error, α/β fit, reciprocal
               orthogonality, weak additivity): pure functions on tensors and layers
  lewc_run.py  `lewc_analysis` (the definitions streamed over batches of two models and their θ(λ)) and
               `lewc_checkpoints` (checkpoints in, lewc.json / lewc.csv / plots out)
"""
from .lewc import (
    LAMBDA_CONVENTION,
    AlphaBeta,
    cosine_similarity,
    fit_alpha_beta,
    lewc_coefficients,
    lewc_prediction,
    llfc_coefficients,
    llfc_prediction,
    reciprocal_orthogonality,
    relative_error,
    weak_additivity_error,
)
from .lewc_run import lewc_analysis, lewc_checkpoints
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
