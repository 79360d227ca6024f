"""Alignment (method §3): a similarity matrix per group, A units × B units, higher = more alike.

``activation``: correlation of activations on calibration data (also what ``zip`` pairs across models by).
``weight``: data-free Git Re-Basin
permutation coordinate descent, then the cosine similarity of each unit's weights with every other group
aligned. Both give scores in [-1, 1], so the partial plan (buffers at +1 / −1, threshold ε) reads them the
same way; a full linear assignment on the scores is the ordinary permutation alignment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .errors import UsageError
from .spec import Heads, PermutationSpec
from .statistics import Statistics

ALIGNMENTS = ("activation", "weight", "zip")
log = logging.getLogger("hubmerge")


def lap(scores: torch.Tensor) -> torch.Tensor:
    """Maximum-score assignment: entry i is the B unit matched to A unit i."""
    rows, cols = linear_sum_assignment(scores.cpu().numpy(), maximize=True)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)


def in_order(spec: PermutationSpec, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The scores, with every pairing of an ordered group's units other than unit i with unit i forbidden (−inf),
    so that every assignment of them (:func:`lap`, with buffers or not) is the identity: a rotary embedding pairs
    those units by position (:attr:`~hubmerge.spec.Group.ordered`), and the matched scores stay as measured."""
    out = dict(scores)
    for g, s in scores.items():
        if spec.groups[g].ordered:
            eye = torch.eye(len(s), dtype=torch.bool, device=s.device)
            out[g] = torch.where(eye, s, torch.full_like(s, float("-inf")))
    return out


def activation_scores(spec: PermutationSpec, stats: Statistics, state_a: dict[str, torch.Tensor],
                      state_b: dict[str, torch.Tensor], estimator: str = "pooled") -> dict[str, torch.Tensor]:
    """Per-group correlation matrices from the statistics pass (by ``estimator``, see
    :meth:`~hubmerge.statistics.PairMoments.correlation`). A group that no module outputs (attention's
    q and k when the projection is computed inside the attention module) is scored by the cosine similarity
    of its units' weights, every other group aligned by its correlations; the log says which. An ordered
    group's scores allow the identity only (:func:`in_order`)."""
    scores = in_order(spec, {g: stats.correlation(grp, estimator) for g, grp in spec.groups.items() if grp.observe})
    unseen = [g for g, grp in spec.groups.items() if not grp.observe]
    if unseen:
        log.warning("groups observed at no module output, aligned by their weights: %s", ", ".join(unseen))
        perms = {g: lap(s) for g, s in scores.items()}
        scores.update(weight_scores(spec, state_a, state_b, perms, unseen))
    return {g: scores[g] for g in spec.groups}


def head_orders(spec: PermutationSpec, stats: Statistics, estimator: str = "pooled") -> dict[str, torch.Tensor]:
    """Per attention, B's heads in the order that best matches A's (entry i: the B head matched to A head i),
    where it is not the identity. Heads are interchangeable as wholes, so B head j can take A head i's place:
    a pair of heads scores the mean correlation of their units matched within the head (q/k and v each by
    linear assignment, over the groups observed), and the heads are matched by linear assignment on those
    scores (Git Re-Basin's head permutation, here by activations; an ordered group's units matched in place).
    Attentions whose heads are observed at no point, or not alike, keep their order."""
    orders, cache = {}, {}

    def where(g: str) -> tuple:
        grp = spec.groups[g]
        return grp.width, tuple((p.module, p.dim, len(p.positions)) for p in grp.observe)

    for h in spec.heads:
        roles = [r for r in range(len(h.heads[0])) if all(spec.groups[head[r]].observe for head in h.heads)]
        alike = all(len({where(head[r]) for head in h.heads}) == 1 for r in roles)
        if len(h.heads) < 2 or not roles or not alike:
            continue
        order = _head_order(spec, h, roles, lambda i, j, r: stats.correlation(
            spec.groups[h.heads[i][r]], estimator, other=spec.groups[h.heads[j][r]], cache=cache))
        if order is not None:
            orders[h.module] = order
    if orders:
        log.info("B's attention heads reordered to match A's in %d of %d attention modules", len(orders),
                 len(spec.heads))
    return orders


def _head_order(spec: PermutationSpec, heads: Heads, roles: list[int],
                similarity: Callable[[int, int, int], torch.Tensor]) -> torch.Tensor | None:
    """B's heads of one attention matched to A's, or None where the best match is their own order:
    ``similarity(i, j, r)`` is the units × units similarity of A's head i and B's head j in role r (q/k or
    v); a pair of heads scores the mean over ``roles`` of its units' similarity matched within the head by
    linear assignment (an ordered group's units in place), and the heads are matched by linear assignment."""
    score = torch.zeros(len(heads.heads), len(heads.heads), dtype=torch.float64)
    for i, mine in enumerate(heads.heads):
        for j in range(len(heads.heads)):
            for r in roles:
                c = similarity(i, j, r).double()
                units = torch.arange(len(c)) if spec.groups[mine[r]].ordered else lap(c)
                score[i, j] += c[torch.arange(len(c)), units].mean().item() / len(roles)
    order = lap(score)
    return None if torch.equal(order, torch.arange(len(order))) else order


def _weight_axes(spec: PermutationSpec) -> dict[str, list[tuple[str, int]]]:
    """group → [(param, dim)]: every weight/bias axis the group acts on (not running stats)."""
    return {g: [(n, d) for n, d in spec.group_axes(g) if not n.endswith(("running_mean", "running_var"))]
            for g in spec.groups}


def _unit_vectors(spec: PermutationSpec, group: str, state: dict[str, torch.Tensor], axes: list[tuple[str, int]],
                  perms: dict[str, torch.Tensor]) -> torch.Tensor:
    """(width, d) matrix: each unit's weights along all its axes, other axes permuted by ``perms``; every
    place the group occupies on an axis (a flattened map's H·W copies, a grouped conv's blocks) adds its
    entries to the unit's vector."""
    parts = []
    for name, dim in axes:
        if name not in state:
            continue
        t = state[name].double()
        for d in range(t.dim()):
            index = None if d == dim else spec.gather(name, d, perms)
            if index is not None:
                t = t.index_select(d, index)
        moved = t.movedim(dim, 0)
        for rows in spec.occurrences(name, dim, group):
            part = moved[rows.reshape(-1)].reshape(rows.shape[0], -1)
            # each parameter counts equally: raw inner products let one large layer drown the others
            # (timm VGG's 4096×8 fc2 outweighs fc1 500-fold) and trap the descent in a local optimum
            parts.append(part / part.norm().clamp_min(1e-12))
    return torch.cat(parts, 1)


def weight_matching(
    spec: PermutationSpec, state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor],
    seed: int = 0, max_sweeps: int = 100,
) -> dict[str, torch.Tensor]:
    """Git Re-Basin weight matching: per group, with all other permutations fixed, solve the LAP of
    Σ⟨W_A[i], P(W_B)[j]⟩ over every axis of the group; visit groups in a seeded random order; stop when
    a sweep improves no group. Each parameter's term is normalised by its norm (our choice): the
    exact alignment of a permuted copy still maximises every term, but no layer dominates by scale. Ordered
    groups keep their order."""
    axes = _weight_axes(spec)
    perms = {g: torch.arange(grp.width) for g, grp in spec.groups.items()}
    rng = np.random.default_rng(seed)
    names = [g for g, grp in spec.groups.items() if not grp.ordered]
    for _ in range(max_sweeps):
        improved = False
        for g in rng.permutation(names):
            width = spec.groups[g].width
            va = _unit_vectors(spec, g, state_a, axes[g], {})
            vb = _unit_vectors(spec, g, state_b, axes[g], perms)
            vb = vb.index_select(0, perms[g])
            cost = va @ vb.T
            choice = lap(cost)
            if cost[torch.arange(width), choice].sum() > cost.diagonal().sum() + 1e-12:
                perms[g] = perms[g][choice]
                improved = True
        if not improved:
            break
    return perms


def weight_head_orders(spec: PermutationSpec, state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor],
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """:func:`head_orders` without data: per attention, B's heads in the order that best matches A's, where
    it is not the identity. Weight matching (:func:`weight_matching`) permutes units within a head only, so
    it first aligns every other group (the residual stream that q, k and v read and the projection writes);
    a pair of heads then scores the mean cosine similarity of their q/k and v units' weights, matched within
    the head by linear assignment (an ordered group's in place), and the heads are matched by linear
    assignment on those scores. Attentions whose heads' weights are not laid out alike keep their order."""
    if not spec.heads:
        return {}
    perms, axes, orders = weight_matching(spec, state_a, state_b, seed=seed), _weight_axes(spec), {}
    for h in spec.heads:
        if len(h.heads) < 2:
            continue
        others = {g: p for g, p in perms.items() if g not in h.groups}
        va, vb = ([[torch.nn.functional.normalize(_unit_vectors(spec, g, state, axes[g], p), dim=1) for g in head]
                   for head in h.heads] for state, p in ((state_a, {}), (state_b, others)))
        if len({tuple(v.shape for v in head) for head in va}) > 1:
            continue
        order = _head_order(spec, h, list(range(len(h.heads[0]))), lambda i, j, r: va[i][r] @ vb[j][r].T)
        if order is not None:
            orders[h.module] = order
    if orders:
        log.info("B's attention heads reordered by their weights to match A's in %d of %d attention modules",
                 len(orders), len(spec.heads))
    return orders


def weight_scores(
    spec: PermutationSpec, state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor],
    perms: dict[str, torch.Tensor], groups: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Cosine similarity of unit weight vectors per group (all, or ``groups``), every other group aligned
    by ``perms``."""
    axes = _weight_axes(spec)
    scores = {}
    for g in groups or spec.groups:
        others = {k: v for k, v in perms.items() if k != g}
        va = torch.nn.functional.normalize(_unit_vectors(spec, g, state_a, axes[g], {}), dim=1)
        vb = torch.nn.functional.normalize(_unit_vectors(spec, g, state_b, axes[g], others), dim=1)
        scores[g] = va @ vb.T
    return in_order(spec, scores)


def align(
    spec: PermutationSpec, method: str, *, stats: Statistics | None = None,
    state_a: dict[str, torch.Tensor] | None = None, state_b: dict[str, torch.Tensor] | None = None, seed: int = 0,
    correlation: str = "pooled",
) -> dict[str, torch.Tensor]:
    """Similarity scores per group by the chosen method (``activation`` needs ``stats``, and estimates
    correlations as ``correlation`` says; ``zip`` pairs the units that are left after within-model pairs
    (:mod:`~hubmerge.zipit`) by the activation scores)."""
    if method in ("activation", "zip"):
        if stats is None:
            raise UsageError("activation alignment needs calibration statistics")
        return activation_scores(spec, stats, state_a, state_b, correlation)
    if method == "weight":
        perms = weight_matching(spec, state_a, state_b, seed=seed)
        return weight_scores(spec, state_a, state_b, perms)
    raise UsageError(f"unknown alignment {method!r}; choose one of {ALIGNMENTS}")
