"""REPAIR (method §5): undo the variance collapse of interpolated units.

``repair``: for each layer, front to back, measure the merged model's pre-activation mean/std per unit on
calibration data and fold an affine correction into the layer (into its norm when one follows, else into
its weight and bias), so the statistics become the endpoints' interpolated ones
(μ* = (1−α)μ_A + αμ_B, σ* = (1−α)σ_A + ασ_B). Shared units always; unmerged units toward their own
endpoint's statistics when ``unmerged=True``. ``reset``: re-estimate BatchNorm running statistics.
``reset_repair``: both, RESET for the layers a BatchNorm reads and REPAIR for the others (a VGG's classifier,
a model's layers without BatchNorm).

Each correction changes what later layers see, so layers are measured in order; instead of a pass from the
input per layer, a :class:`Sweep` carries the calibration activations forward through the model's graph
(:mod:`hubmerge.activations`), measuring each layer where it stands and applying its correction to the
values it carries on, so REPAIR of a whole model costs about one forward pass. A budget candidate that is
planned like a reference merge in front of some layer :meth:`~Sweep.branch` es off the reference's sweep
there: it copies the corrections in front and continues from the reference's activations (a suffix pass).
With RESET the sweep also carries RESET's own train-mode activations (:class:`_Reset`), so a branch continues
RESET from there too.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .activations import Activations, Program
from .data import Batches, batches, progress_bar
from .distributed import total
from .errors import UsageError
from .partial import GroupPlan, Layout, layout
from .partitioned import PartialMergedModel, PartitionedLayer, SectionwiseLayer, output_scale
from .spec import Axis, Layer, PermutationSpec
from .statistics import Moments, Statistics, unit_dim
from .matching import MatchedLayout, Matchings, is_matching

REPAIRS = ("repair", "reset", "reset_repair")
RESETS = ("reset", "reset_repair")  # the variants that re-estimate BatchNorm statistics first
CORRECTS = ("repair", "reset_repair")  # the variants that fold corrections into layers
AUTO = "auto"
DEAD = 1e-8  # a unit with σ below this is dead (constant on the calibration data)
Rows = list[tuple[nn.Module, torch.Tensor]]  # a sub-layer and the output position of each of its rows


@dataclass(frozen=True)
class Correction:
    """One conv/linear output REPAIR renormalises: ``index`` in the spec's layers (or outputs, for a merge held
    in the plain architecture), the module measured (the layer, or a token layer's shared copy), the BatchNorm
    reading it, the sub-layers covering its output rows with the
    output position of each of their rows (the shift goes into the one bias each row has), and the target
    mean/std of its units with the mask of units to correct."""

    index: int
    name: str
    norm: str | None
    rows: Rows
    mean: torch.Tensor
    std: torch.Tensor
    mask: torch.Tensor


def corrections(model: PartialMergedModel, plans: dict[str, GroupPlan] | Matchings, stats: Statistics,
                unmerged: bool = False, normed: bool = True) -> list[Correction]:
    """Every correction REPAIR makes in ``model``, in forward order. A partitioned merge corrects each layer's
    output units (``[A-only | shared | B-only]``; unmerged ones toward their own endpoint when ``unmerged``);
    a full merge held in the plain architecture (families without partial merging) corrects every output of
    :attr:`~hubmerge.spec.PermutationSpec.outputs`, where position p holds A's unit p and the B unit matched
    to it. A matched merge (:class:`~hubmerge.matching.Matching` plans: N-way) corrects every output toward
    its members' weighted statistics (the merge matrix applied to the endpoints'). Without ``normed``, layers
    a BatchNorm reads are left out (``reset_repair``: RESET has set their BatchNorms to the merge's own
    statistics, and a correction folded in there would undo that)."""
    spec, alpha, weights, out = model.spec, model.alpha, model.weights, []
    matched = is_matching(plans)
    layers = [stats.layers_of(m) for m in range(len(weights))]
    missing = [name for name in targets(spec, "repair" if normed else "reset_repair") if name not in layers[0]]
    if missing:
        raise UsageError(f"REPAIR of {missing[0]} (and {len(missing) - 1} more outputs) needs the endpoints' "
                         "statistics there, which the statistics pass measured only for the merge's own REPAIR "
                         "variant; prepare the merge with the variant it is built with (repair=...)")
    if spec.partial is not None:
        matched_b = {} if matched else {g: p.shared_b for g, p in plans.items()}
        for i, o in enumerate(spec.outputs):
            if o.norm and not normed:
                continue
            axis = spec.axes[f"{o.name}.weight"][0]
            if matched:
                at, mean, std = _targets(axis, plans, [layer[o.name] for layer in layers], weights)
                mask = ~at.fixed
            else:
                a, b = layers[0][o.name], layers[1][o.name]
                index = spec.gather(f"{o.name}.weight", 0, matched_b)
                index = torch.arange(len(a.mean)) if index is None else index
                mean, std = (1 - alpha) * a.mean + alpha * b.mean[index], (1 - alpha) * a.std + alpha * b.std[index]
                mask = torch.cat([torch.full((seg.size,), seg.group is not None) for seg in axis])
            module = model.net.get_submodule(o.name)
            out.append(Correction(i, o.name, o.norm, [(module, torch.arange(len(mask)))], mean, std, mask))
        return out
    for i, layer in enumerate(spec.layers):
        # only outputs with units and a bias or BatchNorm to fold into (the logits are the output, not units)
        if layer.name not in layers[0] or (layer.norm and not normed):
            continue
        part, name = model.layer(layer.name), layer.name
        if isinstance(part, SectionwiseLayer):
            # a layer run along another axis, one copy per section of the units passing by: the merged copy on the
            # shared units is measured and corrected (toward the endpoints' statistics over all their units); the
            # A-only and B-only sections run their own endpoint's copy, left as built
            if not part.sizes[1]:
                continue
            part, name = part.merged, f"{layer.name}.merged"
        if isinstance(part, PartitionedLayer):
            rows = part.scaled_rows()
        else:  # a depthwise conv is stored plainly, a token layer's copy is a plain layer
            rows = [(part, torch.arange(part.weight.shape[0]))]
        at, mean, std = _targets(layer.out_axis, plans, [moments[layer.name] for moments in layers], weights)
        mask = ((at.section == 1) | torch.tensor(unmerged)) & ~at.fixed
        out.append(Correction(i, name, layer.norm, rows, mean, std, mask))
    return out


def targets(spec: PermutationSpec, method: str | None) -> list[str]:
    """The outputs whose endpoint statistics REPAIR variant ``method`` (resolved, not ``auto``) corrects
    toward, which the statistics pass must measure: every output for ``repair``, those no BatchNorm reads for
    ``reset_repair``, none for ``reset`` or no correction."""
    if method not in CORRECTS:
        return []
    return [o.name for o in spec.outputs if method not in RESETS or o.norm is None]


def _targets(axis: Axis, plans: dict[str, GroupPlan] | Matchings, moments: list[Moments], weights: tuple[float, ...]
             ) -> tuple[Layout | MatchedLayout, torch.Tensor, torch.Tensor]:
    """The layout of an output axis and its units' target mean and std: the endpoints' statistics combined as
    the merge combines their units (weights ``1−α``, ``α`` for two endpoints)."""
    at = MatchedLayout.of(axis, plans) if is_matching(plans) else layout(axis, plans)
    return at, at.combine([m.mean for m in moments], weights), at.combine([m.std for m in moments], weights)


def affine(c: Correction, got: Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit ``(scale, shift)`` that give an output measured as ``got`` the target mean/std of ``c``."""
    std = got.std.cpu()
    # a unit dead in the merge or in the target (constant on the data) only gets its mean set: scaling
    # cannot revive it, and a zero scale cannot be folded into a following BatchNorm
    scale = torch.where(c.mask & (std > DEAD) & (c.std > DEAD), c.std / std.clamp_min(DEAD), torch.ones_like(std))
    shift = torch.where(c.mask, c.mean - scale * got.mean.cpu(), torch.zeros_like(scale))
    return scale, shift


@torch.no_grad()
def fold(net: nn.Module, c: Correction, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make a layer's output behave as ``scale·x + shift`` without changing module types: into the
    BatchNorm that reads it, else into its sub-layers' weights (a weight-standardised conv's gain) and biases."""
    if c.norm:
        bn = net.get_submodule(c.norm)
        # BN(s·x + t) = (γ·s)·(x − (μ_run − t)/s)/√(σ²_run + ε) + β
        bn.running_mean.copy_(((bn.running_mean.double() - shift) / scale).to(bn.running_mean.dtype))
        bn.weight.mul_(scale.to(bn.weight.dtype))
        return
    for sub, index in c.rows:
        s, t = scale[index], shift[index]
        scaled = output_scale(sub)
        scaled.mul_(s.view(-1, *([1] * (scaled.dim() - 1))).to(scaled.dtype))
        if sub.bias is not None:
            sub.bias.copy_((s * sub.bias.double() + t).to(sub.bias.dtype))


def shared_prefix(layers: list[Layer], plans: dict[str, GroupPlan], other: dict[str, GroupPlan]) -> int:
    """How many leading layers (in forward order) read and write only groups planned alike in both."""
    for i, layer in enumerate(layers):
        if any(not plans[g].same(other[g]) for g in layer.groups):
            return i
    return len(layers)


@torch.no_grad()
def _copy_layer(model: PartialMergedModel, source: PartialMergedModel, layer: Layer) -> None:
    for name in filter(None, (layer.name, layer.norm)):
        model.net.get_submodule(name).load_state_dict(source.net.get_submodule(name).state_dict())


def _along(dim: int, scale: torch.Tensor, shift: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``scale·values + shift`` with the per-unit vectors along ``dim``."""
    shape = [1] * values.dim()
    shape[dim] = -1
    return values * scale.view(shape).to(values) + shift.view(shape).to(values)


class Sweep:
    """REPAIR of one merge carried through its calibration activations (see the module docstring).

    ``todo``: the corrections still to make, in forward order (none for a merge that is already repaired or
    not to be repaired: the sweep then only carries activations, for scoring or for branches).
    """

    def __init__(self, model: PartialMergedModel, plans: dict[str, GroupPlan], stats: Statistics | None,
                 acts: Activations, todo: list[Correction], unmerged: bool, normed: bool, reset: _Reset | None = None):
        self.model, self.plans, self.stats, self.acts = model, plans, stats, acts
        self.todo, self.unmerged, self.normed, self.reset = list(todo), unmerged, normed, reset

    @classmethod
    def start(cls, model: PartialMergedModel, plans: dict[str, GroupPlan], stats: Statistics | None, data: Batches,
              *, correct: bool = True, unmerged: bool = False, normed: bool = True, reset: bool = False,
              device: torch.device | str = "cpu", memory: float = float("inf")) -> Sweep:
        """A sweep from the input, keeping at most ``memory`` bytes of activations in memory (the rest in a
        temporary folder); with ``correct`` it makes every REPAIR correction of ``model`` (as
        :func:`corrections` says for ``unmerged`` and ``normed``); with ``reset``, RESET (:class:`_Reset`) goes
        in front of them, carried through a second set of activations (each set then gets half of ``memory``)."""
        model.eval().to(device)
        todo = corrections(model, plans, stats, unmerged, normed) if correct else []
        program, memory = Program(model.net), memory / 2 if reset else memory
        acts = Activations(program, model.net, data, device, memory)
        resetting = _Reset.start(model.net, Activations(program, model.net, data, device, memory)) if reset else None
        return cls(model, plans, stats, acts, todo, unmerged, normed, resetting)

    def run(self, until: int | None = None, progress: str | bool = False) -> PartialMergedModel:
        """Make the corrections of the layers in front of layer ``until`` of the spec (all of them: None),
        with a progress bar titled ``progress``; with ``until``, also carry the activations up to that
        layer's node."""
        program, layers = self.acts.program, self.model.spec.layers
        now = [c for c in self.todo if until is None or c.index < until]
        if self.reset is not None:  # RESET ahead of every correction: they are made on its statistics
            self.reset.advance(self._reset_stop(until, now))
        self.todo = self.todo[len(now):]
        for c in progress_bar(now, progress):
            index, module = program.node_of(c.name), self.model.net.get_submodule(c.name)
            got, dim = Moments(), unit_dim(module)
            keep = program.runs_itself(index, c.name)  # carry on the corrected output instead of running it again
            self.acts.observe(index, module, lambda out: got.add(out, dim), keep)
            scale, shift = affine(c, got.summed())
            fold(self.model.net, c, scale, shift)
            if keep and c.norm is None:  # corrected in the layer itself (a following norm reads the output as it is)
                self.acts.transform(functools.partial(_along, dim, scale, shift))
        if until is not None and until < len(layers):
            self.acts.advance(program.node_of(layers[until].name))
        return self.model

    def _reset_stop(self, until: int | None, now: list[Correction]) -> int:
        """Where RESET must be before the corrections ``now`` of the layers in front of layer ``until``: at that
        layer's node, or past the node of a correction in a module fx keeps whole, which runs all of it."""
        program, layers = self.acts.program, self.model.spec.layers
        stop = len(program.nodes) if until is None or until >= len(layers) else program.node_of(layers[until].name)
        return max([stop, *(program.node_of(c.name) + 1 for c in now)])

    def branches_exactly(self, plans: dict[str, GroupPlan]) -> bool:
        """Whether :meth:`branch` can continue the merge of ``plans`` from this sweep. Without RESET always;
        with it, unless RESET has to pass the node of the first layer planned differently before the branch
        starts: a module fx keeps whole that holds that layer and a correction in front of it (MobileViT's
        transformer blocks), whose BatchNorms the branch must re-estimate and this sweep has already
        finished."""
        layers = self.model.spec.layers
        first = shared_prefix(layers, plans, self.plans)
        if self.reset is None or first >= len(layers):
            return True
        now = [c for c in self.todo if c.index < first]
        return max(self.reset.acts.position, self._reset_stop(first, now)) <= self.acts.program.node_of(
            layers[first].name)

    def branch(self, model: PartialMergedModel, plans: dict[str, GroupPlan], correct: bool = True) -> Sweep:
        """The sweep of another merge of the same endpoints and settings (built, not yet repaired), started
        where the two are first planned differently: this sweep is carried up to that layer, ``model`` takes
        its corrections in front of it and continues from its activations there. Branches must come in
        forward order of their first difference (a sweep only moves forward). With RESET, ``model`` takes
        the BatchNorm statistics in front too and continues RESET from this sweep's train-mode activations,
        which :meth:`branches_exactly` must allow."""
        if not self.branches_exactly(plans):
            raise ValueError("RESET has passed the first changed layer's node: start this merge from the input")
        first = shared_prefix(self.model.spec.layers, plans, self.plans)
        self.run(until=first)
        for layer in self.model.spec.layers[:first]:
            _copy_layer(model, self.model, layer)
        model.eval().to(next(self.model.parameters()).device)
        todo = corrections(model, plans, self.stats, self.unmerged, self.normed) if correct else []
        program = Program(model.net)
        reset = None if self.reset is None else self.reset.fork(program, model.net)
        return Sweep(model, plans, self.stats, self.acts.fork(program, model.net),
                     [c for c in todo if c.index >= first], self.unmerged, self.normed, reset)

    def finish(self) -> torch.Tensor:
        """Make the remaining corrections and return the repaired model's outputs on the calibration data."""
        self.run()
        return self.acts.result()


def repair(model: PartialMergedModel, plans: dict[str, GroupPlan], stats: Statistics, data: Batches, *,
           unmerged: bool = False, normed: bool = True, device: torch.device | str = "cpu",
           memory: float = float("inf")) -> PartialMergedModel:
    """Correct every hidden layer's pre-activation statistics in place (``normed=False``: only those no BatchNorm
    reads), front to back, in one sweep that keeps at most ``memory`` bytes of activations in memory."""
    return Sweep.start(model, plans, stats, data, unmerged=unmerged, normed=normed, device=device,
                       memory=memory).run(progress="REPAIR")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def resolve(method: str | None, model: nn.Module) -> str | None:
    """The REPAIR variant ``method`` means for ``model``: ``auto`` is ``reset_repair`` for a model with
    BatchNorm and ``repair`` for one without (what the panel of examples/panel.py measured best per kind of
    model); any other method is itself."""
    if method != AUTO:
        return method
    return "reset_repair" if has_batchnorm(model) else "repair"


def _resettable(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BatchNorms RESET re-estimates, by name; an error a user can act on where there are none."""
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if not norms:
        raise UsageError("repair='reset' and 'reset_repair' re-estimate BatchNorm statistics, but the model has "
                         "none; use 'repair'")
    return norms


@contextmanager
def _estimating(norms: list[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """``norms`` in train mode with a cumulative average (momentum None) while the block runs: each batch they
    see adds to their running statistics with equal weight, as RESET wants."""
    momenta = [n.momentum for n in norms]
    for n in norms:
        n.momentum = None
        n.train()
    try:
        yield
    finally:
        for n, mom in zip(norms, momenta):
            n.momentum = mom
            n.eval()


@torch.no_grad()
def _averaged(norms: list[nn.modules.batchnorm._BatchNorm]) -> None:
    """Each process averaged its own batches' statistics: weight them by batch count over every process."""
    for n in norms:
        count = n.num_batches_tracked.double()
        mean, var, count = total(n.running_mean * count, n.running_var * count, count)
        n.running_mean.copy_(mean / count)
        n.running_var.copy_(var / count)
        n.num_batches_tracked.copy_(count)


@torch.no_grad()
def reset_norms(model: nn.Module, data: Batches, device: torch.device | str = "cpu") -> nn.Module:
    """REPAIR's RESET: recompute every BatchNorm's running statistics on ``data`` (cumulative average)."""
    norms = list(_resettable(model).values())
    model.eval().to(device)
    for n in norms:
        n.reset_running_stats()
    with _estimating(norms):
        for x, _ in batches(data, device):
            model(x)
    _averaged(norms)
    return model


class _Reset:
    """RESET carried through calibration activations of its own, so that a budget candidate branched off a
    reference merge re-estimates only the BatchNorms from its first changed layer on (a suffix pass, like its
    REPAIR). RESET runs the model in train mode (each BatchNorm normalises by its batch's statistics), so its
    activations are not the sweep's; and it comes before every REPAIR correction, so a :class:`Sweep` keeps it
    ahead of its own position. Moving it past a BatchNorm's node finishes that BatchNorm's statistics, which
    are then the ones :func:`reset_norms` gives."""

    def __init__(self, net: nn.Module, acts: Activations):
        self.acts, self.norms = acts, _resettable(net)
        self.node = {name: acts.program.node_of(name) for name in self.norms}

    @classmethod
    @torch.no_grad()
    def start(cls, net: nn.Module, acts: Activations) -> _Reset:
        """RESET of ``net`` from the input (``acts`` at position 0): every BatchNorm's statistics start over."""
        out = cls(net, acts)
        for n in out.norms.values():
            n.reset_running_stats()
        return out

    def advance(self, stop: int) -> None:
        """Carry RESET up to node ``stop``, finishing the BatchNorms in front of it."""
        passed = [m for name, m in self.norms.items() if self.acts.position <= self.node[name] < stop]
        with _estimating(passed):
            self.acts.advance(max(stop, self.acts.position))
        _averaged(passed)

    @torch.no_grad()
    def fork(self, program: Program, net: nn.Module) -> _Reset:
        """RESET of another merge (``net``, traced as ``program``) that equals this one in front of the position:
        its BatchNorms there take these finished statistics, the others start over."""
        out = _Reset(net, self.acts.fork(program, net))
        for name, norm in out.norms.items():
            if self.node[name] < self.acts.position:
                norm.load_state_dict(self.norms[name].state_dict())
            else:
                norm.reset_running_stats()
        return out


def apply(model: PartialMergedModel, method: str | None, plans: dict[str, GroupPlan], stats: Statistics | None,
          data: Batches | None, *, unmerged: bool = False, device: torch.device | str = "cpu",
          memory: float = float("inf")) -> PartialMergedModel:
    """Run the chosen REPAIR variant (None = leave the merge as built); ``memory`` as in :func:`repair`."""
    if method is None:
        return model
    if method not in REPAIRS:
        raise UsageError(f"unknown repair {method!r}; choose one of {REPAIRS}, {AUTO!r} (resolved for the model "
                         "by resolve()) or None")
    if data is None:
        raise UsageError(f"repair={method!r} needs calibration data")
    if method in RESETS:
        reset_norms(model, data, device)
    if method in CORRECTS:
        repair(model, plans, stats, data, unmerged=unmerged, normed=method not in RESETS, device=device,
               memory=memory)
    return model
