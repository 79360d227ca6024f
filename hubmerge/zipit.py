"""Zip alignment (ZipIt!, Stoica et al. 2024): merge units *within* a model as well as across models.

Two endpoints trained on different tasks carry features that are redundant inside one model as often as
they match one in the other; ZipIt! merges the most correlated pairs of the concatenated features
``[f_A ‖ f_B]`` whichever models they come from. Per group, a zip pairs the 2n units of A and B into n
merged units, each a cross pair (an A unit and a B unit, weighted ``1−α`` and ``α``) or a within pair (two
units of one model, averaged): a :class:`~hubmerge.matching.Matching`, which :mod:`hubmerge.matching`
turns into merge and unmerge matrices along every axis of the spec.

The zip is built as the merge of *virtual endpoints* in its order (:func:`virtual`), one per endpoint, each
holding its endpoint's share of every merged unit (a cross pair's own unit; a within pair's two units at
``1/Σ``, Σ the pair's weights, and nothing for the other endpoint), so ``Σ_m w_m · E'_m`` is the zip and every
later stage (partitioned build, REPAIR, storage) treats it as a permutation merge of the E'_m. A *partial
zip* (``zip_depth``, ZipIt!'s multi-head model) zips the groups of the first layers only and keeps the
others apart, each endpoint's own (:func:`trunk`, :func:`plans`): depth 0 is the ensemble. Where a zipped
unit reads units kept apart (a late block writing into a zipped residual stream), each endpoint's share
reads that endpoint's units, weighted as the zip weighs its members.

Matching (our design, not ZipIt!'s code): within pairs are chosen greedily, most correlated first and
without replacement, among pairs whose within-model correlation beats what either unit correlates with in
the other model, at most ``⌊β·n/2⌋`` per model (a share β of each model's units) and as many in A as in B
(so the merge keeps one endpoint's width); the units left are paired across models by linear assignment.
β=0 is therefore exactly the permutation full merge (the same assignment), not ZipIt!'s greedy variant of it.

More than two endpoints (:func:`plan_many`) are zipped from their N-way alignment (:mod:`hubmerge.many`): one
unit of each within-model pair moves into its partner's merged unit (:func:`match_many`), so β=0 is exactly
the N-way permutation merge. A full zip of them is their matched merge (:mod:`hubmerge.matching`); a partial
one merges their N virtual endpoints as a two-way one merges two.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from .alignment import lap
from .errors import UsageError
from .matching import PAD, MatchedLayout, Matching, Matchings, Weights, matched_states
from .partial import GroupPlan
from .spec import Group, PermutationSpec
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
              aligned: Matchings, beta: float, estimator: str = "pooled", groups: set[str] | None = None) -> Matchings:
    """Per group (of ``groups``: those :func:`trunk` zips; None: all), the N-way zip of every endpoint's units
    at within-model share ``beta`` (each endpoint's within-model correlations from its statistics with
    endpoint 0, endpoint 0's with endpoint 1) from their N-way alignment ``aligned``
    (:func:`~hubmerge.many.align`, which β=0 gives exactly) and the scores of every pair of endpoints
    (:func:`~hubmerge.many.pair_scores`)."""
    chosen = {g: grp for g, grp in spec.groups.items() if groups is None or g in groups}
    _check(chosen, beta)
    count = len(stats.layers)
    zips = {}
    for g, grp in chosen.items():
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


def virtual(spec: PermutationSpec, zips: Matchings, models: list[nn.Module], weights: Weights) -> list[nn.Module]:
    """One endpoint per model, in the zip's merged order, whose interpolation ``Σ_m w_m · E'_m`` at ``weights``
    is the zip: E'_m holds model m's share of every merged unit (:meth:`~hubmerge.matching.Matching.weights`
    with ``of``: a unit of every model, its own unit; otherwise its units in the merged unit at ``1/Σ``, Σ the
    members' model weights, none where it has none), every reading axis unmerged from its own model. Groups
    the zip leaves out are the endpoints' own, so a partial merge of the E'_m (those groups kept apart, each
    read by a zipped unit through its own endpoint's share) is a partial zip: a merged unit reads each
    endpoint's units kept apart with that endpoint's members' weights, as the zip weighs their outputs."""
    out = []
    for state in matched_states(spec, zips, models, weights, range(len(models))):
        model = copy.deepcopy(models[0])
        model.load_state_dict(state)
        out.append(model.eval())
    return out


@dataclass(frozen=True)
class Target:
    """Per-unit mean and std of an output of a virtual endpoint (REPAIR's targets read nothing else)."""

    mean: torch.Tensor
    std: torch.Tensor


def virtual_statistics(spec: PermutationSpec, zips: Matchings, stats: Statistics | ManyStatistics,
                       weights: Weights) -> ManyStatistics:
    """REPAIR's statistics of the virtual endpoints (:func:`virtual`) at ``weights``: each output's per-unit
    mean and std held as each virtual endpoint holds its units, so the targets REPAIR interpolates are the
    zip's (a within pair's: its two units' mean)."""
    count = len(weights)
    own = [stats.layers_of(m) for m in range(count)]
    layers = [{} for _ in range(count)]
    for name in own[0]:
        at = MatchedLayout.of(spec.axes[f"{name}.weight"][0], zips)
        for m, side in enumerate(layers):
            side[name] = Target(*(at.combine([getattr(o[name], s) for o in own], weights, of=m)
                                  for s in ("mean", "std")))
    return ManyStatistics({}, layers, stats.samples)


def plans(spec: PermutationSpec, zipped: set[str], models: int = 2) -> dict[str, GroupPlan]:
    """The partial plans that merge the virtual endpoints of ``models`` endpoints: zipped groups unit for unit,
    the others apart."""
    return {g: GroupPlan.merged(grp.width, models) if g in zipped else GroupPlan.apart(grp.width, models)
            for g, grp in spec.groups.items()}
