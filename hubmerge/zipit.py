"""Zip alignment (ZipIt!, Stoica et al. 2024): merge units *within* a model as well as across models.

Two endpoints trained on different tasks carry features that are redundant inside one model as often as
they match one in the other; ZipIt! merges the most correlated pairs of the concatenated features
``[f_A ‖ f_B]`` whichever models they come from. Per group, a zip pairs the 2n units of A and B into n
merged units, each a cross pair (an A unit and a B unit, weighted ``1−α`` and ``α``) or a within pair (two
units of one model, averaged): a :class:`~hubmerge.matching.Matching`, which :mod:`hubmerge.matching`
turns into merge and unmerge matrices along every axis of the spec.

The zip is built as the merge of two *virtual endpoints* in its order (:func:`virtual`): A' takes each cross
pair's A unit, B' its B unit, both take a within pair's mean, so ``(1−α)·A' + α·B'`` is the zip and every
later stage (partitioned build, REPAIR, storage) treats it as a permutation merge of A' and B' (where a
within pair's merged unit reads units kept apart, only its own endpoint's virtual one reads them). A *partial
zip* (``zip_depth``, ZipIt!'s multi-head model) zips the groups of the first layers only and keeps the
others apart, each endpoint's own (:func:`trunk`, :func:`plans`): depth 0 is the ensemble.

Matching (our design, not ZipIt!'s code): within pairs are chosen greedily, most correlated first and
without replacement, among pairs whose within-model correlation beats what either unit correlates with in
the other model, at most ``⌊β·n/2⌋`` per model (a share β of each model's units) and as many in A as in B
(so the merge keeps one endpoint's width); the units left are paired across models by linear assignment.
β=0 is therefore exactly the permutation full merge (the same assignment), not ZipIt!'s greedy variant of it.

More than two endpoints (:func:`plan_many`) are zipped from their N-way alignment (:mod:`hubmerge.many`): one
unit of each within-model pair moves into its partner's merged unit (:func:`match_many`), so β=0 is exactly
the N-way permutation merge. They are zipped fully (one endpoint's size); partial zips are built for two.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from .alignment import lap
from .errors import UsageError
from .matching import PAD, MatchedLayout, Matching, Matchings, has_units, matched_state, reader_dims
from .partial import GroupPlan
from .spec import Axis, Group, PermutationSpec, positions
from .statistics import ManyStatistics, Statistics

log = logging.getLogger("hubmerge")


def _within(corr: torch.Tensor, best_cross: torch.Tensor, limit: int) -> list[tuple[int, int]]:
    """Greedy within-model pairs: most correlated first, each unit once, only where the pair's correlation
    beats both units' best correlation with the other model; at most ``limit``."""
    if limit == 0:
        return []
    n = corr.shape[0]
    i, j = torch.triu_indices(n, n, 1)
    value = corr[i, j]
    ok = value > torch.maximum(best_cross[i], best_cross[j])
    i, j, value = i[ok], j[ok], value[ok]
    used, pairs = set(), []
    for k in torch.argsort(value, descending=True, stable=True).tolist():
        a, b = int(i[k]), int(j[k])
        if a not in used and b not in used:
            pairs.append((a, b))
            used.update((a, b))
            if len(pairs) == limit:
                break
    return pairs


def plan(spec: PermutationSpec, scores: dict[str, torch.Tensor], stats: Statistics, beta: float,
         estimator: str = "pooled", groups: set[str] | None = None) -> Matchings:
    """Per group (of ``groups``: those :func:`trunk` zips; None: all), the zip of its units at within-model
    share ``beta``. ``scores`` are the A×B alignment scores (the permutation merge's), so β=0 gives its
    assignment exactly; a group observed at no module output has no within-model correlations and is paired
    across models only (the log says which)."""
    chosen = {g: grp for g, grp in spec.groups.items() if groups is None or g in groups}
    _check(chosen, beta)
    zips = {}
    for g, grp in chosen.items():
        within = [stats.correlation(grp, estimator, pair) if _sees(grp, beta) else None for pair in ("aa", "bb")]
        zips[g] = match_many(grp, None, {(0, 1): scores[g]}, within, beta)
    return zips


def _check(groups: dict[str, Group], beta: float) -> None:
    """Refuse a share outside [0, 1]; say which groups can be zipped across models only."""
    if not 0.0 <= beta <= 1.0:
        raise UsageError(f"zip_beta must be in [0, 1], got {beta}")
    unseen = [g for g, grp in groups.items() if not grp.observe]
    if unseen and beta > 0:
        log.warning("groups observed at no module output are zipped across models only: %s", ", ".join(unseen))
    ordered = [g for g, grp in groups.items() if grp.ordered]
    if ordered and beta > 0:
        log.info("groups whose units keep their order (a rotary embedding) are zipped across models in place: %s",
                 ", ".join(ordered))


def _sees(group: Group, beta: float) -> bool:
    """Whether a zip looks for within-model pairs in ``group``: observed somewhere, free to move (not ordered)."""
    return bool(group.observe) and beta > 0 and not group.ordered


def match_many(group: Group, aligned: Matching | None, scores: dict[tuple[int, int], torch.Tensor],
               within: list[torch.Tensor | None], beta: float) -> Matching:
    """The zip of one group's units over N endpoints (a :class:`~hubmerge.matching.Matching`, rows by their
    first unit) from the scores of every pair of endpoints and, where observed, each one's within-model
    correlations (None: across models only); ``aligned``: the N-way alignment of more than two endpoints
    (None for two).

    Each model's within-model pairs are chosen greedily where they beat both units' best correlation with any
    unit of another model, at most ``⌊β·n/2⌋`` per model. Two endpoints are zipped by the two-way rule (see
    the module docstring: pairs as many in A as in B, each a merged unit alone, the rest paired across by
    linear assignment). For more than two a pair cannot stand alone (N models' pairs would outnumber the merged
    units they free), so the zip starts from the N-way merge's alignment (:func:`~hubmerge.many.align`, one
    unit of every model per merged unit) and moves, most correlated pair first, the unit of the pair that
    fits its merged unit worse into its partner's; a merged unit is never emptied, so the zip keeps one
    endpoint's width, and a merged unit left by a moved unit averages the models that remain in it."""
    n, count = group.width, len(within)
    limit = int(beta * n / 2 + 1e-9)

    def best(m: int) -> torch.Tensor:  # each unit of model m's best correlation with another model's units
        return torch.stack([scores[(m, k)].max(1).values if m < k else scores[(k, m)].max(0).values
                            for k in range(count) if k != m]).max(0).values

    pairs = [_within(w, best(m), limit) if w is not None else [] for m, w in enumerate(within)]
    if count == 2:
        rows = _two(pairs, scores[(0, 1)], n)
    else:
        rows = _moved(pairs, within, scores, [u - m * n for m, u in enumerate(aligned.members.T)])
    size = max(len(r) for r in rows)
    return Matching(n, count, torch.tensor([r + [PAD] * (size - len(r)) for r in rows], dtype=torch.long))


def _two(pairs: list[list[tuple[int, int]]], cross: torch.Tensor, n: int) -> list[list[int]]:
    """The two-way zip's merged units: as many within pairs in A as in B, each alone, the rest of A's units
    paired with the rest of B's by linear assignment."""
    k = min(len(p) for p in pairs)
    pairs_a, pairs_b = pairs[0][:k], pairs[1][:k]
    used_a, used_b = {u for p in pairs_a for u in p}, {u for p in pairs_b for u in p}
    rest_a = torch.tensor([u for u in range(n) if u not in used_a], dtype=torch.long)
    rest_b = torch.tensor([u for u in range(n) if u not in used_b], dtype=torch.long)
    scores = cross if k == 0 else cross[rest_a][:, rest_b]
    partner = rest_b[lap(scores)] if len(rest_a) else rest_b
    return sorted([[int(a), n + int(b)] for a, b in zip(rest_a, partner)] + [list(p) for p in pairs_a]
                  + [[n + a, n + b] for a, b in pairs_b])


def _moved(pairs: list[list[tuple[int, int]]], within: list[torch.Tensor | None],
           scores: dict[tuple[int, int], torch.Tensor], aligned: list[torch.Tensor]) -> list[list[int]]:
    """The N-way zip's merged units: the N-way alignment's, with one unit of each within pair moved to its
    partner's (see :func:`match_many`)."""
    n, count = len(aligned[0]), len(aligned)
    slot = torch.empty(count, n, dtype=torch.long)
    for m, units in enumerate(aligned):
        slot[m, units] = torch.arange(n)
    rows: list[set[tuple[int, int]]] = [{(m, int(units[p])) for m, units in enumerate(aligned)} for p in range(n)]

    def fit(m: int, u: int) -> float:  # how well unit u of model m correlates with the rest of its merged unit
        others = [(k, v) for k, v in rows[int(slot[m, u])] if k != m]
        return sum(float(scores[(m, k)][u, v] if m < k else scores[(k, m)][v, u]) for k, v in others) / max(
            len(others), 1)

    order = sorted(((float(within[m][a, b]), m, a, b) for m, ps in enumerate(pairs) for a, b in ps),
                   key=lambda t: -t[0])
    for _, m, a, b in order:
        stay, move = (a, b) if fit(m, a) >= fit(m, b) else (b, a)
        source, target = int(slot[m, move]), int(slot[m, stay])
        if len(rows[source]) == 1:  # it is its merged unit's last member
            continue
        rows[source].discard((m, move))
        rows[target].add((m, move))
        slot[m, move] = target
    return sorted(sorted(k * n + v for k, v in row) for row in rows)


def plan_many(spec: PermutationSpec, stats: ManyStatistics, scores: dict[tuple[int, int], dict[str, torch.Tensor]],
              aligned: Matchings, beta: float, estimator: str = "pooled") -> Matchings:
    """Per group, the N-way zip of every endpoint's units at within-model share ``beta`` (each endpoint's
    within-model correlations from its statistics with endpoint 0, endpoint 0's with endpoint 1) from their
    N-way alignment ``aligned`` (:func:`~hubmerge.many.align`, which β=0 gives exactly) and the scores of every
    pair of endpoints (:func:`~hubmerge.many.pair_scores`)."""
    _check(spec.groups, beta)
    count = len(stats.layers)
    zips = {}
    for g, grp in spec.groups.items():
        within = [None] * count
        if _sees(grp, beta):
            within = [stats.pairs[(0, 1)].correlation(grp, estimator, "aa"),
                      *(stats.pairs[(0, m)].correlation(grp, estimator, "bb") for m in range(1, count))]
        zips[g] = match_many(grp, aligned[g], {p: s[g] for p, s in scores.items()}, within, beta)
    return zips


def trunk(spec: PermutationSpec, depth: int | None) -> set[str]:
    """The groups a zip to ``depth`` merges: those first written by one of the first ``depth`` layers of the
    spec (forward order), or by none; the others are kept apart, each model's own (None: every group). An
    attention's heads are zipped only where all their groups are (heads merge or stay apart whole)."""
    if depth is None:
        return set(spec.groups)
    first: dict[str, int] = {}
    for i, layer in enumerate(spec.layers):
        for seg in layer.out_axis:
            if seg.group is not None:
                first.setdefault(seg.group, i)
    zipped = {g for g in spec.groups if first.get(g, -1) < depth}
    for heads in spec.heads:
        if not zipped.issuperset(heads.groups):
            zipped -= set(heads.groups)
    return zipped


def virtual(spec: PermutationSpec, zips: Matchings, model_a: nn.Module, model_b: nn.Module
            ) -> tuple[nn.Module, nn.Module]:
    """Two endpoints in the zip's merged order whose interpolation ``(1−α)·A' + α·B'`` is the zip at α:
    A' takes a cross pair's A unit, B' its B unit, and both take a within pair's mean; every reading axis is
    unmerged from its own model. Groups the zip leaves out are the endpoints' own, so a partial merge of
    A' and B' (those groups kept apart) is a partial zip; where a zipped unit reads units kept apart (a late
    block writing into a zipped residual stream), an endpoint without a member in it reads none of them
    (:func:`_absent_reads`): they are the other endpoint's units."""
    out = []
    readers = reader_dims(model_a)
    for m, weights in enumerate(((1.0, 0.0), (0.0, 1.0))):
        model = copy.deepcopy(model_a)
        model.load_state_dict(_absent_reads(spec, zips, matched_state(spec, zips, [model_a, model_b], weights),
                                            m, readers))
        out.append(model.eval())
    return out[0], out[1]


def _positions(axis: Axis, keep) -> torch.Tensor:
    """A boolean mask of an axis's positions: per segment, ``keep(segment)`` gives its units' mask (or None)."""
    mask, start = torch.zeros(sum(seg.size for seg in axis), dtype=torch.bool), 0
    for seg in axis:
        units = keep(seg)
        if units is not None:
            mask[positions(seg, start)[units].reshape(-1)] = True
        start += seg.size
    return mask


def _absent_reads(spec: PermutationSpec, zips: Matchings, state: dict[str, torch.Tensor], model: int,
                  readers: dict[str, int]) -> dict[str, torch.Tensor]:
    """``state`` (a virtual endpoint's) with the reads of unzipped groups' units zeroed in every zipped unit
    that holds no unit of ``model``: those rows are the other endpoint's (a within pair), whose weights
    over units kept apart read that endpoint's units, not this one's."""
    every = torch.ones(1, dtype=torch.bool)
    for key, read in readers.items():
        axes = spec.axes.get(key) or ()
        if read >= len(axes) or not axes[read]:
            continue
        produce = [d for d, axis in enumerate(axes) if d != read and has_units(axis, zips)]
        cols = _positions(axes[read], lambda seg: every.expand(seg.width)
                          if seg.group is not None and seg.group not in zips else None)
        if not produce or not cols.any():
            continue
        rows = _positions(axes[produce[0]], lambda seg: ~(zips[seg.group].members // seg.width == model).any(1)
                          if seg.group in zips else None)
        shape = [1] * state[key].dim()
        row_shape, col_shape = list(shape), list(shape)
        row_shape[produce[0]], col_shape[read] = -1, -1
        state[key] = state[key].masked_fill(rows.view(row_shape) & cols.view(col_shape), 0.0)
    return state


@dataclass(frozen=True)
class Target:
    """Per-unit mean and std of an output of a virtual endpoint (REPAIR's targets read nothing else)."""

    mean: torch.Tensor
    std: torch.Tensor


def virtual_statistics(spec: PermutationSpec, zips: Matchings, stats: Statistics) -> Statistics:
    """REPAIR's statistics of the virtual endpoints: each output's per-unit mean and std mapped as the zip
    maps its units (a within pair's target is its two units' mean)."""
    layers = [{}, {}]
    for name in stats.layers_a:
        at = MatchedLayout.of(spec.axes[f"{name}.weight"][0], zips)
        for side, weights in zip(layers, ((1.0, 0.0), (0.0, 1.0))):
            side[name] = Target(*(at.combine([getattr(m[name], s) for m in (stats.layers_a, stats.layers_b)],
                                             weights) for s in ("mean", "std")))
    return Statistics({}, layers[0], layers[1], stats.samples)


def plans(spec: PermutationSpec, zipped: set[str]) -> dict[str, GroupPlan]:
    """The partial plans that merge the virtual endpoints: zipped groups unit for unit, the others apart."""
    return {g: GroupPlan.merged(grp.width) if g in zipped else GroupPlan.apart(grp.width)
            for g, grp in spec.groups.items()}
