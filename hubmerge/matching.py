"""Merges given as matchings of units: the merge and unmerge matrices of ZipIt!'s zip and of N-way merges.

A :class:`Matching` of one group says which units of the concatenated endpoints ``[model 0 ‖ model 1 ‖ …]``
form each merged unit: a zip pairs two units of either model (:mod:`hubmerge.zipit`), an N-way permutation
merge takes one unit of every model (:mod:`hubmerge.many`), an N-way zip groups units of some or all models.
Applying it follows the spec's table: along every axis that *produces* units (a layer's output rows, a bias,
a norm's or layer scale's vector, a class token) the merged value is the weighted mean of its members, the
merge matrix M; along every axis that *reads* units (a conv/linear weight's input columns) each endpoint's
columns are summed into their merged units, the unmerge matrix U: ``W = Σ_m M_m · W_m · U_m``. An N-way merge
(or zip) is built from its matchings directly; any other zip (of two, or partial) builds one virtual endpoint
per endpoint with them (:func:`hubmerge.zipit.virtual`).

A member's weight is its model's weight ``w_m`` (``1−α`` and ``α`` for two endpoints); where a merged unit
holds several units of one model or not every model, the weights are renormalised over its members (a
pair within one model: ½ and ½).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import torch
from torch import nn

from .errors import UsageError
from .spec import Axis, PermutationSpec, positions

Weights = tuple[float, ...]
PAD = -1  # the padding of a merged unit's members where it holds fewer units than the largest one


@dataclass(frozen=True)
class Matching:
    """One group's merged units: row p of ``members`` holds the indices of its units in the concatenation of
    the endpoints' units (unit u of model m is ``m·width + u``), ascending, a row of fewer units padded at its
    end with :data:`PAD` (an N-way zip's merged units differ in size); every unit of every model is in exactly
    one row, so the merge keeps one endpoint's width."""

    width: int
    models: int
    members: torch.Tensor

    @property
    def sizes(self) -> tuple[int, int, int]:
        """(k_A, m, k_B) as a partition reads it: every unit is merged."""
        return 0, self.width, 0

    @property
    def within(self) -> tuple[int, ...]:
        """Per model, how many merged units hold more than one of its units (zip's within-model pairs)."""
        owner = self.members // self.width
        return tuple(int(((owner == m).sum(1) > 1).sum()) for m in range(self.models))

    def weights(self, w: Weights, dtype: torch.dtype, of: int | None = None) -> torch.Tensor:
        """(width, members) weights: each member's model weight, renormalised where a merged unit does not
        hold one unit of every model (equal weights where its models weigh 0 together); 0 at padding.

        With ``of``, model ``of``'s share as a virtual endpoint (:func:`hubmerge.zipit.virtual`): 1 at its
        members where a merged unit holds one unit of every model, else ``1/Σ`` (Σ its members' model
        weights), 0 at the other models' members, so that ``Σ_m w_m · weights(w, of=m) = weights(w)``."""
        real = self.members != PAD
        owner = torch.where(real, self.members // self.width, 0)
        each = torch.where(real, torch.tensor(w, dtype=dtype)[owner], 0.0)
        one_each = torch.stack([((owner == m) & real).sum(1) == 1 for m in range(self.models)]).all(0)
        total = each.sum(1, keepdim=True)
        if of is not None:
            mine = real & (owner == of)
            if ((total == 0) & mine).any():
                raise UsageError(f"a merged unit holds units of endpoints that all weigh 0 (endpoint {of}'s), "
                                 "which a zip's virtual endpoints cannot carry: weigh every endpoint above 0 "
                                 "(for two, alpha strictly between 0 and 1)")
            return torch.where(mine, torch.where(one_each[:, None], 1.0, 1.0 / total.clamp_min(
                torch.finfo(dtype).tiny)), 0.0).to(dtype)
        even = real.to(dtype) / real.sum(1, keepdim=True).to(dtype)
        renormalised = torch.where(total > 0, each / total.clamp_min(torch.finfo(dtype).tiny), even)
        return torch.where(one_each[:, None], each, renormalised)

    def targets(self, model: int) -> torch.Tensor:
        """The merged unit each unit of ``model`` goes to (the unmerge matrix as an index)."""
        out = torch.empty(self.width, dtype=torch.long)
        rows = torch.arange(self.width)[:, None].expand_as(self.members)
        mine = self.members // self.width == model
        out[self.members[mine] - model * self.width] = rows[mine]
        return out


Matchings = dict[str, Matching]


def is_matching(plans: dict) -> bool:
    """Whether ``plans`` are matchings (an N-way merge) rather than partial plans."""
    return bool(plans) and all(isinstance(p, Matching) for p in plans.values())


def members(axis: Axis, matchings: Matchings, w: Weights, dtype: torch.dtype, of: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge matrix M of an axis as an index: per merged position, the positions of its members in the
    endpoints' axes laid end to end, (positions, members), and their weights; fixed positions and groups
    without a matching take every model's own position at its model weight. With ``of``, model ``of``'s
    virtual endpoint's (:meth:`Matching.weights`; its own position at 1 where there is no matching)."""
    length, n = sum(seg.size for seg in axis), len(w)
    used = [matchings[seg.group] for seg in axis if seg.group in matchings]
    wrong = [m for m in used if m.models != n]
    if wrong:
        raise UsageError(f"a matching of {wrong[0].models} models applied to {n} models")
    size = max([n, *(m.members.shape[1] for m in used)])  # columns: members at most (padding weighs 0)
    index = torch.zeros(length, size, dtype=torch.long)
    index[:, :n] = torch.arange(length)[:, None] + length * torch.arange(n)
    weight = torch.zeros(length, size, dtype=dtype)
    weight[:, :n] = torch.tensor(w if of is None else _one(of, n), dtype=dtype)
    start = 0
    for seg in axis:
        if seg.group in matchings:
            match = matchings[seg.group]
            rows = positions(seg, start)  # (width, repeat)
            real = match.members.clamp_min(0)
            model, unit = real // match.width, real % match.width  # (width, members)
            k = match.members.shape[1]
            index[rows, :k] = (rows[unit] + length * model[:, :, None]).transpose(1, 2)
            weight[rows, :k] = match.weights(w, dtype, of)[:, None, :]
            weight[rows, k:] = 0.0
        start += seg.size
    return index, weight


def _one(model: int, count: int) -> Weights:
    """Weights that take model ``model`` alone."""
    return tuple(float(m == model) for m in range(count))


def unmerge_index(axis: Axis, matchings: Matchings, model: int) -> torch.Tensor:
    """The unmerge matrix U of one endpoint's axis as an index: the merged position each position goes to."""
    out, start = torch.arange(sum(seg.size for seg in axis)), 0
    for seg in axis:
        if seg.group in matchings:
            rows = positions(seg, start)
            out[rows] = rows[matchings[seg.group].targets(model)]
        start += seg.size
    return out


@dataclass(frozen=True)
class MatchedLayout:
    """An axis of a matched merge: REPAIR reads its per-position targets as it reads a partial
    :class:`~hubmerge.partial.Layout`'s (every unit is merged; ``fixed`` positions are the logits')."""

    axis: Axis
    matchings: Matchings
    fixed: torch.Tensor

    @classmethod
    def of(cls, axis: Axis, matchings: Matchings) -> MatchedLayout:
        return cls(axis, matchings, torch.cat([torch.full((seg.size,), seg.group is None) for seg in axis]))

    @property
    def section(self) -> torch.Tensor:
        return torch.ones(len(self.fixed), dtype=torch.long)

    def combine(self, tensors: list[torch.Tensor], w: Weights, dim: int = 0, of: int | None = None) -> torch.Tensor:
        """A per-position tensor of the merge from each endpoint's: every merged position's members, weighted
        (with ``of``: as model ``of``'s virtual endpoint holds them, :meth:`Matching.weights`)."""
        index, weight = members(self.axis, self.matchings, w, tensors[0].dtype, of)
        shape = [1] * tensors[0].dim()
        shape[dim] = -1
        every = torch.cat(tensors, dim)
        device = every.device
        parts = [weight[:, s].view(shape).to(device) * every.index_select(dim, index[:, s].to(device))
                 for s in range(index.shape[1])]
        return reduce(torch.add, parts)


def reader_dims(model: nn.Module) -> dict[str, int]:
    """weight key → the dim of its input units, for every conv/linear module (a transposed conv's is dim 0)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            out[f"{name}.weight" if name else "weight"] = 0 if getattr(m, "transposed", False) else 1
    return out


def has_units(axis: Axis | None, matchings: Matchings) -> bool:
    """Whether an axis holds units of a matched group."""
    return bool(axis) and any(s.group in matchings for s in axis)


def matched_state(spec: PermutationSpec, matchings: Matchings, models: list[nn.Module], w: Weights
                  ) -> dict[str, torch.Tensor]:
    """The state of the matched merge in the plain architecture (integer buffers from model 0): every
    tensor's reading axis unmerged per endpoint, its producing axis merged (see the module docstring);
    groups without a matching stay as they are, each position the weighted mean of the endpoints'."""
    return matched_states(spec, matchings, models, w, (None,))[0]


def matched_states(spec: PermutationSpec, matchings: Matchings, models: list[nn.Module], w: Weights,
                   shares: Sequence[int | None]) -> list[dict[str, torch.Tensor]]:
    """Per entry of ``shares``, a state as :func:`matched_state` makes it: None, the merge's; model m, the state
    of m's virtual endpoint (:func:`hubmerge.zipit.virtual`: its share of each merged unit, its own value
    elsewhere, so the virtual endpoints' states weighted by ``w`` sum to the merge's). Each tensor is unmerged
    once for all of them."""
    states = [m.state_dict() for m in models]
    readers = reader_dims(models[0])
    out = [{} for _ in shares]
    for key, first in states[0].items():
        tensors = [s[key] for s in states]
        if not first.is_floating_point():
            for state in out:
                state[key] = first
            continue
        axes = spec.axes.get(key) or ()
        read = readers.get(key)
        if read is not None and read < len(axes) and has_units(axes[read], matchings):
            tensors = [torch.zeros_like(t).index_add_(read, unmerge_index(axes[read], matchings, m).to(t.device), t)
                       for m, t in enumerate(tensors)]
        produce = [d for d, axis in enumerate(axes) if d != read and has_units(axis, matchings)]
        if len(produce) > 1:
            raise UsageError(f"cannot merge {key} by matching: units lie on its dims {produce}, and only a "
                             "conv/linear weight's input dim is known to read units")
        for state, of in zip(out, shares):
            if produce:
                state[key] = MatchedLayout.of(axes[produce[0]], matchings).combine(tensors, w, produce[0], of)
            else:
                state[key] = reduce(torch.add, [wm * t for wm, t in zip(w if of is None else _one(of, len(w)),
                                                                         tensors)])
    return out
