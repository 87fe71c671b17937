"""Matching checkpoints: the library behind `lmcx match` and the experiment runner's match steps.

`match_checkpoints(a_path, b_paths, cfg, out_dir)` brings each model B into model A's unit order with
weight matching (wm), activation matching (am) or the straight-through estimator (ste) and writes:

One B:
  permutation.json       the permutation of B (save_permutation_file; info: method, seed, source files)
  permuted.safetensors   B permuted into A's frame: an ordinary checkpoint (info: permuted_from, method,
                         matched_to, plus B's own info)
  metrics.json           written last (the completeness marker): method, settings, iterations, objective
                         per sweep (wm; within objective_error of exact) and which tensors it sums over
                         (wm_objective), L2 distance to A
                         before and after over the trainable parameters (l2_definition; total and per parameter),
                         seconds, LAP seconds, method details (am: correlations; ste: losses, history),
                         and `outputs: [{source, permutation, permuted}]`

Several B's (`cfg.many`):
  anchor       [A]'s protocol: each B_i matched to A on its own, with `cfg.method`;
  merge-many   MergeMany over [A, B_1, ..., B_k] (wm only); A keeps its frame (its permutation is the
               identity), each B_i gets the permutation aligning it to A's unit order.
  Either way: b{i}/permutation.json and b{i}/permuted.safetensors for i = 1..k, and metrics.json
  (last) listing every output, with L2 distances to A and between the B's before and after.

config.yaml is not written here: the caller's run directory logic (rundir.run_once) does that.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, build_from_checkpoint, check_compatible, load_checkpoint, save_checkpoint
from .config import MatchConfig, to_dict, validate
from .errors import LmcxError
from .io import write_json
from .names import PERMUTED_FILE

PERMUTATION_FILE = "permutation.json"
METRICS_FILE = "metrics.json"
METHOD_NAMES = {"wm": "weight matching", "am": "activation matching", "ste": "straight-through estimator"}

__all__ = ["match_checkpoints", "match_outputs", "match_pair", "PERMUTATION_FILE", "PERMUTED_FILE", "METRICS_FILE"]


def match_outputs(num_b: int) -> list[str]:
    """Files (and folders) a match run writes, marker first: what `run_once` clears before a redo."""
    if num_b == 1:
        return [METRICS_FILE, PERMUTATION_FILE, PERMUTED_FILE]
    return [METRICS_FILE] + [f"b{i}" for i in range(1, num_b + 1)]


def parameter_names(ckpt: Checkpoint) -> list[str]:
    """The trainable parameters of the checkpoint's model (built on the meta device: no memory)."""
    from .models import build_model

    with torch.device("meta"):
        return [n for n, _ in build_model(ckpt.model, ckpt.in_shape, ckpt.num_classes).named_parameters()]


def _l2(state_a, state_b, keys: list[str]) -> dict[str, Any]:
    """L2 to A as everywhere in lmcx (permutation.distance.L2_DEFINITION): over `keys`, the trainable parameters."""
    from .permutation import l2_distance

    total, per = l2_distance(state_a, state_b, keys)
    return {"total": total, "per_param": per}


def match_pair(spec, a: Checkpoint, b: Checkpoint, cfg: MatchConfig, device: torch.device, ds=None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Permutation of B aligning it to A with `cfg.method`, and that method's statistics."""
    from .permutation import activation_correlations, assign_from_correlation, straight_through_estimator, \
        weight_matching
    from .permutation.activation_matching import TIEBREAK

    if cfg.method == "wm":
        from .permutation.distance import objective_keys

        sa = {k: v.to(device) for k, v in a.state.items()}
        sb = {k: v.to(device) for k, v in b.state.items()}
        r = weight_matching(spec, sa, sb, max_iter=cfg.max_iter, seed=cfg.seed, start=cfg.start, tol=cfg.tol,
                            show_progress=True, keys=objective_keys(parameter_names(a), cfg.wm_objective))
        return r.perm, {"iterations": r.iterations, "converged": r.converged, "stop": r.stop, "objective": r.objective,
                        "objective_error": r.objective_error,
                        "solves": r.solves, "lap_seconds": r.lap_seconds, "match_seconds": r.seconds}
    model_a = build_from_checkpoint(a, device)
    model_b = build_from_checkpoint(b, device)
    if cfg.method == "am":
        st = activation_correlations(spec, model_a, model_b, ds, samples=cfg.am_samples, batch_size=cfg.am_batch_size)
        t = time.perf_counter()
        perm, lap = assign_from_correlation(st.corr, st.pre_corr)
        seconds = st.seconds + time.perf_counter() - t
        per_perm = {}
        for p, c in st.corr.items():
            n = c.shape[0]
            idx = torch.arange(n)
            per_perm[p] = {"units": n, "points": st.points[p], "rows_per_point": st.rows[p],
                           "mean_corr_before": (c[idx, idx].sum() / (n * st.points[p])).item(),
                           "mean_corr_after": (c[idx, perm[p]].sum() / (n * st.points[p])).item()}
        return perm, {"iterations": 1, "objective": None, "lap_seconds": lap, "match_seconds": seconds,
                      "am": {"samples": st.samples, "batch_size": cfg.am_batch_size,
                             "activation_seconds": st.seconds, "permutations": per_perm,
                             "notes": "Pearson correlation of activations at the spec's activation points (eval "
                                      "mode, first `samples` training images, conv positions as samples), summed "
                                      f"per permutation; ties (dead units) broken by pre-activation correlation "
                                      f"x {TIEBREAK:g}"}}
    if cfg.method == "ste":
        r = straight_through_estimator(spec, model_a, model_b, ds, cfg.ste, seed=cfg.seed, max_iter=cfg.max_iter,
                                       wm_objective=cfg.wm_objective)
        return r.perm, {"iterations": r.steps, "objective": None, "lap_seconds": r.lap_seconds,
                        "match_seconds": r.seconds,
                        "ste": {"best_midpoint_train_loss": r.best_loss, "best_step": r.best_step,
                                "initial_midpoint_train_loss": r.initial_loss,
                                "naive_midpoint_train_loss": r.naive_loss, "eval_samples": r.eval_samples,
                                "steps": r.steps, "eval_every": r.eval_every, "checks": r.checks,
                                "evaluations": r.evaluations, "wm_calls": r.wm_calls, "wm_sweeps": r.wm_sweeps,
                                "wm_seconds": r.wm_seconds, "history": r.history,
                                "settings": to_dict(cfg.ste),
                                "notes": "midpoint 1/2(theta_A + pi(theta_B)) in train mode (BN batch statistics); "
                                         "best permutation by midpoint loss on the first eval_samples training "
                                         "images, checked at step 0 (WM projection of theta_A), every eval_every "
                                         "steps (0: once per epoch) and at each epoch's end; each distinct "
                                         "permutation scored once (history: one row per scored permutation)"}}
    raise LmcxError(f"unknown matching method {cfg.method!r}; choose wm, am or ste")


def _write_pair(out: Path, spec, a: Checkpoint, b: Checkpoint, perm: dict[str, torch.Tensor], cfg: MatchConfig,
                method: str, extra_info: dict[str, Any]) -> dict[str, torch.Tensor]:
    """permutation.json and permuted.safetensors for one B; returns B's permuted state."""
    from .permutation import apply_permutation, save_permutation_file

    info = {"method": method, "seed": cfg.seed, "a": str(a.path), "b": str(b.path),
            **({"wm_objective": cfg.wm_objective} if method in ("wm", "ste") else {}), **extra_info}
    save_permutation_file(out / PERMUTATION_FILE, perm, info)
    permuted = apply_permutation(spec, perm, b.state)
    ckpt_info = {**b.info, "permuted_from": str(b.path), "method": method, "matched_to": str(a.path),
                 "match_seed": cfg.seed, **{k: v for k, v in info.items() if k == "wm_objective"}, **extra_info}
    save_checkpoint(out / PERMUTED_FILE, Checkpoint(b.model, b.data, b.in_shape, b.num_classes, permuted, ckpt_info))
    return permuted


def _check_tensors(ckpt: Checkpoint) -> None:
    """The checkpoint's tensors have exactly the names and shapes of the model its metadata describes
    (checked against a model built on the meta device: no memory, no initialisation)."""
    from .models import build_model

    with torch.device("meta"):
        expected = build_model(ckpt.model, ckpt.in_shape, ckpt.num_classes).state_dict()
    for k, v in expected.items():
        if k not in ckpt.state:
            raise LmcxError(f"{ckpt.label} has no tensor {k!r} that a {ckpt.model.arch} of width "
                            f"{ckpt.model.width:g} needs; the file's metadata and tensors disagree")
        if tuple(ckpt.state[k].shape) != tuple(v.shape):
            raise LmcxError(f"{ckpt.label}: tensor {k!r} has shape {tuple(ckpt.state[k].shape)}, but a "
                            f"{ckpt.model.arch} of width {ckpt.model.width:g} needs {tuple(v.shape)}; "
                            "the file's metadata and tensors disagree")
    extra = sorted(set(ckpt.state) - set(expected))
    if extra:
        raise LmcxError(f"{ckpt.label} holds a tensor {extra[0]!r} that a {ckpt.model.arch} does not have; "
                        "the file's metadata and tensors disagree")


def match_checkpoints(a_path, b_paths: list, cfg: MatchConfig, out_dir, device: str = "auto",
                      data_root=None) -> dict[str, Any]:
    """Match every model of `b_paths` to model A and write the outputs described in the module
    docstring into `out_dir`; returns what metrics.json holds."""
    from .models import permutation_coverage, permutation_spec
    from .permutation import l2_distance, merge_many
    from .permutation.distance import L2_DEFINITION, OBJECTIVES, objective_keys
    from .threads import thread_info
    from .train import resolve_device

    t_start = time.perf_counter()
    validate(cfg)
    out = Path(out_dir)
    b_paths = list(b_paths)
    if not b_paths:
        raise LmcxError("give at least one model B to match to A")
    if cfg.method not in METHOD_NAMES:
        raise LmcxError(f"unknown matching method {cfg.method!r}; choose wm, am or ste")
    merging = len(b_paths) > 1 and cfg.many == "merge-many"
    if merging and cfg.method != "wm":
        raise LmcxError(f"many=merge-many uses weight matching only; use --method wm, or --many anchor to match "
                        f"each B to A with {cfg.method}")
    a = load_checkpoint(a_path)
    bs = [load_checkpoint(p) for p in b_paths]
    for b in bs:
        check_compatible(a, b)
    spec = permutation_spec(a.model, a.in_shape, a.num_classes)
    coverage = permutation_coverage(a.model, a.in_shape, a.num_classes)
    dev = resolve_device(device)
    for ckpt in [a, *bs]:  # tensors must fit the architecture the metadata names: fail before any work
        _check_tensors(ckpt)
    ds = None
    if cfg.method in ("am", "ste"):
        from .data import load_dataset

        data_cfg = replace(a.data, root=str(data_root)) if data_root is not None else a.data
        ds = load_dataset(data_cfg, dev)

    settings = to_dict(cfg)
    if not merging:
        pairs = [match_pair(spec, a, b, cfg, dev, ds) for b in bs]
        method = cfg.method
        extra = {}
    else:
        r = merge_many(spec, [{k: v.to(dev) for k, v in c.state.items()} for c in [a, *bs]],
                       max_iter=cfg.max_iter, seed=cfg.seed, keys=objective_keys(parameter_names(a), cfg.wm_objective))
        pairs = [(p, {"iterations": r.iterations, "converged": r.converged, "objective": None,
                      "match_seconds": r.seconds}) for p in r.perms[1:]]
        method = "wm"
        extra = {"many": "merge-many"}

    single = len(bs) == 1
    l2_keys = parameter_names(a)
    outputs: list[dict[str, Any]] = []
    permuted_states = []
    for i, (b, (perm, stats)) in enumerate(zip(bs, pairs), 1):
        where = out if single else out / f"b{i}"
        info = dict(extra)
        if not single:
            info.update(many=cfg.many)
        permuted = _write_pair(where, spec, a, b, perm, cfg, method, info)
        permuted_states.append(permuted)
        rel = (lambda name: name) if single else (lambda name, i=i: f"b{i}/{name}")
        outputs.append({"source": str(b.path), "permutation": rel(PERMUTATION_FILE), "permuted": rel(PERMUTED_FILE),
                        "l2_before": _l2(a.state, b.state, l2_keys), "l2_after": _l2(a.state, permuted, l2_keys),
                        **stats})

    metrics: dict[str, Any] = {
        "method": method, "method_name": METHOD_NAMES[method], "seed": cfg.seed, "a": str(a.path),
        "b": [str(b.path) for b in bs], "device": str(dev),
        "architecture": a.model.arch, "width": a.model.width, "norm": a.model.norm, "dataset": a.data.name,
        "settings": settings, "threads": thread_info(),
        "permutation_spec": {  # traced from the model (lmcx/models/specs.py): what it permutes, what it pins and why
            "permutations": coverage.permutations, "tensors": coverage.tensors,
            "tensors_permuted": coverage.tensors_permuted, "axes": coverage.axes,
            "axes_permuted": coverage.axes_permuted, "block_axes": coverage.block_axes,
            "pinned": {reason: {"axes": len(axes), "e.g.": axes[:3]} for reason, axes in coverage.pinned.items()}},
        "l2_definition": L2_DEFINITION,
    }
    if method in ("wm", "ste"):
        metrics.update(wm_objective=cfg.wm_objective, wm_objective_definition=OBJECTIVES[cfg.wm_objective])
    if single:
        o = outputs[0]
        metrics.update({k: v for k, v in o.items() if k not in ("source", "permutation", "permuted")})
        metrics["outputs"] = [{k: o[k] for k in ("source", "permutation", "permuted")}]
    else:
        metrics["many"] = cfg.many
        if merging:
            metrics.update(iterations=pairs[0][1]["iterations"], converged=pairs[0][1]["converged"],
                           match_seconds=pairs[0][1]["match_seconds"])
        metrics["outputs"] = outputs
        between = []
        for (i, bi), (j, bj) in itertools.combinations(enumerate(bs, 1), 2):
            between.append({"pair": [f"b{i}", f"b{j}"],
                            "l2_before": l2_distance(bi.state, bj.state, l2_keys)[0],
                            "l2_after": l2_distance(permuted_states[i - 1], permuted_states[j - 1], l2_keys)[0]})
        metrics["l2_between_b"] = between
    metrics["seconds"] = time.perf_counter() - t_start
    write_json(out / METRICS_FILE, metrics)
    return metrics


def summary_lines(metrics: dict[str, Any], run_dir: str | Path | None = None) -> list[str]:
    """One line per matched B: L2 to A before → after, iterations, seconds (and STE's midpoint losses)."""
    single = "l2_before" in metrics
    rows = [metrics] if single else metrics.get("outputs", [])
    unit = {"wm": "sweeps", "am": "assignment pass", "ste": "steps"}.get(metrics.get("method"), "iterations")
    if metrics.get("many") == "merge-many":
        unit = "MergeMany rounds"
    lines = []
    for row in rows:
        where = str(run_dir) if single else str(Path(run_dir or ".") / row["permuted"])
        extra = ""
        if "ste" in row:
            s = row["ste"]
            extra = (f"; midpoint train loss naive {s['naive_midpoint_train_loss']:.4f}, "
                     f"best {s['best_midpoint_train_loss']:.4f} (step {s['best_step']})")
        seconds = metrics["seconds"] if single else row.get("match_seconds", 0.0)
        lines.append(f"{where}: {metrics['method']} L2 to A {row['l2_before']['total']:.4g} → "
                     f"{row['l2_after']['total']:.4g}, {row.get('iterations')} {unit}, {seconds:.2f} s{extra}")
    if not single:
        lines.append(f"{run_dir}: {len(rows)} models matched ({metrics.get('many')}), {metrics['seconds']:.2f} s")
    return lines
