"""Activation statistics from one streaming pass of both endpoints (method §2).

Accumulators are float64 sums (Σx, Σx², Σx_A x_Bᵀ, and for zip alignment the within-model Σx_A x_Aᵀ and
Σx_B x_Bᵀ), so memory is O(width²) per observation point whatever the amount of data, and statistics of
disjoint data add up exactly (``a + b``), as workers' would.
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
    """Units along ``dim`` → (samples, units): every other position (batch, spatial, token) is a sample of
    each unit. Kept in the model's precision (half precisions in float32), which the products of
    :meth:`PairMoments.add` run in."""
    x = out.detach().movedim(dim, -1).reshape(-1, out.shape[dim])
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@dataclass
class Moments:
    """Per-unit Σx and Σx² of one model at one point."""

    count: int = 0
    sum: torch.Tensor | None = None
    sumsq: torch.Tensor | None = None

    def add(self, out: torch.Tensor, dim: int = 1) -> None:
        """Add every position of ``out`` as a sample of the units along ``dim`` (reduced in place, without
        moving the units to the last dim first: measured about twice as fast on conv maps). As in
        :meth:`PairMoments.add`, the reductions run in the output's own precision on values centred by
        their mean, and the sums are kept in float64."""
        x = out.detach()
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        others = [d for d in range(x.dim()) if d != dim % x.dim()]
        n = x.numel() // x.shape[dim]
        mu = x.mean(others, keepdim=True)
        c = x - mu
        mu, s, q = mu.reshape(-1).double(), c.sum(others).double(), c.square().sum(others).double()
        self.add_sums(n, s + n * mu, q + 2 * mu * s + n * mu * mu)

    def add_sums(self, count: int, s: torch.Tensor, q: torch.Tensor) -> None:
        """Add ``count`` samples whose per-unit Σx and Σx² are ``s`` and ``q``."""
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = q if self.sumsq is None else self.sumsq + q
        self.count += count

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


def _plus(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
    return y if x is None else x if y is None else x + y


PAIRS = {"ab": ("a", "b", "cross"), "aa": ("a", "a", "within_a"), "bb": ("b", "b", "within_b")}


@dataclass
class PairMoments:
    """Moments of A and B at one observation point plus the cross moment Σx_A x_Bᵀ, the sums of each
    batch's per-unit std (for the ``batch`` estimator) and, where zip alignment asks for them
    (``within``), the within-model moments Σx_A x_Aᵀ and Σx_B x_Bᵀ."""

    a: Moments = field(default_factory=Moments)
    b: Moments = field(default_factory=Moments)
    cross: torch.Tensor | None = None
    batch_std_a: torch.Tensor | None = None
    batch_std_b: torch.Tensor | None = None
    batches: int = 0
    within: bool = False
    within_a: torch.Tensor | None = None
    within_b: torch.Tensor | None = None

    def add(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        """Add one batch's matching samples × units matrices of A and B.

        The products run in the features' own precision (float32 for a float32 model: its matrix products
        are 2–3× faster than float64's on CPU, and no float64 copy is made) on features centred by the
        batch's mean, and every sum is kept in float64: Σx_A x_Bᵀ = c_Aᵀc_B + μ_A(Σc_B)ᵀ + (Σc_A)μ_Bᵀ + n·μ_Aμ_Bᵀ
        holds for any shift μ, and centred products carry no large common term to cancel later, so a float32
        model's correlations agree with float64 ones to about 1e-6 (tested). Column sums are products with a
        ones vector (reductions down the samples of a samples × units matrix are several times slower,
        measured)."""
        n = len(xa)
        ones = xa.new_ones(n)

        def centred(x: torch.Tensor, moments: Moments) -> tuple[torch.Tensor, ...]:
            mu = ones @ x / n
            c = x - mu
            mu, s, q = mu.double(), (ones @ c).double(), (ones @ c.square()).double()
            moments.add_sums(n, s + n * mu, q + 2 * mu * s + n * mu * mu)
            std = ((q - s * s / n).clamp_min(0) / max(n - 1, 1)).sqrt()  # the code's torch.std: unbiased
            return c, mu, s, std

        def product(p: tuple, r: tuple) -> torch.Tensor:
            (c1, mu1, s1, _), (c2, mu2, s2, _) = p, r
            return (c1.T @ c2).double() + torch.outer(mu1, s2) + torch.outer(s1, mu2) + n * torch.outer(mu1, mu2)

        pa, pb = centred(xa, self.a), centred(xb, self.b)
        self.batch_std_a = _plus(self.batch_std_a, pa[3])
        self.batch_std_b = _plus(self.batch_std_b, pb[3])
        self.cross = _plus(self.cross, product(pa, pb))
        if self.within:
            self.within_a = _plus(self.within_a, product(pa, pa))
            self.within_b = _plus(self.within_b, product(pb, pb))
        self.batches += 1

    def swapped(self) -> PairMoments:
        """These moments with A and B exchanged (the cross moment transposed)."""
        return PairMoments(self.b, self.a, self.cross.T, self.batch_std_b, self.batch_std_a, self.batches, self.within,
                           self.within_b, self.within_a)

    def moved_b(self, index: torch.Tensor) -> PairMoments:
        """These moments with B's units taken in the order ``index`` (B's unit i is the old unit index[i])."""
        b = Moments(self.b.count, self.b.sum[index], self.b.sumsq[index])
        within_b = None if self.within_b is None else self.within_b[index][:, index]
        return PairMoments(self.a, b, self.cross[:, index], self.batch_std_a, self.batch_std_b[index], self.batches,
                           self.within, self.within_a, within_b)

    def __add__(self, other: PairMoments) -> PairMoments:
        return PairMoments(self.a + other.a, self.b + other.b, self.cross + other.cross,
                           self.batch_std_a + other.batch_std_a, self.batch_std_b + other.batch_std_b,
                           self.batches + other.batches, self.within, _plus(self.within_a, other.within_a),
                           _plus(self.within_b, other.within_b))

    def covariance(self, pair: str = "ab") -> torch.Tensor:
        """cov(x_A,i, x_B,j) over all samples (``pair`` as for :meth:`correlation`)."""
        first, second, key = PAIRS[pair]
        if getattr(self, key) is None:
            raise UsageError(f"within-model correlations ({pair}) need statistics collected with within=True")
        m1, m2 = getattr(self, first), getattr(self, second)
        return getattr(self, key) / m1.count - torch.outer(m1.mean, m2.mean)

    def correlation(self, estimator: str = "pooled", pair: str = "ab") -> torch.Tensor:
        """C[i, j] = corr(x_A,i, x_B,j) (``pair="ab"``; ``"aa"`` and ``"bb"``: within A or B, which needs
        ``within``). ``pooled``: the covariance over the stds of all samples, a dead unit correlating 0 with
        everything; ``batch``: over the mean of each batch's std plus 1e-4, as the code of REPAIR (Jordan et
        al.) and of partial merging (Koch) estimate it."""
        first, second, _ = PAIRS[pair]
        m1, m2 = getattr(self, first), getattr(self, second)
        cov = self.covariance(pair)
        if estimator == "batch":
            s1, s2 = getattr(self, f"batch_std_{first}"), getattr(self, f"batch_std_{second}")
            return cov / (torch.outer(s1, s2) / self.batches**2 + BATCH_EPSILON)
        if estimator != "pooled":
            raise UsageError(f"unknown correlation estimator {estimator!r}; choose one of {ESTIMATORS}")
        denom = torch.outer(m1.std, m2.std)
        # no epsilon in the denominator: it would bias low-variance units' correlations away from 1
        return torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))


@dataclass
class Statistics:
    """Everything the later stages need from the data, for one endpoint pair.

    ``points[(module, dim)]``: pair moments of a module's output over one unit dim, where groups are
    observed (post-activation where possible, for matching); one point may hold several groups (a fused qkv
    holds every head). ``layers_a/b[layer]``: per-unit moments of each layer's pre-activation output (REPAIR's
    targets), for the layers the merge's REPAIR variant corrects (:func:`collect_many`'s ``outputs``).
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

    def layers_of(self, model: int) -> dict[str, Moments]:
        """Model ``model``'s (0 = A, 1 = B) per-unit moments of each REPAIR output."""
        return (self.layers_a, self.layers_b)[model]

    def correlation(self, group: Group, estimator: str = "pooled", pair: str = "ab", other: Group | None = None,
                    cache: dict | None = None) -> torch.Tensor:
        """Correlation matrix of a group (by :meth:`PairMoments.correlation`'s ``estimator``: A × B, or within
        one model by ``pair``), averaged over its observation points and the places it occupies at each
        (method §2: residual streams are judged at every point they are observed, not only the last). With
        ``other``, A's units of ``group`` against B's of ``other``, a group observed at the same points alike
        (another head of the same attention). ``cache`` keeps each point's whole correlation matrix for later
        calls (scoring every pair of heads reads the same points many times)."""
        mats = []
        for point, theirs in zip(group.observe, (other or group).observe):
            key = (point.module, point.dim)
            if (theirs.module, theirs.dim) != key:
                raise ValueError(f"groups {group.name} and {other.name} are observed at different points")
            cache = {} if cache is None else cache
            if (key, estimator, pair) not in cache:
                cache[(key, estimator, pair)] = self.points[key].correlation(estimator, pair)
            full = cache[(key, estimator, pair)]
            for where, there in zip(point.positions, theirs.positions):
                mats.append(full[torch.tensor(where)][:, torch.tensor(there)])
        return torch.stack(mats).mean(0)

    def swapped(self) -> Statistics:
        """The statistics of the pair (B, A)."""
        return Statistics({k: pm.swapped() for k, pm in self.points.items()}, self.layers_b, self.layers_a,
                          self.samples)

    def with_b_moved(self, spec: PermutationSpec, sources: dict[str, str]) -> Statistics:
        """The statistics of A and of B with whole groups moved (:func:`~hubmerge.spec.permute_heads`: B's
        group g takes the units of ``sources[g]``), as a pass over the moved B would measure them."""
        indexes: dict[tuple[str, int], torch.Tensor] = {}
        for g, src in sources.items():
            for point, theirs in zip(spec.groups[g].observe, spec.groups[src].observe):
                key = (point.module, point.dim)
                if (theirs.module, theirs.dim) != key:
                    raise ValueError(f"groups {g} and {src} are observed at different points")
                index = indexes.setdefault(key, torch.arange(len(self.points[key].b.sum)))
                for where, there in zip(point.positions, theirs.positions):
                    index[torch.tensor(where)] = torch.tensor(there)
        points = {key: pm.moved_b(indexes[key]) if key in indexes else pm for key, pm in self.points.items()}
        layers_b = dict(self.layers_b)
        for name, m in layers_b.items():
            index = spec.moved(f"{name}.weight", 0, sources)
            if index is not None:
                layers_b[name] = Moments(m.count, m.sum[index], m.sumsq[index])
        return Statistics(points, self.layers_a, layers_b, self.samples)


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
    within: bool = False,
    outputs: Iterable[str] | None = None,
) -> Statistics:
    """Stream ``data`` through both endpoints once and accumulate every statistic the merge needs (with
    ``within``, also the within-model moments that zip alignment matches redundant units by; ``outputs`` as
    for :func:`collect_many`)."""
    return collect_many([model_a, model_b], spec, data, device, progress, within, outputs).pairs[(0, 1)]


@dataclass
class ManyStatistics:
    """Statistics of N endpoints from one pass: ``pairs[(k, l)]`` (k < l) the pair statistics of models k
    and l (its ``layers_a`` / ``layers_b`` are ``layers[k]`` / ``layers[l]``), ``layers[m]`` model m's
    per-unit moments of each REPAIR output."""

    pairs: dict[tuple[int, int], Statistics]
    layers: list[dict[str, Moments]]
    samples: int = 0

    def layers_of(self, model: int) -> dict[str, Moments]:
        return self.layers[model]

    def with_moved(self, model: int, spec: PermutationSpec, sources: dict[str, str]) -> ManyStatistics:
        """The statistics with model ``model``'s whole groups moved (:meth:`Statistics.with_b_moved`: its group g
        takes the units of ``sources[g]``) in every pair it belongs to, as a pass over the moved model would
        measure them."""
        moved = {}
        for (k, m), s in self.pairs.items():
            if m == model:
                moved[(k, m)] = s.with_b_moved(spec, sources)
            elif k == model:
                moved[(k, m)] = s.swapped().with_b_moved(spec, sources).swapped()
        layers = list(self.layers)
        layers[model] = next(s.layers_b if m == model else s.layers_a for (k, m), s in moved.items())
        pairs = {(k, m): Statistics(moved.get((k, m), s).points, layers[k], layers[m], s.samples)
                 for (k, m), s in self.pairs.items()}
        return ManyStatistics(pairs, layers, self.samples)


@torch.no_grad()
def collect_many(models: list[nn.Module], spec: PermutationSpec, data: Batches, device: torch.device | str = "cpu",
                 progress: bool = False, within: bool = False, outputs: Iterable[str] | None = None) -> ManyStatistics:
    """Stream ``data`` through every endpoint once and accumulate the statistics of every pair of them, and
    each endpoint's per-unit moments of the REPAIR ``outputs`` (names; None: all of the spec's). A merge measures
    only the outputs its REPAIR variant corrects (:func:`hubmerge.repair.targets`): per-unit moments of every
    conv output of both endpoints were about a quarter of a ResNet's statistics pass.

    Features are reduced after each batch (each model's observed features are kept for that batch only), so
    in-place activations downstream cannot alter them and memory stays bounded.
    """
    points = list(dict.fromkeys((p.module, p.dim) for g in spec.groups.values() for p in g.observe))
    names = [o.name for o in spec.outputs] if outputs is None else list(outputs)
    layers = [{name: Moments() for name in names} for _ in models]
    stats = ManyStatistics({(k, m): Statistics({p: PairMoments(within=within) for p in points}, layers[k], layers[m])
                            for k in range(len(models)) for m in range(k + 1, len(models))}, layers)
    stash: list[dict[tuple[str, int], torch.Tensor]] = [{} for _ in models]
    handles = []

    def keep(m, point):
        return lambda out: stash[m].__setitem__(point, _flat(out, point[1]))

    def moments(target, dim):
        return lambda out: target.add(out, dim)

    for m, model in enumerate(models):
        handles += [_hook(model, point[0], keep(m, point)) for point in points]
        for name, target in layers[m].items():
            handles.append(_hook(model, name, moments(target, unit_dim(model.get_submodule(name)))))
    try:
        for model in models:
            model.eval().to(device)
        for x, _ in batches(data, device, progress and "statistics pass"):
            for model in models:
                model(x)
            for (k, m), pair in stats.pairs.items():
                for point in points:
                    pair.points[point].add(stash[k][point], stash[m][point])
            for kept in stash:
                kept.clear()
            stats.samples += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    require_everywhere(stats.samples > 0, "calibration data is empty: give at least one batch of inputs")
    for pair in stats.pairs.values():
        pair.samples = stats.samples
    return _summed(stats)


def _summed(stats: ManyStatistics) -> ManyStatistics:
    """Statistics added up over every process of a process group, in one all-reduce."""
    if world()[1] == 1:
        return stats
    pairs = [pm for s in stats.pairs.values() for pm in s.points.values()]
    moments = [m for pm in pairs for m in (pm.a, pm.b)] + [m for layer in stats.layers for m in layer.values()]
    counts = [m.count for m in moments] + [stats.samples] + [pm.batches for pm in pairs]
    counts = torch.tensor(counts, dtype=torch.float64)
    summed = iter(total(counts, *[t for m in moments for t in (m.sum, m.sumsq)],
                        *[t for pm in pairs for t in (pm.cross, pm.batch_std_a, pm.batch_std_b)],
                        *[t for pm in pairs if pm.within for t in (pm.within_a, pm.within_b)]))
    counts = next(summed).long().tolist()
    for m, count in zip(moments, counts):
        m.count, m.sum, m.sumsq = count, next(summed), next(summed)
    stats.samples = counts[len(moments)]
    for pm, count in zip(pairs, counts[len(moments) + 1:]):
        pm.cross, pm.batch_std_a, pm.batch_std_b, pm.batches = next(summed), next(summed), next(summed), count
    for pm in pairs:
        if pm.within:
            pm.within_a, pm.within_b = next(summed), next(summed)
    for pair in stats.pairs.values():
        pair.samples = stats.samples
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
