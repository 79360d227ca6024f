"""Budget allocation (method §7): spread a relative size increase over the groups where it helps most.

Every allocator returns per-group γ whose merged model costs at most ``budget`` more than one endpoint
(parameters, or FLOPs with ``budget_unit="flops"``), with the last step sized to the largest whole number
of units that still fits. γ_g is kept as k_g / n_g, so costs are exact. What is widened is a group, or the
heads of one attention module (:class:`~hubmerge.partial.Choice`), kept apart a whole head at a time.

- ``uniform``: the largest single γ for all groups.
- ``adaptive``: adaptive buffers (split pairs scoring below ε), ε searched so the budget is met.
- ``benefit``: the thesis's proof of concept: widen each group alone to γ=1, REPAIR, measure the
  improvement on calibration data, divide by its cost, fill groups in that order.
- ``greedy``: grow in γ steps; at every step re-measure each candidate's improvement given what is already
  widened, with marginal costs recomputed, and take the best improvement per cost.

The measure is the cross-entropy on calibration labels (``score="loss"``), accuracy (``"accuracy"``), or,
without labels, KL divergence from the ensemble's predictions (``"agreement"``); ``"auto"`` picks loss
when labels exist, agreement otherwise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import batches, progress_bar
from .distributed import total
from .errors import DataError, UsageError
from .evaluate import logits
from .partial import Sizes, apart_sizes, choices
from .repair import CORRECTS, RESETS, Sweep, shared_prefix

log = logging.getLogger("hubmerge")


@dataclass
class Allocation:
    gammas: dict[str, float]
    allocation: list[dict]
    trace: list[dict] = field(default_factory=list)
    partial: str | None = None  # plan method the allocation was made for, when it is not the options'
    epsilon: float | None = None


class Scorer:
    """Badness of a candidate merge from its logits on the calibration data (lower is better)."""

    def __init__(self, prepared):
        o = prepared.options
        data = prepared.calibration
        labels = [y for _, y in batches(data)]
        has_labels = all(y is not None for y in labels)
        self.kind = ("loss" if has_labels else "agreement") if o.score == "auto" else o.score
        if self.kind in ("loss", "accuracy") and not has_labels:
            raise UsageError(f"score={self.kind!r} needs labelled calibration data; use score='agreement'")
        self.labels = torch.cat(labels) if has_labels else None
        if self.kind == "agreement":
            ens = logits(prepared.ensemble(), data, o.device)
            self.target = F.log_softmax(ens, 1)

    def __call__(self, out: torch.Tensor) -> float:
        """The mean over all calibration samples (over every process of a process group)."""
        out = out.double().cpu()
        if self.labels is not None and len(self.labels) and int(self.labels.max()) >= out.shape[1]:
            raise DataError(f"calibration labels go up to {int(self.labels.max())}, but the merge has {out.shape[1]} "
                            "outputs: give calibration data of the endpoints' classes only, or score='agreement'")
        if self.kind == "loss":
            summed = F.cross_entropy(out, self.labels, reduction="sum")
        elif self.kind == "accuracy":
            summed = (out.argmax(1) != self.labels).double().sum()
        else:
            summed = F.kl_div(F.log_softmax(out, 1), self.target, log_target=True, reduction="sum")
        summed, count = total(summed, torch.tensor(float(len(out))))
        return (summed / count).item()


class _Search:
    """Shared state of the measured allocators: units per group, costs, and candidate evaluation (counted
    and timed: build, REPAIR and scoring).

    Candidates are scored through REPAIR sweeps (:class:`~hubmerge.repair.Sweep`): a candidate branches off a
    reference merge's sweep at its first layer planned differently, copying the reference's corrections in
    front and continuing from its calibration activations there, so it costs a suffix pass. With
    ``repair="reset"`` or ``"reset_repair"`` RESET is carried alongside (its train-mode activations): a
    candidate takes the reference's BatchNorm statistics in front and re-estimates the rest, a suffix pass
    as well.
    """

    def __init__(self, prepared):
        self.p = prepared
        self.unit = prepared.options.budget_unit
        self.budget = prepared.options.budget
        self.choices = {c.name: c for c in choices(prepared.spec)}  # groups, and attention modules' heads
        self.widths = {name: c.width for name, c in self.choices.items()}
        self.group_widths = {g: grp.width for g, grp in prepared.spec.groups.items()}
        self.models = len(prepared.models)
        self.k = {name: 0 for name in self.widths}
        self.evaluations, self.seconds = 0, 0.0

    def gammas(self, k: dict[str, int]) -> dict[str, float]:
        """Per-group γ of k units (heads) apart per choice."""
        return {g: v for name, c in self.choices.items() for g, v in c.gammas(k[name]).items()}

    def partition(self, k: dict[str, int]) -> dict[str, Sizes]:
        """k units (heads) of each choice kept apart by every endpoint: a group's sizes are (k, n − k, k), of N
        endpoints (k, n − k, k, …, k); groups that cannot widen, (0, n, 0, …)."""
        merged = {g: apart_sizes(n, 0, self.models) for g, n in self.group_widths.items()}
        return merged | {g: v for name, c in self.choices.items()
                         for g, v in c.partition(k[name], self.group_widths, self.models).items()}

    def increase(self, k: dict[str, int]) -> float:
        return self.p.costs.increase(self.partition(k))[self.unit]

    def fits(self, k: dict[str, int]) -> bool:
        return self.increase(k) <= self.budget + 1e-12

    def largest_fit(self, g: str, upto: int) -> int:
        """The most units of group ``g`` (between its current k and ``upto``) that keep the budget."""
        lo, hi = self.k[g], upto
        while lo < hi:  # cost grows with k, so bisect
            mid = (lo + hi + 1) // 2
            if self.fits({**self.k, g: mid}):
                lo = mid
            else:
                hi = mid - 1
        return lo

    @contextmanager
    def _timed(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0

    def start(self, k: dict[str, int], repaired: Sweep | None = None) -> Sweep:
        """A sweep from the input of the merge with ``k`` units apart per group, built and repaired as the
        options say; given that merge already ``repaired`` (an earlier candidate), a sweep that only carries
        its activations. With RESET the merge is built and repaired again instead: branches continue RESET
        from activations taken before any REPAIR correction, which a repaired merge no longer gives."""
        o = self.p.options
        resets = o.repair in RESETS
        with self._timed():
            if repaired is not None and not resets:
                model, plans, correct = repaired.model, repaired.plans, False
            else:
                plans = self.p.plans(self.gammas(k))
                model, correct = self.p.build(plans, repair=None), o.repair in CORRECTS
            return Sweep.start(model, plans, self.p.repair_statistics, self.p.calibration, correct=correct,
                               unmerged=o.repair_unmerged, normed=not resets, reset=resets, device=o.device,
                               memory=o.activation_bytes)

    def in_forward_order(self, reference: Sweep, ks: list[dict[str, int]]) -> list[int]:
        """Indices of candidates ``ks`` by their first layer planned differently from ``reference`` (sweeps only
        move forward, so branches are taken in that order)."""
        first = [shared_prefix(self.p.spec.layers, self.p.plans(self.gammas(k)), reference.plans) for k in ks]
        return sorted(range(len(ks)), key=first.__getitem__)

    def candidate(self, reference: Sweep, k: dict[str, int]) -> Sweep:
        """The sweep of the merge with ``k`` units apart, branched off ``reference`` (see the class docstring),
        or from the input where RESET cannot branch there (:meth:`~hubmerge.repair.Sweep.branches_exactly`)."""
        plans = self.p.plans(self.gammas(k))
        if not reference.branches_exactly(plans):
            return self.start(k)
        with self._timed():
            return reference.branch(self.p.build(plans, repair=None), plans, correct=self.p.options.repair in CORRECTS)

    def score(self, scorer: Scorer, sweep: Sweep) -> float:
        """Finish a sweep (its remaining REPAIR corrections) and score the repaired merge's logits."""
        with self._timed():
            value = scorer(sweep.finish())
        self.evaluations += 1
        return value

    def result(self, trace: list[dict], benefits: dict[str, float] | None = None, **extra) -> Allocation:
        base = self.p.costs(self.partition({g: 0 for g in self.widths})).groups
        now = self.p.costs(self.partition(self.k)).groups

        def added(name: str, unit: str) -> int:
            return sum(getattr(now[g], unit) - getattr(base[g], unit) for g in self.choices[name].groups)

        rows = [{
            "group": g, "gamma": self.k[g] / n, "units_added": self.k[g],
            "params_added": added(g, "params"), "flops_added": added(g, "flops"),
            "benefit": None if benefits is None else benefits.get(g),
        } for g, n in self.widths.items()]
        return Allocation(self.gammas(self.k), rows, trace, **extra)


def _uniform(s: _Search) -> Allocation:
    # γ on the finest grid that every group can express equally: bisection over a shared γ
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if s.fits({g: round(mid * n) for g, n in s.widths.items()}):
            lo = mid
        else:
            hi = mid
    s.k = {g: round(lo * n) for g, n in s.widths.items()}
    return s.result([{"gamma": lo, "increase": s.increase(s.k)}])


def _adaptive(s: _Search) -> Allocation:
    """Bisect ε: a higher threshold splits more pairs (data-driven per group)."""
    p = s.p

    def sizes(eps: float) -> dict[str, int]:
        partition = p.partition(p.plans(1.0, method="adaptive", epsilon=eps))
        return {name: c.apart(partition) for name, c in s.choices.items()}

    lo, hi, trace = -1.0, 1.0 + 1e-9, []
    if s.fits(sizes(hi)):
        lo = hi
    for _ in range(25):
        if hi - lo < 1e-4:
            break
        mid = (lo + hi) / 2
        k = sizes(mid)
        trace.append({"epsilon": mid, "increase": s.increase(k)})
        lo, hi = (mid, hi) if s.fits(k) else (lo, mid)
    s.k = sizes(lo)
    return s.result(trace, partial="adaptive", epsilon=lo)


def _benefit(s: _Search, scorer: Scorer) -> Allocation:
    reference = s.start(s.k)
    groups = list(s.widths)
    alone = [{**{h: 0 for h in groups}, g: s.widths[g]} for g in groups]
    values = {}
    for i in progress_bar(s.in_forward_order(reference, alone), "measuring benefit per group"):
        values[groups[i]] = s.score(scorer, s.candidate(reference, alone[i]))
    base = s.score(scorer, reference)
    benefit, trace = {}, []
    for g, k in zip(groups, alone):
        gain, cost = base - values[g], s.increase(k)
        benefit[g] = gain / cost if cost > 0 else 0.0
        trace.append({"group": g, "score_gain": gain, "cost": cost, "benefit_factor": benefit[g]})
    # the budget is spent in full (a group that measured no gain still adds capacity), best first
    for g in sorted(benefit, key=benefit.get, reverse=True):
        s.k[g] = s.largest_fit(g, s.widths[g])
    return s.result(trace, benefit)


def _greedy(s: _Search, scorer: Scorer) -> Allocation:
    step = s.p.options.greedy_step
    reference = s.start(s.k)
    current = s.score(scorer, reference)
    trace, benefits = [], {g: 0.0 for g in s.widths}
    while True:
        spent, steps = s.increase(s.k), []
        for g, n in s.widths.items():
            k_next = s.largest_fit(g, min(n, s.k[g] + max(1, round(step * n)))) if s.k[g] < n else s.k[g]
            if k_next > s.k[g]:
                steps.append((g, {**s.k, g: k_next}))
        if not steps:  # nothing fits any more: the budget is spent to the unit
            break
        reference, best = s.start(s.k, repaired=reference), None
        for i in s.in_forward_order(reference, [k for _, k in steps]):
            g, cand = steps[i]
            sweep = s.candidate(reference, cand)
            gain, cost = current - s.score(scorer, sweep), s.increase(cand) - spent
            ratio = gain / cost if cost > 0 else float("inf")
            # the best gain per cost; among equals the first group in the spec's order
            if best is None or (ratio, -i) > (best[0], -best[1]):
                best = (ratio, i, gain, sweep)
        ratio, i, gain, reference = best
        g, s.k = steps[i][0], steps[i][1]
        current -= gain
        benefits[g] += gain
        trace.append({"group": g, "units": s.k[g], "score": current, "benefit_per_cost": ratio,
                      "increase": s.increase(s.k)})
        log.info("greedy: %s -> %d units, score %.4f, increase %.3f", g, s.k[g], current, s.increase(s.k))
    return s.result(trace, benefits)


def allocate(prepared) -> Allocation:
    """Per-group γ for ``prepared.options.budget`` by ``prepared.options.allocator``."""
    o = prepared.options
    s = _Search(prepared)
    if o.allocator == "uniform":
        return _uniform(s)
    if o.allocator == "adaptive":
        return _adaptive(s)
    scorer = Scorer(prepared)
    result = _benefit(s, scorer) if o.allocator == "benefit" else _greedy(s, scorer)
    result.trace.append({"evaluations": s.evaluations, "evaluation_seconds": s.seconds,
                         "score": scorer.kind})
    return result
