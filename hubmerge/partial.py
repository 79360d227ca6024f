"""Partial plan (method §4): per group, which unit pairs are merged and which stay A-only / B-only.

The layout of every group in the merged model is ``[A-only | shared | B-only]``. γ=0 is the ordinary full
permutation merge, γ=1 keeps every unit of both models (the ensemble).
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

Sizes = tuple[int, int, int]

PARTIALS = ("forced", "adaptive", "topk", "random")


@dataclass(frozen=True)
class GroupPlan:
    """Unit indices (into the original, unpermuted endpoints) of each section of one group."""

    a_only: torch.Tensor
    shared_a: torch.Tensor
    shared_b: torch.Tensor
    b_only: torch.Tensor

    @property
    def sizes(self) -> tuple[int, int, int]:
        """(k_A, m, k_B): widths of the A-only, shared and B-only sections."""
        return len(self.a_only), len(self.shared_a), len(self.b_only)

    @property
    def a_index(self) -> torch.Tensor:
        """A's units in the order of the merged layout's ``[A-only | shared]`` slice."""
        return torch.cat([self.a_only, self.shared_a])

    @property
    def b_index(self) -> torch.Tensor:
        """B's units in the order of the merged layout's ``[shared | B-only]`` slice."""
        return torch.cat([self.shared_b, self.b_only])

    @classmethod
    def merged(cls, width: int) -> GroupPlan:
        """Every unit merged with the unit of the same index (two endpoints already in one order)."""
        every = torch.arange(width)
        return cls(every[:0], every, every, every[:0])

    @classmethod
    def apart(cls, width: int) -> GroupPlan:
        """Every unit kept apart (an attention head that is not merged)."""
        every = torch.arange(width)
        return cls(every, every[:0], every[:0], every)

    @classmethod
    def from_pairs(cls, pairs_a: torch.Tensor, pairs_b: torch.Tensor, split: torch.Tensor) -> GroupPlan:
        """From matched pairs and a boolean mask of the pairs to keep apart."""
        order = torch.argsort(pairs_a)
        pairs_a, pairs_b, split = pairs_a[order], pairs_b[order], split[order]
        return cls(pairs_a[split], pairs_a[~split], pairs_b[~split], torch.sort(pairs_b[split]).values)


@dataclass(frozen=True)
class Layout:
    """Where each position of an axis of the merged model comes from: ``section`` 0 = A-only, 1 = shared,
    2 = B-only; ``a`` / ``b``: the position of A's / B's axis it takes (0 where it takes none). The axis
    is its segments one after the other, each laid out ``[A-only | shared | B-only]``; fixed positions
    (``fixed``) are shared and stay where they are."""

    section: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    fixed: torch.Tensor

    def combine(self, ta: torch.Tensor, tb: torch.Tensor, alpha: float, dim: int = 0) -> torch.Tensor:
        """A per-position tensor of the merge (a bias, a norm's parameter, a REPAIR target): A's value on
        A-only positions, B's on B-only ones, ``(1−α)·A + α·B`` on shared ones."""
        shape = [1] * ta.dim()
        shape[dim] = -1
        wa = torch.tensor([1.0, 1 - alpha, 0.0], dtype=ta.dtype)[self.section].view(shape).to(ta.device)
        wb = torch.tensor([0.0, alpha, 1.0], dtype=ta.dtype)[self.section].view(shape).to(ta.device)
        return wa * ta.index_select(dim, self.a.to(ta.device)) + wb * tb.index_select(dim, self.b.to(tb.device))


def head_layout(heads: Heads, partition: dict[str, Sizes]) -> Layout:
    """The :class:`Layout` of the heads of the merged attention, as per-head tables (a relative position bias)
    hold them: a merged head is one head, shared; a head kept apart is A's head, then B's."""
    secs, from_a, from_b = [], [], []
    for h, head in enumerate(heads.heads):
        apart = partition[head[0]][0] > 0
        for section in ((0, 2) if apart else (1,)):
            secs.append(section)
            from_a.append(h if section < 2 else 0)
            from_b.append(h if section > 0 else 0)
    secs, from_a, from_b = (torch.tensor(v, dtype=torch.long) for v in (secs, from_a, from_b))
    return Layout(secs, from_a, from_b, torch.zeros(len(secs), dtype=torch.bool))


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


def sections(axis: Axis, partition: dict[str, Sizes]) -> torch.Tensor:
    """The section (0 A-only, 1 shared, 2 B-only) of every position of ``axis`` in the merged model."""
    parts = []
    for run in _runs(axis):
        for i in range(3):
            for seg in (axis[j] for j in run):
                n = (partition[seg.group] if seg.group is not None else (0, seg.width, 0))[i]
                parts.append(torch.full((n * seg.repeat,), i, dtype=torch.long))
    return torch.cat(parts)


def layout(axis: Axis, plans: dict[str, GroupPlan]) -> Layout:
    """The :class:`Layout` of ``axis`` (from the spec's table) under ``plans``."""
    per_segment, start = [], 0
    for seg in axis:
        rows = positions(seg, start)
        plan = plans.get(seg.group) if seg.group is not None else None
        if plan is None:
            every = rows.reshape(-1)
            parts = [(0, None, None), (1, every, every), (2, None, None)]
        else:
            parts = [(0, rows[plan.a_only].reshape(-1), None), (1, rows[plan.shared_a].reshape(-1),
                     rows[plan.shared_b].reshape(-1)), (2, None, rows[plan.b_only].reshape(-1))]
        per_segment.append((seg, parts))
        start += seg.size
    secs, from_a, from_b, fixed = [], [], [], []
    for run in _runs(axis):
        for i in range(3):
            for seg, parts in (per_segment[j] for j in run):
                section, a, b = parts[i]
                if a is None and b is None:
                    continue
                n = len(a if a is not None else b)
                secs.append(torch.full((n,), section, dtype=torch.long))
                from_a.append(a if a is not None else torch.zeros(n, dtype=torch.long))
                from_b.append(b if b is not None else torch.zeros(n, dtype=torch.long))
                fixed.append(torch.full((n,), seg.group is None))
    return Layout(torch.cat(secs), torch.cat(from_a), torch.cat(from_b), torch.cat(fixed))


def _relaxed(scores: torch.Tensor, k: int, fill: tuple[float, float]) -> GroupPlan:
    """LAP on the score matrix padded with k buffer slots per side.

    ``fill = (real–buffer, buffer–buffer)``: (+1, −1) forces exactly k splits (forced buffers); (ε, ε)
    splits a pair only where its score is below ε, at most k times (adaptive buffers).
    """
    n = scores.shape[0]
    if k == 0:  # no buffers: the ordinary assignment, without padding
        return GroupPlan.from_pairs(torch.arange(n), lap(scores), torch.zeros(n, dtype=torch.bool))
    if k == n and fill[0] > fill[1]:  # forced with every unit split: nothing left to match
        every = torch.arange(n)
        return GroupPlan(every, every[:0], every[:0], every)
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
    return GroupPlan(a[~matched], a[matched], b_matched, b_only)


def plan_group(scores: torch.Tensor, gamma: float, method: str = "forced", *, epsilon: float = 0.0,
               seed: int = 0) -> GroupPlan:
    """Plan one group from its A×B score matrix; ``gamma`` is the (maximum) share of units kept apart."""
    if not 0.0 <= gamma <= 1.0:
        raise UsageError(f"gamma must be in [0, 1], got {gamma}")
    n = scores.shape[0]
    k = round(gamma * n)
    scores = scores.double().cpu()
    if method == "forced":
        return _relaxed(scores, k, (1.0, -1.0))
    if method == "adaptive":
        return _relaxed(scores, k, (epsilon, epsilon))
    if method not in ("topk", "random"):
        raise UsageError(f"unknown partial method {method!r}; choose one of {PARTIALS}")
    a = torch.arange(n)
    b = lap(scores)
    split = torch.zeros(n, dtype=torch.bool)
    if k:
        if method == "topk":  # merge the best-correlated pairs, keep the k worst apart (Semi-Ensemble)
            worst = torch.argsort(scores[a, b], stable=True)[:k]
        else:
            worst = torch.as_tensor(np.random.default_rng(seed).choice(n, size=k, replace=False))
        split[worst] = True
    return GroupPlan.from_pairs(a, b, split)


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
         cache: dict[tuple, GroupPlan] | None = None) -> dict[str, GroupPlan]:
    """Plans for every group (γ per group, a scalar meaning the same γ everywhere); the groups of attention
    heads are planned per head (:func:`_plan_heads`).

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
            cache[key] = plan_group(scores[g], gamma, method, epsilon=epsilon, seed=seed + i)
        return cache[key]

    heads = spec.head_of()
    out = {g: planned(g, gammas[g], method, i) for i, g in enumerate(spec.groups) if g not in heads}
    for tie in spec.ties:
        apart = max(out[g].sizes[0] for g in tie)
        if any(out[g].sizes[0] != apart for g in tie):
            out.update({g: planned(g, apart / spec.groups[g].width, "forced", 0) for g in tie})
    for h in spec.heads:
        out.update(_plan_heads(h, {g: planned(g, 0.0, "forced", 0) for g in h.groups},
                               scores, gammas, epsilon if method == "adaptive" else None))
    return {g: out[g] for g in spec.groups}


def _plan_heads(heads: Heads, merged: dict[str, GroupPlan], scores: dict[str, torch.Tensor],
                gammas: dict[str, float], threshold: float | None = None) -> dict[str, GroupPlan]:
    """Heads are merged or kept apart whole. Of the module's H heads, round(Σ γ_h) are kept apart (γ_h: the
    largest γ of the head's groups, so a scalar γ keeps round(γ·H) apart and γ=1 on one head's group keeps
    that head apart), those with the largest γ_h first, among equals those whose matched dims correlate
    least (their mean score in ``merged``, the full-merge plans); with adaptive buffers (``threshold`` = ε)
    only heads scoring below ε. Kept apart, every unit of the head's groups is apart; merged, the groups
    take their full-merge plans."""
    want = [max(gammas[g] for g in head) for head in heads.heads]
    quality = [float(np.mean([scores[g].double()[merged[g].shared_a, merged[g].shared_b].mean().item() for g in head]))
               for head in heads.heads]
    ranked = sorted(range(len(want)), key=lambda h: (-want[h], quality[h], h))[:math.floor(sum(want) + 0.5)]
    apart = {h for h in ranked if threshold is None or quality[h] < threshold}
    return {g: GroupPlan.apart(len(merged[g].shared_a)) if h in apart else merged[g]
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

    def partition(self, k: int, widths: dict[str, int]) -> dict[str, Sizes]:
        """Sizes of the groups with k units (heads) apart: which heads does not change the cost."""
        if self.heads is None:
            return {g: (k, self.width - k, k) for g in self.groups}
        return {g: (widths[g], 0, widths[g]) if h < k else (0, widths[g], 0)
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
