"""LEWC run over data: `lewc_analysis` streams the definitions of lewc.py over batches of a pair of models,
`lewc_checkpoints` reads checkpoints and writes lewc.csv, the plots, then lewc.json.

All statistics are accumulated batch by batch in float64 and equal their one-batch values.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import progress
from ..config import LewcConfig, to_dict
from ..errors import LmcxError
from .lewc import (DEFINITIONS, LAMBDA_CONVENTION, LAYER_INDEX, RESIDUAL_LAYER_INDEX, SCALE_FREE_NOTE,
                   alpha_beta_from_gram, cosine_similarity, flatten_samples, gram, lewc_coefficients,
                   lewc_prediction, llfc_coefficients, llfc_prediction, plain_weight_module,
                   reciprocal_orthogonality_parts, relative_error_parts, scale_free_error_from_gram, sqrt_ratio,
                   weak_additivity_parts)


@dataclass
class _Ratio:
    num: float = 0.0
    den: float = 0.0

    def add(self, parts: tuple[float, float]) -> None:
        self.num += parts[0]
        self.den += parts[1]

    @property
    def value(self) -> float:
        return sqrt_ratio(self.num, self.den)


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
                                 batch_size=norm_fix_batch_size).eval()
              for lam in progress.track(lambdas, f"lewc θ(λ), norm fix {norm_fix}", unit="λ")]

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
            f, fa, fb = flatten_samples(out), flatten_samples(feats_a[i]), flatten_samples(feats_b[i])
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

        for xb, _ in progress.track(eval_batches(ds, x, x.new_zeros(len(x)), batch_size), "lewc layers",
                                    total=-(-len(x) // batch_size), unit="batch"):
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
                "rel_err_lewc_scale_free": scale_free_error_from_gram(st.gram, lewc_a, lewc_b),
                "rel_err_llfc_scale_free": scale_free_error_from_gram(st.gram, llfc_a, llfc_b),
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


def summary(layers: list[dict[str, Any]], lambdas: list[float], comparison: str = "raw") -> list[dict[str, Any]]:
    """Per λ: means over layers, and at how many layers LEWC's error beats LLFC's: the plain relative
    error (`comparison` raw) or, for normalised networks, the scale-free one (`scale_free`)."""
    suffix = "_scale_free" if comparison == "scale_free" else ""
    rows = []
    for j, lam in enumerate(lambdas):
        entries = [layer["lambdas"][j] for layer in layers]

        def mean(values):
            values = [v for v in values if v is not None and math.isfinite(v)]
            return sum(values) / len(values) if values else None

        def share_error(model: str):
            return mean([None if e["beta_share"] is None else abs(e["beta_share"] - e[f"{model}_beta_share"])
                         for e in entries])

        rows.append({"lambda": lam, "comparison": comparison,
                     "mean_cos_lewc": mean([e["cos_lewc"] for e in entries]),
                     "mean_cos_llfc": mean([e["cos_llfc"] for e in entries]),
                     **{f"mean_rel_err_{m}{sf}": mean([e[f"rel_err_{m}{sf}"] for e in entries])
                        for sf in ("", "_scale_free") for m in ("lewc", "llfc")},
                     "mean_beta_share_err_lewc": share_error("lewc"), "mean_beta_share_err_llfc": share_error("llfc"),
                     "layers_lewc_closer": sum(e[f"rel_err_lewc{suffix}"] < e[f"rel_err_llfc{suffix}"] for e in entries),
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


def scale_of(model, norm_fix: str) -> tuple[str, str]:
    """("scale_free", why) when every layer of θ(λ) is re-normalised, so LEWC's shrinkage cannot show;
    else ("raw", ...)."""
    # BN with interpolated statistics (norm fix none) is a fixed affine map: it does not re-standardise
    why = [w for w, on in (("BatchNorm with statistics reset", model.norm == "bn" and norm_fix == "reset"),
                           ("LayerNorm", model.norm == "ln"), ("REPAIR", norm_fix == "repair")) if on]
    if why:
        return "scale_free", SCALE_FREE_NOTE.format(why=", ".join(why))
    return "raw", "no normalisation: the features' size is free, so rel_err compares LEWC and LLFC in full"


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
    from ..threads import thread_info
    from ..train import resolve_device
    from .pair import model_summary, permuted_b

    started = time.perf_counter()
    out_dir = Path(out_dir)
    dev = resolve_device(device)
    ckpt_a, ckpt_b = load_checkpoint(a_path), load_checkpoint(b_path)
    check_compatible(ckpt_a, ckpt_b)
    points = feature_points(ckpt_a.model, ckpt_a.in_shape, ckpt_a.num_classes)  # or a refusal, before any work
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
    layers = lewc_analysis(model_a, model_b, ds, x, lambdas, points, norm_fix=resolved_fix,
                           batch_size=cfg.batch_size, norm_fix_batches=cfg.norm_fix_batches,
                           norm_fix_batch_size=cfg.norm_fix_batch_size)

    comparison, comparison_note = scale_of(ckpt_a.model, resolved_fix)
    layer_index = RESIDUAL_LAYER_INDEX if ckpt_a.model.arch == "resnet20" else LAYER_INDEX
    write_csv(out_dir / "lewc.csv", csv_rows(layers))
    plot_lewc_cosine(layers, out_dir / "lewc_cosine.png")
    plot_lewc_coefficients(layers, out_dir / "lewc_coefficients.png",
                           note="ℓ: stem = 1, each residual block +1" if ckpt_a.model.arch == "resnet20" else "")
    data = {
        "format": "lmcx-lewc",
        "settings": {
            "lambda_convention": LAMBDA_CONVENTION,
            "layer_index": layer_index,
            "comparison": comparison, "comparison_note": comparison_note,
            "a": str(ckpt_a.path), "b": str(ckpt_b.path),
            "permuted": state_bp is not None, "permutation": permutation,
            "lambdas": lambdas,
            "samples": len(x), "samples_requested": cfg.samples,
            "sample_source": f"the first {len(x)} images of the {ckpt_a.data.name} test split",
            "norm_fix": resolved_fix, "norm_fix_requested": norm_fix,
            **{k: v for k, v in to_dict(cfg).items() if k not in ("lambdas", "samples")},
            "device": str(dev), "threads": thread_info(),
            "definitions": DEFINITIONS,
        },
        "models": model_summary(ckpt_a),
        "summary": summary(layers, lambdas, comparison),
        "layers": layers,
        "seconds": time.perf_counter() - started,
    }
    write_json(out_dir / "lewc.json", data)  # last: marks the step complete
    return data
