"""Permutation specs of any PyTorch model, traced with torch.fx.

`trace_spec(model, example_input)` traces the model's forward (in eval and in train mode, as Python
control flow may differ), runs the graph on the example input to learn every tensor's shape, and lets
a handler per operation (trace_table.py) state which axes must carry the same permutation, in a
union-find over all axes (axis_groups.py). Everything added into one residual stream ends up in one
group; the model's input and output axes are pinned, and so is every axis that an operation the
tracer does not understand touches. Each unpinned group that holds parameter axes is a permutation,
named after the module (or parameter) that first produces it. The spec is then checked on the model
itself (check.py: a random permutation of every group must leave the outputs unchanged in eval and
train mode), so a wrong spec never reaches the caller; an untraceable model is an LmcxError.
"""
from __future__ import annotations

import copy
import operator
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..errors import LmcxError
from .axis_groups import AxisGroups, ResolvedGroups
from .spec import PermutationSpec, permutation_spec_from_axes
from .trace_ops import Dims, OpContext, dims_in
from .trace_table import ACTIVATIONS, describe, function_handler, is_handled_leaf, method_handler, module_handler

__all__ = ["trace_spec", "trace_unchecked"]


def trace_spec(model: nn.Module, example_input: torch.Tensor | tuple) -> PermutationSpec:
    """The permutation spec of `model`, traced and checked (see the module docstring). `example_input`
    is one batch (a tensor, or a tuple of the forward's arguments); use at least 2 samples, since the
    train-mode check runs BatchNorm on it. The spec holds for inputs of this shape (a flatten's block
    size depends on the feature map's size). The model is not modified."""
    from .check import check_spec  # check.py imports nothing from here; kept local to show the order

    spec = trace_unchecked(model, example_input)
    check_spec(model, spec, example_input)
    return spec


def trace_unchecked(model: nn.Module, example_input: torch.Tensor | tuple) -> PermutationSpec:
    """`trace_spec` without the check: for timing the two halves separately. Not for users."""
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    model = copy.deepcopy(model)  # the trace runs the model: the caller's BN statistics must not move
    was_training = model.training
    graphs: list[fx.GraphModule] = []
    for training in (False, True):
        model.train(training)
        graph = _symbolic_trace(model)
        if not graphs or graph.code != graphs[0].code:
            graphs.append(graph)
    model.eval()
    tracing = _Tracing(model)
    for graph in graphs:
        tracing.propagate(graph, inputs)
    model.train(was_training)
    return tracing.spec()


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_handled_leaf(m) or super().is_leaf_module(m, qualname)


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:  # fx raises TraceError, TypeError, AttributeError, ... from the user's forward
        raise LmcxError(f"cannot trace {type(model).__name__} with torch.fx{_user_frame(e)}: {_first_line(e)}; "
                        "the tracer follows forward() without tensor values, so Python control flow on tensor "
                        "values (if/while on a tensor, .item(), data-dependent shapes) cannot be traced: "
                        "rewrite that code to depend only on shapes and attributes") from None


def _user_frame(e: Exception) -> str:
    """' at file:line (function)' of the innermost traceback frame outside torch, where the trace stopped."""
    torch_dir = str(Path(torch.__file__).parent)
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(torch_dir)]
    return f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames[1:] else ""


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class _Interpreter(fx.Interpreter):
    """Runs the graph on the example input and shows each node, with its concrete values, to `_Tracing`."""

    def __init__(self, graph: fx.GraphModule, tracing: "_Tracing"):
        super().__init__(graph)
        self.tracing = tracing
        self.values: dict[fx.Node, Any] = {}  # node -> its output as Dims (nested like the output)

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        result = super().run_node(n)
        self.values[n] = self.tracing.visit(self, n, args, kwargs, result)
        return result


class _Tracing:
    """The axis groups of one model, filled graph by graph; `spec()` reads the permutation spec off them."""

    def __init__(self, model: nn.Module):
        self.groups = AxisGroups()
        self.state = {k: v for k, v in model.state_dict(keep_vars=True).items()}
        self.param_dims: dict[int, Dims] = {}  # id(tensor) -> Dims; tied parameters share one entry
        for t in self.state.values():
            if id(t) not in self.param_dims:
                self.param_dims[id(t)] = Dims(self.groups.new(s) for s in t.shape)
        self.used: set[int] = set()
        self.visited: list[list[tuple[fx.Node, Any, nn.Module | None]]] = []  # per graph, in execution order

    def propagate(self, graph: fx.GraphModule, inputs: tuple) -> None:
        self.visited.append([])
        try:
            with torch.no_grad():
                _Interpreter(graph, self).run(*inputs)
        except LmcxError:
            raise
        except Exception as e:
            raise LmcxError(f"the traced model fails on the example input: {_first_line(e)}; pass an input the "
                            "model accepts (one batch, as for forward())") from None

    def _fresh(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return Dims(self.groups.new(s) for s in value.shape)
        if isinstance(value, (tuple, list)):
            return tuple(self._fresh(v) for v in value)
        if isinstance(value, dict):
            return {k: self._fresh(v) for k, v in value.items()}
        return None

    def _tensor_dims(self, t: torch.Tensor) -> Dims | None:
        if id(t) in self.param_dims:
            self.used.add(id(t))
            return self.param_dims[id(t)]
        return None

    def visit(self, interp: _Interpreter, n: fx.Node, args: tuple, kwargs: dict, result: Any) -> Any:
        values = interp.values
        module = interp.module.get_submodule(n.target) if n.op == "call_module" else None
        if n.op == "placeholder":
            value = self._fresh(result)
            self._pin_all(value, "model input")
        elif n.op == "get_attr":
            value = self._tensor_dims(result) if isinstance(result, torch.Tensor) else None
            if value is None:
                value = self._fresh(result)
                self._pin_all(value, "a tensor constant outside the state dict")
        elif n.op == "output":
            self._pin_all(fx.node.map_arg(n.args, values.get), "model output")
            value = None
        elif isinstance(n.target, type) and issubclass(n.target, tuple):  # a (named) tuple built of outputs
            value = tuple(fx.node.map_arg(n.args, values.get)) + tuple(fx.node.map_arg(n.kwargs, values.get).values())
        elif n.target is operator.getitem and isinstance(n.args[0], fx.Node) and \
                isinstance(values.get(n.args[0]), (tuple, dict)) and not isinstance(values[n.args[0]], Dims):
            # an element of a tuple output (chunk, attention)
            value = values[n.args[0]][args[1]]
        else:
            value = self._fresh(result)
            params = {}
            if module is not None:
                for name, t in [*module.named_parameters(), *module.named_buffers()]:
                    if (d := self._tensor_dims(t)) is not None:
                        params[name] = d
            ctx = OpContext(self.groups, n, args, kwargs, fx.node.map_arg(n.args, values.get),
                            fx.node.map_arg(n.kwargs, values.get), value, module, params)
            handler = module_handler(module) if module is not None else \
                method_handler(n.target) if n.op == "call_method" else function_handler(n.target)
            if handler is not None:
                handler(ctx)
            ctx.finish(describe(n, module))
        self.visited[-1].append((n, value, module))
        return value

    def _pin_all(self, value: Any, reason: str) -> None:
        for d in dims_in(value):
            for e in d:
                self.groups.pin(e, reason)

    # ----------------------------------------------------------------------------------------
    # Reading the spec off the groups

    def spec(self) -> PermutationSpec:
        groups = self.groups.resolve()
        names = self._names(groups)
        axes: dict[str, tuple[str | None, ...]] = {}
        blocks: dict[tuple[str, int], int] = {}
        pinned: dict[tuple[str, int], str] = {}
        for key, t in self.state.items():
            if not t.is_floating_point():
                continue  # num_batches_tracked and other counters: nothing to permute
            entry: list[str | None] = [None] * t.ndim
            for axis, e in enumerate(self.param_dims[id(t)]):
                if t.shape[axis] <= 1:
                    continue
                reason = "not used in the forward pass" if id(t) not in self.used else groups.pinned(e)
                if reason is None and groups.units(e) <= 1:
                    reason = "follows an axis of one unit"
                if reason is not None:
                    pinned[(key, axis)] = reason
                    continue
                root, k = groups.base(e)
                entry[axis] = names[root]
                if k > 1:
                    blocks[(key, axis)] = k
            axes[key] = tuple(entry)
        return permutation_spec_from_axes(axes, self._activation_points(groups, names), blocks, pinned)

    def _permutable(self, groups: ResolvedGroups, e: int) -> bool:
        return groups.pinned(e) is None and groups.units(e) > 1

    def _names(self, groups: ResolvedGroups) -> dict[int, str]:
        """Group root -> name of the first module (or parameter) in execution order whose output carries it
        (the parameter's own name if none does); ':2', ':3' tell apart groups that one node produces."""
        param_axes = [(key, axis, e) for key, t in self.state.items() if id(t) in self.used
                      for axis, e in enumerate(self.param_dims[id(t)]) if self._permutable(groups, e)]
        with_params = {groups.base(e)[0] for _, _, e in param_axes}
        producers = [(_label(n), e) for graph in self.visited for n, value, _ in graph for d in dims_in(value) for e in d]
        names: dict[int, str] = {}
        for label, e in producers + [(key, e) for key, _, e in param_axes]:
            root = groups.base(e)[0]
            if root in names or root not in with_params or not self._permutable(groups, e):
                continue
            name, i = label, 1
            while name in names.values():
                i += 1
                name = f"{label}:{i}"
            names[root] = name
        return names

    def _activation_points(self, groups: ResolvedGroups, names: dict[int, str]) -> dict[str, list[str]]:
        """Modules called once in eval mode whose output carries a permutation, unblocked, on dimension 1;
        activation functions are preferred (as in the hand-written specs: post-ReLU activations)."""
        visited = self.visited[0]
        calls = Counter(n.target for n, _, _ in visited if n.op == "call_module")
        found: dict[str, list[tuple[bool, str]]] = {}
        for n, value, module in visited:
            if n.op != "call_module" or calls[n.target] != 1 or not isinstance(value, Dims) or len(value) < 2:
                continue
            root, k = groups.base(value[1])
            if k == 1 and root in names and self._permutable(groups, value[1]):
                found.setdefault(names[root], []).append((isinstance(module, ACTIVATIONS), n.target))
        return {p: [t for act, t in points if act] or [t for _, t in points] for p, points in found.items()}


def _label(n: fx.Node) -> str:
    if n.op in ("call_module", "get_attr"):
        return str(n.target)
    stack = n.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else n.name
