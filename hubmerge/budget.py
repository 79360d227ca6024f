"""Budget allocation (method §7): spread a relative size increase over the groups where it helps most.

Every allocator returns per-group γ whose merged model costs at most ``budget`` more than one endpoint
(parameters, or FLOPs with ``budget_unit="flops"``), with the last step sized to the largest whole number
of units that still fits. γ_g is kept as k_g / n_g, so costs are exact.

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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import batches, progress_bar
from .errors import UsageError
from .evaluate import Ensemble, logits
from .repair import Repaired

log = logging.getLogger("hubmerge")


@dataclass
class Allocation:
    gammas: dict[str, float]
    allocation: list[dict]
    trace: list[dict] = field(default_factory=list)
    partial: str | None = None  # plan method the allocation was made for, when it is not the options'
    epsilon: float | None = None


class Scorer:
    """Badness of a candidate merge on calibration data (lower is better)."""

    def __init__(self, prepared):
        self.prepared = prepared
        o = prepared.options
        data = prepared.calibration
        labels = [y for _, y in batches(data)]
        has_labels = all(y is not None for y in labels)
        self.kind = ("loss" if has_labels else "agreement") if o.score == "auto" else o.score
        if self.kind in ("loss", "accuracy") and not has_labels:
            raise UsageError(f"score={self.kind!r} needs labelled calibration data; use score='agreement'")
        self.labels = torch.cat(labels) if has_labels else None
        if self.kind == "agreement":
            ens = logits(Ensemble(prepared.model_a, prepared.model_b, o.alpha), data, o.device)
            self.target = F.log_softmax(ens, 1)

    def __call__(self, model) -> float:
        out = logits(model, self.prepared.calibration, self.prepared.options.device)
        if self.kind == "loss":
            value = F.cross_entropy(out, self.labels).item()
        elif self.kind == "accuracy":
            value = 1.0 - (out.argmax(1) == self.labels).double().mean().item()
        else:
            value = F.kl_div(F.log_softmax(out, 1), self.target, log_target=True, reduction="batchmean").item()
        return value


class _Search:
    """Shared state of the measured allocators: units per group, costs, and candidate evaluation (counted
    and timed: build, REPAIR and scoring)."""

    def __init__(self, prepared):
        self.p = prepared
        self.unit = prepared.options.budget_unit
        self.budget = prepared.options.budget
        self.widths = {g: grp.width for g, grp in prepared.spec.groups.items()}
        self.k = {g: 0 for g in self.widths}
        self.evaluations, self.seconds = 0, 0.0

    def gammas(self, k: dict[str, int]) -> dict[str, float]:
        return {g: k[g] / self.widths[g] for g in k}

    def partition(self, k: dict[str, int]) -> dict[str, tuple[int, int, int]]:
        """k units of each group kept apart on both sides: sizes (k, n − k, k)."""
        return {g: (k[g], self.widths[g] - k[g], k[g]) for g in k}

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

    def score(self, scorer: Scorer, k: dict[str, int], reference: Repaired | None = None
              ) -> tuple[float, Repaired]:
        """Score of the merge with ``k`` units apart per group; REPAIR reuses ``reference``'s corrections
        in front of the first group where the two differ."""
        t0 = time.perf_counter()
        plans = self.p.plans(self.gammas(k))
        model = self.p.build(plans, reference=reference)
        value = scorer(model)
        self.evaluations += 1
        self.seconds += time.perf_counter() - t0
        return value, Repaired(model, plans)

    def result(self, trace: list[dict], benefits: dict[str, float] | None = None, **extra) -> Allocation:
        base = self.p.costs(self.partition({g: 0 for g in self.widths})).groups
        now = self.p.costs(self.partition(self.k)).groups
        rows = [{
            "group": g, "gamma": self.k[g] / n, "units_added": self.k[g],
            "params_added": now[g].params - base[g].params, "flops_added": now[g].flops - base[g].flops,
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
        plans = p.plans(1.0, method="adaptive", epsilon=eps)
        return {g: plans[g].sizes[0] for g in s.widths}

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
    base, reference = s.score(scorer, s.k)
    full = {g: 0 for g in s.widths}
    benefit, trace = {}, []
    for g, n in progress_bar(list(s.widths.items()), "measuring benefit per group"):
        k = {**full, g: n}
        gain = base - s.score(scorer, k, reference)[0]
        cost = s.increase(k)
        benefit[g] = gain / cost if cost > 0 else 0.0
        trace.append({"group": g, "score_gain": gain, "cost": cost, "benefit_factor": benefit[g]})
    # the budget is spent in full (a group that measured no gain still adds capacity), best first
    for g in sorted(benefit, key=benefit.get, reverse=True):
        s.k[g] = s.largest_fit(g, s.widths[g])
    return s.result(trace, benefit)


def _greedy(s: _Search, scorer: Scorer) -> Allocation:
    step = s.p.options.greedy_step
    current, reference = s.score(scorer, s.k)
    trace, benefits = [], {g: 0.0 for g in s.widths}
    while True:
        best, spent = None, s.increase(s.k)
        for g, n in s.widths.items():
            if s.k[g] >= n:
                continue
            k_next = s.largest_fit(g, min(n, s.k[g] + max(1, round(step * n))))
            if k_next == s.k[g]:
                continue
            cand = {**s.k, g: k_next}
            cost = s.increase(cand) - spent
            value, built = s.score(scorer, cand, reference)
            gain = current - value
            ratio = gain / cost if cost > 0 else float("inf")
            if best is None or ratio > best[0]:
                best = (ratio, g, k_next, gain, built)
        if best is None:  # nothing fits any more: the budget is spent to the unit
            break
        ratio, g, k_next, gain, reference = best
        s.k[g] = k_next
        current -= gain
        benefits[g] += gain
        trace.append({"group": g, "units": k_next, "score": current, "benefit_per_cost": ratio,
                      "increase": s.increase(s.k)})
        log.info("greedy: %s -> %d units, score %.4f, increase %.3f", g, k_next, current, s.increase(s.k))
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
