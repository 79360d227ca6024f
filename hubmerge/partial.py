"""Partial plan (method §4): per group, which units are merged and which stay each endpoint's own.

The layout of every group in the merged model is ``[A-only | shared | B-only]``; an N-way merge's is
``[A-only | shared | B-only | C-only | …]``: section 0 holds endpoint 0's own units, section 1 the shared
ones (one unit of every endpoint each), section i+1 endpoint i's own units (:func:`own`), so two endpoints
are the N=2 case. γ=0 is the ordinary full permutation merge, γ=1 keeps every unit of every model (the
ensemble).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from .alignment import lap
from .errors import UsageError
from .spec import Axis, Heads, PermutationSpec, positions

log = logging.getLogger("hubmerge")

Sizes = tuple[int, ...]  # a group's section sizes: (k_A, m, k_B), or (k_0, m, k_1, …, k_{N−1})
Weights = tuple[float, ...]  # the endpoints' weights: 1−α and α for two

PARTIALS = ("forced", "adaptive", "topk", "random")
SHARED = 1  # the section of shared units


def own(model: int) -> int:
    """The section of endpoint ``model``'s own units (0 for A, then 2, 3, … after the shared section)."""
    return 0 if model == 0 else model + 1


def owner(section: int) -> int | None:
    """The endpoint whose own units a section holds (None: the shared section)."""
    return None if section == SHARED else (0 if section == 0 else section - 1)


def endpoint_names(count: int) -> list[str]:
    """``a``, ``b``, ``c``, …: how reports, cards, saved configs and stored copies name ``count`` endpoints."""
    return [chr(ord("a") + i) for i in range(count)]


@dataclass(frozen=True)
class GroupPlan:
    """Unit indices (into the original, unpermuted endpoints) of each section of one group: ``only[i]`` the
    units endpoint i keeps apart, ``shared[i]`` its merged units, in merged order (merged unit p is
    ``shared[i][p]`` of every endpoint i)."""

    only: tuple[torch.Tensor, ...]
    shared: tuple[torch.Tensor, ...]

    @property
    def models(self) -> int:
        return len(self.only)

    @property
    def sizes(self) -> Sizes:
        """The sections' widths: (k_A, m, k_B) for two endpoints, (k_0, m, k_1, …) for N."""
        return len(self.only[0]), len(self.shared[0]), *(len(o) for o in self.only[1:])

    @property
    def a_only(self) -> torch.Tensor:
        return self.only[0]

    @property
    def b_only(self) -> torch.Tensor:
        return self.only[1]

    @property
    def shared_a(self) -> torch.Tensor:
        return self.shared[0]

    @property
    def shared_b(self) -> torch.Tensor:
        return self.shared[1]

    def same(self, other: GroupPlan) -> bool:
        """Whether two plans hold the same units in every section."""
        return self is other or (self.models == other.models and all(
            torch.equal(p, q) for p, q in zip((*self.only, *self.shared), (*other.only, *other.shared))))

    @classmethod
    def two(cls, a_only: torch.Tensor, shared_a: torch.Tensor, shared_b: torch.Tensor, b_only: torch.Tensor
            ) -> GroupPlan:
        """The plan of two endpoints."""
        return cls((a_only, b_only), (shared_a, shared_b))

    @classmethod
    def merged(cls, width: int, models: int = 2) -> GroupPlan:
        """Every unit merged with the unit of the same index (endpoints already in one order)."""
        every = torch.arange(width)
        return cls((every[:0],) * models, (every,) * models)

    @classmethod
    def apart(cls, width: int, models: int = 2) -> GroupPlan:
        """Every unit kept apart (an attention head that is not merged)."""
        every = torch.arange(width)
        return cls((every,) * models, (every[:0],) * models)

    @classmethod
    def from_pairs(cls, pairs_a: torch.Tensor, pairs_b: torch.Tensor, split: torch.Tensor) -> GroupPlan:
        """From matched pairs and a boolean mask of the pairs to keep apart."""
        order = torch.argsort(pairs_a)
        pairs_a, pairs_b, split = pairs_a[order], pairs_b[order], split[order]
        return cls.two(pairs_a[split], pairs_a[~split], pairs_b[~split], torch.sort(pairs_b[split]).values)

    @classmethod
    def from_members(cls, members: torch.Tensor, width: int, split: torch.Tensor) -> GroupPlan:
        """From merged units holding one unit of every endpoint (row p: endpoint i's unit ``i·width + u`` in
        column i, as an N-way alignment gives them) and a boolean mask of the merged units to keep apart."""
        units = members - torch.arange(members.shape[1]) * width
        return cls(tuple(units[split, i] for i in range(units.shape[1])),
                   tuple(units[~split, i] for i in range(units.shape[1])))


def combine_weights(section: torch.Tensor, weights: Weights, dtype: torch.dtype) -> list[torch.Tensor]:
    """Per endpoint, its weight at every position of an axis in ``section`` s: 1 on its own units, its weight
    ``w_i`` on shared ones, 0 on the other endpoints' own units."""
    out = []
    for i, w in enumerate(weights):
        table = torch.zeros(len(weights) + 1, dtype=dtype)
        table[own(i)], table[SHARED] = 1.0, w
        out.append(table[section])
    return out


def block_weights(weights: Weights, cross: Weights) -> torch.Tensor:
    """(N, N+2, N+1) float64: endpoint i's coefficient on its weight in each block (row section, column
    section) of a merged layer, method §4's table: own rows read its own and the shared columns at 1 and
    nothing else; shared rows read the shared columns at ``w_i`` and endpoint i's own columns at ``cross[i]``
    (``w_i`` for ``cross="interpolate"``, 1 for ``"fill"``); row kind N+1, a layer's fixed rows (the logits),
    reads the shared and its own columns at ``w_i``."""
    n = len(weights)
    out = torch.zeros(n, n + 2, n + 1, dtype=torch.float64)
    for i, (w, c) in enumerate(zip(weights, cross)):
        mine = own(i)
        out[i, mine, mine] = out[i, mine, SHARED] = 1.0
        out[i, SHARED, SHARED], out[i, SHARED, mine] = w, c
        out[i, n + 1, SHARED] = out[i, n + 1, mine] = w
    return out


@dataclass(frozen=True)
class Layout:
    """Where each position of an axis of the merged model comes from: ``section`` (:func:`own`: 0 A-only,
    1 shared, 2 B-only, …); ``sources[i]``: the position of endpoint i's axis it takes (0 where it takes
    none). The axis is its segments one after the other, each laid out ``[A-only | shared | B-only | …]``;
    fixed positions (``fixed``) are shared and stay where they are."""

    section: torch.Tensor
    sources: tuple[torch.Tensor, ...]
    fixed: torch.Tensor

    def combine(self, tensors: list[torch.Tensor], weights: Weights, dim: int = 0) -> torch.Tensor:
        """A per-position tensor of the merge (a bias, a norm's parameter, a REPAIR target): each endpoint's
        value on its own positions, ``Σ_i w_i·value_i`` on shared ones (``(1−α)·A + α·B`` for two)."""
        shape = [1] * tensors[0].dim()
        shape[dim] = -1
        out = None
        for t, w, at in zip(tensors, combine_weights(self.section, weights, tensors[0].dtype), self.sources):
            term = w.view(shape).to(t.device) * t.index_select(dim, at.to(t.device))
            out = term if out is None else out + term
        return out


def head_layout(heads: Heads, partition: dict[str, Sizes]) -> Layout:
    """The :class:`Layout` of the heads of the merged attention, as per-head tables (a relative position bias)
    hold them: a merged head is one head, shared; a head kept apart is A's head, then B's (then C's, …)."""
    n = len(next(iter(partition.values()))) - 1
    secs, sources = [], [[] for _ in range(n)]
    for h, head in enumerate(heads.heads):
        apart = partition[head[0]][0] > 0
        for section in ([own(i) for i in range(n)] if apart else [SHARED]):
            secs.append(section)
            for i in range(n):
                sources[i].append(h if section in (SHARED, own(i)) else 0)
    secs = torch.tensor(secs, dtype=torch.long)
    return Layout(secs, tuple(torch.tensor(s, dtype=torch.long) for s in sources),
                  torch.zeros(len(secs), dtype=torch.bool))


def _runs(axis: Axis) -> list[list[int]]:
    """The axis's segments (indices) in runs laid out together, each ``[A-only | shared | B-only]`` over the
    whole run: a segment ``joined`` to the one before it (q, k and v of one attention head, which a head kept
    apart lays out whole) shares its run; every other segment is a run of its own."""
    runs: list[list[int]] = []
    for i, seg in enumerate(axis):
        if seg.joined and runs:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def section_count(partition: dict[str, Sizes]) -> int:
    """How many sections a partition's axes have: N+1 for N endpoints (3 for two)."""
    return max(3, *(len(s) for s in partition.values()))


def padded(sizes: Sizes, count: int) -> Sizes:
    """``sizes`` with zero-width sections appended up to ``count`` sections (an N-way full merge's sizes are
    (0, m, 0); a fixed segment's, (0, width))."""
    return (*sizes, *[0] * (count - len(sizes)))


def apart_sizes(width: int, k: int, models: int = 2) -> Sizes:
    """The sizes of a group of ``width`` units with k merged units kept apart by each of ``models`` endpoints:
    (k, width − k, k) for two, (k, width − k, k, …, k) for N."""
    return (k, width - k, *[k] * (models - 1))


def sections(axis: Axis, partition: dict[str, Sizes]) -> torch.Tensor:
    """The section (:func:`own`: 0 A-only, 1 shared, 2 B-only, …) of every position of ``axis`` in the merged
    model."""
    count, parts = section_count(partition), []
    for run in _runs(axis):
        for i in range(count):
            for seg in (axis[j] for j in run):
                sizes = partition[seg.group] if seg.group is not None else (0, seg.width)
                n = sizes[i] if i < len(sizes) else 0
                parts.append(torch.full((n * seg.repeat,), i, dtype=torch.long))
    return torch.cat(parts)


def layout(axis: Axis, plans: dict[str, GroupPlan]) -> Layout:
    """The :class:`Layout` of ``axis`` (from the spec's table) under ``plans``."""
    n = next(iter(plans.values())).models
    per_segment, start = [], 0
    for seg in axis:
        rows = positions(seg, start)
        plan = plans.get(seg.group) if seg.group is not None else None
        # per section: the positions each endpoint's axis gives it (None: that endpoint gives none)
        parts: list[list[torch.Tensor | None]] = [[None] * n for _ in range(n + 1)]
        if plan is None:
            parts[SHARED] = [rows.reshape(-1)] * n
        else:
            parts[SHARED] = [rows[s].reshape(-1) for s in plan.shared]
            for i, units in enumerate(plan.only):
                parts[own(i)][i] = rows[units].reshape(-1)
        per_segment.append((seg, parts))
        start += seg.size
    secs, sources, fixed = [], [[] for _ in range(n)], []
    for run in _runs(axis):
        for section in range(n + 1):
            for seg, parts in (per_segment[j] for j in run):
                given = parts[section]
                size = next((len(t) for t in given if t is not None), None)
                if size is None:
                    continue
                secs.append(torch.full((size,), section, dtype=torch.long))
                for i, t in enumerate(given):
                    sources[i].append(t if t is not None else torch.zeros(size, dtype=torch.long))
                fixed.append(torch.full((size,), seg.group is None))
    return Layout(torch.cat(secs), tuple(torch.cat(s) for s in sources), torch.cat(fixed))


def _relaxed(scores: torch.Tensor, k: int, fill: tuple[float, float]) -> GroupPlan:
    """LAP on the score matrix padded with k buffer slots per side.

    ``fill = (real–buffer, buffer–buffer)``: (+1, −1) forces exactly k splits (forced buffers); (ε, ε)
    splits a pair only where its score is below ε, at most k times (adaptive buffers).
    """
    n = scores.shape[0]
    if k == 0:  # no buffers: the ordinary assignment, without padding
        return GroupPlan.from_pairs(torch.arange(n), lap(scores), torch.zeros(n, dtype=torch.bool))
    if k == n and fill[0] > fill[1]:  # forced with every unit split: nothing left to match
        return GroupPlan.apart(n)
    padded = torch.full((n + k, n + k), fill[1], dtype=torch.float64)
    padded[:n, :n] = scores
    padded[:n, n:] = fill[0]
    padded[n:, :n] = fill[0]
    match = lap(padded)
    a = torch.arange(n)
    partner = match[:n]
    matched = partner < n
    b_matched = partner[matched]
    b_only = torch.tensor(sorted(set(range(n)) - set(b_matched.tolist())), dtype=torch.long)
    return GroupPlan.two(a[~matched], a[matched], b_matched, b_only)


def _worst(quality: torch.Tensor, k: int, method: str, epsilon: float, seed: int) -> torch.Tensor:
    """The mask of the merged units to keep apart, of those whose members' score is ``quality``: the k worst
    (``topk``; Semi-Ensemble's rule), of those at most the ones below ε (``adaptive``), or k at random."""
    split = torch.zeros(len(quality), dtype=torch.bool)
    if k:
        if method == "random":
            worst = torch.as_tensor(np.random.default_rng(seed).choice(len(quality), size=k, replace=False))
        else:
            worst = torch.argsort(quality, stable=True)[:k]
            if method == "adaptive":
                worst = worst[quality[worst] < epsilon]
        split[worst] = True
    return split


def plan_group(scores: torch.Tensor, gamma: float, method: str = "forced", *, epsilon: float = 0.0,
               seed: int = 0, members: torch.Tensor | None = None) -> GroupPlan:
    """Plan one group from its A×B score matrix; ``gamma`` is the (maximum) share of units kept apart.

    Endpoints already matched (``members``: an N-way alignment's merged units, one unit of every endpoint
    each) are planned from ``scores`` per merged unit, their members' mean correlation: the matching fixes
    which units would merge, so forced and top-k buffers alike keep apart the k merged units that score
    least, adaptive ones those of them below ε, random ones k at random."""
    if not 0.0 <= gamma <= 1.0:
        raise UsageError(f"gamma must be in [0, 1], got {gamma}")
    if method not in PARTIALS:
        raise UsageError(f"unknown partial method {method!r}; choose one of {PARTIALS}")
    n = scores.shape[0]
    k = round(gamma * n)
    scores = scores.double().cpu()
    if members is not None:
        return GroupPlan.from_members(members, n, _worst(scores, k, method, epsilon, seed))
    if method == "forced":
        return _relaxed(scores, k, (1.0, -1.0))
    if method == "adaptive":
        return _relaxed(scores, k, (epsilon, epsilon))
    a = torch.arange(n)
    b = lap(scores)
    return GroupPlan.from_pairs(a, b, _worst(scores[a, b], k, method, epsilon, seed))


def gammas_for(spec: PermutationSpec, gamma: float | dict[str, float]) -> dict[str, float]:
    """Expand a scalar γ to every group that can widen (fixed groups, :attr:`~hubmerge.spec.PermutationSpec.fixed`,
    stay merged: γ=0); check a dict names only known groups or attention modules (whose γ goes to the groups of
    all their heads: round(γ·heads) kept apart), and no fixed group with γ > 0. Tied groups (a grouped conv's
    blocks) all take the largest γ given to any of them, as the merged conv's blocks widen alike."""
    if isinstance(gamma, dict):
        modules = {h.module: h.groups for h in spec.heads}
        unknown = sorted(set(gamma) - set(spec.groups) - set(modules))
        if unknown:
            raise UsageError(f"gamma names unknown groups {unknown}; groups are {list(spec.groups)}"
                             + (f", attention modules {list(modules)}" if modules else ""))
        per_group = {g: float(v) for name, v in gamma.items() for g in modules.get(name, (name,))}
        fixed = sorted(g for g, v in per_group.items() if v and g in spec.fixed)
        if fixed:
            raise UsageError(f"gamma > 0 for groups {fixed}, which cannot widen ({spec.fixed[fixed[0]]}); "
                             "they are always merged")
        tie = spec.tie_of()
        return {g: max(per_group.get(t, 0.0) for t in tie.get(g, (g,))) for g in spec.groups}
    return {g: 0.0 if g in spec.fixed else float(gamma) for g in spec.groups}


def check_widenable(spec: PermutationSpec, what: str) -> None:
    """Refuse ``what`` (a γ > 0, a budget) where the spec's groups cannot be widened yet, saying why."""
    if spec.partial is not None:
        raise UsageError(f"{what} needs partial merging, which the {spec.family} family does not support yet "
                         f"({spec.partial}); a full merge (gamma=0, no budget) works")


def plan(spec: PermutationSpec, scores: dict[str, torch.Tensor], gamma: float | dict[str, float],
         method: str = "forced", *, epsilon: float = 0.0, seed: int = 0,
         cache: dict[tuple, GroupPlan] | None = None, matchings: dict | None = None) -> dict[str, GroupPlan]:
    """Plans for every group (γ per group, a scalar meaning the same γ everywhere); the groups of attention
    heads are planned per head (:func:`_plan_heads`). For N endpoints already aligned (``matchings``: one
    :class:`~hubmerge.matching.Matching` per group, :mod:`hubmerge.many`), ``scores`` are per merged unit
    (:func:`plan_group`).

    A group's plan depends only on its own scores, γ and the method, so ``cache`` (keyed by those) lets
    the budget search re-plan only the groups it changes. Tied groups (a grouped conv's blocks) keep equally
    many units apart: where adaptive buffers split a different number in each, all keep the largest number
    apart, by forced buffers.
    """
    if any(gamma.values()) if isinstance(gamma, dict) else gamma:
        check_widenable(spec, "gamma > 0")
    if not isinstance(gamma, dict) and gamma and spec.fixed:
        log.info("gamma=%s widens %d of %d groups; the others are always merged (%s)", gamma,
                 len(spec.widenable()), len(spec.groups), next(iter(spec.fixed.values())))
    gammas = gammas_for(spec, gamma)
    cache = {} if cache is None else cache

    def planned(g: str, gamma: float, method: str, i: int) -> GroupPlan:
        key = (g, gamma, method, epsilon, seed)
        if key not in cache:
            cache[key] = plan_group(scores[g], gamma, method, epsilon=epsilon, seed=seed + i,
                                    members=None if matchings is None else matchings[g].members)
        return cache[key]

    def quality(p: GroupPlan, g: str) -> torch.Tensor:  # the merged units' scores in p's merged order
        return scores[g].double() if matchings is not None else scores[g].double()[p.shared_a, p.shared_b]

    heads = spec.head_of()
    out = {g: planned(g, gammas[g], method, i) for i, g in enumerate(spec.groups) if g not in heads}
    for tie in spec.ties:
        apart = max(out[g].sizes[0] for g in tie)
        if any(out[g].sizes[0] != apart for g in tie):
            out.update({g: planned(g, apart / spec.groups[g].width, "forced", 0) for g in tie})
    for h in spec.heads:
        merged = {g: planned(g, 0.0, "forced", 0) for g in h.groups}
        out.update(_plan_heads(h, merged, {g: quality(p, g) for g, p in merged.items()}, gammas,
                               epsilon if method == "adaptive" else None))
    return {g: out[g] for g in spec.groups}


def _plan_heads(heads: Heads, merged: dict[str, GroupPlan], scores: dict[str, torch.Tensor],
                gammas: dict[str, float], threshold: float | None = None) -> dict[str, GroupPlan]:
    """Heads are merged or kept apart whole. Of the module's H heads, round(Σ γ_h) are kept apart (γ_h: the
    largest γ of the head's groups, so a scalar γ keeps round(γ·H) apart and γ=1 on one head's group keeps
    that head apart), those with the largest γ_h first, among equals those whose matched dims correlate
    least (the mean of ``scores``, per merged unit of ``merged``, the full-merge plans); with adaptive buffers
    (``threshold`` = ε) only heads scoring below ε. Kept apart, every unit of the head's groups is apart;
    merged, the groups take their full-merge plans."""
    want = [max(gammas[g] for g in head) for head in heads.heads]
    quality = [float(np.mean([scores[g].mean().item() for g in head])) for head in heads.heads]
    ranked = sorted(range(len(want)), key=lambda h: (-want[h], quality[h], h))[:math.floor(sum(want) + 0.5)]
    apart = {h for h in ranked if threshold is None or quality[h] < threshold}
    return {g: GroupPlan.apart(len(merged[g].shared_a), merged[g].models) if h in apart else merged[g]
            for h, head in enumerate(heads.heads) for g in head}


@dataclass(frozen=True)
class Choice:
    """What a budget widens, in forward order: one group of ``width`` units, the ``width`` heads of one
    attention module (``heads``), kept apart whole, or tied groups of ``width`` units each (``tied``: a grouped
    conv's blocks), as many units of each."""

    name: str
    width: int
    heads: Heads | None = None
    tied: tuple[str, ...] = ()

    @property
    def groups(self) -> tuple[str, ...]:
        if self.heads is not None:
            return self.heads.groups
        return self.tied or (self.name,)

    def gammas(self, k: int) -> dict[str, float]:
        """Per-group γ that :func:`plan` turns into k units (heads) apart."""
        return {g: k / self.width for g in self.groups}

    def partition(self, k: int, widths: dict[str, int], models: int = 2) -> dict[str, Sizes]:
        """Sizes of the groups with k units (heads) apart, each of ``models`` endpoints keeping its own: which
        heads does not change the cost."""
        if self.heads is None:
            return {g: apart_sizes(self.width, k, models) for g in self.groups}
        return {g: apart_sizes(widths[g], widths[g] if h < k else 0, models)
                for h, head in enumerate(self.heads.heads) for g in head}

    def apart(self, partition: dict[str, Sizes]) -> int:
        """How many units (heads) of this choice ``partition`` keeps apart."""
        return partition[self.name][0] if self.heads is None else self.heads.apart(partition)


def choices(spec: PermutationSpec) -> list[Choice]:
    """Every :class:`Choice` of ``spec``: the groups that can widen, with each attention module's heads as one
    choice and each set of tied groups as one (named after its first group)."""
    heads, ties = spec.head_of(), spec.tie_of()
    out, seen = [], set()
    for g, grp in spec.groups.items():
        if g in spec.fixed:  # (with_fixed keeps whole ties and heads together)
            continue
        h = heads.get(g)
        if g in ties:
            if ties[g][0] == g:
                out.append(Choice(g, grp.width, tied=ties[g]))
        elif h is None:
            out.append(Choice(g, grp.width))
        elif h.module not in seen:
            seen.add(h.module)
            out.append(Choice(h.module, len(h.heads), h))
    return out
