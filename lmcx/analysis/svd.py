"""SVD analysis of weight matching ([A], SCIENCE.md "SVD analysis").

Every layer weight `W` (a floating state-dict entry with ndim >= 2 that the permutation spec permutes on
some axis: all of them in the built-in architectures; a convolution `[out, in, kh, kw]` reshaped to
`out × (in·kh·kw)`) is decomposed as `W = U S Vᵀ` (float64, singular values descending).

Definitions (each lives in one function below):

- `singular_values(W)`: the diagonal of S. A permutation of units permutes rows and columns of `W`,
  i.e. `π(W) = P W Qᵀ` with permutation matrices P, Q, so it changes U and V but never S.
- `max_relative_sv_difference(s, t)`: `max_i |s_i − t_i| / max(s_i, 1e-10·s_1)` — how far apart two
  spectra are (B against π(B): float precision, ~1e-15 in float64).
- `num_top(s, γ)`: `k = #{i : s_i / s_1 ≥ γ}`; γ = 0 keeps all `min(out, in·k·k)` singular vectors.
- `alignment_R(W_A, W_B', γ, k_rule)`: `R(γ) = ⟨U_Aᵀ U_B', V_Aᵀ V_B'⟩_F / k` over top singular
  vectors, k_A and k_B counted on each layer's own spectrum. `k_rule = "min"` (default, [A]'s single
  k): both keep the top `k = min(k_A, k_B)`. `k_rule = "own"`: A keeps k_A, B' keeps k_B and
  `k = √(k_A·k_B)`. The two agree when k_A = k_B. Either way
  `R = ⟨U_A V_Aᵀ, U_B' V_B'ᵀ⟩_F / (‖U_A V_Aᵀ‖_F ‖U_B' V_B'ᵀ‖_F)`: the cosine similarity of the
  truncated polar factors, so |R| ≤ 1, R = 1 for identical layers, R ≈ 0 for unrelated ones (about
  1/√k for random ones), and R is invariant to the joint sign flip (u_i, v_i) → (−u_i, −v_i) that
  makes singular vectors ambiguous.
- `alignment_R(..., weighted=True)`: the singular-value-weighted variant
  `R_w(γ) = ⟨U_A S̃_A V_Aᵀ, U_B' S̃_B' V_B'ᵀ⟩_F / (‖S̃_A‖_F ‖S̃_B'‖_F)` with `S̃ = diag(s_i / s_1)` over
  the same top-k: the cosine similarity of the two rank-k truncations of the weights (at γ = 0, the
  cosine similarity of the whole weight matrices). Vectors with large singular values count more.
- `l2_distance` (from lmcx.permutation.distance): `‖θ_A − θ_B‖` and `‖θ_A − π(θ_B)‖`, per layer
  and in total; relative reduction `(‖θ_A − θ_B‖ − ‖θ_A − π(θ_B)‖) / ‖θ_A − θ_B‖`.

Entry points: `svd_analysis` on state dicts, `analyze_svd_checkpoints` on checkpoint files (writes
svd.json last, svd.csv and the plots).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import progress
from ..config import SvdConfig, to_dict
from ..errors import LmcxError
from ..permutation.distance import L2_DEFINITION, l2_distance
from .pair import model_summary, permuted_b

StateDict = Mapping[str, torch.Tensor]

SV_RELATIVE_FLOOR = 1e-10  # singular values below this × s_1 are numerically zero: compared to s_1 instead

DEFINITIONS = {
    "layer_matrix": "every floating weight with ndim >= 2 that the permutation spec permutes on some axis; convolutions "
                    "[out, in, kh, kw] reshaped to out x (in*kh*kw); SVD in float64",
    "max_rel_sv_diff": "max_i |s_i(B) - s_i(pi(B))| / max(s_i(B), 1e-10 * s_1(B))",
    "k": "k_A, k_B = number of singular values with s_i / s_1 >= gamma, each from its own spectrum (gamma = 0: "
         "all); k_rule min: both layers keep the top k = min(k_A, k_B); k_rule own: each keeps its own and "
         "k = sqrt(k_A * k_B)",
    "R": "R(gamma) = <U_A^T U_B', V_A^T V_B'>_F / k over the kept singular vectors (see k) "
         "= cosine similarity of the truncated polar factors U V^T; B' = B (naive) or pi(B) (permuted)",
    "R_weighted": "R_w(gamma) = <U_A S~_A V_A^T, U_B' S~_B' V_B'^T>_F / (||S~_A||_F ||S~_B'||_F), "
                  "S~ = diag(s_i / s_1) over the same top-k: cosine similarity of the rank-k truncations",
    "l2": "||theta_A - theta_B||; 'layers' = over the layer weights analysed, 'parameters' = " + L2_DEFINITION
          + " (the L2 match metrics report)",
    "l2_relative_reduction": "(||A - B|| - ||A - pi(B)||) / ||A - B||",
}


# ---------------------------------------------------------------------------------------------
# Definitions


def layer_matrix(w: torch.Tensor) -> torch.Tensor:
    """A layer weight as a float64 matrix: `[out, in]`, convolutions `[out, in·kh·kw]`."""
    if w.ndim < 2:
        raise ValueError(f"a layer weight has ndim >= 2, got shape {tuple(w.shape)}")
    return w.detach().to(torch.float64).reshape(w.shape[0], -1)


def weight_layers(params: StateDict) -> list[str]:
    """Names of the layer weights analysed: floating entries with ndim >= 2, in state-dict order."""
    return [k for k, v in params.items() if torch.is_tensor(v) and v.is_floating_point() and v.ndim >= 2]


def spec_layers(spec, params: StateDict, arch: str) -> list[str]:
    """The layer weights of `weight_layers` that the permutation spec permutes on some axis (a weight it
    leaves alone has π(W) = W: nothing to compare); every one for the built-in architectures."""
    layers = [k for k in weight_layers(params) if any(p is not None for p in spec.axes_to_perm.get(k, ()))]
    if not layers:
        raise LmcxError(f"{arch}: the permutation spec permutes no layer weight (ndim >= 2), so there is nothing for "
                        "the SVD analysis to compare; see the spec's coverage in `lmcx match`'s metrics.json")
    return layers


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """Singular values of `layer_matrix(w)`, descending (float64)."""
    return torch.linalg.svdvals(layer_matrix(w))


@dataclass
class Factors:
    """`layer_matrix(w) = u @ diag(s) @ v.T`, thin SVD, s descending."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor


def svd_factors(w: torch.Tensor, device: str | torch.device | None = None) -> Factors:
    """Thin SVD of `layer_matrix(w)` in float64, computed on `device` (default: w's), returned on the CPU."""
    m = layer_matrix(w)
    u, s, vh = torch.linalg.svd(m if device is None else m.to(device), full_matrices=False)
    return Factors(u.cpu(), s.cpu(), vh.mT.cpu())


def max_relative_sv_difference(s: torch.Tensor, t: torch.Tensor) -> float:
    """`max_i |s_i − t_i| / max(s_i, 1e-10·s_1)`; 0 for an all-zero layer."""
    if s.shape != t.shape:
        raise ValueError(f"spectra of different lengths: {tuple(s.shape)} and {tuple(t.shape)}")
    s, t = s.double(), t.double()
    if s.numel() == 0 or s[0] == 0:
        return float((s - t).abs().max()) if s.numel() else 0.0
    denom = s.clamp_min(SV_RELATIVE_FLOOR * s[0])
    return float(((s - t).abs() / denom).max())


def num_top(s: torch.Tensor, gamma: float) -> int:
    """`k = #{i : s_i / s_1 ≥ γ}` (s descending); γ = 0 (or an all-zero layer) keeps all."""
    if gamma <= 0 or s.numel() == 0 or s[0] <= 0:
        return int(s.numel())
    return int((s / s[0] >= gamma).sum())


K_RULES = ("min", "own")


def kept(ka: int, kb: int, k_rule: str) -> tuple[int, int]:
    """How many singular vectors of A and of B' R(γ) keeps under `k_rule`."""
    if k_rule not in K_RULES:
        raise LmcxError(f"svd.k_rule: {k_rule!r} is not one of {', '.join(K_RULES)}")
    return (min(ka, kb),) * 2 if k_rule == "min" else (ka, kb)


def alignment_from_factors(fa: Factors, fb: Factors, gamma: float, weighted: bool = False, k_rule: str = "min"
                           ) -> tuple[float, int, int]:
    """(R(γ), k_A, k_B) from precomputed SVDs (k_A, k_B: each layer's own count, before `k_rule`);
    see the module docstring for the definition."""
    own_a, own_b = num_top(fa.s, gamma), num_top(fb.s, gamma)
    ka, kb = kept(own_a, own_b, k_rule)
    if ka == 0 or kb == 0:
        return float("nan"), own_a, own_b
    ua, va = fa.u[:, :ka], fa.v[:, :ka]
    ub, vb = fb.u[:, :kb], fb.v[:, :kb]
    if weighted:
        wa = fa.s[:ka] / fa.s[0]
        wb = fb.s[:kb] / fb.s[0]
        ua, ub = ua * wa, ub * wb  # column i scaled by s_i / s_1
        norm = torch.linalg.vector_norm(wa) * torch.linalg.vector_norm(wb)
    else:
        norm = torch.tensor(math.sqrt(ka * kb), dtype=torch.float64)
    inner = ((ua.mT @ ub) * (va.mT @ vb)).sum()  # ⟨U_Aᵀ U_B', V_Aᵀ V_B'⟩_F
    return float(inner / norm), own_a, own_b


def alignment_R(w_a: torch.Tensor, w_b: torch.Tensor, gamma: float, weighted: bool = False,
                k_rule: str = "min") -> float:
    """Alignment `R(γ)` of two layer weights of one shape (module docstring); `weighted` gives `R_w(γ)`."""
    if w_a.shape != w_b.shape:
        raise ValueError(f"layers of different shapes: {tuple(w_a.shape)} and {tuple(w_b.shape)}")
    return alignment_from_factors(svd_factors(w_a), svd_factors(w_b), gamma, weighted, k_rule)[0]


def relative_reduction(before: float, after: float) -> float:
    """`(before − after) / before` (nan when before is 0)."""
    return (before - after) / before if before > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# The analysis on state dicts


def svd_analysis(params_a: StateDict, params_b: StateDict, params_b_perm: StateDict, gammas: list[float],
                 weighted: bool = False, param_keys: list[str] | None = None,
                 device: str | torch.device = "cpu", layers: list[str] | None = None,
                 k_rule: str = "min") -> dict[str, Any]:
    """Per-layer SVD analysis of A against B (naive) and π(B) (permuted).

    `param_keys`: the trainable parameters for the total L2 distance over 'parameters' (default: every
    floating entry except norm running statistics). `layers`: the layer weights analysed (default:
    `weight_layers(params_a)`). SVDs run on `device` in float64. Returns {"layers": [...], "totals": {...}}.
    """
    layers = weight_layers(params_a) if layers is None else layers
    if not layers:
        raise LmcxError("the models have no layer weights (ndim >= 2) to analyse")
    for name, params in (("B", params_b), ("permuted B", params_b_perm)):
        for k in layers:
            if k not in params or tuple(params[k].shape) != tuple(params_a[k].shape):
                raise LmcxError(f"{k!r} is missing from model {name} or has another shape; the models must have "
                                "the same architecture and width")
    if param_keys is None:
        param_keys = [k for k, v in params_a.items() if torch.is_tensor(v) and v.is_floating_point()
                      and not k.endswith(("running_mean", "running_var"))]
    cpu = {k: v.detach().cpu() for k, v in params_a.items() if k in set(layers) | set(param_keys)}
    cpu_b = {k: params_b[k].detach().cpu() for k in cpu}
    cpu_bp = {k: params_b_perm[k].detach().cpu() for k in cpu}

    dist_naive_total, dist_naive = l2_distance(cpu, cpu_b, layers)
    dist_perm_total, dist_perm = l2_distance(cpu, cpu_bp, layers)
    par_naive_total, _ = l2_distance(cpu, cpu_b, param_keys)
    par_perm_total, _ = l2_distance(cpu, cpu_bp, param_keys)

    rows = []
    for k in progress.track(layers, "svd", unit="layer"):
        fa, fb, fp = (svd_factors(p[k], device) for p in (cpu, cpu_b, cpu_bp))
        align = []
        for g in gammas:
            r_naive, ka, kb = alignment_from_factors(fa, fb, g, k_rule=k_rule)
            r_perm, _, kp = alignment_from_factors(fa, fp, g, k_rule=k_rule)
            entry = {"gamma": g, "naive": r_naive, "permuted": r_perm, "k_a": ka, "k_b": kb, "k_b_permuted": kp,
                     "k_kept": list(kept(ka, kb, k_rule))}
            if weighted:
                entry["naive_weighted"] = alignment_from_factors(fa, fb, g, True, k_rule)[0]
                entry["permuted_weighted"] = alignment_from_factors(fa, fp, g, True, k_rule)[0]
            align.append(entry)
        rows.append({
            "name": k,
            "shape": list(cpu[k].shape),
            "matrix_shape": list(layer_matrix(cpu[k]).shape),
            "l2": {"a_b": dist_naive[k], "a_permuted_b": dist_perm[k],
                   "relative_reduction": relative_reduction(dist_naive[k], dist_perm[k])},
            "max_rel_sv_diff": max_relative_sv_difference(fb.s, fp.s),
            "alignment": align,
            "singular_values": {"a": fa.s.tolist(), "b": fb.s.tolist(), "b_permuted": fp.s.tolist()},
        })

    mean_alignment = []
    for i, g in enumerate(gammas):
        entry = {"gamma": g}
        for key in ("naive", "permuted") + (("naive_weighted", "permuted_weighted") if weighted else ()):
            values = [r["alignment"][i][key] for r in rows if math.isfinite(r["alignment"][i][key])]
            entry[key] = sum(values) / len(values) if values else float("nan")
        mean_alignment.append(entry)
    totals = {
        "l2": {
            "layers": {"a_b": dist_naive_total, "a_permuted_b": dist_perm_total,
                       "relative_reduction": relative_reduction(dist_naive_total, dist_perm_total)},
            "parameters": {"a_b": par_naive_total, "a_permuted_b": par_perm_total,
                           "relative_reduction": relative_reduction(par_naive_total, par_perm_total)},
        },
        "mean_alignment": mean_alignment,
        "max_rel_sv_diff": max(r["max_rel_sv_diff"] for r in rows),
    }
    return {"layers": rows, "totals": totals}


def csv_rows(result: dict[str, Any], weighted: bool = False) -> list[dict[str, Any]]:
    """svd.csv: one row per layer."""
    out = []
    for r in result["layers"]:
        row: dict[str, Any] = {"layer": r["name"], "shape": "x".join(map(str, r["shape"])),
                               "rows": r["matrix_shape"][0], "cols": r["matrix_shape"][1],
                               "l2_a_b": r["l2"]["a_b"], "l2_a_permuted_b": r["l2"]["a_permuted_b"],
                               "l2_relative_reduction": r["l2"]["relative_reduction"],
                               "max_rel_sv_diff": r["max_rel_sv_diff"],
                               "s1_a": r["singular_values"]["a"][0], "s1_b": r["singular_values"]["b"][0]}
        for a in r["alignment"]:
            g = f"{a['gamma']:g}"
            row.update({f"R_naive_g{g}": a["naive"], f"R_permuted_g{g}": a["permuted"],
                        f"k_a_g{g}": a["k_a"], f"k_b_g{g}": a["k_b"],
                        f"k_kept_a_g{g}": a["k_kept"][0], f"k_kept_b_g{g}": a["k_kept"][1]})
            if weighted:
                row.update({f"Rw_naive_g{g}": a["naive_weighted"], f"Rw_permuted_g{g}": a["permuted_weighted"]})
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints in, files out


SVD_OUTPUTS = ["svd.json", "svd.csv", "svd_spectra.png", "svd_alignment.png"]


def analyze_svd_checkpoints(a_path, b_path, cfg: SvdConfig, out_dir, perm_path=None, b_permuted_path=None,
                            device: str = "auto") -> dict[str, Any]:
    """SVD analysis of checkpoints A and B (B against π(B)); writes svd.csv, the plots, then svd.json.

    SVDs (float64) and weight matching computed on the fly (no `perm_path` or `b_permuted_path`) run
    on `device`. Returns the svd.json content.
    """
    from ..checkpoint import check_compatible, load_checkpoint
    from ..io import write_csv, write_json
    from ..models import build_model, permutation_spec
    from ..plots import plot_svd_alignment, plot_svd_spectra
    from ..threads import thread_info
    from ..train import resolve_device

    started = time.perf_counter()
    out_dir = Path(out_dir)
    dev = resolve_device(device)
    ckpt_a, ckpt_b = load_checkpoint(a_path), load_checkpoint(b_path)
    check_compatible(ckpt_a, ckpt_b)
    state_bp, permutation = permuted_b(ckpt_a, ckpt_b, perm_path, b_permuted_path,
                                       wm_seed=cfg.wm_seed, wm_max_iter=cfg.wm_max_iter,
                                       wm_objective=cfg.wm_objective,
                                       device=dev)
    model = build_model(ckpt_a.model, ckpt_a.in_shape, ckpt_a.num_classes)
    param_keys = [n for n, _ in model.named_parameters()]
    # safetensors sorts names alphabetically: put layers back in the model's order (input first)
    order = [k for k in model.state_dict() if k in ckpt_a.state]
    state_a = {k: ckpt_a.state[k] for k in order + [k for k in ckpt_a.state if k not in set(order)]}
    spec = permutation_spec(ckpt_a.model, ckpt_a.in_shape, ckpt_a.num_classes)
    layers = spec_layers(spec, state_a, ckpt_a.model.arch)
    result = svd_analysis(state_a, ckpt_b.state, state_bp, list(cfg.gammas), cfg.weighted, param_keys, dev, layers,
                          cfg.k_rule)

    write_csv(out_dir / "svd.csv", csv_rows(result, cfg.weighted))
    plot_svd_spectra(result["layers"], out_dir / "svd_spectra.png")
    plot_svd_alignment(result["layers"], out_dir / "svd_alignment.png", weighted=cfg.weighted, k_rule=cfg.k_rule)
    data = {
        "format": "lmcx-svd",
        "settings": {
            "a": str(ckpt_a.path), "b": str(ckpt_b.path), "permutation": permutation,
            **to_dict(cfg), "device": str(dev), "threads": thread_info(), "svd_dtype": "float64",
            "definitions": DEFINITIONS,
        },
        "models": model_summary(ckpt_a),
        "totals": result["totals"],
        "layers": result["layers"],
        "seconds": time.perf_counter() - started,
    }
    write_json(out_dir / "svd.json", data)  # last: marks the step complete
    return data
