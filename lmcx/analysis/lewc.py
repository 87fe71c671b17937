"""Layerwise exponentially weighted connectivity, LEWC ([B], SCIENCE.md "LEWC"), against LLFC.

Convention (one for all of lmcx; [B] writes λ on A instead):
    θ(λ) = (1 − λ) θ_A + λ θ_B, λ = 0 is A.
Layer index ℓ is counted from the input: ℓ = 1 is the first feature point of `models.feature_points`
(the first hidden layer's post-ReLU output for MLP/VGG, the stem for ResNet-20), ℓ = L the logits.
`f_ℓ(x; θ)` is the output of feature point ℓ, flattened per sample. The merged model θ(λ) is built by
`lmcx.interpolate.interpolated_model` with the chosen norm fix. "B" below is whatever model B is given:
the trained B (naive) or π(B) (permuted).

Definitions (each lives in one function below; sums run over samples and features):

- `lewc_prediction`: `(1 − λ)^ℓ f_ℓ(A) + λ^ℓ f_ℓ(B)`; `llfc_prediction`: `(1 − λ) f_ℓ(A) + λ f_ℓ(B)`.
- `cosine_similarity`: per sample, `⟨f, p⟩ / (‖f‖ ‖p‖)` of the flattened features; 1 when both are
  zero, 0 when exactly one is. Reported as the mean over samples.
- `relative_error`: `‖f − p‖ / ‖f‖`, Frobenius norms over all samples at once.
  At λ = ½ the two predictions are multiples of each other (cosine similarity cannot separate them),
  the relative error and the fitted coefficients can.
- `scale_free_error_from_gram`: `min_c ‖f − c p‖ / ‖f‖ = √(1 − ⟨f, p⟩² / (‖f‖² ‖p‖²))`, the relative error once
  the prediction's overall scale is fitted. Normalised networks (BN reset, LN, REPAIR) re-standardise
  every layer of θ(λ), so LEWC's shrinkage (1 − λ)^ℓ + λ^ℓ cannot show in ‖f‖ and the plain relative
  error is biased against LEWC by construction; this error, the cosine and β / (α + β) compare only
  how A's and B's features are mixed. Equal for both predictions at λ = ½.
- `fit_alpha_beta`: least squares `(α, β) = argmin ‖f_ℓ(θ(λ)) − α f_ℓ(A) − β f_ℓ(B)‖²` over all samples
  and features, to compare with LEWC's `((1 − λ)^ℓ, λ^ℓ)` and LLFC's `(1 − λ, λ)`. `β / (α + β)` compares
  the mixing irrespective of scale. When f(A) and f(B) are (numerically) collinear, e.g. for exact
  copies, α and β are not identifiable: they are reported as null and `alpha_plus_beta` is the
  coefficient κ of `f ≈ κ (f(A) + f(B)) / 2` (which equals α + β when f(A) = f(B)).
- `reciprocal_orthogonality`: for a layer whose output is `f_ℓ = σ(norm(W_ℓ z_{ℓ−1}))` with one weight
  W_ℓ (MLP, VGG, the ResNet stem, every classifier), `‖W_ℓ^B z^A_{ℓ−1}‖ / ‖W_ℓ^A z^A_{ℓ−1}‖`
  ("b_on_a") and `‖W_ℓ^A z^B_{ℓ−1}‖ / ‖W_ℓ^B z^B_{ℓ−1}‖` ("a_on_b"), z_{ℓ−1} being exactly what the
  weight receives (after pooling and flattening where the model has them), W applied without bias.
  Reciprocal orthogonality means both are ≈ 0. LEWC needs it for ℓ ≥ 2 only (ℓ = 1 sees the shared
  input); it is reported for ℓ = 1 too. ResNet blocks mix conv1, conv2 and the shortcut: null, with
  the reason (the α/β fit works for them).
- `weak_additivity_error`: at a feature point that is a ReLU, with `g_ℓ(X)` model X's own
  preactivation (the ReLU's input) and the two scaled preactivations `u_A = (1 − λ)^ℓ g_ℓ(A)`,
  `u_B = λ^ℓ g_ℓ(B)` (what the merged preactivation is under reciprocal orthogonality and LEWC at
  ℓ − 1): `‖ReLU(u_A + u_B) − ReLU(u_A) − ReLU(u_B)‖ / ‖ReLU(u_A + u_B)‖`. Since ReLU is positively
  homogeneous, `ReLU(u_A) + ReLU(u_B)` is the LEWC prediction. Null at the logits (no ReLU).

This module holds the definitions (pure functions on tensors and layers); lewc_run.py runs them over
batches of a pair of models and over checkpoint files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LmcxError

LAMBDA_CONVENTION = "theta(lambda) = (1 - lambda) * theta_A + lambda * theta_B; lambda = 0 is A"
LAYER_INDEX = ("l counted from the input: l = 1 is the first hidden layer's post-ReLU output, l = L the logits; "
               "the LEWC exponent is l, the number of weight layers from the input")
RESIDUAL_LAYER_INDEX = ("l is the feature point index: stem = 1, each basic block +1 (a block holds two convs and a "
                        "skip connection, so l counts blocks, not weight layers), logits = L; the LEWC exponent is "
                        "this l, for which [B]'s theory (stated for plain bias-free ReLU nets) gives no guarantee: "
                        "read the fitted alpha, beta and beta_share rather than the LEWC prediction")
SCALE_FREE_NOTE = ("the network normalises every layer of theta(lambda) ({why}), so LEWC's shrinkage (1 - lambda)^l "
                   "+ lambda^l cannot appear in the features' size: compare cos, rel_err_*_scale_free and "
                   "beta_share (scale-free), not rel_err")
COLLINEAR_TOLERANCE = 1e-9  # 1 − corr(f_A, f_B)² below this: α and β not identifiable

DEFINITIONS = {
    "lewc_prediction": "(1 - lambda)^l f_l(A) + lambda^l f_l(B)",
    "llfc_prediction": "(1 - lambda) f_l(A) + lambda f_l(B)",
    "cos": "mean over samples of the cosine similarity of f_l(theta(lambda)) and the prediction, features "
           "flattened per sample (1 if both are zero, 0 if one is)",
    "rel_err": "||f - pred|| / ||f||, Frobenius norms over all samples, f = f_l(theta(lambda))",
    "alpha_beta": "least squares f_l(theta(lambda)) ~ alpha f_l(A) + beta f_l(B) over all samples and features; "
                  "null when f_l(A), f_l(B) are collinear (then alpha_plus_beta = kappa of f ~ kappa (f_A + f_B) / 2)",
    "beta_share": "beta / (alpha + beta); LEWC predicts lambda^l / ((1 - lambda)^l + lambda^l), LLFC lambda",
    "rel_err_scale_free": "min_c ||f - c pred|| / ||f|| = sqrt(1 - <f, pred>^2 / (||f||^2 ||pred||^2)): the error "
                          "once the prediction's overall scale is fitted",
    "fit_rel_residual": "||f - alpha f_A - beta f_B|| / ||f||",
    "reciprocal_orthogonality": "b_on_a = ||W_l^B z^A_{l-1}|| / ||W_l^A z^A_{l-1}||, a_on_b = ||W_l^A z^B_{l-1}|| / "
                                "||W_l^B z^B_{l-1}||, z_{l-1} the input of the layer's weight, W without bias; "
                                "null for residual blocks",
    "weak_additivity_error": "||ReLU(u_A + u_B) - ReLU(u_A) - ReLU(u_B)|| / ||ReLU(u_A + u_B)||, u_A = (1 - lambda)^l "
                             "g_l(A), u_B = lambda^l g_l(B), g_l = each model's own input to the ReLU of feature "
                             "point l; null where the feature point is not a ReLU",
}


# ---------------------------------------------------------------------------------------------
# Definitions


def lewc_coefficients(lam: float, ell: int) -> tuple[float, float]:
    """LEWC's weights of f_ℓ(A) and f_ℓ(B): `((1 − λ)^ℓ, λ^ℓ)`."""
    return (1.0 - lam) ** ell, lam ** ell


def llfc_coefficients(lam: float) -> tuple[float, float]:
    """LLFC's weights of f_ℓ(A) and f_ℓ(B): `(1 − λ, λ)`."""
    return 1.0 - lam, lam


def lewc_prediction(f_a: torch.Tensor, f_b: torch.Tensor, lam: float, ell: int) -> torch.Tensor:
    """`(1 − λ)^ℓ f_ℓ(A) + λ^ℓ f_ℓ(B)`."""
    ca, cb = lewc_coefficients(lam, ell)
    return ca * f_a + cb * f_b


def llfc_prediction(f_a: torch.Tensor, f_b: torch.Tensor, lam: float) -> torch.Tensor:
    """`(1 − λ) f_ℓ(A) + λ f_ℓ(B)`."""
    ca, cb = llfc_coefficients(lam)
    return ca * f_a + cb * f_b


def flatten_samples(x: torch.Tensor) -> torch.Tensor:
    """`[N, ...]` -> `[N, features]`, float64."""
    return x.detach().reshape(x.shape[0], -1).double()


def cosine_similarity(f: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of flattened features `[N, ...]` -> `[N]` (float64);
    1 where both are zero, 0 where exactly one is."""
    f, p = flatten_samples(f), flatten_samples(p)
    nf, np_ = torch.linalg.vector_norm(f, dim=1), torch.linalg.vector_norm(p, dim=1)
    cos = (f * p).sum(1) / (nf * np_).clamp_min(torch.finfo(torch.float64).tiny)
    cos = torch.where((nf == 0) & (np_ == 0), torch.ones_like(cos), cos)
    return cos.clamp(-1.0, 1.0)


def _sq(x: torch.Tensor) -> float:
    return float(x.detach().double().square().sum())


def sqrt_ratio(num_sq: float, den_sq: float) -> float:
    """`sqrt(num_sq / den_sq)`: nan for 0/0, inf for x/0."""
    if den_sq == 0:
        return float("nan") if num_sq == 0 else float("inf")
    return math.sqrt(max(num_sq, 0.0) / den_sq)


def relative_error_parts(f: torch.Tensor, pred: torch.Tensor) -> tuple[float, float]:
    return _sq(f.double() - pred.double()), _sq(f)


def relative_error(f: torch.Tensor, pred: torch.Tensor) -> float:
    """`‖f − pred‖ / ‖f‖` over all samples and features."""
    return sqrt_ratio(*relative_error_parts(f, pred))


def gram(f: torch.Tensor, f_a: torch.Tensor, f_b: torch.Tensor) -> torch.Tensor:
    """Inner products (float64) `[⟨a,a⟩, ⟨a,b⟩, ⟨b,b⟩, ⟨a,f⟩, ⟨b,f⟩, ⟨f,f⟩]` over all samples and features."""
    a, b, m = f_a.detach().double().reshape(-1), f_b.detach().double().reshape(-1), f.detach().double().reshape(-1)
    return torch.stack([a @ a, a @ b, b @ b, a @ m, b @ m, m @ m])


@dataclass
class AlphaBeta:
    """Least-squares coefficients of `f ≈ α f_A + β f_B` (see the module docstring)."""

    alpha: float | None
    beta: float | None
    alpha_plus_beta: float
    identifiable: bool
    rel_residual: float

    @property
    def beta_share(self) -> float | None:
        if self.alpha is None or self.beta is None or self.alpha + self.beta == 0:
            return None
        return self.beta / (self.alpha + self.beta)


def alpha_beta_from_gram(g: torch.Tensor) -> AlphaBeta:
    aa, ab, bb, am, bm, mm = (float(v) for v in g)
    if aa == 0 or bb == 0 or 1 - ab * ab / (aa * bb) < COLLINEAR_TOLERANCE:
        s2 = aa + 2 * ab + bb  # ‖(a + b)/2‖² · 4
        kappa = 2 * (am + bm) / s2 if s2 > 0 else float("nan")
        half = kappa / 2
        resid = mm - 2 * half * (am + bm) + half * half * s2
        return AlphaBeta(None, None, kappa, False, sqrt_ratio(resid, mm))
    det = aa * bb - ab * ab
    alpha = (bb * am - ab * bm) / det
    beta = (aa * bm - ab * am) / det
    resid = mm - 2 * (alpha * am + beta * bm) + alpha * alpha * aa + 2 * alpha * beta * ab + beta * beta * bb
    return AlphaBeta(alpha, beta, alpha + beta, True, sqrt_ratio(resid, mm))


def scale_free_error_from_gram(g: torch.Tensor, ca: float, cb: float) -> float:
    """`min_c ‖f − c (ca f_A + cb f_B)‖ / ‖f‖` from the inner products of `gram`."""
    aa, ab, bb, am, bm, mm = (float(v) for v in g)
    fp = ca * am + cb * bm
    pp = ca * ca * aa + 2 * ca * cb * ab + cb * cb * bb
    if mm <= 0 or pp <= 0:
        return float("nan")
    return math.sqrt(max(0.0, 1.0 - fp * fp / (mm * pp)))


def fit_alpha_beta(f: torch.Tensor, f_a: torch.Tensor, f_b: torch.Tensor) -> AlphaBeta:
    """Least squares `f ≈ α f_A + β f_B` over all samples and features."""
    return alpha_beta_from_gram(gram(f, f_a, f_b))


def apply_weight(module: nn.Module, weight: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """`W z` for the Linear / Conv2d `module`'s geometry with the given weight and no bias."""
    if isinstance(module, nn.Linear):
        return F.linear(z, weight)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise LmcxError(f"convolutions with padding_mode={module.padding_mode!r} are not supported")
        return F.conv2d(z, weight, None, module.stride, module.padding, module.dilation, module.groups)
    raise TypeError(f"not a Linear or Conv2d: {type(module).__name__}")


def reciprocal_orthogonality_parts(own: nn.Module, other: nn.Module, z: torch.Tensor) -> tuple[float, float]:
    return _sq(apply_weight(own, other.weight, z)), _sq(apply_weight(own, own.weight, z))


def reciprocal_orthogonality(own: nn.Module, other: nn.Module, z: torch.Tensor) -> float:
    """`‖W^other z‖ / ‖W^own z‖` where z is the input of `own` (its model's z_{ℓ−1}); bias-free.
    `own` = layer ℓ of A and `other` = layer ℓ of B gives b_on_a."""
    return sqrt_ratio(*reciprocal_orthogonality_parts(own, other, z))


def weak_additivity_parts(u_a: torch.Tensor, u_b: torch.Tensor) -> tuple[float, float]:
    u_a, u_b = u_a.double(), u_b.double()
    both = F.relu(u_a + u_b)
    return _sq(both - F.relu(u_a) - F.relu(u_b)), _sq(both)


def weak_additivity_error(u_a: torch.Tensor, u_b: torch.Tensor) -> float:
    """`‖ReLU(u_A + u_B) − ReLU(u_A) − ReLU(u_B)‖ / ‖ReLU(u_A + u_B)‖` on two (already scaled) preactivations."""
    return sqrt_ratio(*weak_additivity_parts(u_a, u_b))


# ---------------------------------------------------------------------------------------------
# Which weight produces a feature point


def plain_weight_module(model: nn.Module, point: str) -> tuple[str | None, str | None]:
    """(name of the single Linear/Conv2d whose output feature point `point` is a function of, reason if none).

    The feature point itself if it is a Linear/Conv2d (the classifier), else the only Linear/Conv2d
    among its siblings (`layers.0.relu` -> `layers.0.linear`, `stem.relu` -> `stem.conv`).
    """
    modules = dict(model.named_modules())
    mod = modules[point]
    if isinstance(mod, (nn.Linear, nn.Conv2d)):
        return point, None
    parent = point.rsplit(".", 1)[0] if "." in point else ""
    siblings = [f"{parent}.{n}" if parent else n for n, m in modules[parent].named_children()
                if isinstance(m, (nn.Linear, nn.Conv2d))]
    if len(siblings) == 1:
        return siblings[0], None
    if len(siblings) > 1 or any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in modules[parent].modules()
                                if m is not modules[parent]):
        return None, (f"{point} is not one weight applied to f_(l-1): its block holds "
                      f"{', '.join(siblings) or 'several weights'} (a residual block output mixes them and the "
                      "shortcut); the alpha/beta fit still applies")
    return None, f"no single weight layer produces {point}"

