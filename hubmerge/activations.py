"""Calibration activations carried through a model's traced graph, so work that goes front to back costs
about one forward pass instead of one pass from the input per step (issue 13).

REPAIR corrects layers in forward order, each correction changing what later layers see, and a budget
candidate that differs from a reference merge only from some layer on computes the same values in front of
it. Both need the calibration set's activations *at a position* of the network: :class:`Program` is the
model's ``torch.fx`` graph in execution order (traced with timm's own leaf modules and autowrapped functions,
as ``timm.models._features_fx`` does, plus hubmerge's partitioned modules), and :class:`Activations` holds,
for every chunk of the data (one input batch), the values that nodes at or after the position still read.
Moving it forward runs each node once per chunk; :meth:`Activations.fork` lets another model of the same
graph (a candidate merge) continue from the same position.

Memory is the live values at the position for the whole calibration set (for a CNN, about the widest
feature map of every sample), on ``device``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import fx, nn
from torch.utils._pytree import tree_map_only

from .data import Batches, batches
from .errors import UnsupportedModelError
from .partitioned import PartitionedLayer, PartitionedNorm


class _Tracer(fx.Tracer):
    """torch.fx with timm's leaf modules and autowrapped functions (what timm registers for its fx feature
    extraction) and hubmerge's partitioned modules as leaves, so every module REPAIR corrects is one node
    or inside one."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self.leaves = (PartitionedLayer, PartitionedNorm, *get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


class Program:
    """A module's traced graph as a list of nodes in execution order, with the last node that reads each
    value (values are dropped after it)."""

    def __init__(self, module: nn.Module):
        try:
            graph = _Tracer().trace(module)
        except Exception as exc:  # fx raises many types (TraceError, TypeError on control flow, …)
            raise UnsupportedModelError(f"torch.fx cannot trace {type(module).__name__} for REPAIR and the budget "
                                        f"search ({type(exc).__name__}: {exc})") from exc
        self.nodes: list[fx.Node] = list(graph.nodes)
        order = {n.name: i for i, n in enumerate(self.nodes)}
        self.last_use = {n.name: max((order[u.name] for u in n.users), default=order[n.name]) for n in self.nodes}
        self.signature = [(n.op, str(n.target), n.name) for n in self.nodes]
        self.attrs = {n.name: n.target for n in self.nodes if n.op == "get_attr"}

    def node_of(self, module: str) -> int:
        """Index of the node that runs ``module``: its own call, or that of the leaf module containing it."""
        for i, n in enumerate(self.nodes):
            if n.op == "call_module" and (n.target == module or module.startswith(f"{n.target}.")):
                return i
        raise UnsupportedModelError(f"{module} is never called as a module in the traced graph, so its output "
                                    "cannot be measured")

    def runs_itself(self, index: int, module: str) -> bool:
        """Whether node ``index`` is ``module``'s own call (its output is the module's output)."""
        return self.nodes[index].op == "call_module" and self.nodes[index].target == module


def _attr(root: nn.Module, target: str):
    return functools.reduce(getattr, target.split("."), root)


def _run(node: fx.Node, env: dict, root: nn.Module):
    """The value of one node, its inputs read from ``env``."""
    args = fx.node.map_arg(node.args, lambda n: env[n.name])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
    if node.op == "get_attr":
        return _attr(root, node.target)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return root.get_submodule(node.target)(*args, **kwargs)
    if node.op == "output":
        return args[0]
    raise UnsupportedModelError(f"unexpected graph node {node.op} {node.target}")


class Activations:
    """The values live at ``position`` of ``program`` (nodes before it have run) for every chunk of the
    calibration data, computed by ``root`` (the traced module, whose current weights every step uses)."""

    def __init__(self, program: Program, root: nn.Module, data: Batches | None, device: torch.device | str = "cpu"):
        self.program, self.root, self.position = program, root, 0
        self.chunks: list[dict] = []
        if data is None:
            return
        inputs = [n for n in program.nodes if n.op == "placeholder"]
        for x, _ in batches(data, device):
            env = {inputs[0].name: x}
            for extra in inputs[1:]:  # further forward arguments keep their defaults
                if not extra.args:
                    raise UnsupportedModelError(f"the model's forward takes a second input {extra.name!r} without a "
                                                "default; hubmerge feeds it images only")
                env[extra.name] = extra.args[0]
            self.chunks.append(env)

    def _step(self, env: dict, index: int) -> None:
        """Run node ``index`` on one chunk and store its value."""
        node = self.program.nodes[index]
        if node.op != "placeholder":
            env[node.name] = _run(node, env, self.root)
        self._drop(env, index)

    def _drop(self, env: dict, index: int) -> None:
        """Forget the values that no node after ``index`` reads (the model's output is kept)."""
        keep = self.program.nodes[-1].name
        for name in [k for k in env if self.program.last_use[k] <= index and k != keep]:
            del env[name]

    @torch.no_grad()
    def advance(self, stop: int) -> None:
        """Run nodes ``[position, stop)`` on every chunk."""
        if stop < self.position:
            raise ValueError(f"cannot move back from node {self.position} to {stop}")
        for env in self.chunks:
            for index in range(self.position, stop):
                self._step(env, index)
        self.position = stop

    @torch.no_grad()
    def observe(self, index: int, module: nn.Module, record: Callable[[torch.Tensor], None]) -> list:
        """Move to node ``index`` and run it on every chunk with ``record`` called on ``module``'s output
        (the node itself or a submodule of the leaf it calls). The node's values are returned, one per chunk,
        without being stored: :meth:`commit` keeps them (possibly changed); otherwise the position stays in
        front of the node, which then runs again with whatever changed in between."""
        self.advance(index)
        handle = module.register_forward_hook(lambda _m, _i, out: record(out))
        try:
            return [_run(self.program.nodes[index], env, self.root) for env in self.chunks]
        finally:
            handle.remove()

    def commit(self, index: int, values: list) -> None:
        """Store the values of node ``index`` (the position) and move past it."""
        if index != self.position:
            raise ValueError(f"commit at node {index}, but the position is {self.position}")
        for env, value in zip(self.chunks, values):
            env[self.program.nodes[index].name] = value
            self._drop(env, index)
        self.position = index + 1

    def fork(self, program: Program, root: nn.Module) -> Activations:
        """The same values at the same position, to be carried on by ``root`` (traced as ``program``, which
        must match this graph up to the position). Tensors are copied, since a node may write into its input
        in place (``x += shortcut``)."""
        if program.signature[:self.position] != self.program.signature[:self.position]:
            raise UnsupportedModelError("the two merges trace to different graphs in front of their first "
                                        "difference; their activations cannot be shared")
        out = Activations(program, root, None)
        out.position = self.position
        # parameters read in front of the position are the new model's own
        out.chunks = [{k: _attr(root, program.attrs[k]) if k in program.attrs else
                       tree_map_only(torch.Tensor, torch.clone, v) for k, v in env.items()} for env in self.chunks]
        return out

    @torch.no_grad()
    def result(self) -> torch.Tensor:
        """Run the rest of the graph and return the model's outputs for all chunks, concatenated in order."""
        self.advance(len(self.program.nodes))
        out = self.program.nodes[-1].name
        return torch.cat([env[out] for env in self.chunks])
