"""Zip alignment (ZipIt!): within-model pairs, the merge/unmerge matrices, REPAIR toward the pairs' statistics,
partial zips.

β=0 equals the permutation full merge bit for bit in every family (``tests/test_families.py``); here: the
matching rule on hand-made correlations, the within-model correlations against numpy, a model zipped with
itself, REPAIR's targets, partial zips from the ensemble to the full zip, saving and reloading, and what a
zip refuses.
"""

import copy

import pytest
import torch

import hubmerge
from hubmerge import zipit
from hubmerge.api import Prepared
from hubmerge.arch_specs import spec_for
from hubmerge.build import build
from hubmerge.errors import UsageError
from hubmerge.evaluate import Ensemble
from hubmerge.matching import Matching, matched_state
from hubmerge.options import MergeOptions
from hubmerge.partitioned import PartialMergedModel
from hubmerge.repair import corrections
from hubmerge.statistics import collect, layer_moments
from hubmerge.spec import Group, permute_state

from conftest import inputs, labelled, make
from helpers import first_block_features
from test_families import FAMILIES, batch, make as make_family, relative


def match(cross: torch.Tensor, within_a: torch.Tensor, within_b: torch.Tensor, beta: float) -> Matching:
    """The zip of two models' units from hand-made correlations."""
    return zipit.match_many(Group("g", cross.shape[0], ()), None, {(0, 1): cross}, [within_a, within_b], beta)


def pairs(z: Matching) -> set[tuple[int, ...]]:
    return set(map(tuple, z.members.tolist()))


def test_within_pairs_need_a_partner_in_both_models_and_beat_the_cross_match():
    cross = torch.tensor([[0.6, 0.1, 0.0, 0.0], [0.1, 0.5, 0.0, 0.0], [0.0, 0.0, 0.7, 0.2], [0.0, 0.0, 0.2, 0.8]])
    within_a = torch.eye(4)
    within_a[0, 1] = within_a[1, 0] = 0.9  # A's units 0 and 1 are more alike than either is to any B unit
    within_b = torch.eye(4)
    within_b[2, 3] = within_b[3, 2] = 0.95
    # β=0: the linear assignment, cross pairs only, in A's order
    assert pairs(match(cross, within_a, within_b, 0.0)) == {(0, 4), (1, 5), (2, 6), (3, 7)}
    # β=0.5 allows ⌊0.5·4/2⌋ = 1 pair per model: A's (0, 1) and B's (2, 3); A's 2, 3 take B's 0, 1
    z = match(cross, within_a, within_b, 0.5)
    assert pairs(z) == {(0, 1), (2, 4), (3, 5), (6, 7)} and z.within == (1, 1)
    assert torch.equal(z.targets(0), torch.tensor([0, 0, 1, 2]))
    assert torch.equal(z.targets(1), torch.tensor([1, 2, 3, 3]))
    # a within pair in A alone would leave the merge wider than an endpoint: none is taken
    assert match(cross, within_a, torch.eye(4), 1.0).within == (0, 0)
    # a within pair that does not beat a unit's cross match is not taken
    within_a[0, 1] = within_a[1, 0] = 0.55
    assert match(cross, within_a, within_b, 1.0).within == (0, 0)


def test_within_correlations_match_numpy():
    a, b = make("mlp", 0), make("mlp", 1)
    spec = spec_for(a)
    x = inputs("mlp", 50)
    stats = collect(a, b, spec, [x[:20], x[20:]], within=True)
    grp = spec.groups["blocks.0.fc"]
    for pair, feats in zip(("aa", "bb"), first_block_features(a, b, x=x)):
        ref = torch.nan_to_num(torch.corrcoef(feats.T))
        assert torch.allclose(stats.correlation(grp, pair=pair), ref, atol=1e-10)
    with pytest.raises(UsageError, match="within=True"):
        collect(a, b, spec, [x]).correlation(grp, pair="aa")


@pytest.mark.parametrize("name", ["mlp", "cifar_vgg", "convnext", "vit", "swin"])
def test_a_model_zipped_with_itself_is_itself(name):
    """On features that are distinct (no two units of one model correlate as a unit does with its copy),
    every unit pairs with its own copy at any β, also in a partial zip (whose zipped units read the copies'
    later blocks weighted, not added up); the families chosen have no unit constant on the data."""
    a = make_family(name, 1)
    calib = [(batch(name, seed=s), None) for s in (1, 2)]
    x = batch(name)
    layers = len(spec_for(a, FAMILIES[name].input_size).layers)
    for beta, depth in ((0.5, None), (1.0, None), (1.0, layers // 2)):
        result = hubmerge.merge(a, make_family(name, 1), calib, align="zip", zip_beta=beta, zip_depth=depth,
                                repair=None)
        assert all(w == [0, 0] for w in result.report.within.values())
        assert relative(result.model(x), a(x)) <= 1e-10, depth
        assert result.report.options["cross"] == "interpolate"  # what cross="auto" is for a zip


def endpoints(name: str) -> tuple[torch.nn.Module, torch.nn.Module, list]:
    """Two endpoints and calibration batches: the test MLP without BatchNorm, or a family's tiny model."""
    if name == "mlp":
        return make("mlp", 1), make("mlp", 2), labelled("mlp", batches=3)
    return make_family(name, 1), make_family(name, 2), [(batch(name, seed=s), None) for s in (1, 2)]


@pytest.mark.parametrize("name", ["mlp", "swin"])
def test_repair_gives_zipped_units_their_pairs_statistics(name):
    """REPAIR's target for a zipped unit is its pair's weighted mean/std (``1−α``, ``α`` across models, ½ and ½
    within one), computed here from the endpoints' statistics for the outputs that hold one group, and the
    repaired merge reaches it on the calibration data: a partitioned family, and one whose merge is held in
    the plain architecture."""
    a, b, calib = endpoints(name)
    alpha = 0.3
    prepared = Prepared(a, b, calib, MergeOptions(align="zip", zip_beta=1.0, repair="repair", alpha=alpha))
    assert sum(sum(z.within) for z in prepared.matchings.values()) > 0  # some units zipped within their model
    plans = prepared.plans(0.0)
    targets = corrections(prepared.build(plans, repair=None), plans, prepared.repair_statistics)
    assert targets and all(c.norm is None for c in targets)  # corrections folded into the layers themselves
    checked = 0
    for c in targets:
        axis = prepared.spec.axes[f"{c.name}.weight"][0]
        if len(axis) == 1 and axis[0].group is not None and axis[0].repeat == 1 and axis[0].order is None:
            z = prepared.matchings[axis[0].group]
            model, unit = z.members // z.width, z.members % z.width
            weight = z.weights((1 - alpha, alpha), torch.float64)
            for stat in ("mean", "std"):
                own = [getattr(m[c.name], stat) for m in (prepared.stats.layers_a, prepared.stats.layers_b)]
                want = sum(weight[:, s] * torch.stack(own)[model[:, s], unit[:, s]] for s in range(2))
                assert torch.allclose(getattr(c, stat), want, atol=1e-12, rtol=1e-12), (c.name, stat)
            checked += 1
    assert checked
    model = prepared.build(plans)
    got = layer_moments(model.net, [c.name for c in targets], calib)
    for c in targets:
        mean, std = got[c.name].mean, got[c.name].std
        live = c.mask & (c.std > 1e-6)
        assert torch.allclose(mean[c.mask], c.mean[c.mask], atol=1e-8, rtol=1e-8), c.name
        assert torch.allclose(std[live], c.std[live], atol=1e-8, rtol=1e-8), c.name


@pytest.mark.parametrize("name", ["mlp", "cifar_resnet", "vit", "convnext"])
def test_a_partial_zip_runs_from_the_ensemble_to_the_full_zip(name, tmp_path):
    """``zip_depth``: depth 0 keeps every group apart (the logit-averaged ensemble, float64 ≤1e-10), a depth
    past the last layer is the full zip bit for bit, and one in between is smaller than the ensemble and
    saves, reloads strictly and computes the same outputs."""
    a, b = make_family(name, 1), make_family(name, 2)
    calib = [(batch(name, seed=s), None) for s in (1, 2)]
    x = batch(name)
    ensemble = hubmerge.merge(a, b, calib, align="zip", zip_depth=0, repair=None)
    assert relative(ensemble.model(x), Ensemble(a, b)(x)) <= 1e-10
    full = hubmerge.merge(a, b, calib, align="zip", repair=None).model.state_dict()
    layers = len(spec_for(a, FAMILIES[name].input_size).layers)
    deep = hubmerge.merge(a, b, calib, align="zip", zip_depth=layers, repair=None).model.state_dict()
    assert deep.keys() == full.keys() and all(torch.equal(deep[k], v) for k, v in full.items())
    half = hubmerge.merge(a, b, calib, align="zip", zip_depth=layers // 2)
    assert 0 < half.report.param_increase < ensemble.report.param_increase
    half.model.save_pretrained(tmp_path)
    loaded = PartialMergedModel.from_pretrained(tmp_path)
    assert torch.equal(loaded(x), half.model(x)) and loaded.settings["zip_depth"] == layers // 2


@pytest.mark.parametrize("name", ["vit", "convnext"])  # (no unit constant on the data: no ties to break)
def test_a_partial_zip_does_not_depend_on_the_order_of_bs_units(name):
    """B with every group's units in another order gives the same partial zip, also where a zipped residual
    stream is written by blocks kept apart: a within pair of A's units there reads A's units kept apart and
    none of B's (B's virtual endpoint reads nothing there; with B's weights it would read B's units with A's
    weights, which depends on B's order: checked by undoing it)."""
    a, b = make_family(name, 1), make_family(name, 2)
    calib = [(batch(name, seed=s), None) for s in (1, 2)]
    x = batch(name)
    spec = spec_for(a, FAMILIES[name].input_size)
    gen = torch.Generator().manual_seed(3)
    perms = {g: torch.arange(grp.width) if grp.ordered else torch.randperm(grp.width, generator=gen)
             for g, grp in spec.groups.items()}
    moved = make_family(name, 2)
    moved.load_state_dict(permute_state(spec, b.state_dict(), perms))
    depth = len(spec.layers) // 2
    options = MergeOptions(align="zip", zip_beta=1.0, zip_depth=depth, repair=None, match_heads=False)
    prepared = Prepared(a, b, calib, options)
    reads = [layer for layer in spec.layers if layer.out_axis[0].group in prepared.matchings
             and layer.in_axis[0].group not in (None, *prepared.matchings)]
    within = {g for g, z in prepared.matchings.items() if z.within[0]}
    assert any(layer.out_axis[0].group in within for layer in reads)  # the case this is about occurs
    one = prepared.build(prepared.plans(0.0))
    other = hubmerge.merge(a, moved, calib, options=options).model
    assert relative(one(x), other(x)) <= 1e-10
    # negative control: B's virtual endpoint reading its units kept apart with A's weights there (before 0.16.0)
    virtual_a = prepared.merged_endpoints(tuple(prepared.weights))[0][0]
    reading = copy.deepcopy(virtual_a)
    reading.load_state_dict(matched_state(spec, prepared.matchings, [a, b], (0.0, 1.0)))
    wrong = build(spec, prepared.plans(0.0), virtual_a, reading, architecture=prepared.architecture,
                  model_args=prepared.model_args, alpha=options.alpha)
    assert relative(wrong(x), one(x)) > 1e-6


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("name", ["cifar_resnet", "vit", "convnext"])
def test_virtual_endpoints_weighted_are_the_zip(name, count):
    """A partial zip's virtual endpoints weighted by the endpoints' weights are the zip's matched state in every
    tensor (1e-12), also where a zipped unit reads units kept apart (a late block writing into a zipped residual
    stream: the partial merge reads each endpoint's units there with its own virtual endpoint's rows, so a
    within pair reads its model's units at its full weight); an endpoint without a unit in a merged unit holds
    nothing of it."""
    models = [make_family(name, s) for s in range(1, count + 1)]
    calib = [(batch(name, seed=s), None) for s in (1, 2)]
    spec = spec_for(models[0], FAMILIES[name].input_size)
    options = MergeOptions(align="zip", zip_beta=1.0, zip_depth=len(spec.layers) // 2, repair=None, alpha=0.3)
    weights = (0.7, 0.3) if count == 2 else (0.5, 0.3, 0.2)
    prepared = Prepared(models[0], models[1], calib, options, n_way=tuple(models[2:]) if count > 2 else None,
                        weights=weights if count > 2 else None)
    zips = prepared.matchings
    assert set(zips) < set(spec.groups) and sum(sum(z.within) for z in zips.values()) > 0
    virtual, _ = prepared.merged_endpoints(weights)
    states = [v.state_dict() for v in virtual]
    for key, value in matched_state(spec, zips, prepared.models, weights).items():
        if value.is_floating_point():
            got = sum(w * s[key] for w, s in zip(weights, states))
            assert torch.allclose(got, value, atol=1e-12, rtol=1e-12), key
    for layer in spec.layers:
        group = layer.out_axis[0].group
        if group in zips and len(layer.out_axis) == 1 and layer.out_axis[0].repeat == 1:
            for m, state in enumerate(states):
                absent = ~(zips[group].members // zips[group].width == m).any(1)
                assert not state[f"{layer.name}.weight"][absent].any(), (layer.name, m)


@pytest.mark.parametrize("name", ["cifar_resnet", "resnetv2_bit"])
def test_a_zipped_merge_saves_reloads_and_says_so(name, tmp_path):
    """A zip of a partially mergeable family and of one held in the plain architecture (BiT's weight-standardised
    convs without a gain)."""
    a, b = make_family(name, 1), make_family(name, 2)
    calib = [(batch(name, seed=s), None) for s in (1, 2)]
    x = batch(name)
    result = hubmerge.merge(a, b, calib, align="zip", zip_beta=0.5)
    assert sum(sum(w) for w in result.report.within.values()) > 0
    result.model.save_pretrained(tmp_path)
    loaded = PartialMergedModel.from_pretrained(tmp_path)
    assert torch.equal(loaded(x), result.model(x))
    assert loaded.settings["align"] == "zip" and loaded.settings["zip_beta"] == 0.5
    card = (tmp_path / "README.md").read_text()
    assert "ZipIt!" in card and "zip_beta" in card


def test_what_a_zip_refuses():
    a, b = make("mlp", 1), make("mlp", 2)
    calib = labelled("mlp")
    for bad, message in ((dict(gamma=0.3), "by depth only"), (dict(budget=0.1, zip_depth=1), "not both"),
                         (dict(zip_beta=1.5), "zip_beta"), (dict(zip_depth=-1), "zip_depth")):
        with pytest.raises(UsageError, match=message):
            hubmerge.merge(a, b, calib, align="zip", **bad)
    with pytest.raises(UsageError, match="weigh every endpoint above 0"):  # B's pairs would weigh nothing
        hubmerge.merge(a, b, calib, align="zip", zip_beta=1.0, alpha=0.0)
    with pytest.raises(UsageError, match="zip_depth is a depth of zip alignment"):
        hubmerge.merge(a, b, calib, zip_depth=2)
    full_only = [make_family("resnetv2_bit", s) for s in (1, 2)]
    with pytest.raises(UsageError, match="partial zip"):  # the plain architecture holds full merges only
        hubmerge.merge(*full_only, [(batch("resnetv2_bit", seed=1), None)], align="zip", zip_depth=3)
    with pytest.raises(UsageError, match="a budget needs partial merging"):
        hubmerge.merge(*full_only, [(batch("resnetv2_bit", seed=1), None)], align="zip", budget=0.5)


@pytest.mark.parametrize("unit", ["params", "flops"])
def test_a_budget_buys_the_least_zip_depth_it_affords(unit):
    """With a budget a zip keeps apart as many of the last layers as the budget pays for: its depth is the least
    whose partial zip costs at most the budget, and the merge is that depth's partial zip bit for bit."""
    name = "cifar_resnet"
    a, b = make_family(name, 1), make_family(name, 2)
    calib = [(batch(name, seed=s), None) for s in (1, 2)]
    p = Prepared(a, b, calib, MergeOptions(align="zip", repair=None))
    layers = len(p.spec.layers)
    cost = {d: p.costs.increase(p.partition(zipit.plans(p.spec, zipit.trunk(p.spec, d))))[unit]
            for d in range(layers + 1)}
    budget = (cost[layers // 2] + cost[layers // 2 - 1]) / 2  # between two depths' costs
    bought = hubmerge.merge(a, b, calib, align="zip", budget=budget, budget_unit=unit, repair=None)
    depth = bought.report.options["zip_depth"]
    assert cost[depth] <= budget < cost[depth - 1] and bought.report.options["budget"] is None
    same = hubmerge.merge(a, b, calib, align="zip", zip_depth=depth, repair=None)
    assert getattr(same.report, f"{unit[:-1]}_increase") == cost[depth]
    same = same.model.state_dict()
    assert all(torch.equal(same[k], v) for k, v in bought.model.state_dict().items())
    full = hubmerge.merge(a, b, calib, align="zip", budget=0.0, repair=None)
    assert full.report.options["zip_depth"] == min(d for d in cost if cost[d] <= 1e-12)
