"""Permutations of hidden units: specs, weight matching, activation matching, the straight-through
estimator, and matching three or more models."""
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
from .ste import SteResult, straight_through_estimator
from .weight_matching import WeightMatchingResult, l2_distance, matchable_params, weight_matching

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
    "MergeManyResult",
    "merge_many",
    "match_to_anchor",
    "ActivationStats",
    "activation_correlations",
    "activation_matching",
    "assign_from_correlation",
    "SteResult",
    "straight_through_estimator",
]
