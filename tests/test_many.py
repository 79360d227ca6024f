"""N-way merges (``merge_many``): two endpoints give the two-way merge bit for bit, permuted copies of one
model merge back into it, REPAIR targets the weighted statistics of all endpoints, and the report covers
every endpoint and their ensemble. N-way partial merges: γ=1 is the endpoints' weighted logit average, γ=0
their full merge, one endpoint weighted 1 (cross blocks interpolated) is that endpoint, the cost model counts
what is stored, and the merge reloads."""

import pytest
import torch

import hubmerge
import hubmerge.card
import hubmerge.repair
from hubmerge.api import Prepared
from hubmerge.arch_specs import spec_for
from hubmerge.cost import CostModel
from hubmerge.errors import UsageError
from hubmerge.evaluate import evaluate
from hubmerge.options import MergeOptions
from hubmerge.repair import corrections
from hubmerge.partitioned import PartialMergedModel
from hubmerge.spec import head_sources, permute_heads, permute_state
from hubmerge.statistics import collect_many, layer_moments

from conftest import labelled, make
from test_families import FAMILIES, batch, make as make_family, relative


def endpoints(name: str, count: int) -> tuple[list[torch.nn.Module], list]:
    """``count`` endpoints and calibration batches: the test MLP without BatchNorm, or a family's tiny model."""
    if name == "mlp":
        return [make("mlp", s) for s in range(1, count + 1)], labelled("mlp", batches=3)
    return [make_family(name, s) for s in range(1, count + 1)], [(batch(name, seed=s), None) for s in (1, 2)]


@pytest.mark.parametrize("name", ["mlp", "resnet", "swin"])
def test_two_endpoints_give_the_two_way_merge_bit_for_bit(name):
    """Swin's heads are matched to A's as wholes first, in both (and in neither with ``match_heads=False``)."""
    (a, b), calib = endpoints(name, 2)
    for repair, match in ((None, True), ("repair", True), (None, False)):
        two = hubmerge.merge(a, b, calib, repair=repair, alpha=0.3, match_heads=match)
        many = hubmerge.merge_many([a, b], calib, repair=repair, alpha=0.3, match_heads=match)
        one, other = two.model.state_dict(), many.model.state_dict()
        assert other.keys() == one.keys() and all(torch.equal(other[k], v) for k, v in one.items()), repair
        assert many.report.head_orders == two.report.head_orders
    if name == "swin":
        assert two.report.head_orders == {}  # (unmatched)
        assert hubmerge.merge(a, b, calib, repair=None).report.head_orders  # B's heads do take another order


@pytest.mark.parametrize("name", ["mlp", "resnet", "vit", "swin", "eva02"])
def test_permuted_copies_of_one_model_merge_back_into_it(name):
    """Each copy's units in another random order, and its attention heads (ordered groups: the heads only): the
    N-way alignment finds every order, matching each copy's heads to A's as wholes, and the weighted average of
    identical weights is the model (to rounding)."""
    (a,), calib = endpoints(name, 1)
    spec = Prepared(a, a, calib, MergeOptions(repair=None)).spec
    copies, reordered = [a], []
    for seed in (5, 6, 7):
        gen = torch.Generator().manual_seed(seed)
        copy = make_family(name, 1) if name != "mlp" else make("mlp", 1)
        perms = {g: torch.arange(grp.width) if grp.ordered else torch.randperm(grp.width, generator=gen)
                 for g, grp in spec.groups.items()}
        orders = {h.module: torch.randperm(len(h.heads), generator=gen) for h in spec.heads}
        copy.load_state_dict(permute_heads(spec, permute_state(spec, copy.state_dict(), perms), orders))
        copies.append(copy)
        reordered += "bcd"[seed - 5] if any((o != torch.arange(len(o))).any() for o in orders.values()) else ""
    x = calib[0][0]
    merged = hubmerge.merge_many(copies, calib, repair=None, weights=[0.1, 0.2, 0.3, 0.4])
    assert relative(merged.model(x), a(x)) <= 1e-10
    if name in ("mlp", "vit", "swin"):  # features distinct (no unit constant on the data): no pair within a copy
        zipped = hubmerge.merge_many(copies, calib, repair=None, weights=[0.1, 0.2, 0.3, 0.4], align="zip",
                                     zip_beta=1.0)
        assert all(w == [0] * 4 for w in zipped.report.within.values())
        assert relative(zipped.model(x), a(x)) <= 1e-10
        half = dict(weights=[0.1, 0.2, 0.3, 0.4], align="zip", zip_beta=1.0, zip_depth=len(spec.layers) // 2)
        partial = hubmerge.merge_many(copies, calib, repair=None, **half).model  # (cross: interpolate for zips)
        assert any(sizes[0] for sizes in partial.partition.values())
        assert relative(partial(x), a(x)) <= 1e-10
        if name == "vit":  # negative control: filled cross blocks add up the later blocks in the zipped stream
            filled = hubmerge.merge_many(copies, calib, repair=None, cross="fill", **half).model
            assert relative(filled(x), a(x)) > 1e-3
    if spec.heads:
        assert reordered and sorted(merged.report.endpoint_head_orders) == reordered
        unmatched = hubmerge.merge_many(copies, calib, repair=None, weights=[0.1, 0.2, 0.3, 0.4], match_heads=False)
        assert relative(unmatched.model(x), a(x)) > 1e-3  # heads matched by position do not find them


@pytest.mark.parametrize("name", ["mlp", "swin"])
def test_repair_targets_the_weighted_statistics_of_every_endpoint(name):
    """Each corrected output's target is Σ_m w_m · (endpoint m's statistics of its unit matched there), computed
    here from each endpoint's own pass for the outputs that hold one group, and REPAIR reaches it."""
    models, calib = endpoints(name, 3)
    weights = (0.5, 0.3, 0.2)
    prepared = Prepared(*models[:2], calib, MergeOptions(repair="repair"), n_way=tuple(models[2:]), weights=weights)
    model = prepared.build(prepared.matchings)
    targets = corrections(model, prepared.matchings, prepared.many)
    names = [c.name for c in targets]
    own = [layer_moments(m, names, calib) for m in models]
    model = hubmerge.repair.repair(model, prepared.matchings, prepared.many, calib)
    got = layer_moments(model.net, names, calib)
    checked = 0
    for c in targets:
        axis = prepared.spec.axes[f"{c.name}.weight"][0]
        if len(axis) == 1 and axis[0].group is not None and axis[0].repeat == 1 and axis[0].order is None:
            match = prepared.matchings[axis[0].group]
            unit = match.members % match.width
            for stat in ("mean", "std"):
                want = sum(w * getattr(own[m][c.name], stat)[unit[:, m]] for m, w in enumerate(weights))
                assert torch.allclose(getattr(c, stat), want, atol=1e-12, rtol=1e-12), (c.name, stat)
            checked += 1
        mean, std = got[c.name].mean, got[c.name].std
        assert torch.allclose(mean[c.mask], c.mean[c.mask], atol=1e-8, rtol=1e-8), c.name
        live = c.mask & (c.std > 1e-6)
        assert torch.allclose(std[live], c.std[live], atol=1e-8, rtol=1e-8), c.name
    assert checked


def test_report_names_every_endpoint_and_weighs_the_ensemble():
    models, calib = endpoints("mlp", 3)
    evaluation = labelled("mlp", batches=2, n=5)
    result = hubmerge.merge_many(models, calib, evaluation=evaluation, weights=[2, 1, 1])
    metrics = result.report.metrics
    assert list(metrics) == ["a", "b", "c", "ensemble", "full_merge", "merged"]
    assert result.model.weights == (0.5, 0.25, 0.25)

    class Average(torch.nn.Module):
        def forward(self, x):
            return 0.5 * models[0](x) + 0.25 * models[1](x) + 0.25 * models[2](x)

    ensemble = evaluate(Average(), evaluation)
    assert metrics["ensemble"].accuracy == ensemble.accuracy
    assert abs(metrics["ensemble"].loss - ensemble.loss) <= 1e-12
    expected = sum(w * metrics[k].accuracy for w, k in zip((0.5, 0.25, 0.25), "abc")) - metrics["merged"].accuracy
    assert abs(result.report.barrier.accuracy - expected) <= 1e-12


@pytest.mark.parametrize("name", ["mlp", "resnet", "vit", "convnext", "swin", "beit", "eva02", "mixer", "nfnet"])
def test_n_way_partial_merges_hold_the_invariants(name, tmp_path):
    """Residual streams and BatchNorms (ResNet), heads and LayerNorms (ViT), layer scales (ConvNeXt), per-head
    bias tables (Swin, BEiT: whose attention runs sized by its heads), rotary heads (EVA), token-mixing copies
    (Mixer) and weight-standardised convs (NF-Net), three endpoints."""
    models, calib = endpoints(name, 3)
    x = calib[0][0]
    weights = [0.5, 0.3, 0.2]
    ensemble = sum(w * m(x) for w, m in zip(weights, models))
    whole = hubmerge.merge_many(models, calib, repair=None, gamma=1.0, weights=weights).model
    assert relative(whole(x), ensemble) <= 1e-10
    assert all(sizes[1] == 0 for sizes in whole.partition.values() if sizes[0])
    full = hubmerge.merge_many(models, calib, repair=None, weights=weights).model
    none_apart = hubmerge.merge_many(models, calib, repair=None, gamma={g: 0.0 for g in full.spec.groups},
                                     weights=weights).model
    assert relative(none_apart(x), full(x)) <= 1e-12
    for m in range(3):  # every shared unit, cross block and norm view is endpoint m's
        one = [float(i == m) for i in range(3)]
        alone = hubmerge.merge_many(models, calib, repair=None, gamma=0.5, weights=one, cross="interpolate",
                                    partial="topk").model
        assert any(len(sizes) == 4 and sizes[0] for sizes in alone.partition.values())
        assert relative(alone(x), models[m](x)) <= 1e-10, m
    # negative control: filled cross blocks carry the other endpoints' own units into the shared ones
    filled = hubmerge.merge_many(models, calib, repair=None, gamma=0.5, weights=[1.0, 0.0, 0.0], cross="fill",
                                 partial="topk").model
    assert relative(filled(x), models[0](x)) > 1e-3
    costs = CostModel(alone.spec, models[0], tuple(x.shape[1:]))
    assert costs(alone.partition).total.params == sum(p.numel() for p in alone.parameters())
    assert costs(whole.partition).total.flops == 3 * costs.endpoint.flops
    alone.save_pretrained(tmp_path)
    again = hubmerge.PartialMergedModel.from_pretrained(tmp_path).double()
    assert again.partition == alone.partition and torch.equal(again(x), alone(x))
    card = (tmp_path / "README.md").read_text()
    apart = sum(sizes[0] for sizes in alone.partition.values())
    assert f"{apart} of " in card and "merged units kept apart" in card and "| k_A | shared | k_B | k_C |" in card


def test_n_way_partial_merges_keep_the_merged_units_that_correlate_least_apart():
    """γ keeps round(γ·width) merged units apart, the lowest-scoring ones; adaptive buffers only those below ε;
    two endpoints give the two-way partial merge bit for bit."""
    models, calib = endpoints("mlp", 3)
    prepared = Prepared(*models[:2], calib, MergeOptions(repair=None, gamma=0.3), n_way=tuple(models[2:]),
                        weights=(0.4, 0.3, 0.3))
    plans = prepared.plans(0.3)
    for g, p in plans.items():
        score, match = prepared.unit_scores[g], prepared.matchings[g]
        apart = torch.argsort(score, stable=True)[:round(0.3 * match.width)]
        assert p.sizes == (len(apart), match.width - len(apart), len(apart), len(apart))
        assert torch.equal(p.only[2], match.members[torch.sort(apart).values, 2] - 2 * match.width)
        assert score[apart].max() <= score[torch.isin(torch.arange(match.width), apart, invert=True)].min()
    threshold = float(torch.cat(list(prepared.unit_scores.values())).median())
    adaptive = prepared.plans(1.0, "adaptive", threshold)
    assert all(p.sizes[0] == int((prepared.unit_scores[g] < threshold).sum()) for g, p in adaptive.items())
    two = hubmerge.merge(*models[:2], calib, gamma=0.5, alpha=0.3, match_heads=False).model.state_dict()
    many = hubmerge.merge_many(models[:2], calib, gamma=0.5, alpha=0.3).model.state_dict()
    assert many.keys() == two.keys() and all(torch.equal(many[k], v) for k, v in two.items())


def test_repair_of_an_n_way_partial_merge_reaches_its_targets():
    """Shared units toward Σ_m w_m · (endpoint m's statistics of its member), each endpoint's own units left
    (or, with ``repair_unmerged``, toward their own endpoint's)."""
    models, calib = endpoints("mlp", 3)
    weights = (0.5, 0.3, 0.2)
    prepared = Prepared(*models[:2], calib, MergeOptions(repair="repair", gamma=0.4), n_way=tuple(models[2:]),
                        weights=weights)
    plans = prepared.plans(0.4)
    model = prepared.build(plans, repair=None)
    own = [layer_moments(m, [layer.name for layer in prepared.spec.layers], calib) for m in models]
    for unmerged in (False, True):
        targets = corrections(model, plans, prepared.many, unmerged=unmerged)
        assert targets
        for c in targets:
            p = plans[prepared.spec.layers[c.index].out_axis[0].group]
            k = p.sizes[0]
            for stat in ("mean", "std"):
                want = sum(w * getattr(own[m][c.name], stat)[p.shared[m]] for m, w in enumerate(weights))
                assert torch.allclose(getattr(c, stat)[k:k + p.sizes[1]], want, atol=1e-12, rtol=1e-12)
                assert torch.allclose(getattr(c, stat)[-p.sizes[3]:], getattr(own[2][c.name], stat)[p.only[2]],
                                      atol=1e-12, rtol=1e-12)
        assert int(targets[0].mask.sum()) == (len(targets[0].mask) if unmerged else plans[
            prepared.spec.layers[targets[0].index].out_axis[0].group].sizes[1])
        fixed = hubmerge.repair.repair(prepared.build(plans, repair=None), plans, prepared.many, calib,
                                       unmerged=unmerged)
        got = layer_moments(fixed.net, [c.name for c in targets], calib)
        for c in targets:
            assert torch.allclose(got[c.name].mean[c.mask], c.mean[c.mask], atol=1e-8, rtol=1e-8), c.name
            live = c.mask & (c.std > 1e-6)
            assert torch.allclose(got[c.name].std[live], c.std[live], atol=1e-8, rtol=1e-8), c.name


@pytest.mark.parametrize("allocator", ["uniform", "adaptive", "benefit", "greedy"])
def test_n_way_budgets_are_spent_within_the_budget(allocator):
    """Every allocator spends a budget over N endpoints: at most the budget (params, or FLOPs), counted as what
    is stored, the allocation table saying per group how many units each endpoint keeps; budget N−1 is the
    weighted logit average and 0 the full merge; two endpoints give the two-way budgeted merge bit for bit."""
    models, calib = endpoints("mlp", 3)
    x = calib[0][0]
    for budget, unit in ((0.4, "params"), (0.9, "flops")):
        result = hubmerge.merge_many(models, calib, budget=budget, budget_unit=unit, allocator=allocator)
        r, model = result.report, result.model
        increase = r.param_increase if unit == "params" else r.flop_increase
        assert 0 < increase <= budget + 1e-12, (budget, increase)
        costs = CostModel(model.spec, models[0], tuple(x.shape[1:]))
        assert costs(model.partition).total.params == sum(p.numel() for p in model.parameters())
        assert {row["group"] for row in r.allocation} == set(model.spec.groups)
        for row in r.allocation:
            assert model.partition[row["group"]] == (row["units_added"], 10 - row["units_added"],
                                                     row["units_added"], row["units_added"])
    weights = [0.2, 0.3, 0.5]
    whole = hubmerge.merge_many(models, calib, budget=2, allocator=allocator, repair=None, weights=weights).model
    assert relative(whole(x), sum(w * m(x) for w, m in zip(weights, models))) <= 1e-10
    none = hubmerge.merge_many(models, calib, budget=0, allocator=allocator, weights=weights).model
    full = hubmerge.merge_many(models, calib, weights=weights).model
    assert relative(none(x), full(x)) <= 1e-10
    two = hubmerge.merge(*models[:2], calib, budget=0.3, allocator=allocator).model.state_dict()
    many = hubmerge.merge_many(models[:2], calib, budget=0.3, allocator=allocator).model.state_dict()
    assert many.keys() == two.keys() and all(torch.equal(many[k], v) for k, v in two.items())


def test_what_an_n_way_merge_refuses():
    models, calib = endpoints("mlp", 3)
    for bad, message in ((dict(budget=2.5), r"budget must be in \[0, 2\] for 3 endpoints"),
                         (dict(align="weight"), "align='activation' or align='zip'"),
                         (dict(weights=[1, 1]), "3 non-negative"),
                         (dict(weights=[1, -1, 1]), "non-negative"), (dict(weights=[0, 0, 0]), "not all 0"),
                         (dict(alpha=0.3), "alpha weighs two endpoints")):
        with pytest.raises(UsageError, match=message):
            hubmerge.merge_many(models, calib, **bad)
    with pytest.raises(UsageError, match="at least two"):
        hubmerge.merge_many(models[:1], calib)


def test_merge_takes_a_list_of_endpoints():
    """``merge([m1, m2, m3], calib, weights=...)`` is ``merge_many``; a list of two is the two-way merge, its
    weights setting α (which then takes partial merges too)."""
    models, calib = endpoints("mlp", 3)
    listed = hubmerge.merge(models, calib, repair=None, weights=[1, 2, 3]).model.state_dict()
    many = hubmerge.merge_many(models, calib, repair=None, weights=[1, 2, 3]).model.state_dict()
    assert all(torch.equal(many[k], v) for k, v in listed.items())
    two = hubmerge.merge(models[:2], calib, gamma=0.5, weights=[1, 3]).model.state_dict()
    pair = hubmerge.merge(*models[:2], calib, gamma=0.5, alpha=0.75).model.state_dict()
    assert all(torch.equal(pair[k], v) for k, v in two.items())
    with pytest.raises(UsageError, match="weights or alpha"):
        hubmerge.merge(models[:2], calib, weights=[1, 3], alpha=0.2)
    with pytest.raises(UsageError, match="weights weigh a list"):
        hubmerge.merge(*models[:2], calib, weights=[1, 3])


def test_moved_statistics_are_those_of_a_pass_over_the_moved_endpoint():
    """An N-way merge matches each endpoint's heads and moves its statistics in every pair, as A or as B."""
    models, calib = endpoints("vit", 3)
    spec = Prepared(models[0], models[1], calib, MergeOptions(repair=None)).spec
    orders = {h.module: torch.arange(len(h.heads)).flip(0) for h in spec.heads}
    moved = make_family("vit", 2)
    moved.load_state_dict(permute_heads(spec, models[1].state_dict(), orders))
    want = collect_many([models[0], moved, models[2]], spec, calib)
    got = collect_many(models, spec, calib).with_moved(1, spec, head_sources(spec, orders))
    for pair in want.pairs:
        for key, pm in want.pairs[pair].points.items():
            other = got.pairs[pair].points[key]
            for name in ("cross", "batch_std_a", "batch_std_b"):
                assert torch.allclose(getattr(other, name), getattr(pm, name), rtol=1e-12, atol=1e-12), (pair, key)
            assert torch.allclose(other.a.sum, pm.a.sum, rtol=1e-12, atol=1e-12)
            assert torch.allclose(other.b.sumsq, pm.b.sumsq, rtol=1e-12, atol=1e-12)
        assert got.pairs[pair].layers_a is got.layers[pair[0]] and got.pairs[pair].layers_b is got.layers[pair[1]]
    for name, m in want.layers[1].items():
        assert torch.allclose(got.layers[1][name].sum, m.sum, rtol=1e-12, atol=1e-12), name


# N-way zips (ZipIt! for more than two endpoints)

def _dense(match, weights: tuple[float, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per model, the merge matrix M_m (merged units × its units: its members' weights) and the unmerge matrix
    U_m (its units × merged units: 1 where a unit goes), built from the matching's rows one by one."""
    n, count = match.width, match.models
    merge = [torch.zeros(n, n, dtype=torch.float64) for _ in range(count)]
    unmerge = [torch.zeros(n, n, dtype=torch.float64) for _ in range(count)]
    for p, row in enumerate(match.members.tolist()):
        real = [u for u in row if u >= 0]
        owners = [u // n for u in real]
        one_each = sorted(owners) == list(range(count))
        total = sum(weights[o] for o in owners)
        for u, o in zip(real, owners):
            merge[o][p, u % n] = weights[o] if one_each else weights[o] / total
            unmerge[o][u % n, p] = 1.0
    return merge, unmerge


def test_an_n_way_zip_merges_and_unmerges_as_its_matrices_say():
    """Every weight of the MLP's N-way zip is Σ_m M_m · W_m · U_m (fixed input and logits: the identity), with
    merged units of different sizes (padded rows): a unit moved into its within-model partner's merged unit,
    and the merged unit it left averaging the other endpoints' units (weights renormalised)."""
    models, calib = endpoints("mlp", 3)
    weights = (0.5, 0.3, 0.2)
    prepared = Prepared(*models[:2], calib, MergeOptions(align="zip", zip_beta=1.0, repair=None),
                        n_way=tuple(models[2:]), weights=weights)
    zips = prepared.matchings
    assert any(z.members.shape[1] > 3 for z in zips.values())  # a merged unit holds a within-model pair
    assert any(((z.members >= 0).sum(1) < 3).any() for z in zips.values())  # and one misses that model
    assert sum(sum(z.within) for z in zips.values()) >= 3
    for z in zips.values():  # every unit of every model in exactly one merged unit, the width kept
        real = z.members[z.members >= 0]
        assert z.members.shape[0] == z.width and torch.equal(torch.sort(real).values, torch.arange(3 * z.width))
    merged = prepared.build(prepared.plans(0.0)).materialize().state_dict()
    states = [m.state_dict() for m in models]
    eye = [torch.eye(10, dtype=torch.float64) * w for w in weights], [torch.eye(10, dtype=torch.float64)] * 3
    for layer in prepared.spec.layers:
        out_group, in_group = layer.out_axis[0].group, layer.in_axis[0].group
        merge = _dense(zips[out_group], weights)[0] if out_group else eye[0]
        unmerge = _dense(zips[in_group], weights)[1] if in_group else None
        for key in (f"{layer.name}.weight", f"{layer.name}.bias"):
            want = 0
            for m in range(3):
                w = states[m][key]
                if key.endswith("weight") and unmerge is not None:
                    w = w @ unmerge[m]
                want = want + merge[m] @ w
            assert torch.allclose(merged[key], want, atol=1e-13, rtol=1e-13), key


@pytest.mark.parametrize("name", ["mlp", "resnet", "vit", "convnext", "swin", "eva02"])
def test_an_n_way_zip_without_within_pairs_is_the_n_way_merge(name):
    """β=0 gives the N-way permutation merge bit for bit; a zip with within-model pairs is one endpoint's size
    too and loads into the plain architecture; the report counts each endpoint's pairs."""
    models, calib = endpoints(name, 3)
    x = calib[0][0]
    weights = [0.5, 0.3, 0.2]
    full = hubmerge.merge_many(models, calib, repair=None, weights=weights).model.state_dict()
    zipped = hubmerge.merge_many(models, calib, repair=None, weights=weights, align="zip", zip_beta=0.0)
    state = zipped.model.state_dict()
    assert state.keys() == full.keys() and all(torch.equal(state[k], v) for k, v in full.items())
    assert all(w == [0, 0, 0] for w in zipped.report.within.values())
    result = hubmerge.merge_many(models, calib, weights=weights, align="zip", zip_beta=1.0)
    assert sum(sum(w) for w in result.report.within.values()) > 0 and result.report.param_increase == 0
    plain = make_family(name, 1) if name != "mlp" else make("mlp", 1)
    plain.load_state_dict(result.model.materialize().state_dict(), strict=True)
    assert torch.isfinite(result.model(x)).all() and relative(plain(x), result.model(x)) <= 1e-10


@pytest.mark.parametrize("name", ["mlp", "resnet", "swin"])
def test_a_zip_of_two_endpoints_is_the_two_way_zip_bit_for_bit(name):
    (a, b), calib = endpoints(name, 2)
    evaluation = calib[:1] if name == "mlp" else None  # (the families' batches have no labels)
    for options in (dict(repair=None), dict(), dict(zip_depth=2, repair=None)):
        two = hubmerge.merge(a, b, calib, evaluation=evaluation, align="zip", alpha=0.3, **options)
        many = hubmerge.merge_many([a, b], calib, evaluation=evaluation, align="zip", alpha=0.3, **options)
        one, other = two.model.state_dict(), many.model.state_dict()
        assert other.keys() == one.keys() and all(torch.equal(other[k], v) for k, v in one.items()), options
        assert many.report.within == two.report.within and list(many.report.metrics) == list(two.report.metrics)


def test_repair_of_an_n_way_zip_targets_its_members_statistics():
    """A zipped unit's target is its members' statistics weighted as the zip weighs them (renormalised where it
    holds two units of one endpoint or misses one), and REPAIR reaches it; the card names the zip."""
    models, calib = endpoints("mlp", 3)
    weights = (0.5, 0.3, 0.2)
    prepared = Prepared(*models[:2], calib, MergeOptions(align="zip", zip_beta=1.0, repair="repair"),
                        n_way=tuple(models[2:]), weights=weights)
    plans = prepared.plans(0.0)
    model = prepared.build(plans, repair=None)
    targets = corrections(model, plans, prepared.repair_statistics)
    names = [c.name for c in targets]
    own = [layer_moments(m, names, calib) for m in models]
    for c in targets:
        axis = prepared.spec.axes[f"{c.name}.weight"][0]
        if axis[0].group is None:
            continue
        z = plans[axis[0].group]
        member, mine = z.members.clamp_min(0), z.members >= 0
        weight = z.weights(weights, torch.float64)
        for stat in ("mean", "std"):
            table = torch.stack([getattr(o[c.name], stat) for o in own])
            want = (weight * torch.where(mine, table[member // z.width, member % z.width], 0.0)).sum(1)
            assert torch.allclose(getattr(c, stat), want, atol=1e-12, rtol=1e-12), (c.name, stat)
    fixed = hubmerge.repair.repair(model, plans, prepared.repair_statistics, calib)
    got = layer_moments(fixed.net, names, calib)
    for c in targets:
        assert torch.allclose(got[c.name].mean[c.mask], c.mean[c.mask], atol=1e-8, rtol=1e-8), c.name
        live = c.mask & (c.std > 1e-6)
        assert torch.allclose(got[c.name].std[live], c.std[live], atol=1e-8, rtol=1e-8), c.name
    result = hubmerge.merge_many(models, calib, align="zip", zip_beta=1.0, evaluation=calib[:1])
    assert "full_merge_repair" in result.report.metrics  # the permutation merge, compared with the zip
    text = str(hubmerge.card.build(result.model, result.report, repo_id="user/zipped"))
    assert "N-way zipped merge" in text and "hold a pair of A's units" in text and "ZipIt!" in text


@pytest.mark.parametrize("name", ["mlp", "resnet", "vit", "convnext"])
def test_a_partial_n_way_zip_runs_from_the_ensemble_to_the_full_zip(name, tmp_path):
    """``zip_depth`` with three endpoints: depth 0 keeps every group apart (their weighted logit average, float64
    ≤1e-10), a depth past the last layer is the full N-way zip (their matched merge, ≤1e-10), one in between
    costs less than the ensemble, is repaired, saves, reloads and computes the same, and its card says so; a
    budget buys the least depth it affords."""
    models, calib = endpoints(name, 3)
    x = calib[0][0]
    weights = [0.5, 0.3, 0.2]

    def zipped(**options):
        return hubmerge.merge_many(models, calib, weights=weights, align="zip", zip_beta=1.0, **options)

    ensemble = zipped(zip_depth=0, repair=None)
    assert relative(ensemble.model(x), sum(w * m(x) for w, m in zip(weights, models))) <= 1e-10
    layers = len(ensemble.model.spec.layers)
    deep = zipped(zip_depth=layers, repair=None).model
    assert relative(deep(x), zipped(repair=None).model(x)) <= 1e-10
    half = zipped(zip_depth=layers // 2)
    assert 0 < half.report.param_increase < ensemble.report.param_increase
    assert sum(sum(w) for w in half.report.within.values()) > 0 and len(next(iter(half.report.within.values()))) == 3
    assert torch.isfinite(half.model(x)).all()
    half.model.save_pretrained(tmp_path)
    loaded = PartialMergedModel.from_pretrained(tmp_path)
    assert torch.equal(loaded(x), half.model(x)) and loaded.settings["zip_depth"] == layers // 2
    card = (tmp_path / "README.md").read_text()
    assert "N-way zipped merge** (ZipIt!)" in card and f"partial zip (`zip_depth` {layers // 2})" in card
    bought = zipped(budget=half.report.param_increase, repair=None)
    depth = bought.report.options["zip_depth"]
    assert depth <= layers // 2 and bought.report.param_increase <= half.report.param_increase
    same = zipped(zip_depth=depth, repair=None).model.state_dict()
    assert all(torch.equal(same[k], v) for k, v in bought.model.state_dict().items())


@pytest.mark.parametrize("name", ["vit", "convnext"])  # (no unit constant on the data: no ties to break)
def test_a_partial_n_way_zip_does_not_depend_on_the_order_of_an_endpoints_units(name):
    """Endpoint C with every group's units in another order gives the same partial zip, where zipped residual
    streams are written by blocks kept apart (each endpoint's share of a merged unit reads its own units)."""
    models, calib = endpoints(name, 3)
    x = calib[0][0]
    spec = spec_for(models[0], FAMILIES[name].input_size)
    gen = torch.Generator().manual_seed(3)
    perms = {g: torch.arange(grp.width) if grp.ordered else torch.randperm(grp.width, generator=gen)
             for g, grp in spec.groups.items()}
    moved = make_family(name, 3)
    moved.load_state_dict(permute_state(spec, models[2].state_dict(), perms))
    options = dict(weights=[0.5, 0.3, 0.2], align="zip", zip_beta=1.0, zip_depth=len(spec.layers) // 2,
                   repair=None, match_heads=False)
    one = hubmerge.merge_many(models, calib, **options)
    other = hubmerge.merge_many([*models[:2], moved], calib, **options)
    assert sum(sum(w) for w in one.report.within.values()) > 0
    assert relative(one.model(x), other.model(x)) <= 1e-10
