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
from .distributed import require_everywhere, total, world
from .errors import UsageError
from .spec import Group, PermutationSpec


def _flat(out: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Units along ``dim`` → (samples, units) in float64: every other position (batch, spatial, token) is
    a sample of each unit."""
    return out.detach().movedim(dim, -1).reshape(-1, out.shape[dim]).double()


@dataclass
class Moments:
    """Per-unit Σx and Σx² of one model at one point."""

    count: int = 0
    sum: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None

    def add(self, out: torch.Tensor, dim: int = 1) -> None:
        """Add every position of ``out`` as a sample of the units along ``dim`` (reduced in place, without
        moving the units to the last dim first: measured about twice as fast on conv maps)."""
        x = out.detach().double()
        others = [d for d in range(x.dim()) if d != dim % x.dim()]
        s, q = x.sum(others), torch.linalg.vector_norm(x, dim=others).square()
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = q if self.sumsq is None else self.sumsq + q
        self.count += x.numel() // x.shape[dim]

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.sum + other.sum, self.sumsq + other.sumsq)

    def summed(self) -> Moments:
        """These moments added up over every process of a process group (each saw its own batches)."""
        count, s, q = total(torch.tensor(float(self.count)), self.sum, self.sumsq)
        return Moments(int(count.item()), s, q)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def std(self) -> torch.Tensor:
        var = (self.sumsq / self.count - self.mean**2).clamp_min(0)
        return var.sqrt()


ESTIMATORS = ("pooled", "batch")
BATCH_EPSILON = 1e-4  # the REPAIR and partial-merging code's denominator epsilon (``batch`` estimator)


@dataclass
class PairMoments:
    """Moments of A and B at one observation point plus the cross moment Σx_A x_Bᵀ, and the sums of each
    batch's per-unit std (for the ``batch`` estimator)."""

    a: Moments = field(default_factory=Moments)
    b: Moments = field(default_factory=Moments)
    cross: torch.Tensor | None = None
    batch_std_a: torch.Tensor | None = None
    batch_std_b: torch.Tensor | None = None
    batches: int = 0

    def add(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        """Add one batch's matching samples × units matrices of A and B."""
        self.a.add(xa)
        self.b.add(xb)
        c = xa.T @ xb
        ddof = 1 if len(xa) > 1 else 0  # the code's torch.std is the unbiased one
        sa, sb = xa.std(0, correction=ddof), xb.std(0, correction=ddof)
        self.cross = c if self.cross is None else self.cross + c
        self.batch_std_a = sa if self.batch_std_a is None else self.batch_std_a + sa
        self.batch_std_b = sb if self.batch_std_b is None else self.batch_std_b + sb
        self.batches += 1

    def __add__(self, other: PairMoments) -> PairMoments:
        return PairMoments(self.a + other.a, self.b + other.b, self.cross + other.cross,
                           self.batch_std_a + other.batch_std_a, self.batch_std_b + other.batch_std_b,
                           self.batches + other.batches)

    def correlation(self, estimator: str = "pooled") -> torch.Tensor:
        """C[i, j] = corr(x_A,i, x_B,j). ``pooled``: the covariance over the stds of all samples, a dead unit
        correlating 0 with everything; ``batch``: over the mean of each batch's std plus 1e-4, as the code of
        REPAIR (Jordan et al.) and of partial merging (Koch) estimate it."""
        n = self.a.count
        cov = self.cross / n - torch.outer(self.a.mean, self.b.mean)
        if estimator == "batch":
            return cov / (torch.outer(self.batch_std_a, self.batch_std_b) / self.batches**2 + BATCH_EPSILON)
        if estimator != "pooled":
            raise UsageError(f"unknown correlation estimator {estimator!r}; choose one of {ESTIMATORS}")
        denom = torch.outer(self.a.std, self.b.std)
        # no epsilon in the denominator: it would bias low-variance units' correlations away from 1
        return torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))


@dataclass
class Statistics:
    """Everything the later stages need from the data, for one endpoint pair.

    ``points[(module, dim)]``: pair moments of a module's output over one unit dim, where groups are
    observed (post-activation where possible, for matching); one point may hold several groups (a fused qkv
    holds every head). ``layers_a/b[layer]``: per-unit moments of each layer's pre-activation output (REPAIR's
    targets).
    """

    points: dict[tuple[str, int], PairMoments]
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

    def correlation(self, group: Group, estimator: str = "pooled") -> torch.Tensor:
        """Correlation matrix of a group (by :meth:`PairMoments.correlation`'s ``estimator``), averaged over its
        observation points and the places it occupies at each (method §2: residual streams are judged at every
        point they are observed, not only the last)."""
        mats = []
        for point in group.observe:
            full = self.points[(point.module, point.dim)].correlation(estimator)
            for where in point.positions:
                index = torch.tensor(where)
                mats.append(full[index][:, index])
        return torch.stack(mats).mean(0)


def unit_dim(module: nn.Module) -> int:
    """The dim of a layer's output that holds its units: channels of a conv, the last dim of a linear (a
    partitioned layer says which it is)."""
    return getattr(module, "unit_dim", -1 if isinstance(module, nn.Linear) else 1)


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
        {(p.module, p.dim): PairMoments() for g in spec.groups.values() for p in g.observe},
        {o.name: Moments() for o in spec.outputs},
        {o.name: Moments() for o in spec.outputs},
    )
    stash: dict[str, torch.Tensor] = {}
    handles = []

    def keep(point):
        return lambda out: stash.__setitem__(point, _flat(out, point[1]))

    def pair(point):
        return lambda out: stats.points[point].add(stash.pop(point), _flat(out, point[1]))

    def moments(target, dim):
        return lambda out: target.add(out, dim)

    for point in stats.points:
        handles.append(_hook(model_a, point[0], keep(point)))
        handles.append(_hook(model_b, point[0], pair(point)))
    for name in stats.layers_a:
        dim = unit_dim(model_a.get_submodule(name))
        handles.append(_hook(model_a, name, moments(stats.layers_a[name], dim)))
        handles.append(_hook(model_b, name, moments(stats.layers_b[name], dim)))
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
    require_everywhere(stats.samples > 0, "calibration data is empty: give at least one batch of inputs")
    return _summed(stats)


def _summed(stats: Statistics) -> Statistics:
    """Statistics added up over every process of a process group, in one all-reduce."""
    if world()[1] == 1:
        return stats
    moments = [m for pm in stats.points.values() for m in (pm.a, pm.b)] + [*stats.layers_a.values(),
                                                                            *stats.layers_b.values()]
    pairs = list(stats.points.values())
    counts = [m.count for m in moments] + [stats.samples] + [pm.batches for pm in pairs]
    counts = torch.tensor(counts, dtype=torch.float64)
    summed = iter(total(counts, *[t for m in moments for t in (m.sum, m.sumsq)],
                        *[t for pm in pairs for t in (pm.cross, pm.batch_std_a, pm.batch_std_b)]))
    counts = next(summed).long().tolist()
    for m, count in zip(moments, counts):
        m.count, m.sum, m.sumsq = count, next(summed), next(summed)
    stats.samples = counts[len(moments)]
    for pm, count in zip(pairs, counts[len(moments) + 1:]):
        pm.cross, pm.batch_std_a, pm.batch_std_b, pm.batches = next(summed), next(summed), next(summed), count
    return stats


@torch.no_grad()
def layer_moments(model: nn.Module, names: Iterable[str], data: Batches, device: torch.device | str = "cpu"
                  ) -> dict[str, Moments]:
    """Per-unit moments of the outputs of ``names`` in one model, over all of ``data``."""
    names = list(names)
    result = {n: Moments() for n in names}

    def record(name):
        dim = unit_dim(model.get_submodule(name))
        return lambda out: result[name].add(out, dim)

    handles = [_hook(model, n, record(n)) for n in names]
    try:
        model.eval().to(device)
        for x, _ in batches(data, device):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return result
