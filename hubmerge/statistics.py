"""Activation statistics from one streaming pass of both endpoints (method §2).

Accumulators are float64 sums (Σx, Σx², Σx_A x_Bᵀ), so memory is O(width²) per observation point whatever
the amount of data, and statistics of disjoint data add up exactly (``a + b``), as workers' would.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .data import Batches, batches
from .errors import DataError
from .spec import PermutationSpec


def _flat(out: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) → (N·spatial, C) in float64: every position is a sample of each unit."""
    return out.detach().transpose(0, 1).reshape(out.shape[1], -1).T.double()


@dataclass
class Moments:
    """Per-unit Σx and Σx² of one model at one point."""

    count: int = 0
    sum: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        s, q = x.sum(0), (x * x).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = q if self.sumsq is None else self.sumsq + q
        self.count += x.shape[0]

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.sum + other.sum, self.sumsq + other.sumsq)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def std(self) -> torch.Tensor:
        var = (self.sumsq / self.count - self.mean**2).clamp_min(0)
        return var.sqrt()


@dataclass
class PairMoments:
    """Moments of A and B at one observation point plus the cross moment Σx_A x_Bᵀ."""

    a: Moments = field(default_factory=Moments)
    b: Moments = field(default_factory=Moments)
    cross: torch.Tensor | None = None

    def add(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        self.a.add(xa)
        self.b.add(xb)
        c = xa.T @ xb
        self.cross = c if self.cross is None else self.cross + c

    def __add__(self, other: PairMoments) -> PairMoments:
        return PairMoments(self.a + other.a, self.b + other.b, self.cross + other.cross)

    def correlation(self) -> torch.Tensor:
        """C[i, j] = corr(x_A,i, x_B,j); a dead unit correlates 0 with everything."""
        n = self.a.count
        cov = self.cross / n - torch.outer(self.a.mean, self.b.mean)
        denom = torch.outer(self.a.std, self.b.std)
        # no epsilon in the denominator: it would bias low-variance units' correlations away from 1
        return torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))


@dataclass
class Statistics:
    """Everything the later stages need from the data, for one endpoint pair.

    ``points[(group, module)]``: pair moments where a group is observed (post-activation, for matching);
    ``layers_a/b[layer]``: per-unit moments of each layer's pre-activation output (REPAIR's targets).
    """

    points: dict[tuple[str, str], PairMoments]
    layers_a: dict[str, Moments]
    layers_b: dict[str, Moments]
    samples: int = 0

    def __add__(self, other: Statistics) -> Statistics:
        return Statistics(
            {k: v + other.points[k] for k, v in self.points.items()},
            {k: v + other.layers_a[k] for k, v in self.layers_a.items()},
            {k: v + other.layers_b[k] for k, v in self.layers_b.items()},
            self.samples + other.samples,
        )

    def correlation(self, group: str) -> torch.Tensor:
        """Correlation matrix of a group, averaged over its observation points (method §2: residual
        streams are judged at every point they are observed, not only the last)."""
        mats = [pm.correlation() for (g, _), pm in self.points.items() if g == group]
        return torch.stack(mats).mean(0)


def _hook(model: nn.Module, name: str, fn) -> torch.utils.hooks.RemovableHandle:
    return model.get_submodule(name).register_forward_hook(lambda _m, _i, out: fn(out))


@torch.no_grad()
def collect(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    data: Batches,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Statistics:
    """Stream ``data`` through both endpoints once and accumulate every statistic the merge needs.

    Features are reduced inside the hooks (A's observed features are kept for one batch only, until B's
    arrive), so in-place activations downstream cannot alter them and memory stays bounded.
    """
    stats = Statistics(
        {(g.name, p): PairMoments() for g in spec.groups.values() for p in g.observe},
        {l.name: Moments() for l in spec.layers if l.out_group},
        {l.name: Moments() for l in spec.layers if l.out_group},
    )
    stash: dict[str, torch.Tensor] = {}
    handles = []

    def keep(point):
        return lambda out: stash.__setitem__(point, _flat(out))

    def pair(key):
        return lambda out: stats.points[key].add(stash.pop(key[1]), _flat(out))

    def moments(target):
        return lambda out: target.add(_flat(out))

    for group, point in stats.points:
        handles.append(_hook(model_a, point, keep(point)))
        handles.append(_hook(model_b, point, pair((group, point))))
    for name in stats.layers_a:
        handles.append(_hook(model_a, name, moments(stats.layers_a[name])))
        handles.append(_hook(model_b, name, moments(stats.layers_b[name])))
    try:
        model_a.eval().to(device)
        model_b.eval().to(device)
        for x, _ in batches(data, device, progress and "statistics pass"):
            model_a(x)
            model_b(x)
            stats.samples += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    if stats.samples == 0:
        raise DataError("calibration data is empty: give at least one batch of inputs")
    return stats


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the measured layer has run."""


@torch.no_grad()
def layer_moments(
    model: nn.Module, names: Iterable[str], data: Batches, device: torch.device | str = "cpu", stop: bool = False
) -> dict[str, Moments]:
    """Per-unit moments of the outputs of ``names`` in one model; with ``stop`` the forward pass ends
    after the last of them ran, which REPAIR uses to measure one layer at a time cheaply."""
    names = list(names)
    result = {n: Moments() for n in names}
    seen: set[str] = set()

    def record(name):
        def fn(out):
            result[name].add(_flat(out))
            seen.add(name)
            if stop and len(seen) == len(names):
                raise _Stop

        return fn

    handles = [_hook(model, n, record(n)) for n in names]
    try:
        model.eval().to(device)
        for x, _ in batches(data, device):
            seen.clear()
            try:
                model(x)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return result
