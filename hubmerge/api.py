"""The public entry point: ``hubmerge.merge(model_a, model_b, calibration, ...)``.

It runs the pipeline spec → statistics → alignment → partial plan (or budget allocation) → build →
REPAIR → evaluation, and returns the partitioned model with a report. :class:`Prepared` holds what stays
fixed between candidate merges (statistics, scores, costs), which the budget allocators reuse.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import alignment, build as build_stage, many, partial, repair as repair_stage, tasks as task_stage, zipit
from .arch_specs import architecture_of, calling_layers, input_size_of, spec_for
from .budget import allocate
from .cost import CostModel
from .data import Preprocess, as_batches, batches
from .distributed import require_everywhere
from .errors import CheckpointError, DataError, IncompatibleModelsError, UsageError
from .evaluate import Barrier, Ensemble, Metrics, evaluate, evaluate_all, weighted_barrier
from .partial import endpoint_names
from .matching import Matchings, is_matching
from .options import MergeOptions
from .partitioned import PartialMergedModel
from .spec import head_sources, permute_heads
from .statistics import ManyStatistics, Statistics, collect, collect_many

log = logging.getLogger("hubmerge")


@dataclass
class MergeReport:
    """What a merge measured. ``metrics`` keys: a, b, ensemble, full_merge, full_merge_repair, merged."""

    metrics: dict[str, Metrics]
    barrier: Barrier | None
    param_increase: float
    flop_increase: float
    endpoint_params: int
    endpoint_flops: int
    partition: dict[str, list[int]]
    options: dict
    endpoints: dict
    allocation: list[dict] = field(default_factory=list)
    trace: list[dict] = field(default_factory=list)
    within: dict[str, list[int]] = field(default_factory=dict)  # zip: per group and endpoint, its pairs merged
    weights: list[float] = field(default_factory=list)  # the endpoints' weights (1−α, α for two)
    tasks: list[dict] = field(default_factory=list)  # separate tasks: each endpoint's outputs (Task.to_dict)
    timings: dict[str, float] = field(default_factory=dict)
    # per attention module whose heads B's matched in another order: entry i is the B head matched to A head i
    head_orders: dict[str, list[int]] = field(default_factory=dict)
    # the same for every endpoint whose heads were matched to A's in another order, by name (``b``, ``c``, …)
    endpoint_head_orders: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["metrics"] = {k: asdict(v) for k, v in self.metrics.items()}
        out["barrier"] = asdict(self.barrier) if self.barrier else None
        return out


@dataclass
class MergeResult:
    model: PartialMergedModel
    report: MergeReport


def _check_weights(model: nn.Module, name: str) -> torch.dtype:
    """A model's floating dtype, after checking that every parameter is floating and every float tensor
    finite: a NaN would spread through the whole merge, and integer weights are not the model's values."""
    params = list(model.parameters())
    if not params:
        raise IncompatibleModelsError(f"endpoint {name} has no parameters")
    dtypes = {p.dtype for p in params}
    if any(not d.is_floating_point for d in dtypes) or len(dtypes) > 1:
        raise CheckpointError(f"endpoint {name} has parameters of dtypes {sorted(map(str, dtypes))}; hubmerge "
                              "merges floating-point models of one dtype and does not cast them")
    for key, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"endpoint {name}: {key} holds NaN or infinite values; the model is broken")
    return params[0].dtype


def check_compatible(model_a: nn.Module, model_b: nn.Module, names: tuple[str, str] = ("A", "B")
                     ) -> tuple[str, dict]:
    """Both endpoints must be the same architecture with the same shapes, floating dtype and finite weights;
    returns (name, model_args). ``names``: how errors name the two."""
    a, b = names
    dtype_a, dtype_b = _check_weights(model_a, a), _check_weights(model_b, b)
    if dtype_a != dtype_b:
        raise IncompatibleModelsError(f"the endpoints' dtypes differ ({a} {dtype_a}, {b} {dtype_b}); convert one, "
                                      f"for example model.to({dtype_a})")
    arch_a, arch_b = architecture_of(model_a), architecture_of(model_b)
    if arch_a[0] != arch_b[0]:
        raise IncompatibleModelsError(f"different architectures: {a} is {arch_a[0]}, {b} is {arch_b[0]}")
    if arch_a[1] != arch_b[1]:
        diff = {k: (arch_a[1].get(k), arch_b[1].get(k)) for k in arch_a[1] if arch_a[1].get(k) != arch_b[1].get(k)}
        what = "class counts" if "num_classes" in diff else "shapes"
        raise IncompatibleModelsError(f"the endpoints' {what} differ ({a}, {b}): {diff}; merge models of one shape")
    return arch_a


def _recorded_preprocess(model: nn.Module) -> Preprocess | None:
    """Endpoint A's preprocessing, which the merged model records; None, with a warning, where its
    ``pretrained_cfg`` cannot describe its inputs (timm's 3-channel mean for a model built with
    ``in_chans=1``): tensors are used as given, and a ``datasets.Dataset`` then asks for ``preprocess=``."""
    try:
        return Preprocess.from_model(model)
    except DataError as exc:
        log.warning("endpoint A's pretrained_cfg does not describe its inputs (%s); the merge records no "
                    "preprocessing", exc)
        return None


class Prepared:
    """An endpoint pair with its spec, calibration statistics, alignment scores and cost model; with
    ``n_way`` (the further endpoints, possibly none) the N-way merge of all of them, weighted by ``weights``
    (``matchings``). Endpoints of separate tasks (``tasks``) are held answering all of them
    (:func:`hubmerge.tasks.joint`)."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, calibration: Any, options: MergeOptions,
                 endpoints: dict | None = None, preprocess: Preprocess | None = None,
                 n_way: tuple[nn.Module, ...] | None = None, weights: tuple[float, ...] | None = None):
        given = [model_a, model_b, *(n_way or ())]
        self.tasks = task_stage.resolve(given, endpoint_names(len(given)), options.tasks)
        self.classifier: tuple[str, ...] = ()  # separate tasks: the state keys whose rows are the outputs
        if self.tasks:
            task_stage.check_weights(weights or (1 - options.alpha, options.alpha))
            joint = [task_stage.joint(m, t, self.tasks) for m, t in zip(given, self.tasks)]
            self.classifier = joint[0][1]
            model_a, model_b = joint[0][0], joint[1][0]
            n_way = None if n_way is None else tuple(m for m, _ in joint[2:])
        repair = repair_stage.resolve(options.repair, model_a)
        if repair != options.repair:
            log.info("repair=%r is %r for this model", options.repair, repair)
            options = MergeOptions.combine(options, {"repair": repair})
        if options.cross == "auto":  # a zip's units read the blocks kept apart as the zip weighs its members
            options = MergeOptions.combine(options, {"cross": "interpolate" if options.align == "zip" else "fill"})
        self.options = options  # what every stage reads: with ``repair`` and ``cross`` resolved for these endpoints
        self.timings: dict[str, float] = {}
        self.architecture, self.model_args = check_compatible(model_a, model_b)
        for i, other in enumerate(n_way or (), 3):
            check_compatible(model_a, other, ("A", f"endpoint {i}"))
        self.model_a = model_a.eval().to(options.device)
        self.model_b = model_b.eval().to(options.device)
        self.models = [self.model_a, self.model_b, *(m.eval().to(options.device) for m in n_way or ())]
        for m in self.models:  # hooks see every layer the statistics pass and REPAIR observe
            calling_layers(m)
        self.weights = weights or (1 - options.alpha, options.alpha)
        self.endpoints = endpoints or {}
        if preprocess is None and getattr(model_a, "pretrained_cfg", None):
            preprocess = _recorded_preprocess(model_a)
        self.preprocess = preprocess
        self.calibration = None
        if calibration is not None:
            self.calibration = self.batches(calibration)
        elif options.needs_data:
            raise DataError("this merge needs calibration data (activation alignment, REPAIR or a budget); "
                            "give some, or use align='weight' with repair=None for a data-free merge")
        self.input_size = self._input_size()
        self.spec = spec_for(model_a, self.input_size)
        self.costs = CostModel(self.spec, self.model_a, self.input_size)
        self.stats = self.many = None
        if self.calibration is not None:
            with self.timed("statistics"):
                targets = repair_stage.targets(self.spec, options.repair)
                if n_way is None:
                    self.stats = collect(self.model_a, self.model_b, self.spec, self.calibration, options.device,
                                         progress="statistics pass", within=options.align == "zip", outputs=targets)
                else:
                    self.many = collect_many(self.models, self.spec, self.calibration, options.device,
                                             progress="statistics pass", within=options.align == "zip",
                                             outputs=targets)
                    self.stats = self.many.pairs[(0, 1)]
        with self.timed("alignment"):
            self.endpoint_head_orders: dict[int, dict[str, torch.Tensor]] = {}  # every endpoint's but A's
            if options.match_heads and (self.stats is not None or options.align == "weight"):
                self._order_heads(options)
            self.scores = alignment.align(self.spec, options.align, stats=self.stats,
                                          state_a=self.model_a.state_dict(), state_b=self.model_b.state_dict(),
                                          seed=options.seed, correlation=options.correlation)
            self.unit_scores = self.aligned = self.pair_scores = None
            if n_way is not None:  # the N-way permutation merge (a zip's full merge to compare with)
                self.pair_scores = many.pair_scores(self.spec, self.many, [m.state_dict() for m in self.models],
                                                    options.correlation, self.scores)
                self.aligned = many.align(self.spec, self.many, self.pair_scores)
            self.matchings = self.aligned
            self.zip_plans: dict | None = None  # a zip's plans
            self._virtual: dict[tuple, tuple[list[nn.Module], ManyStatistics]] = {}  # by weights
            if options.align == "zip":
                self._zip(options)
        self._plans: dict = {}
        self._owned: dict[tuple, list[nn.Module]] = {}

    def _zip(self, options: MergeOptions) -> None:
        """The zip's matchings and plans: a full zip of more than two endpoints is their matched merge; any other
        zip (two endpoints, or a partial zip to the options' depth or to the one a budget affords) merges the
        zipped groups' virtual endpoints and keeps the others apart."""
        if options.budget is not None:
            self.options = options = self._zip_depth(options)
        count = len(self.models)
        if count > 2 and options.zip_depth is None:
            self.matchings = self.zip_plans = zipit.plan_many(self.spec, self.many, self.pair_scores, self.aligned,
                                                              options.zip_beta, options.correlation)
            return
        zipped = zipit.trunk(self.spec, options.zip_depth)
        if options.zip_depth is not None:  # (a spec without partial merging lists no layers to count)
            partial.check_widenable(self.spec, "a partial zip (zip_depth)")
            apart = sorted(set(self.spec.fixed) - zipped)
            if apart:
                raise UsageError(f"a partial zip to depth {options.zip_depth} keeps groups {apart[:3]} "
                                 f"apart, which cannot widen ({self.spec.fixed[apart[0]]}); zip deeper")
        if count > 2:
            self.matchings = zipit.plan_many(self.spec, self.many, self.pair_scores, self.aligned, options.zip_beta,
                                             options.correlation, zipped)
        else:
            self.matchings = zipit.plan(self.spec, self.scores, self.stats, options.zip_beta, options.correlation,
                                        zipped)
        self.zip_plans = zipit.plans(self.spec, zipped, count)
        self.merged_endpoints(tuple(self.weights))  # (what they cannot carry is refused here, not at the build)

    @property
    def through_virtual(self) -> bool:
        """Whether the merge interpolates a zip's virtual endpoints (every zip but a full one of N > 2, whose plans
        are its matchings)."""
        return self.zip_plans is not None and not is_matching(self.zip_plans)

    def merged_endpoints(self, weights: tuple[float, ...]) -> tuple[list[nn.Module], Statistics | ManyStatistics]:
        """The endpoints this merge interpolates at ``weights`` and the statistics REPAIR targets: the endpoints
        themselves, or a zip's virtual endpoints (:func:`~hubmerge.zipit.virtual`, which depend on the weights
        where a merged unit does not hold one unit of every endpoint) and theirs."""
        if not self.through_virtual:
            return self.models, self.many or self.stats
        if weights not in self._virtual:
            self._virtual[weights] = (zipit.virtual(self.spec, self.matchings, self.models, weights),
                                      zipit.virtual_statistics(self.spec, self.matchings, self.many or self.stats,
                                                               weights))
        return self._virtual[weights]

    def _order_heads(self, options: MergeOptions) -> None:
        """Match B's attention heads (and every further endpoint's) to A's as wholes
        (:func:`~hubmerge.alignment.head_orders`, from the statistics of each with A; for weight matching
        :func:`~hubmerge.alignment.weight_head_orders`, from their weights): the endpoint becomes the same
        function with its heads in that order and its statistics (if any) are moved alike, so every later
        stage aligns A's head i with its head i, as before, but with the head that suits it."""
        for m in range(1, len(self.models)):
            if options.align == "weight":
                orders = alignment.weight_head_orders(self.spec, self.models[0].state_dict(),
                                                      self.models[m].state_dict(), options.seed)
            else:
                stats = self.stats if self.many is None else self.many.pairs[(0, m)]
                orders = alignment.head_orders(self.spec, stats, options.correlation)
            if not orders:
                continue
            self.endpoint_head_orders[m] = orders
            moved = copy.deepcopy(self.models[m])
            moved.load_state_dict(permute_heads(self.spec, self.models[m].state_dict(), orders))
            self.models[m] = moved
            sources = head_sources(self.spec, orders)
            if self.many is None:
                if self.stats is not None:
                    self.stats = self.stats.with_b_moved(self.spec, sources)
            else:
                self.many = self.many.with_moved(m, self.spec, sources)
                self.stats = self.many.pairs[(0, 1)]
        self.model_b = self.models[1]

    @property
    def head_orders(self) -> dict[str, torch.Tensor]:
        """B's head orders (endpoint 1's of :attr:`endpoint_head_orders`)."""
        return self.endpoint_head_orders.get(1, {})

    def _zip_depth(self, options: MergeOptions) -> MergeOptions:
        """The options with the zip depth a budget affords: the least depth (the most layers kept apart) whose
        partial zip costs at most the budget, in the budget's unit; the budget is then spent."""
        if options.budget:
            partial.check_widenable(self.spec, "a budget")
        layers = len(self.spec.layers)
        for depth in range(layers + 1):  # the full zip (depth = layers) costs nothing: the loop always stops
            zipped = zipit.trunk(self.spec, depth)
            if set(self.spec.fixed) - zipped:  # a group that cannot widen must be zipped
                continue
            plans = zipit.plans(self.spec, zipped, len(self.models))
            increase = self.costs.increase(self.partition(plans))[options.budget_unit]
            if increase <= options.budget + 1e-12:
                break
        log.info("budget %g: a partial zip to depth %d of %d (+%.1f%% %s)", options.budget, depth, layers,
                 100 * increase, options.budget_unit)
        return MergeOptions.combine(options, {"zip_depth": depth, "budget": None})

    @property
    def ensemble_weights(self) -> tuple[float, ...]:
        """The endpoints' weights in their ensemble: the merge's, or 1 each for separate tasks, whose outputs
        lie side by side (each endpoint answers only its own)."""
        return (1.0,) * len(self.models) if self.tasks else tuple(self.weights)

    def ensemble(self) -> nn.Module:
        """The endpoints' logit ensemble, the ceiling of a partial merge."""
        return Ensemble(*self.models, weights=self.ensemble_weights)

    def batches(self, data: Any):
        """User data as batches, preprocessed like the endpoints when it is a ``datasets.Dataset`` (tensors
        are taken as they are, so a cfg that cannot describe them is never consulted)."""
        if self.preprocess is None and type(data).__module__.startswith("datasets"):
            self.preprocess = Preprocess.from_model(self.model_a)
        return as_batches(data, preprocess=self.preprocess, batch_size=self.options.batch_size)

    def _input_size(self) -> tuple[int, ...]:
        if self.calibration is not None:
            first = next(iter(batches(self.calibration)), None)
            require_everywhere(first is not None, "calibration data is empty: give at least one batch of inputs")
            size, takes = tuple(first[0].shape[1:]), input_size_of(self.model_a)
            if takes is not None and (len(size) != 3 or size[0] != takes[0]):
                raise DataError(f"calibration inputs have shape {size} per sample; the model takes {takes[0]}-channel "
                                "images (channels, height, width)")
            return size
        takes = input_size_of(self.model_a)
        if takes is None:
            raise UsageError("cannot tell the input resolution for FLOP counting: no calibration data and no "
                             "pretrained_cfg['input_size'] on the model")
        return takes

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Log a stage and add its wall time to ``timings``."""
        log.info("%s...", stage)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

    def plans(self, gamma: float | dict[str, float], method: str | None = None,
              epsilon: float | None = None) -> dict[str, partial.GroupPlan]:
        """Plans for ``gamma`` with the options' partial method (or the one given); a zip's plans (of a two-way
        zip's virtual endpoints: zipped groups merged, the others apart; an N-way zip's matchings); for more than
        two endpoints, the plans of their N-way alignment (:func:`~hubmerge.partial.plan_group`: the merged units
        that score least apart)."""
        o = self.options
        if o.align == "zip":
            return self.zip_plans
        matched = self.many is not None and len(self.models) > 2
        if matched and self.unit_scores is None:  # what an N-way partial merge ranks the merged units by
            self.unit_scores = many.quality(self.aligned, self.pair_scores)
        return partial.plan(self.spec, self.unit_scores if matched else self.scores, gamma, method or o.partial,
                            epsilon=o.epsilon if epsilon is None else epsilon, seed=o.seed, cache=self._plans,
                            matchings=self.aligned if matched else None)

    @property
    def repair_statistics(self) -> Statistics | ManyStatistics:
        """What REPAIR targets in this merge at its weights: the statistics of the endpoints merged (every
        endpoint's for N-way merges, a zip's virtual ones)."""
        return self.merged_endpoints(tuple(self.weights))[1]

    def build(self, plans: dict[str, partial.GroupPlan] | Matchings, repair: str | None = "default",
              alpha: float | None = None, endpoints: bool = False) -> PartialMergedModel:
        """Build (and REPAIR, with the options' method unless told otherwise) the merge for ``plans``,
        at the options' α or the one given, of the endpoints this merge merges (a zip's virtual ones; with
        ``endpoints``, the endpoints themselves, as the permutation merge a zip is compared with)."""
        o = self.options
        method = o.repair if repair == "default" else repair
        alpha = o.alpha if alpha is None else alpha
        n_way = self.many is not None
        w = tuple(self.weights) if n_way else (1 - alpha, alpha)
        models, stats = (self.models, self.many or self.stats) if endpoints else self.merged_endpoints(w)
        if self.tasks:  # each task's classifier rows keep their own endpoint's values
            key = (endpoints, w)
            if key not in self._owned:
                self._owned[key] = task_stage.owned(models, self.tasks, self.classifier, w)
            models = self._owned[key]
        model = build_stage.build(
            self.spec, plans, *models, architecture=self.architecture,
            model_args=self.model_args, alpha=alpha, cross=o.cross, endpoints=self.endpoints,
            settings=o.model_dump(mode="json"), preprocess=self.preprocess.to_dict() if self.preprocess else None,
            input_size=list(self.input_size), weights=list(self.weights) if n_way else None,
            tasks=[t.to_dict() for t in self.tasks] if self.tasks else None,
        )
        return repair_stage.apply(model, method, plans, stats, self.calibration,
                                  unmerged=o.repair_unmerged, device=o.device, memory=o.activation_bytes)

    def full_merge_plans(self) -> dict[str, partial.GroupPlan] | Matchings:
        """The plans of the endpoints' full merge, to build with ``endpoints=True``: by permutation (also for
        a zip, as what it is compared with); for N endpoints their N-way alignment's matchings."""
        if self.aligned is not None:
            return self.aligned
        return partial.plan(self.spec, self.scores, 0.0, "forced", cache=self._plans)

    def partition(self, plans: dict[str, partial.GroupPlan] | Matchings) -> dict[str, partial.Sizes]:
        return {g: p.sizes for g, p in plans.items()}


def _within(prepared: Prepared) -> dict[str, list[int]]:
    """Per group, the zip's pairs within each model (none unless the merge is a zip)."""
    if prepared.options.align != "zip":
        return {}
    return {g: list(z.within) for g, z in prepared.matchings.items()}


def _evaluate_all(prepared: Prepared, model: PartialMergedModel, evaluation: Any) -> tuple[dict, Barrier]:
    """Metrics of the endpoints (``a``, ``b``, and ``c``, ``d``, … of an N-way merge), their ensemble, the
    full merge with and without the correction, and this merge; and its barrier."""
    o = prepared.options
    data = prepared.batches(evaluation)
    names = endpoint_names(len(prepared.models))
    full = prepared.full_merge_plans()
    candidates = {**dict(zip(names, prepared.models)), "full_merge": prepared.build(full, repair=None, endpoints=True)}
    if o.repair is not None and (prepared.many is None or o.align == "zip"):  # else this merge is it
        candidates["full_merge_repair"] = prepared.build(full, endpoints=True)
    candidates["merged"] = model
    # one pass for all: the ensemble's logits come from the endpoints' (issue 13: evaluation shares work)
    found = evaluate_all(candidates, data, o.device, {"ensemble": dict(zip(names, prepared.ensemble_weights))},
                         progress="evaluating", tasks=prepared.tasks)
    order = [*names, "ensemble", "full_merge", "full_merge_repair", "merged"]
    metrics = {k: found[k] for k in order if k in found}
    return metrics, weighted_barrier([metrics[k] for k in names], prepared.weights, metrics["merged"], prepared.tasks)


def merge(model_a: nn.Module | list[nn.Module], model_b: nn.Module | Any = None, calibration: Any = None, *,
          evaluation: Any = None, endpoints: dict | None = None, preprocess: Preprocess | None = None,
          options: MergeOptions | None = None, weights: list[float] | None = None, **overrides: Any) -> MergeResult:
    """Merge two endpoints of one architecture, partially or fully, and report what it measured; or a list
    of endpoints, ``merge([m1, m2, m3, …], calibration, weights=…)``: two as this two-way merge (``weights``
    then set α), three or more as :func:`merge_many`'s N-way full merge.

    ``calibration`` / ``evaluation``: a torch DataLoader (or iterable of batches), a torch Dataset, or a
    ``datasets.Dataset`` (preprocessed as ``preprocess`` says, by default from the endpoint's
    ``pretrained_cfg``; the merged model records it for later evaluation). ``options``: a
    :class:`~hubmerge.options.MergeOptions`, and/or its fields as keywords (which win): ``alpha``, ``align``,
    ``repair``, ``gamma``, ``partial``, ``cross``, ``budget``, ``allocator``… With ``budget`` set, per-group γ
    comes from the allocator; otherwise ``gamma`` (scalar or per group) is used as given. γ=0 everywhere is
    the full merge, whose ``model.materialize()`` is a plain timm model of the endpoints' architecture.
    """
    if isinstance(model_a, (list, tuple)):
        if calibration is not None:
            raise UsageError("merge([models], calibration, ...): the calibration data follows the list of models")
        models, given = list(model_a), dict(evaluation=evaluation, endpoints=endpoints, preprocess=preprocess,
                                             options=options)
        if len(models) != 2:
            return merge_many(models, model_b, weights=weights, **given, **overrides)
        if weights is not None:
            if "alpha" in overrides:
                raise UsageError("give weights or alpha, not both: two endpoints' weights set alpha")
            _check_endpoint_weights(weights, 2)
            overrides["alpha"] = weights[1] / sum(weights)
        return merge(models[0], models[1], model_b, **given, **overrides)
    if weights is not None:
        raise UsageError("weights weigh a list of endpoints, merge([m1, m2, ...], ...); two weigh 1−alpha and alpha")
    opts = MergeOptions.combine(options, overrides)
    opts.check_budget(2)
    t0 = time.perf_counter()
    prepared = Prepared(model_a, model_b, calibration, opts, endpoints, preprocess)
    return _planned(prepared, evaluation, t0)


def _planned(prepared: Prepared, evaluation: Any, t0: float) -> MergeResult:
    """Plan the merge (per-group γ from the allocator where a budget is set, else the options' ``gamma``), build
    it and finish it; an N-way full merge without a budget is built from its matchings (the plain
    architecture)."""
    opts = prepared.options  # as the endpoints resolve them (a zip spends its budget on its depth)
    allocation, trace, method, epsilon = [], [], None, None
    if opts.budget:
        partial.check_widenable(prepared.spec, "a budget")
    if opts.budget is not None:
        with prepared.timed("allocation"):
            result = allocate(prepared)
        gamma, allocation, trace = result.gammas, result.allocation, result.trace
        method, epsilon = result.partial, result.epsilon
    else:
        gamma = opts.gamma
    with prepared.timed("build"):
        if prepared.many is not None and opts.budget is None and not gamma and opts.align != "zip":
            plans = prepared.full_merge_plans()
        else:
            plans = prepared.plans(gamma, method, epsilon)
        model = prepared.build(plans)
    return _finish(prepared, plans, model, evaluation, t0, allocation, trace)


def _check_endpoint_weights(weights: list[float], count: int) -> None:
    if len(weights) != count or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UsageError(f"weights must be {count} non-negative numbers, not all 0, got {weights}")


def merge_many(models: list[nn.Module], calibration: Any, *, evaluation: Any = None,
               weights: list[float] | None = None, endpoints: dict | None = None, preprocess: Preprocess | None = None,
               options: MergeOptions | None = None, **overrides: Any) -> MergeResult:
    """Merge N ≥ 2 endpoints of one architecture: every endpoint's units are matched to endpoint 0's order
    (:mod:`hubmerge.many`: MergeMany on activations), then averaged with ``weights`` (default equal; two
    endpoints without weights weigh ``1−alpha`` and ``alpha``, and give exactly :func:`merge`'s merge), and
    corrected as ``repair`` says. With ``gamma`` > 0 (a scalar or per group) the merge is partial: per group
    a share γ of the merged units, those whose members correlate least, is kept apart, each endpoint keeping
    its own unit (``partial`` as for two endpoints; :func:`~hubmerge.partial.plan_group`), so γ=1 is the N
    endpoints' weighted logit average and γ=0 their full merge, one model of their size. Report metrics are
    named ``a``, ``b``, ``c``, … after the endpoints' order; the ensemble is their weighted logit average.

    A ``budget`` (at most N−1: the ensemble costs N−1 endpoints more than one) is spread over the groups by
    the ``allocator`` as for two endpoints, each unit kept apart costing N−1 units more. N-way merges align by
    activations; ``align="zip"`` zips them (:func:`~hubmerge.zipit.plan_many`: within-model pairs moved
    into their partner's merged unit, one endpoint's size; two endpoints: :func:`merge`'s zip), partially with
    ``zip_depth`` or a budget as for two (the later layers each endpoint's own, their logits averaged), and
    weight matching is refused."""
    opts = MergeOptions.combine(options, overrides)
    if len(models) < 2:
        raise UsageError(f"merge_many needs at least two endpoints, got {len(models)}")
    if opts.align == "weight":
        raise UsageError("N-way merges align by activations: use align='activation' or align='zip'")
    opts.check_budget(len(models))
    if len(models) > 2 and opts.alpha != MergeOptions.model_fields["alpha"].default:
        raise UsageError("alpha weighs two endpoints; weigh three or more with weights=[...] (default equal)")
    if weights is None:
        weights = [1 / len(models)] * len(models) if len(models) > 2 else [1 - opts.alpha, opts.alpha]
    _check_endpoint_weights(weights, len(models))
    weights = tuple(w / sum(weights) for w in weights) if abs(sum(weights) - 1) > 1e-12 else tuple(weights)
    t0 = time.perf_counter()
    prepared = Prepared(models[0], models[1], calibration, opts, endpoints, preprocess, n_way=tuple(models[2:]),
                        weights=weights)
    return _planned(prepared, evaluation, t0)


def _finish(prepared: Prepared, plans: dict, model: PartialMergedModel, evaluation: Any, t0: float,
            allocation: list[dict], trace: list[dict]) -> MergeResult:
    """Evaluate a built merge (where evaluation data is given) and report it."""
    metrics, bar = {}, None
    if evaluation is not None:
        with prepared.timed("evaluation"):
            metrics, bar = _evaluate_all(prepared, model, evaluation)
    increase = prepared.costs.increase(prepared.partition(plans))
    prepared.timings["total"] = time.perf_counter() - t0
    report = MergeReport(
        metrics=metrics, barrier=bar, param_increase=increase["params"], flop_increase=increase["flops"],
        endpoint_params=prepared.costs.endpoint.params, endpoint_flops=prepared.costs.endpoint.flops,
        partition={g: list(s) for g, s in prepared.partition(plans).items()},
        options=prepared.options.model_dump(mode="json"), endpoints=prepared.endpoints, allocation=allocation,
        trace=trace, within=_within(prepared), weights=list(prepared.weights),
        tasks=[t.to_dict() for t in prepared.tasks or ()],
        timings=prepared.timings, head_orders={m: o.tolist() for m, o in prepared.head_orders.items()},
        endpoint_head_orders={endpoint_names(len(prepared.models))[k]: {m: o.tolist() for m, o in orders.items()}
                              for k, orders in prepared.endpoint_head_orders.items()},
    )
    return MergeResult(model, report)


def interpolation_curve(model_a: nn.Module, model_b: nn.Module, calibration: Any, evaluation: Any, *,
                        alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0), **options: Any) -> list[dict]:
    """Accuracy and loss of the merge along α (alignment and statistics computed once), each with and
    without the options' REPAIR; ``gamma`` and the other options apply at every point."""
    opts = MergeOptions.parse(**options)
    prepared = Prepared(model_a, model_b, calibration, opts)
    data = prepared.batches(evaluation)
    plans = prepared.plans(opts.gamma)
    curve = []
    for alpha in alphas:
        row = {"alpha": alpha}
        for key, method in (("merge", None), ("repair", prepared.options.repair)):
            if key == "repair" and method is None:
                continue
            met = evaluate(prepared.build(plans, repair=method, alpha=alpha), data, opts.device)
            row[key] = asdict(met)
        curve.append(row)
    return curve
