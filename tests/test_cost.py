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


def test_a_token_layer_costs_a_copy_per_stream_section_probed_on_either_net():
    """A Mixer whose stream widens runs a copy of each token layer per stream section on as many channels as the
    merge has: its parameters are what the merged model stores, its FLOPs grow with the widened stream (γ=1:
    twice an endpoint's), and probing the merged net gives the same costs as probing an endpoint."""
    import hubmerge
    from hubmerge.arch_specs import spec_for
    from test_families import FAMILIES, batch, make

    a, b = make("mixer", 1), make("mixer", 2)
    calib = [(batch("mixer", seed=s), None) for s in (1, 2)]
    size = FAMILIES["mixer"].input_size
    spec = spec_for(a, size)
    for gamma in (0.3, 1.0):
        merged = hubmerge.merge(a, b, calib, gamma=gamma, repair=None).model
        on_a, on_merged = CostModel(spec, a, size), CostModel(spec, merged.net, size)
        total = on_a(merged.partition).total
        assert total == on_merged(merged.partition).total and on_a.endpoint == on_merged.endpoint
        assert total.params == sum(p.numel() for p in merged.parameters())
    assert total.flops == 2 * on_a.endpoint.flops
