"""Partial plan (method §4): per group, which unit pairs are merged and which stay A-only / B-only.

The layout of every group in the merged model is ``[A-only | shared | B-only]``. γ=0 is the ordinary full
permutation merge, γ=1 keeps every unit of both models (the ensemble).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .alignment import lap
from .errors import UsageError
from .spec import PermutationSpec

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
    def from_pairs(cls, pairs_a: torch.Tensor, pairs_b: torch.Tensor, split: torch.Tensor) -> GroupPlan:
        """From matched pairs and a boolean mask of the pairs to keep apart."""
        order = torch.argsort(pairs_a)
        pairs_a, pairs_b, split = pairs_a[order], pairs_b[order], split[order]
        return cls(pairs_a[split], pairs_a[~split], pairs_b[~split], torch.sort(pairs_b[split]).values)


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
    """Expand a scalar γ to every group; check a dict names only known groups."""
    if isinstance(gamma, dict):
        unknown = sorted(set(gamma) - set(spec.groups))
        if unknown:
            raise UsageError(f"gamma names unknown groups {unknown}; groups are {list(spec.groups)}")
        return {g: float(gamma.get(g, 0.0)) for g in spec.groups}
    return {g: float(gamma) for g in spec.groups}


def check_widenable(spec: PermutationSpec, what: str) -> None:
    """Refuse ``what`` (a γ > 0, a budget) where the spec's groups cannot be widened yet, saying why."""
    if spec.partial is not None:
        raise UsageError(f"{what} needs partial merging, which the {spec.family} family does not support yet "
                         f"({spec.partial}); a full merge (gamma=0, no budget) works")


def plan(spec: PermutationSpec, scores: dict[str, torch.Tensor], gamma: float | dict[str, float],
         method: str = "forced", *, epsilon: float = 0.0, seed: int = 0,
         cache: dict[tuple, GroupPlan] | None = None) -> dict[str, GroupPlan]:
    """Plans for every group (γ per group, a scalar meaning the same γ everywhere).

    A group's plan depends only on its own scores, γ and the method, so ``cache`` (keyed by those) lets
    the budget search re-plan only the groups it changes.
    """
    gammas = gammas_for(spec, gamma)
    if any(gammas.values()):
        check_widenable(spec, "gamma > 0")
    cache = {} if cache is None else cache
    out = {}
    for i, g in enumerate(spec.groups):
        key = (g, gammas[g], method, epsilon, seed)
        if key not in cache:
            cache[key] = plan_group(scores[g], gammas[g], method, epsilon=epsilon, seed=seed + i)
        out[g] = cache[key]
    return out
