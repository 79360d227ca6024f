"""Alignment (method §3): a similarity matrix per group, A units × B units, higher = more alike.

``activation``: correlation of activations on calibration data. ``weight``: data-free Git Re-Basin
permutation coordinate descent, then the cosine similarity of each unit's weights with every other group
aligned. Both give scores in [-1, 1], so the partial plan (buffers at +1 / −1, threshold ε) reads them the
same way; a full linear assignment on the scores is the ordinary permutation alignment.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .errors import UsageError
from .spec import PermutationSpec, expand
from .statistics import Statistics

ALIGNMENTS = ("activation", "weight")


def lap(scores: torch.Tensor) -> torch.Tensor:
    """Maximum-score assignment: entry i is the B unit matched to A unit i."""
    rows, cols = linear_sum_assignment(scores.cpu().numpy(), maximize=True)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)


def activation_scores(spec: PermutationSpec, stats: Statistics) -> dict[str, torch.Tensor]:
    """Per-group correlation matrices from the statistics pass."""
    return {g: stats.correlation(g) for g in spec.groups}


def _weight_axes(spec: PermutationSpec) -> dict[str, list[tuple[str, int]]]:
    """group → [(param, dim)]: every weight/bias axis the group acts on (not running stats)."""
    out: dict[str, list[tuple[str, int]]] = {g: [] for g in spec.groups}
    for name, axes in spec.param_axes().items():
        if name.endswith(("running_mean", "running_var")):
            continue
        for dim, axis in enumerate(axes):
            if axis is not None:
                out[axis[0]].append((name, dim))
    return out


def _unit_vectors(
    state: dict[str, torch.Tensor], axes: list[tuple[str, int]], perms: dict[str, torch.Tensor],
    spec_axes: dict, width: int,
) -> torch.Tensor:
    """(width, d) matrix: each unit's weights along all its axes, other axes permuted by ``perms``.

    A flattened axis holds each unit's ``repeat`` entries contiguously, so ``reshape(width, -1)`` keeps
    them with their unit."""
    parts = []
    for name, dim in axes:
        if name not in state:
            continue
        t = state[name].double()
        for d, axis in enumerate(spec_axes[name]):
            if d != dim and axis is not None and axis[0] in perms:
                t = t.index_select(d, expand(perms[axis[0]], axis[1]))
        # each parameter counts equally: raw inner products let one large layer drown the others
        # (timm VGG's 4096×8 fc2 outweighs fc1 500-fold) and trap the descent in a local optimum
        t = t.movedim(dim, 0).reshape(width, -1)
        parts.append(t / t.norm().clamp_min(1e-12))
    return torch.cat(parts, 1)


def weight_matching(
    spec: PermutationSpec, state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor],
    seed: int = 0, max_sweeps: int = 100,
) -> dict[str, torch.Tensor]:
    """Git Re-Basin weight matching: per group, with all other permutations fixed, solve the LAP of
    Σ⟨W_A[i], P(W_B)[j]⟩ over every axis of the group; visit groups in a seeded random order; stop when
    a sweep improves no group. Each parameter's term is normalised by its norm (our choice): the
    exact alignment of a permuted copy still maximises every term, but no layer dominates by scale."""
    axes, spec_axes = _weight_axes(spec), spec.param_axes()
    perms = {g: torch.arange(grp.width) for g, grp in spec.groups.items()}
    rng = np.random.default_rng(seed)
    names = list(spec.groups)
    for _ in range(max_sweeps):
        improved = False
        for g in rng.permutation(names):
            width = spec.groups[g].width
            va = _unit_vectors(state_a, axes[g], {}, spec_axes, width)
            vb = _unit_vectors(state_b, axes[g], perms, spec_axes, width)
            vb = vb.index_select(0, perms[g])
            cost = va @ vb.T
            choice = lap(cost)
            if cost[torch.arange(width), choice].sum() > cost.diagonal().sum() + 1e-12:
                perms[g] = perms[g][choice]
                improved = True
        if not improved:
            break
    return perms


def weight_scores(
    spec: PermutationSpec, state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor],
    perms: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Cosine similarity of unit weight vectors per group, every other group aligned by ``perms``."""
    axes, spec_axes = _weight_axes(spec), spec.param_axes()
    scores = {}
    for g, grp in spec.groups.items():
        others = {k: v for k, v in perms.items() if k != g}
        va = torch.nn.functional.normalize(_unit_vectors(state_a, axes[g], {}, spec_axes, grp.width), dim=1)
        vb = torch.nn.functional.normalize(_unit_vectors(state_b, axes[g], others, spec_axes, grp.width), dim=1)
        scores[g] = va @ vb.T
    return scores


def align(
    spec: PermutationSpec, method: str, *, stats: Statistics | None = None,
    state_a: dict[str, torch.Tensor] | None = None, state_b: dict[str, torch.Tensor] | None = None, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Similarity scores per group by the chosen method (``activation`` needs ``stats``)."""
    if method == "activation":
        if stats is None:
            raise UsageError("activation alignment needs calibration statistics")
        return activation_scores(spec, stats)
    if method == "weight":
        perms = weight_matching(spec, state_a, state_b, seed=seed)
        return weight_scores(spec, state_a, state_b, perms)
    raise UsageError(f"unknown alignment {method!r}; choose one of {ALIGNMENTS}")
