import pytest

import hubmerge
from hubmerge.budget import allocate
from hubmerge.errors import DataError, UsageError

from conftest import inputs, labelled, make
from helpers import prepared

ALLOCATORS = ["uniform", "adaptive", "benefit", "greedy"]


def widths(p):
    return {g: grp.width for g, grp in p.spec.groups.items()}


@pytest.mark.parametrize("allocator", ALLOCATORS)
@pytest.mark.parametrize("budget", [0.15, 0.4])
@pytest.mark.parametrize("unit", ["params", "flops"])
def test_allocation_meets_the_budget_and_never_exceeds_it(allocator, budget, unit):
    p = prepared("mlp_bn", budget=budget, allocator=allocator, budget_unit=unit, greedy_step=0.5)
    result = allocate(p)
    k = {row["group"]: row["units_added"] for row in result.allocation}
    n = widths(p)
    used = p.costs.increase({g: (k[g], n[g] - k[g], k[g]) for g in n})[unit]
    assert used <= budget
    if allocator in ("benefit", "greedy"):  # spent to one unit: no group can take another
        for g in n:
            if k[g] < n[g]:
                more = {h: (k[h], n[h] - k[h], k[h]) for h in n}
                more[g] = (k[g] + 1, n[g] - k[g] - 1, k[g] + 1)
                assert p.costs.increase(more)[unit] > budget
    assert used > 0.5 * budget  # a tiny MLP cannot come closer at uniform/adaptive granularity


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_budget_zero_is_the_full_merge_and_one_the_ensemble(allocator):
    a, b, data = make("mlp_bn", 1), make("mlp_bn", 2), labelled("mlp_bn")
    zero = hubmerge.merge(a, b, data, budget=0.0, allocator=allocator, greedy_step=0.5)
    assert all(ka == kb == 0 for ka, _, kb in zero.model.partition.values())
    # REPAIR keeps the ensemble exact; RESET (the BatchNorm default) re-estimates its statistics on the calibration data
    one = hubmerge.merge(a, b, data, budget=1.0, allocator=allocator, greedy_step=0.5, alpha=0.5, repair="repair")
    assert all(m == 0 for _, m, _ in one.model.partition.values())
    x = inputs("mlp_bn")
    assert (one.model(x) - hubmerge.Ensemble(a, b)(x)).abs().max() < 1e-10


@pytest.mark.parametrize("allocator", ["benefit", "greedy"])
def test_same_seed_same_allocation(allocator):
    a, b, data = make("mlp_bn", 1), make("mlp_bn", 2), labelled("mlp_bn")
    runs = [hubmerge.merge(a, b, data, budget=0.3, allocator=allocator, seed=3, greedy_step=0.25,
                           partial="random").report.allocation for _ in range(2)]
    assert runs[0] == runs[1]
    assert any(row["units_added"] for row in runs[0])


def test_label_free_calibration_scores_agreement_with_the_ensemble():
    a, b = make("mlp_bn", 1), make("mlp_bn", 2)
    unlabelled = [x for x, _ in labelled("mlp_bn")]
    result = hubmerge.merge(a, b, unlabelled, budget=0.3, allocator="greedy", greedy_step=0.5)
    assert result.report.trace[-1]["score"] == "agreement"
    assert result.report.trace[-1]["evaluations"] > 0
    with pytest.raises(UsageError, match="labelled"):
        hubmerge.merge(a, b, unlabelled, budget=0.3, allocator="greedy", score="loss")


def test_report_has_the_allocation_per_group():
    a, b, data = make("mlp_bn", 1), make("mlp_bn", 2), labelled("mlp_bn")
    report = hubmerge.merge(a, b, data, budget=0.3, allocator="benefit").report
    assert {row["group"] for row in report.allocation} == {"blocks.0.fc", "blocks.1.fc"}
    assert all(row["benefit"] is not None for row in report.allocation)
    assert report.param_increase <= 0.3


def test_budget_out_of_range_is_a_clear_error():
    with pytest.raises(UsageError, match=r"budget: Input should be greater than or equal to 0"):
        hubmerge.merge(make("mlp", 0), make("mlp", 1), labelled("mlp"), budget=-0.1)
    with pytest.raises(UsageError, match=r"budget must be in \[0, 1\] for 2 endpoints"):
        hubmerge.merge(make("mlp", 0), make("mlp", 1), labelled("mlp"), budget=1.5)


def test_calibration_labels_beyond_the_outputs_are_refused_with_what_to_do():
    """Images of a class no endpoint was trained on (labels past the outputs) cannot be scored by loss: the
    search says so instead of failing inside the loss."""
    a, b = make("mlp", 1), make("mlp", 2)
    data = [(x, y + 10) for x, y in labelled("mlp")]
    with pytest.raises(DataError, match="calibration labels go up to 15, but the merge has 10 outputs"):
        hubmerge.merge(a, b, data, budget=0.2, repair="repair")
