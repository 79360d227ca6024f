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

The values live at the position for the whole calibration set (for a CNN, about the widest feature map of
every sample) are kept on ``device`` up to a memory limit (``MergeOptions.activation_memory``) and in a
temporary folder beyond it, so a merge's memory does not grow with the calibration set.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map_only

from .data import Batches, batches
from .errors import UnsupportedModelError
from .partitioned import PartitionedLayer, PartitionedNorm, SectionwiseLayer


class _Tracer(fx.Tracer):
    """torch.fx with timm's leaf modules and autowrapped functions (what timm registers for its fx feature
    extraction) and hubmerge's partitioned modules as leaves, so every module REPAIR corrects is one node
    or inside one."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self.leaves = (PartitionedLayer, PartitionedNorm, SectionwiseLayer, *get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


class Program:
    """A module's traced graph as a list of nodes in execution order, with the last node that reads each
    value (values are dropped after it)."""

    def __init__(self, module: nn.Module):
        try:
            graph = _Tracer().trace(module)
        except Exception as exc:  # fx raises many types (TraceError, TypeError on control flow, …)
            raise UnsupportedModelError(f"torch.fx cannot trace {type(module).__name__}, which REPAIR and the budget "
                                        f"search run through ({type(exc).__name__}: {exc}); merge it with "
                                        "repair='reset' or repair=None and no budget") from exc
        self.nodes: list[fx.Node] = list(graph.nodes)
        order = {n.name: i for i, n in enumerate(self.nodes)}
        self.last_use = {n.name: max((order[u.name] for u in n.users), default=order[n.name]) for n in self.nodes}
        self.signature = [(n.op, str(n.target), n.name) for n in self.nodes]

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
    """The value of one node, its inputs read from ``env`` (parameters and buffers from ``root`` itself, so
    a correction folded into them in the meantime is seen, and they are never copied or spilled)."""
    def value(n: fx.Node):
        return _attr(root, n.target) if n.op == "get_attr" else env[n.name]

    args, kwargs = fx.node.map_arg(node.args, value), fx.node.map_arg(node.kwargs, value)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return root.get_submodule(node.target)(*args, **kwargs)
    if node.op == "output":
        return args[0]
    raise UnsupportedModelError(f"unexpected graph node {node.op} {node.target}")


def _nbytes(env: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(env) if isinstance(t, torch.Tensor))


class _Chunks:
    """The chunks' values: in memory while they fit in ``limit`` bytes, the rest in a private temporary
    folder (``torch.save``), read back when their turn comes; so memory stays bounded whatever the size of
    the calibration set, at the price of reading and writing the spilled chunks once per step."""

    def __init__(self, limit: float):
        self.limit, self.used = limit, 0
        self.memory: list[dict | None] = []  # None: on disk
        self.sizes: list[int] = []
        self.folder: Path | None = None

    def __len__(self) -> int:
        return len(self.memory)

    def _path(self, i: int) -> Path:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="hubmerge-activations-"))
            weakref.finalize(self, shutil.rmtree, self.folder, True)
        return self.folder / f"{i}.pt"

    def __getitem__(self, i: int) -> dict:
        env = self.memory[i]
        return torch.load(self._path(i), weights_only=False) if env is None else env

    def append(self, env: dict) -> None:
        self.memory.append(None)
        self.sizes.append(0)
        self[len(self.memory) - 1] = env

    def __setitem__(self, i: int, env: dict) -> None:
        if self.memory[i] is not None:
            self.used -= self.sizes[i]
        self.sizes[i] = _nbytes(env)
        if self.used + self.sizes[i] <= self.limit:
            self.memory[i], self.used = env, self.used + self.sizes[i]
        else:
            self.memory[i] = None
            torch.save(env, self._path(i))

    @property
    def spilled(self) -> int:
        """How many chunks wait on disk."""
        return sum(env is None for env in self.memory)


class Activations:
    """The values live at ``position`` of ``program`` (nodes before it have run) for every chunk of the
    calibration data, computed by ``root`` (the traced module, whose current weights every step uses); at
    most ``memory`` bytes of them in memory (see :class:`_Chunks`).

    Every step visits each chunk once (read, run its nodes, store), and a :meth:`transform` of the last
    stored value is applied on the next visit, so correcting a layer's output costs no extra visit.
    """

    def __init__(self, program: Program, root: nn.Module, data: Batches | None, device: torch.device | str = "cpu",
                 memory: float = float("inf")):
        self.program, self.root, self.position = program, root, 0
        self.chunks = _Chunks(memory)
        self.pending: tuple[str, Callable] | None = None
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

    def _visit(self, change: bool = True) -> Iterator[dict]:
        """Each chunk's values in turn (with the pending transform applied), stored again after the caller's
        step on them; a caller that only reads them (``change=False``) stores nothing unless a transform was
        pending (a spilled chunk is then not written again)."""
        store = change or self.pending is not None
        for i in range(len(self.chunks)):
            env = self.chunks[i]
            if self.pending is not None:
                name, fn = self.pending
                env[name] = fn(env[name])
            yield env
            if store:
                self.chunks[i] = env
        self.pending = None

    def _steps(self, env: dict, stop: int) -> None:
        """Run nodes ``[position, stop)`` on one chunk, dropping the values no later node reads."""
        for index in range(self.position, stop):
            node = self.program.nodes[index]
            if node.op not in ("placeholder", "get_attr"):
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
        if stop == self.position and self.pending is None:
            return
        for env in self._visit():
            self._steps(env, stop)
        self.position = stop

    @torch.no_grad()
    def observe(self, index: int, module: nn.Module, record: Callable[[torch.Tensor], None], keep: bool) -> None:
        """Move to node ``index`` and run it on every chunk with ``record`` called on ``module``'s output
        (the node itself or a submodule of the leaf it calls). With ``keep`` its values are stored and the
        position moves past it (:meth:`transform` may still change them); otherwise they are dropped and the
        position stays in front of the node, which then runs again with whatever changed in between."""
        if index < self.position:
            raise ValueError(f"cannot move back from node {self.position} to {index}")
        node = self.program.nodes[index]
        handle = module.register_forward_hook(lambda _m, _i, out: record(out))
        try:
            for env in self._visit():
                self._steps(env, index)
                value = _run(node, env, self.root)
                if keep:
                    env[node.name] = value
                    self._drop(env, index)
        finally:
            handle.remove()
        self.position = index + 1 if keep else index

    def transform(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the values of the node just kept by :meth:`observe` with ``fn`` of them (applied to each
        chunk on its next visit)."""
        if self.pending is not None:
            raise ValueError("a transform is already pending")
        self.pending = (self.program.nodes[self.position - 1].name, fn)

    def fork(self, program: Program, root: nn.Module) -> Activations:
        """The same values at the same position, to be carried on by ``root`` (traced as ``program``, which
        must match this graph up to the position). Tensors are copied, since a node may write into its input
        in place (``x += shortcut``)."""
        if program.signature[:self.position] != self.program.signature[:self.position]:
            raise UnsupportedModelError("the two merges trace to different graphs in front of their first "
                                        "difference; their activations cannot be shared")
        out = Activations(program, root, None, memory=self.chunks.limit)
        out.position = self.position
        for env in self._visit(change=False):
            out.chunks.append(tree_map_only(torch.Tensor, torch.clone, env))
        return out

    @torch.no_grad()
    def result(self) -> torch.Tensor:
        """Run the rest of the graph and return the model's outputs for all chunks, concatenated in order."""
        self.advance(len(self.program.nodes))
        out = self.program.nodes[-1].name
        return torch.cat([self.chunks[i][out] for i in range(len(self.chunks))])
