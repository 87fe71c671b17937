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

All statistics are accumulated batch by batch in float64 and equal their one-batch values.
Entry points: `lewc_analysis` on models, `lewc_checkpoints` on checkpoint files (writes lewc.csv, the
plots, then lewc.json).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LewcConfig, to_dict
from ..errors import LmcxError

LAMBDA_CONVENTION = "theta(lambda) = (1 - lambda) * theta_A + lambda * theta_B; lambda = 0 is A"
LAYER_INDEX = ("l counted from the input: l = 1 is the first feature point (first hidden layer's post-ReLU "
               "output; ResNet-20: the stem), l = L the logits; the LEWC exponent is l")
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


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(x.shape[0], -1).double()


def cosine_similarity(f: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of flattened features `[N, ...]` -> `[N]` (float64);
    1 where both are zero, 0 where exactly one is."""
    f, p = _flat(f), _flat(p)
    nf, np_ = torch.linalg.vector_norm(f, dim=1), torch.linalg.vector_norm(p, dim=1)
    cos = (f * p).sum(1) / (nf * np_).clamp_min(torch.finfo(torch.float64).tiny)
    cos = torch.where((nf == 0) & (np_ == 0), torch.ones_like(cos), cos)
    return cos.clamp(-1.0, 1.0)


def _sq(x: torch.Tensor) -> float:
    return float(x.detach().double().square().sum())


def _ratio(num_sq: float, den_sq: float) -> float:
    """`sqrt(num_sq / den_sq)`: nan for 0/0, inf for x/0."""
    if den_sq == 0:
        return float("nan") if num_sq == 0 else float("inf")
    return math.sqrt(max(num_sq, 0.0) / den_sq)


def relative_error_parts(f: torch.Tensor, pred: torch.Tensor) -> tuple[float, float]:
    return _sq(f.double() - pred.double()), _sq(f)


def relative_error(f: torch.Tensor, pred: torch.Tensor) -> float:
    """`‖f − pred‖ / ‖f‖` over all samples and features."""
    return _ratio(*relative_error_parts(f, pred))


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
        return AlphaBeta(None, None, kappa, False, _ratio(resid, mm))
    det = aa * bb - ab * ab
    alpha = (bb * am - ab * bm) / det
    beta = (aa * bm - ab * am) / det
    resid = mm - 2 * (alpha * am + beta * bm) + alpha * alpha * aa + 2 * alpha * beta * ab + beta * beta * bb
    return AlphaBeta(alpha, beta, alpha + beta, True, _ratio(resid, mm))


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
    return _ratio(*reciprocal_orthogonality_parts(own, other, z))


def weak_additivity_parts(u_a: torch.Tensor, u_b: torch.Tensor) -> tuple[float, float]:
    u_a, u_b = u_a.double(), u_b.double()
    both = F.relu(u_a + u_b)
    return _sq(both - F.relu(u_a) - F.relu(u_b)), _sq(both)


def weak_additivity_error(u_a: torch.Tensor, u_b: torch.Tensor) -> float:
    """`‖ReLU(u_A + u_B) − ReLU(u_A) − ReLU(u_B)‖ / ‖ReLU(u_A + u_B)‖` on two (already scaled) preactivations."""
    return _ratio(*weak_additivity_parts(u_a, u_b))


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
        return None, (f"{point} is a residual block output (it mixes {', '.join(siblings) or 'several weights'} "
                      "and the shortcut), not one weight applied to f_(l-1); the alpha/beta fit still applies")
    return None, f"no single weight layer produces {point}"


# ---------------------------------------------------------------------------------------------
# Streaming the analysis over batches


@dataclass
class _Ratio:
    num: float = 0.0
    den: float = 0.0

    def add(self, parts: tuple[float, float]) -> None:
        self.num += parts[0]
        self.den += parts[1]

    @property
    def value(self) -> float:
        return _ratio(self.num, self.den)


@dataclass
class _LambdaStats:
    cos_lewc: float = 0.0  # sums over samples
    cos_llfc: float = 0.0
    count: int = 0
    err_lewc: _Ratio = field(default_factory=_Ratio)
    err_llfc: _Ratio = field(default_factory=_Ratio)
    weak_add: _Ratio = field(default_factory=_Ratio)
    gram: torch.Tensor = field(default_factory=lambda: torch.zeros(6, dtype=torch.float64))


@dataclass
class _Layer:
    index: int  # ℓ
    name: str
    weight: str | None
    reason: str | None
    is_relu: bool
    features: int = 0
    b_on_a: _Ratio = field(default_factory=_Ratio)
    a_on_b: _Ratio = field(default_factory=_Ratio)
    per_lambda: dict[int, _LambdaStats] = field(default_factory=dict)


def _register(model: nn.Module, name: str, fn, pre: bool = False):
    mod = dict(model.named_modules())[name]
    return mod.register_forward_pre_hook(fn) if pre else mod.register_forward_hook(fn)


@torch.inference_mode()
def lewc_analysis(model_a: nn.Module, model_b: nn.Module, ds, x: torch.Tensor, lambdas: list[float],
                  points: list[str], *, norm_fix: str = "none", batch_size: int = 250, norm_fix_batches: int = 10,
                  norm_fix_batch_size: int = 500) -> list[dict[str, Any]]:
    """LEWC / LLFC measurements of A and B (or π(B)) on uint8 images `x` for every feature point and λ.

    `norm_fix` is a resolved norm fix ("reset" | "repair" | "none") passed to `interpolated_model`.
    Returns one dict per layer (see lewc.json in `lewc_checkpoints`).
    """
    from ..interpolate import interpolated_model

    if not points:
        raise LmcxError("the model has no feature points to analyse")
    model_a.eval()
    model_b.eval()
    mods_a, mods_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    missing = [p for p in points if p not in mods_a or p not in mods_b]
    if missing:
        raise LmcxError(f"feature point {missing[0]!r} is not a module of the model; the checkpoint does not fit "
                        "its architecture")
    layers = []
    for ell, point in enumerate(points, start=1):
        weight, reason = plain_weight_module(model_a, point)
        layers.append(_Layer(ell, point, weight, reason, isinstance(mods_a[point], nn.ReLU),
                             per_lambda={i: _LambdaStats() for i in range(len(lambdas))}))
    merged = [interpolated_model(model_a, model_b, lam, ds, norm_fix, batches=norm_fix_batches,
                                 batch_size=norm_fix_batch_size).eval() for lam in lambdas]

    feats_a: dict[int, torch.Tensor] = {}
    feats_b: dict[int, torch.Tensor] = {}
    pre_a: dict[int, torch.Tensor] = {}
    hooks = []

    def keep(store, i):
        def hook(_m, _inp, out):
            store[i] = out.detach()
        return hook

    def keep_pre(store, i):
        def hook(m, inp):
            store[i] = inp[0].detach().clone() if getattr(m, "inplace", False) else inp[0].detach()
        return hook

    def weak_add_b(i, layer):
        def hook(_m, inp):
            g_b = inp[0].detach()
            for j, lam in enumerate(lambdas):
                ca, cb = lewc_coefficients(lam, layer.index)
                layer.per_lambda[j].weak_add.add(weak_additivity_parts(ca * pre_a[i], cb * g_b))
            del pre_a[i]
        return hook

    def recip(layer, own, other, acc_name):
        def hook(_m, inp):
            getattr(layer, acc_name).add(reciprocal_orthogonality_parts(own, other, inp[0].detach()))
        return hook

    def compare(i, layer, j, lam):
        def hook(_m, _inp, out):
            f, fa, fb = _flat(out), _flat(feats_a[i]), _flat(feats_b[i])
            st = layer.per_lambda[j]
            p_lewc, p_llfc = lewc_prediction(fa, fb, lam, layer.index), llfc_prediction(fa, fb, lam)
            st.cos_lewc += float(cosine_similarity(f, p_lewc).sum())
            st.cos_llfc += float(cosine_similarity(f, p_llfc).sum())
            st.count += f.shape[0]
            st.err_lewc.add(relative_error_parts(f, p_lewc))
            st.err_llfc.add(relative_error_parts(f, p_llfc))
            st.gram += gram(f, fa, fb).cpu()
        return hook

    try:
        for i, layer in enumerate(layers):
            hooks.append(_register(model_a, layer.name, keep(feats_a, i)))
            hooks.append(_register(model_b, layer.name, keep(feats_b, i)))
            if layer.is_relu:
                hooks.append(_register(model_a, layer.name, keep_pre(pre_a, i), pre=True))
                hooks.append(_register(model_b, layer.name, weak_add_b(i, layer), pre=True))
            if layer.weight is not None:
                wa, wb = mods_a[layer.weight], mods_b[layer.weight]
                hooks.append(wa.register_forward_pre_hook(recip(layer, wa, wb, "b_on_a")))
                hooks.append(wb.register_forward_pre_hook(recip(layer, wb, wa, "a_on_b")))
            for j, (lam, m) in enumerate(zip(lambdas, merged)):
                hooks.append(_register(m, layer.name, compare(i, layer, j, lam)))
        from ..data import eval_batches

        for xb, _ in eval_batches(ds, x, x.new_zeros(len(x)), batch_size):
            model_a(xb)
            model_b(xb)
            for m in merged:
                m(xb)
            for layer_i, layer in enumerate(layers):
                layer.features = feats_a[layer_i][0].numel()
            feats_a.clear()
            feats_b.clear()
    finally:
        for h in hooks:
            h.remove()

    out = []
    for layer in layers:
        per = []
        for j, lam in enumerate(lambdas):
            st = layer.per_lambda[j]
            fit = alpha_beta_from_gram(st.gram)
            lewc_a, lewc_b = lewc_coefficients(lam, layer.index)
            llfc_a, llfc_b = llfc_coefficients(lam)
            per.append({
                "lambda": lam,
                "cos_lewc": st.cos_lewc / st.count, "cos_llfc": st.cos_llfc / st.count,
                "rel_err_lewc": st.err_lewc.value, "rel_err_llfc": st.err_llfc.value,
                "alpha": fit.alpha, "beta": fit.beta, "alpha_plus_beta": fit.alpha_plus_beta,
                "beta_share": fit.beta_share, "fit_identifiable": fit.identifiable,
                "fit_rel_residual": fit.rel_residual,
                "lewc_alpha": lewc_a, "lewc_beta": lewc_b,
                "lewc_beta_share": lewc_b / (lewc_a + lewc_b) if lewc_a + lewc_b > 0 else None,
                "llfc_alpha": llfc_a, "llfc_beta": llfc_b, "llfc_beta_share": llfc_b,
                "weak_additivity_error": st.weak_add.value if layer.is_relu else None,
            })
        out.append({
            "index": layer.index, "name": layer.name, "features_per_sample": layer.features,
            "weight": layer.weight,
            "reciprocal_orthogonality": (None if layer.weight is None else
                                         {"b_on_a": layer.b_on_a.value, "a_on_b": layer.a_on_b.value}),
            "reciprocal_orthogonality_note": layer.reason,
            "weak_additivity_note": None if layer.is_relu else "the feature point is not a ReLU",
            "lambdas": per,
        })
    return out


def summary(layers: list[dict[str, Any]], lambdas: list[float]) -> list[dict[str, Any]]:
    """Per λ: means over layers, and at how many layers LEWC's relative error beats LLFC's."""
    rows = []
    for j, lam in enumerate(lambdas):
        entries = [layer["lambdas"][j] for layer in layers]

        def mean(key):
            values = [e[key] for e in entries if e[key] is not None and math.isfinite(e[key])]
            return sum(values) / len(values) if values else None

        rows.append({"lambda": lam, "mean_cos_lewc": mean("cos_lewc"), "mean_cos_llfc": mean("cos_llfc"),
                     "mean_rel_err_lewc": mean("rel_err_lewc"), "mean_rel_err_llfc": mean("rel_err_llfc"),
                     "layers_lewc_closer": sum(e["rel_err_lewc"] < e["rel_err_llfc"] for e in entries),
                     "layers": len(entries)})
    return rows


def csv_rows(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """lewc.csv: one row per layer and λ."""
    rows = []
    for layer in layers:
        ro = layer["reciprocal_orthogonality"] or {}
        for e in layer["lambdas"]:
            rows.append({"layer": layer["index"], "name": layer["name"], **e,
                         "recip_orth_b_on_a": ro.get("b_on_a"), "recip_orth_a_on_b": ro.get("a_on_b")})
    return rows


# ---------------------------------------------------------------------------------------------
# Checkpoints in, files out


LEWC_OUTPUTS = ["lewc.json", "lewc.csv", "lewc_cosine.png", "lewc_coefficients.png"]


def lewc_checkpoints(a_path, b_path, cfg: LewcConfig, out_dir, perm_path=None, b_permuted_path=None,
                     norm_fix: str = "auto", device: str = "auto", data_root=None) -> dict[str, Any]:
    """LEWC analysis of checkpoints A and B; B is used as trained (naive) unless `perm_path` (a
    permutation file applied to B) or `b_permuted_path` (a permuted checkpoint of B) is given.

    Samples are the first `cfg.samples` test images of A's dataset (`data_root` overrides where it
    lives). Writes lewc.csv, lewc_cosine.png, lewc_coefficients.png, then lewc.json; returns its content.
    """
    from ..checkpoint import build_from_checkpoint, check_compatible, load_checkpoint
    from ..data import load_dataset
    from ..interpolate import resolve_norm_fix
    from ..io import write_csv, write_json
    from ..models import feature_points
    from ..plots import plot_lewc_coefficients, plot_lewc_cosine
    from ..train import resolve_device
    from .svd import model_summary, permuted_b

    started = time.perf_counter()
    out_dir = Path(out_dir)
    dev = resolve_device(device)
    ckpt_a, ckpt_b = load_checkpoint(a_path), load_checkpoint(b_path)
    check_compatible(ckpt_a, ckpt_b)
    state_bp, permutation = permuted_b(ckpt_a, ckpt_b, perm_path, b_permuted_path, on_the_fly=False)
    if state_bp is not None:
        ckpt_b.state = state_bp
    resolved_fix = resolve_norm_fix(norm_fix, ckpt_a.model.norm)
    if data_root is not None:
        ckpt_a.data.root = str(data_root)
    ds = load_dataset(ckpt_a.data, dev)
    x = ds.x_test[: cfg.samples]
    model_a, model_b = build_from_checkpoint(ckpt_a, dev), build_from_checkpoint(ckpt_b, dev)
    lambdas = list(cfg.lambdas)
    layers = lewc_analysis(model_a, model_b, ds, x, lambdas, feature_points(ckpt_a.model), norm_fix=resolved_fix,
                           batch_size=cfg.batch_size, norm_fix_batches=cfg.norm_fix_batches,
                           norm_fix_batch_size=cfg.norm_fix_batch_size)

    write_csv(out_dir / "lewc.csv", csv_rows(layers))
    plot_lewc_cosine(layers, out_dir / "lewc_cosine.png")
    plot_lewc_coefficients(layers, out_dir / "lewc_coefficients.png")
    data = {
        "format": "lmcx-lewc",
        "settings": {
            "lambda_convention": LAMBDA_CONVENTION,
            "layer_index": LAYER_INDEX,
            "a": str(ckpt_a.path), "b": str(ckpt_b.path),
            "permuted": state_bp is not None, "permutation": permutation,
            "lambdas": lambdas,
            "samples": len(x), "samples_requested": cfg.samples,
            "sample_source": f"the first {len(x)} images of the {ckpt_a.data.name} test split",
            "norm_fix": resolved_fix, "norm_fix_requested": norm_fix,
            **{k: v for k, v in to_dict(cfg).items() if k not in ("lambdas", "samples")},
            "device": str(dev),
            "definitions": DEFINITIONS,
        },
        "models": model_summary(ckpt_a),
        "summary": summary(layers, lambdas),
        "layers": layers,
        "seconds": time.perf_counter() - started,
    }
    write_json(out_dir / "lewc.json", data)  # last: marks the step complete
    return data
