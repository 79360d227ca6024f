import pytest

from hubmerge.cost import CostModel, full_partition

from conftest import CASES, make, partial_gamma
from helpers import prepared


def test_endpoint_cost_is_its_parameter_count(case):
    model = make(case, 0)
    p = prepared(case)
    assert p.costs.endpoint.params == sum(q.numel() for q in model.parameters())


@pytest.mark.parametrize("gamma", [0.0, "partial", 1.0])
def test_partitioned_parameter_count_matches_the_closed_form(case, gamma):
    p = prepared(case)
    model = p.build(p.plans(partial_gamma(case) if gamma == "partial" else gamma), repair=None)
    report = p.costs(model.partition)
    assert report.total.params == sum(q.numel() for q in model.parameters())
    # the same closed form computed on the partitioned net itself
    assert CostModel(p.spec, model.net, CASES[case][2])(model.partition).total == report.total


def test_ensemble_costs_twice_the_hidden_layers():
    p = prepared("mlp")
    inc = p.costs.increase(p.partition(p.plans(1.0)))
    head = p.model_a.head
    # γ=1: every hidden layer doubles; only the shared logits layer reads both halves (its bias is not doubled)
    assert inc["params"] == pytest.approx(1 - head.out_features / p.costs.endpoint.params)
    assert p.costs.increase(full_partition(p.spec)) == {"params": 0.0, "flops": 0.0}


def test_flops_scale_with_spatial_size():
    p = prepared("cifar_resnet20")
    first = p.costs.geo["conv1"]
    assert first.positions == 16 * 16 and first.kernel == 9
