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


def _to_others(group: Group, stats: ManyStatistics, perms: list[dict[str, torch.Tensor]], m: int) -> torch.Tensor:
    """Correlation of the mean of the other models' aligned units (rows, in merged order) with model m's units
    (columns), averaged over the group's observation points and places, as two-way scores are."""
    others = [k for k in range(len(perms)) if k != m]
    g, mats = group.name, []
    for obs in group.observe:
        point = (obs.module, obs.dim)
        for where in obs.positions:
            idx = torch.tensor(where)

            def at(k: int) -> torch.Tensor:
                return idx[perms[k][g]]

            cov = sum(_cov(stats, point, k, m)[at(k)][:, idx] for k in others) / len(others)
            var = sum(_moments(stats, point, k).std[at(k)] ** 2 if k == l else _cov(stats, point, k, l)[at(k), at(l)]
                      for k in others for l in others) / len(others) ** 2
            denom = torch.outer(var.clamp_min(0).sqrt(), _moments(stats, point, m).std[idx])
            mats.append(torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov)))
    return torch.stack(mats).mean(0)


def align(spec: PermutationSpec, stats: ManyStatistics, states: list[dict[str, torch.Tensor]],
          estimator: str = "pooled", scores_b: dict[str, torch.Tensor] | None = None) -> Matchings:
    """One matching per group of every endpoint's units (see the module docstring); ``estimator`` is the
    correlation estimate of the first assignment to the reference, ``scores_b`` endpoint 1's scores against
    it where the caller has them already (the two-way alignment's)."""
    n = len(states)
    perms = [{g: torch.arange(grp.width) for g, grp in spec.groups.items()}]
    for m in range(1, n):
        scores = scores_b if m == 1 and scores_b is not None else activation_scores(
            spec, stats.pairs[(0, m)], states[0], states[m], estimator)
        perms.append({g: lap(s) for g, s in scores.items()})
    # refined where observed; an ordered group keeps the identity its scores allow (alignment.in_order)
    observed = [grp for grp in spec.groups.values() if grp.observe and not grp.ordered]
    for _ in range(SWEEPS if n > 2 else 0):
        changed = False
        for m in range(1, n):
            for grp in observed:
                new = lap(_to_others(grp, stats, perms, m))
                if not torch.equal(new, perms[m][grp.name]):
                    perms[m][grp.name], changed = new, True
        if not changed:
            break
    return {g: Matching(grp.width, n, torch.stack([perms[m][g] + m * grp.width for m in range(n)], 1))
            for g, grp in spec.groups.items()}


def quality(spec: PermutationSpec, stats: ManyStatistics, states: list[dict[str, torch.Tensor]],
            matchings: Matchings, estimator: str = "pooled") -> dict[str, torch.Tensor]:
    """Per group, each merged unit's score: its members' correlation averaged over every pair of endpoints
    (the two-way alignment's scores of that pair at the units matched together), what an N-way partial merge
    ranks merged units by to keep the worst apart, as a two-way top-k merge ranks its pairs."""
    n = len(states)
    out = {g: torch.zeros(grp.width, dtype=torch.float64) for g, grp in spec.groups.items()}
    pairs = [(k, m) for k in range(n) for m in range(k + 1, n)]
    for k, m in pairs:
        scores = activation_scores(spec, stats.pairs[(k, m)], states[k], states[m], estimator)
        for g, match in matchings.items():
            units = match.members % match.width
            out[g] += scores[g].double()[units[:, k], units[:, m]] / len(pairs)
    return out
