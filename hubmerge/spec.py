"""The permutation spec: the one description of a model's unit structure that every stage reads.

A *group* is a set of interchangeable units (neurons, channels, the dims of one attention head) that must be
permuted together wherever they appear. The primary table, ``axes``, says for every state tensor and every
dim which units its positions hold, as a list of :class:`Segment` s: a conv's output axis is one segment of
its group; the input axis of a layer after a concatenation has one segment per concatenated group; a Linear
reading a flattened C×H×W map holds each channel H·W times (``repeat``); a fused ``qkv`` projection holds
one segment per head. Everything else (matching's unit vectors, permutations, REPAIR's layers, costs) is a
view of that table. Specs are derived from the model's traced computation (:mod:`hubmerge.trace`), never
written by hand.

``outputs`` are the conv/linear modules REPAIR corrects. ``layers``, ``norms``, ``vectors`` and ``heads``
are the view the partitioned build uses: conv/linear modules whose axes hold whole groups (or fixed
positions) and depthwise convs, with the BatchNorm that follows; norms (LayerNorm, GroupNorm(1), GRN,
layer-scale modules), which become partitioned norms where their group widens; per-unit tensors elsewhere
(a block's layer-scale vector); attention heads, merged or kept apart whole. Where a model has parameters
outside that view (a weight read by another module's forward, a conv applied twice), ``partial`` says why
widening groups is not available yet; full merges (γ=0) work for every derived spec. Where only some groups
cannot widen (an op mixes their units that neither a partitioned norm nor whole heads reproduce: attention whose
head count cannot be raised), ``fixed`` says why for each, and partial merges widen the others. ``across``: layers
run along another axis than units passing them by (a token-mixing MLP on a residual stream), of which every
section of those units runs its own copy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Segment:
    """A run of positions along one tensor dim: ``width`` units of ``group`` (None = fixed positions, never
    permuted), each repeated ``repeat`` times contiguously, in the group's unit order ``order``
    (None = 0, 1, …, width−1)."""

    group: str | None
    width: int
    repeat: int = 1
    order: tuple[int, ...] | None = None
    # laid out with the segment before it: both hold one attention head's dims, which a head kept apart lays out
    # whole, A's head then B's (a fused qkv of q, k, v head by head: MaxViT); else each segment on its own
    joined: bool = False

    @property
    def size(self) -> int:
        return self.width * self.repeat

    def units(self) -> torch.Tensor:
        return torch.arange(self.width) if self.order is None else torch.tensor(self.order)


Axis = tuple[Segment, ...]


@dataclass(frozen=True)
class Point:
    """Where a group is observed: the output of ``module`` along ``dim``; ``positions[r][u]`` is where unit
    ``u`` sits in the r-th place the group occupies there (a grouped conv's input holds it once per block)."""

    module: str
    dim: int
    positions: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Group:
    """Units permuted together; ``observe``: points whose activations carry them (for matching);
    ``normalised``: an op (LayerNorm, softmax, attention) mixes them, so widening is not exact; ``ordered``: a
    rotary embedding pairs them by position (EVA's q/k dims), so every alignment keeps their order (the
    identity) and they move only as a whole, with their attention head."""

    name: str
    width: int
    observe: tuple[Point, ...]
    normalised: bool = False
    ordered: bool = False


@dataclass(frozen=True)
class Layer:
    """A conv or linear module whose output and input axes hold whole segments of groups (or fixed positions).

    ``out_axis`` and ``in_axis`` are the module weight's axes from the spec's table, with fixed positions as
    segments of group None (an image's channels, the logits): most layers map one group to one group; a
    fused ``qkv`` projection writes one segment per head and per q/k/v, an attention's output projection
    reads one per head, and a Linear that reads a flattened C×H×W map holds each input unit ``H·W`` times
    (``repeat``). ``norm`` is the BatchNorm applied to this layer's output, if any. ``depthwise``: a
    depthwise conv, which filters each unit of its group on its own (input group = output group); its
    weight is per unit, like a norm's, and widens without zero blocks. ``blocks``: a grouped conv's blocks
    (ResNeXt, RegNet), each writing one segment of ``out_axis`` from its own copy of ``in_axis`` (the
    weight's input axis is one block's); widened, every block is laid out ``[A-only | shared | B-only]``.
    ``standardised``: a weight-standardised conv (timm's ``ScaledStdConv2d``, NF-Nets), which standardises
    each output unit's weights over its inputs and scales them by a per-unit gain; partitioned, it
    standardises each endpoint's view of the inputs on its own (:class:`~hubmerge.partitioned.PartitionedStdConv`).
    """

    name: str
    out_axis: Axis
    in_axis: Axis
    norm: str | None = None
    depthwise: bool = False
    blocks: int = 1
    standardised: bool = False

    @property
    def groups(self) -> set[str]:
        """Every group the layer reads or writes."""
        return {s.group for s in self.out_axis + self.in_axis if s.group is not None}

    @property
    def out_group(self) -> str | None:
        """The group of an output axis that holds one group (None: fixed, the logits)."""
        return _only(self.out_axis)

    @property
    def in_group(self) -> str | None:
        """The group of an input axis that holds one group (None: fixed, the image channels)."""
        return _only(self.in_axis)


def _only(axis: Axis) -> str | None:
    groups = {s.group for s in axis}
    if len(groups) != 1:
        raise ValueError(f"an axis of segments of {sorted(map(str, groups))} holds more than one group")
    return groups.pop()


@dataclass(frozen=True)
class Output:
    """A conv/linear module whose output units REPAIR renormalises, and the BatchNorm that reads its output
    directly (the correction folds into that norm, else into the module's weight and bias)."""

    name: str
    norm: str | None = None


@dataclass(frozen=True)
class Norm:
    """A module that acts on the units of ``axis`` (whole groups in unit order, usually one) along ``dim`` of
    its input (negative, from the end) and keeps them there, whose parameters are per-unit vectors, and inside
    which nothing but a normalisation mixes units: a LayerNorm, GroupNorm(1), GRN, a layer-scale module. Where
    a group is widened it becomes a partitioned norm: the A-view (A's units: ``[A-only | shared]`` of every
    segment) and the B-view (``[shared | B-only]``) go through the module separately, as each endpoint
    normalises its own units."""

    name: str
    axis: Axis
    dim: int


@dataclass(frozen=True)
class Vector:
    """A state tensor outside conv/linear layers and norms with one dim holding units (a layer-scale vector, a
    class token, a positional table along channels, a BatchNorm's tensors on a concatenation): it widens like
    a norm's parameters, along ``dim``, which holds ``axis``."""

    key: str
    axis: Axis
    dim: int


@dataclass(frozen=True)
class Width:
    """A module attribute holding the width its forward cuts an output to, where the cut keeps every unit of
    ``axis`` (GhostNet's ``out[:, :out_chs]``): the partitioned model sets it to the merged width."""

    module: str
    attribute: str
    axis: Axis


@dataclass(frozen=True)
class Across:
    """A layer of the view applied along another dim than the one holding the units of ``axis``, at ``dim`` of
    its input (a Mixer's or ResMLP's token-mixing MLP: the same weights for every channel of the stream). Where
    those units widen, every section of them runs its own copy of the layer, as each endpoint ran its own: A's
    on A-only units, B's on B-only ones, the merged layer on shared ones
    (:class:`~hubmerge.partitioned.SectionwiseLayer`); the layer's own groups keep their width."""

    layer: str
    axis: Axis
    dim: int


@dataclass(frozen=True)
class Heads:
    """The heads of one attention module, in order, each as the groups of its q/k dims and of its v dims.

    Within a head, q and k share one permutation and v another; widening part of a head would change its
    scores, so a head is merged or kept apart whole: kept apart, A's head and B's head are two heads of
    the merged attention, which then has more heads (``num_heads`` of the module grows)."""

    module: str
    heads: tuple[tuple[str, ...], ...]
    # (state key, dim) of per-head tables (a relative position bias): one entry per head along dim, so a head
    # kept apart takes A's entry and B's, a merged one their interpolation
    tables: tuple[tuple[str, int], ...] = ()

    @property
    def groups(self) -> tuple[str, ...]:
        """The groups of every head, head by head."""
        return sum(self.heads, ())

    def apart(self, partition: dict[str, tuple[int, int, int]]) -> int:
        """How many heads ``partition`` keeps apart (each endpoint then runs its own)."""
        return sum(partition[head[0]][0] > 0 for head in self.heads)

    def sources(self, order: torch.Tensor) -> dict[str, str]:
        """For the heads reordered so that head i holds what head ``order[i]`` held: group → the group whose
        units it takes (the same role, q/k or v, of the source head)."""
        return {g: s for i, j in enumerate(order.tolist()) for g, s in zip(self.heads[i], self.heads[j]) if g != s}


@dataclass(frozen=True)
class PermutationSpec:
    """Groups, the per-axis table of every state tensor, and the derived layer view (forward order)."""

    family: str
    groups: dict[str, Group]
    axes: dict[str, tuple[Axis | None, ...]]
    layers: tuple[Layer, ...]
    partial: str | None = None  # why groups cannot be widened (partial merging); None: they can
    outputs: tuple[Output, ...] = ()
    norms: tuple[Norm, ...] = ()
    vectors: tuple[Vector, ...] = ()
    heads: tuple[Heads, ...] = ()
    # groups that must widen alike: the blocks of a grouped conv, which the merged conv keeps equally wide
    ties: tuple[tuple[str, ...], ...] = ()
    # constant zero vectors outside the state (BEiT's k bias) that hold units: the merged model widens them
    # with zeros, and permutations leave them as they are
    zeros: tuple[Vector, ...] = ()
    # groups that keep their width in partial merges (always merged), each with why it cannot widen
    fixed: dict[str, str] = field(default_factory=dict)
    # module attributes holding a width the forward cuts to, which the partitioned model sets (GhostNet)
    widths: tuple[Width, ...] = ()
    # layers applied along another dim than units passing them by, which run one copy per section of those
    across: tuple[Across, ...] = ()

    @property
    def support(self) -> str:
        """``partial`` (every group can widen), ``some`` (the ``fixed`` groups cannot) or ``full`` (full merges
        only, ``partial`` says why)."""
        return "full" if self.partial is not None else "some" if set(self.fixed) - self.copied() else "partial"

    def copied(self) -> set[str]:
        """Groups of the layers that every section of the units passing them by runs a copy of (:class:`Across`):
        they keep their width, yet γ=1 is still the ensemble, as each endpoint's section runs its own copy."""
        names = {a.layer for a in self.across}
        return {g for layer in self.layers if layer.name in names for g in layer.groups}

    def widenable(self) -> list[str]:
        """The groups a partial merge may widen (none where ``partial`` says why)."""
        return [] if self.partial is not None else [g for g in self.groups if g not in self.fixed]

    def with_fixed(self, fixed: dict[str, str]) -> PermutationSpec:
        """The spec with ``fixed`` groups (group → why) kept at their width too, and with what widens alike:
        the tied blocks of a grouped conv, every group of an attention's heads. Where no group is left to
        widen, partial merging is unavailable and ``partial`` gives the first reason."""
        out = dict(self.fixed)
        for g, why in fixed.items():
            out.setdefault(g, why)
        for together in [*self.ties, *(h.groups for h in self.heads)]:
            why = next((out[g] for g in together if g in out), None)
            if why is not None:
                out.update({g: out.get(g, why) for g in together})
        partial = self.partial
        if partial is None and out and len(out) == len(self.groups):
            partial = next(iter(out.values()))
        return dataclasses.replace(self, fixed=out, partial=partial)

    def with_whole_heads(self, modules: set[str]) -> PermutationSpec:
        """The spec with the heads of the attention ``modules`` laid out whole wherever their dims lie side by side
        (a fused projection read head by head): consecutive segments of one head are ``joined``, so a head kept
        apart is A's head, then B's (:func:`~hubmerge.partial.layout`)."""
        head = {g: (h.module, i) for h in self.heads if h.module in modules for i, dims in enumerate(h.heads)
                for g in dims}

        def join(axis: Axis | None) -> Axis | None:
            if axis is None:
                return None
            out: list[Segment] = []
            for seg in axis:
                together = bool(out) and seg.group in head and head.get(out[-1].group) == head[seg.group]
                out.append(dataclasses.replace(seg, joined=together))
            return tuple(out)

        layers = tuple(dataclasses.replace(layer, out_axis=join(layer.out_axis), in_axis=join(layer.in_axis))
                       for layer in self.layers)
        axes = {name: tuple(join(a) for a in held) for name, held in self.axes.items()}
        return dataclasses.replace(self, layers=layers, axes=axes)

    def tie_of(self) -> dict[str, tuple[str, ...]]:
        """group → the groups it must widen alike with (itself among them), for tied groups."""
        return {g: tie for tie in self.ties for g in tie}

    def head_of(self) -> dict[str, Heads]:
        """group → the attention whose heads it belongs to (for groups that belong to one)."""
        return {g: h for h in self.heads for g in h.groups}

    def occurrences(self, name: str, dim: int, group: str) -> list[torch.Tensor]:
        """Position indices of ``group`` along ``dim`` of tensor ``name``: one (width, repeat) matrix per
        segment of the group, row u holding unit u's positions."""
        out, start = [], 0
        for seg in self.axes[name][dim] or ():
            if seg.group == group:
                out.append(positions(seg, start))
            start += seg.size
        return out

    def group_axes(self, group: str) -> list[tuple[str, int]]:
        """Every (tensor, dim) on which ``group`` appears."""
        return [(name, d) for name, axes in self.axes.items() for d, axis in enumerate(axes)
                if axis and any(s.group == group for s in axis)]

    def gather(self, name: str, dim: int, perms: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Index along ``dim`` of ``name`` that applies ``perms`` (unit u of the result is unit perms[g][u]);
        None where no permuted group lies on it."""
        axis = self.axes[name][dim]
        if not axis or not any(s.group in perms for s in axis):
            return None
        parts, start = [], 0
        for seg in axis:
            if seg.group in perms:
                rows = positions(seg, start)
                parts.append(rows[perms[seg.group].to(rows.device)][seg.units()].reshape(-1))
            else:
                parts.append(torch.arange(start, start + seg.size))
            start += seg.size
        return torch.cat(parts)


    def moved(self, name: str, dim: int, sources: dict[str, str]) -> torch.Tensor | None:
        """Index along ``dim`` of ``name`` that moves whole groups: the k-th segment of group g takes the
        entries of the k-th segment of ``sources[g]`` on the same axis (the heads of one attention, alike in
        shape); None where no moved group lies on it."""
        axis = self.axes[name][dim]
        if not axis or not any(seg.group in sources for seg in axis):
            return None
        found: dict[str | None, list[tuple[int, Segment]]] = {}
        start = 0
        for seg in axis:
            found.setdefault(seg.group, []).append((start, seg))
            start += seg.size
        seen: dict[str | None, int] = {}
        parts, start = [], 0
        for seg in axis:
            k = seen[seg.group] = seen.get(seg.group, -1) + 1
            begin = start
            if seg.group in sources:
                begin, src = found[sources[seg.group]][k]
                if (src.width, src.repeat, src.order) != (seg.width, seg.repeat, seg.order):
                    raise ValueError(f"{name}: groups {seg.group} and {src.group} are laid out differently")
            parts.append(torch.arange(begin, begin + seg.size))
            start += seg.size
        return torch.cat(parts)


def positions(seg: Segment, start: int = 0) -> torch.Tensor:
    """(width, repeat) positions of one segment's units (the segment begins at ``start``), row u for unit u."""
    inverse = torch.empty(seg.width, dtype=torch.long)
    inverse[seg.units()] = torch.arange(seg.width)
    return start + inverse[:, None] * seg.repeat + torch.arange(seg.repeat)


def expand(index: torch.Tensor, repeat: int) -> torch.Tensor:
    """Expand unit indices to tensor indices when each unit spans ``repeat`` contiguous entries."""
    if repeat == 1:
        return index
    return (index[:, None] * repeat + torch.arange(repeat, device=index.device)).reshape(-1)


def head_sources(spec: PermutationSpec, orders: dict[str, torch.Tensor]) -> dict[str, str]:
    """Every group that a reordering of heads (``orders[module][i]``: the head that head i takes) moves, and
    the group it takes its units from."""
    return {g: src for h in spec.heads if h.module in orders for g, src in h.sources(orders[h.module]).items()}


def permute_heads(spec: PermutationSpec, state: dict[str, torch.Tensor], orders: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """A state dict whose attention heads are reordered: head i of module m becomes the head that was head
    ``orders[m][i]`` (its q/k and v units with it, and its entry of every per-head table). Heads are
    interchangeable as wholes, so the function of the model is unchanged."""
    sources = head_sources(spec, orders)
    out = _reindexed(spec, state, lambda name, dim: spec.moved(name, dim, sources))
    for h in spec.heads:
        if h.module in orders:
            for key, dim in h.tables:
                out[key] = out[key].index_select(dim, orders[h.module].to(out[key].device))
    return out


def permute_state(
    spec: PermutationSpec, state: dict[str, torch.Tensor], perms: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Apply per-group permutations to a state dict: unit ``i`` of the result is unit ``perms[g][i]``.

    Groups missing from ``perms`` stay as they are. The function of the model is unchanged.
    """
    return _reindexed(spec, state, lambda name, dim: spec.gather(name, dim, perms))


def _reindexed(spec: PermutationSpec, state: dict[str, torch.Tensor], index_of) -> dict[str, torch.Tensor]:
    """A state dict with every tensor of the spec's table taken along each dim in the order ``index_of(name,
    dim)`` gives (None: as it is)."""
    out = dict(state)
    for name in spec.axes:
        if name not in state:
            continue
        t = state[name]
        for dim in range(t.dim()):
            index = index_of(name, dim)
            if index is not None:
                t = t.index_select(dim, index.to(t.device))
        out[name] = t
    return out
