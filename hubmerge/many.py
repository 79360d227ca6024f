"""N-way alignment (Git Re-Basin's MergeMany, on activations): every endpoint's units matched to one order.

Model 0 is the reference and keeps its order. Each other model is first matched to it by linear assignment
on their correlations, exactly as the two-way permutation merge matches B to A (so two endpoints give that
merge's assignment). With more than two, MergeMany's refinement follows: each model in turn is re-matched
to the mean of the other models' aligned features, whose correlation with its units follows from the
pairwise covariances of the statistics pass (pooled estimate), until a sweep changes no assignment. The
result is one :class:`~hubmerge.matching.Matching` per group whose merged units hold one unit of every model.
An N-way partial merge keeps apart the merged units whose members correlate least (:func:`quality`).
"""

from __future__ import annotations

import torch

from .alignment import activation_scores, lap
from .matching import Matching, Matchings
from .spec import Group, PermutationSpec
from .statistics import ManyStatistics, Moments

SWEEPS = 20  # refinement sweeps at most (each one a linear assignment per model and group)


def _cov(stats: ManyStatistics, point: tuple[str, int], k: int, m: int) -> torch.Tensor:
    """cov(x_k,i, x_m,j) at ``point`` (k ≠ m)."""
    if k < m:
        return stats.pairs[(k, m)].points[point].covariance()
    return stats.pairs[(m, k)].points[point].covariance().T


def _moments(stats: ManyStatistics, point: tuple[str, int], k: int) -> Moments:
    pair = next(p for p in stats.pairs if k in p)
    pm = stats.pairs[pair].points[point]
    return pm.a if pair[0] == k else pm.b


def _to_others(group: Group, stats: ManyStatistics, perms: list[torch.Tensor], m: int) -> torch.Tensor:
    """Correlation of the mean of the other models' aligned units (rows, in merged order) with model m's units
    (columns), averaged over the group's observation points and places, as two-way scores are."""
    others = [k for k in range(len(perms)) if k != m]
    mats = []
    for obs in group.observe:
        point = (obs.module, obs.dim)
        for where in obs.positions:
            idx = torch.tensor(where)

            def at(k: int) -> torch.Tensor:
                return idx[perms[k]]

            cov = sum(_cov(stats, point, k, m)[at(k)][:, idx] for k in others) / len(others)
            var = sum(_moments(stats, point, k).std[at(k)] ** 2 if k == l else _cov(stats, point, k, l)[at(k), at(l)]
                      for k in others for l in others) / len(others) ** 2
            denom = torch.outer(var.clamp_min(0).sqrt(), _moments(stats, point, m).std[idx])
            mats.append(torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov)))
    return torch.stack(mats).mean(0)


def align_group(group: Group, stats: ManyStatistics, scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per model, its units in the merged order of one group: model 0's as they are, each other model's
    matched to them by linear assignment on ``scores`` (``scores[m-1]``: model 0 × model m), then refined
    by MergeMany sweeps where the group is observed and its units may move (not an ordered group)."""
    perms = [torch.arange(group.width), *(lap(s) for s in scores)]
    if len(perms) == 2 or not group.observe or group.ordered:
        return perms  # an ordered group keeps the identity its scores allow (alignment.in_order)
    for _ in range(SWEEPS):
        changed = False
        for m in range(1, len(perms)):
            new = lap(_to_others(group, stats, perms, m))
            if not torch.equal(new, perms[m]):
                perms[m], changed = new, True
        if not changed:
            break
    return perms


def pair_scores(spec: PermutationSpec, stats: ManyStatistics, states: list[dict[str, torch.Tensor]],
                estimator: str = "pooled", scores_b: dict[str, torch.Tensor] | None = None
                ) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Per pair of endpoints (k < m), per group, the two-way alignment's scores of k's units × m's
    (``scores_b``: those of endpoints 0 and 1, where the caller has them already)."""
    n = len(states)
    return {(k, m): scores_b if (k, m) == (0, 1) and scores_b is not None else activation_scores(
        spec, stats.pairs[(k, m)], states[k], states[m], estimator) for k in range(n) for m in range(k + 1, n)}


def align(spec: PermutationSpec, stats: ManyStatistics, scores: dict[tuple[int, int], dict[str, torch.Tensor]]
          ) -> Matchings:
    """One matching per group of every endpoint's units (see the module docstring) from the scores of every pair
    of endpoints (:func:`pair_scores`; this reads those with the reference, endpoint 0)."""
    n = len(stats.layers)
    out = {}
    for g, grp in spec.groups.items():
        perms = align_group(grp, stats, [scores[(0, m)][g] for m in range(1, n)])
        out[g] = Matching(grp.width, n, torch.stack([p + m * grp.width for m, p in enumerate(perms)], 1))
    return out


def quality(matchings: Matchings, scores: dict[tuple[int, int], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per group, each merged unit's score: its members' correlation averaged over every pair of endpoints
    (``scores``: :func:`pair_scores`, at the units matched together), what an N-way partial merge ranks merged
    units by to keep the worst apart, as a two-way top-k merge ranks its pairs."""
    out = {}
    for g, match in matchings.items():
        units = match.members % match.width
        out[g] = torch.zeros(match.width, dtype=torch.float64)
        for (k, m), s in scores.items():
            out[g] += s[g].double()[units[:, k], units[:, m]] / len(scores)
    return out
