"""Permutations of hidden units, one method per module:
  spec.py                 permutation specs (which permutation acts on which axis of which parameter,
                          block axes, pin reasons), applying, composing and checking permutations, files
  trace.py                `trace_spec`: the spec of any model traced with torch.fx (axis_groups.py: the
                          union-find over axes; trace_ops.py, trace_layers.py: the handlers;
                          trace_table.py: which module / function / method each handler covers)
  check.py                `check_spec`: a spec verified by permuting and comparing outputs; coverage
  weight_matching.py      weight matching (`lmcx match --method wm`); wm_costs.py: its cost matrices and gains
  distance.py             what WM's objective and "L2 to A" sum over, and the L2 distance of two models
  activation_matching.py  activation matching (`--method am`) from activation correlations on data
  ste.py                  the straight-through estimator (`--method ste`)
  merge_many.py           three or more models: MergeMany and [A]'s match-to-an-anchor protocol
"""
from .activation_matching import ActivationStats, activation_correlations, activation_matching, assign_from_correlation
from .merge_many import MergeManyResult, match_to_anchor, merge_many
from .spec import (
    Permutation,
    PermutationSpec,
    StateDict,
    apply_permutation,
    check_permutation,
    compose_permutations,
    get_permuted_param,
    identity_permutation,
    invert_permutation,
    load_permutation_file,
    perm_sizes,
    permutation_spec_from_axes,
    random_permutation,
    save_permutation_file,
)
from .check import Coverage, check_spec, spec_coverage
from .ste import SteResult, straight_through_estimator
from .trace import trace_spec
from .distance import l2_distance, objective_keys
from .weight_matching import WeightMatchingResult, matchable_params, weight_matching

__all__ = [
    "Permutation",
    "PermutationSpec",
    "StateDict",
    "apply_permutation",
    "check_permutation",
    "compose_permutations",
    "get_permuted_param",
    "identity_permutation",
    "invert_permutation",
    "load_permutation_file",
    "save_permutation_file",
    "perm_sizes",
    "permutation_spec_from_axes",
    "random_permutation",
    "WeightMatchingResult",
    "weight_matching",
    "l2_distance",
    "matchable_params",
    "objective_keys",
    "MergeManyResult",
    "merge_many",
    "match_to_anchor",
    "ActivationStats",
    "activation_correlations",
    "activation_matching",
    "assign_from_correlation",
    "SteResult",
    "straight_through_estimator",
    "trace_spec",
    "check_spec",
    "spec_coverage",
    "Coverage",
]
