"""Linear interpolation between two models, loss and accuracy barriers, and the norm fixes.

Convention (one for all of lmcx): θ(λ) = (1 − λ) θ_A + λ θ_B, so λ = 0 is A and λ = 1 is B.

One idea per module, each importing only those above it:
  norm_fix.py  which fix a model gets (`auto`, reset, repair, none), the fixed training batches they
               use, and `reset` (BatchNorm running statistics recomputed)
  repair.py    REPAIR (Jordan et al.): per-unit activation statistics matched to the endpoints'
  path.py      the λ grid, θ(λ) of two state dicts (`lerp_state`), and `Interpolator`: θ(λ) of two
               models with the norm fix applied
  curves.py    `evaluate_curves`: the logits of every θ(λ) on every split, once; the logits cache
  barrier.py   loss and accuracy barriers of a curve (SCIENCE.md), curve.csv rows, summary lines
  run.py       checkpoints in, files out: `interpolate_checkpoints` (`lmcx interpolate`) and
               `calibrate_dir` (`lmcx calibrate`); the output files are described there
"""
from .barrier import barrier_metrics, loss_gaps, summarize, summary_lines
from .curves import CURVE_SPLITS, LOGITS_FILE, Curves, evaluate_curves, load_curves, save_curves
from .norm_fix import (NORM_FIX_NOTES, NORM_FIXES, check_norm_fix, model_norm, norm_fix_inputs, reset_bn_stats,
                       resolve_norm_fix)
from .path import LAMBDA_CONVENTION, Interpolator, check_same_layout, interpolated_model, lambda_grid, lerp_state
from .repair import activation_stats, endpoint_stats, repair, repair_points
from .run import (BARRIER_FILE, OUTPUTS, calibrate_dir, fit_temperatures, interpolate_checkpoints, is_calibrated,
                  write_outputs)

__all__ = ["LAMBDA_CONVENTION", "Interpolator", "Curves", "lambda_grid", "lerp_state",
           "model_norm", "check_norm_fix", "resolve_norm_fix", "norm_fix_inputs", "reset_bn_stats", "repair_points",
           "activation_stats", "endpoint_stats", "repair", "interpolated_model", "barrier_metrics", "evaluate_curves",
           "save_curves", "load_curves", "fit_temperatures", "summarize", "interpolate_checkpoints",
           "calibrate_dir", "is_calibrated", "check_same_layout",
           "BARRIER_FILE", "CURVE_SPLITS", "LOGITS_FILE", "NORM_FIXES", "NORM_FIX_NOTES", "OUTPUTS", "loss_gaps",
           "summary_lines", "write_outputs"]
