"""What the analyses of a pair (A, B) share: where π(B) comes from, and how the models are described."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import LmcxError


def check_permutation_source(perm_path, b_permuted_path) -> None:
    """π(B) comes from a permutation file or a permuted checkpoint, never both."""
    if perm_path is not None and b_permuted_path is not None:
        raise LmcxError("give either --perm or --b-permuted, not both")


def permuted_b(ckpt_a, ckpt_b, perm_path=None, b_permuted_path=None, *, wm_seed: int = 0, wm_max_iter: int = 100,
               wm_objective: str = "params", on_the_fly: bool = True, device: str | torch.device = "cpu"
               ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """π(B)'s state dict and a description of where π came from.

    `perm_path`: a permutation file (lmcx match) applied to B. `b_permuted_path`: an already permuted
    checkpoint of B. Neither: weight matching of B to A computed here (`on_the_fly`), else (None, naive).
    """
    from ..checkpoint import check_compatible, load_checkpoint
    from ..models import permutation_spec
    from ..permutation.spec import apply_permutation, load_permutation_file

    check_permutation_source(perm_path, b_permuted_path)
    if perm_path is not None:
        spec = permutation_spec(ckpt_b.model, ckpt_b.in_shape, ckpt_b.num_classes)
        perm = load_permutation_file(perm_path, spec, ckpt_b.state)
        return apply_permutation(spec, perm, ckpt_b.state), {"source": "file", "path": str(perm_path),
                                                             "note": "permutation file applied to B"}
    if b_permuted_path is not None:
        ckpt_p = load_checkpoint(b_permuted_path)
        check_compatible(ckpt_a, ckpt_p)
        return dict(ckpt_p.state), {"source": "checkpoint", "path": str(ckpt_p.path),
                                    "note": "already permuted checkpoint of B"}
    if not on_the_fly:
        return None, {"source": "none", "note": "no permutation: B as trained (naive)"}
    from ..match import parameter_names
    from ..permutation.distance import objective_keys
    from ..permutation.weight_matching import weight_matching

    spec = permutation_spec(ckpt_b.model, ckpt_b.in_shape, ckpt_b.num_classes)
    device = torch.device(device)
    state_a = {k: v.to(device) for k, v in ckpt_a.state.items()}
    state_b = {k: v.to(device) for k, v in ckpt_b.state.items()}
    result = weight_matching(spec, state_a, state_b, max_iter=wm_max_iter, seed=wm_seed,
                             keys=objective_keys(parameter_names(ckpt_a), wm_objective))
    return apply_permutation(spec, result.perm, ckpt_b.state), {
        "source": "weight_matching", "seed": wm_seed, "max_iter": wm_max_iter, "wm_objective": wm_objective,
        "iterations": result.iterations, "converged": result.converged,
        "note": "no --perm or --b-permuted given: weight matching of B to A computed here"}


def model_summary(ckpt) -> dict[str, Any]:
    return {"architecture": ckpt.model.arch, "width": ckpt.model.width, "norm": ckpt.model.norm,
            "bias": ckpt.model.bias, "dataset": ckpt.data.name}

