import pytest
import torch

import hubmerge

from hubmerge.api import Prepared
from hubmerge.errors import UsageError
from hubmerge.options import MergeOptions
from hubmerge.repair import Sweep, affine, corrections, fold, shared_prefix
from hubmerge.statistics import layer_moments

from conftest import CASES, inputs, labelled, make
from helpers import prepared

helpers_prepared = prepared


@pytest.mark.parametrize("case", ["mlp", "mlp_bn", "timm_resnet18", "cifar_vgg_stride"])
def test_repair_of_a_merge_with_itself_changes_nothing(case):
    a = make(case, 1)
    p = Prepared(a, make(case, 1), labelled(case), MergeOptions.parse(repair="repair"))
    plans = p.plans(0.0)
    plain, repaired = p.build(plans, repair=None), p.build(plans)
    for k, v in plain.state_dict().items():
        assert torch.allclose(v, repaired.state_dict()[k], atol=1e-9, rtol=1e-9), k
    x = inputs(case)
    assert (repaired(x) - a(x)).abs().max() < 1e-9


def effective_moments(model, plain, layer, data):
    """Mean/std of a layer's pre-activation as the network sees it: with a norm, REPAIR's correction
    s·x + t lives in the norm's weight and running mean, so recover s and t from the unrepaired norm."""
    got = layer_moments(model.net, [layer.name], data)[layer.name]
    if not layer.norm:
        return got.mean, got.std
    fixed, orig = model.net.get_submodule(layer.norm), plain.net.get_submodule(layer.norm)
    s = (fixed.weight / orig.weight).detach().double()
    t = orig.running_mean.double() - s * fixed.running_mean.double()
    return s * got.mean + t, s.abs() * got.std


@pytest.mark.parametrize("case", ["mlp", "mlp_bn", "timm_resnet18"])
def test_repair_sets_merged_statistics_to_the_interpolated_targets(case):
    p = prepared(case, repair="repair")
    plans = p.plans(0.3)
    model, plain = p.build(plans), p.build(plans, repair=None)
    for layer in p.spec.layers[:-1]:
        mean, std = effective_moments(model, plain, layer, p.calibration)
        plan = plans[layer.out_group]
        ka, m, _ = plan.sizes
        sa, sb = p.stats.layers_a[layer.name], p.stats.layers_b[layer.name]
        target_mean = (sa.mean[plan.shared_a] + sb.mean[plan.shared_b]) / 2
        target_std = (sa.std[plan.shared_a] + sb.std[plan.shared_b]) / 2
        shared = slice(ka, ka + m)
        assert torch.allclose(mean[shared], target_mean, atol=1e-8), layer.name
        live = std[shared] > 1e-6  # a unit the merge killed keeps σ = 0: scaling cannot revive it
        assert live.float().mean() > 0.9
        assert torch.allclose(std[shared][live], target_std[live], rtol=1e-8), layer.name


def test_unmerged_option_corrects_unmerged_units_toward_their_endpoint():
    p = prepared("mlp", repair_unmerged=True, cross="fill")
    plans = p.plans(0.5)
    model = p.build(plans)
    layer = p.spec.layers[1]
    got = layer_moments(model.net, [layer.name], p.calibration)[layer.name]
    ka = plans[layer.out_group].sizes[0]
    want = p.stats.layers_a[layer.name].mean[plans[layer.out_group].a_only]
    assert torch.allclose(got.mean[:ka], want, atol=1e-8)
    shared_only = prepared("mlp", cross="fill", repair_unmerged=False)
    untouched = layer_moments(shared_only.build(plans).net, [layer.name], p.calibration)[layer.name]
    assert not torch.allclose(untouched.mean[:ka], want, atol=1e-3)


def test_reset_recomputes_batchnorm_statistics():
    p = prepared("mlp_bn", repair="reset")
    model = p.build(p.plans(0.0))
    norm = model.net.blocks[0].norm
    x = torch.cat([x for x, _ in p.calibration])
    pre = model.net.blocks[0].fc(x.flatten(1))
    assert torch.allclose(norm.running_mean, pre.mean(0), atol=1e-9)


def test_reset_without_batchnorm_is_a_clear_error():
    p = prepared("mlp", repair="reset")
    with pytest.raises(UsageError, match="BatchNorm"):
        p.build(p.plans(0.0))


def test_reset_repair_is_reset_where_every_layer_feeds_a_batchnorm():
    """Also the merge the statistics of every output give: the statistics pass measures only the outputs the
    merge's REPAIR variant corrects (here none), and nothing else read the others."""
    p = prepared("mlp_bn", repair="reset_repair")
    plans = p.plans(0.3)
    both, reset = p.build(plans).state_dict(), p.build(plans, repair="reset").state_dict()
    assert all(torch.equal(v, reset[k]) for k, v in both.items())
    every = prepared("mlp_bn", repair="repair")
    assert not p.stats.layers_a and set(every.stats.layers_a) == {o.name for o in p.spec.outputs}
    measured = every.build(every.plans(0.3), repair="reset_repair").state_dict()
    assert all(torch.equal(v, measured[k]) for k, v in both.items())


def test_reset_repair_resets_batchnorms_and_repairs_the_layers_none_reads():
    """timm's VGG: every conv feeds a BatchNorm (reset), the pre-logits MLP does not (repaired)."""
    p = prepared("timm_vgg11_bn", repair="reset_repair")
    plans = p.plans(0.05)
    both, reset = p.build(plans), p.build(plans, repair="reset")
    free = [layer for layer in p.spec.layers[:-1] if layer.norm is None]
    assert [layer.name for layer in free] == ["pre_logits.fc1", "pre_logits.fc2"]
    for layer in p.spec.layers:
        if layer.norm:  # as RESET left it
            for name in (layer.name, layer.norm):
                want = reset.net.get_submodule(name).state_dict()
                assert all(torch.equal(v, want[k]) for k, v in both.net.get_submodule(name).state_dict().items())
    targets = {c.name: c for c in corrections(both, plans, p.stats, unmerged=True, normed=False)}
    assert set(targets) == {layer.name for layer in free}
    # the statistics pass measured the endpoints only where REPAIR corrects; REPAIR of every layer is refused
    assert set(p.stats.layers_a) == set(p.stats.layers_b) == {layer.name for layer in free}
    with pytest.raises(UsageError, match="statistics pass measured only"):
        p.build(plans, repair="repair")
    for layer in free:
        got, c = layer_moments(both.net, [layer.name], p.calibration)[layer.name], targets[layer.name]
        before = layer_moments(reset.net, [layer.name], p.calibration)[layer.name]
        live = c.mask & (got.std > 1e-6)
        assert live.float().mean() > 0.9
        assert torch.allclose(got.mean[c.mask], c.mean[c.mask], atol=1e-8), layer.name
        assert torch.allclose(got.std[live], c.std[live], rtol=1e-8), layer.name
        assert not torch.allclose(before.mean[c.mask], c.mean[c.mask], atol=1e-3)  # RESET alone misses them


def layer_by_layer(model, plans, stats, data, unmerged):
    """REPAIR as the method states it: each layer measured by a pass from the input, after the corrections
    of the layers in front of it (what hubmerge did before its one-pass sweep)."""
    for c in corrections(model, plans, stats, unmerged):
        fold(model.net, c, *affine(c, layer_moments(model.net, [c.name], data)[c.name]))
    return model


def family_prepared(family):
    from test_families import batch, make

    calib = [(batch(family, 8, seed=s), None) for s in (1, 2)]
    return Prepared(make(family, 1), make(family, 2), calib, MergeOptions.parse(repair="repair", repair_unmerged=True))


@pytest.mark.parametrize("case", ["mlp", "mlp_bn", "timm_resnet18", "cifar_vgg_stride", "vit", "convnext",
                                  "mobilevit", "nfnet"])
def test_one_pass_repair_equals_layer_by_layer_repair(case):
    """The sweep carries corrected activations forward instead of measuring each layer from the input; in
    float64 both give the same weights to 1e-10. ViT is a full merge held in the plain architecture;
    MobileViT and NFNet have corrected layers inside modules that torch.fx keeps whole, which the sweep runs
    again after each correction (timm's VGG, whose ConvMlp is such a module in a partitioned merge, takes the
    same path; it is left out for its 40 s)."""
    p = helpers_prepared(case, repair="repair", repair_unmerged=True) if case in CASES else family_prepared(case)
    plans = p.plans(0.3 if p.spec.partial is None else 0.0)
    plain = p.build(plans, repair=None)
    swept, stepped = p.build(plans), layer_by_layer(p.build(plans, repair=None), plans, p.stats, p.calibration, True)
    want = stepped.state_dict()
    changed = 0
    for k, v in swept.state_dict().items():
        if v.is_floating_point():
            assert ((v - want[k]).abs().max() <= 1e-10 * want[k].abs().max().clamp_min(1e-300)), k
            changed += not torch.equal(v, plain.state_dict()[k])
    assert changed >= len(corrections(plain, plans, p.stats)) // 2  # the corrections did something


def same_as_fresh(sweep, fresh, x):
    """A sweep's merge equals ``fresh`` bit for bit, and the logits it carried to the end are the merge's own
    (to rounding: carried values are corrected as s·y + t, the merge computes with folded weights)."""
    out = sweep.finish()
    want = fresh.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in sweep.model.state_dict().items())
    assert (out - fresh(x)).abs().max() <= 1e-10 * out.abs().max()


def counted(model, resets=True):
    """``model`` (with ``resets``) with its BatchNorms counting batches already seen, as a trained endpoint's do
    (these random endpoints' count 0): RESET must start every count over, or its cumulative average keeps old
    statistics."""
    for m in model.modules() if resets else []:
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.num_batches_tracked.fill_(7)
    return model


@pytest.mark.parametrize("case, method", [("mlp", "repair"), ("mlp_bn", "repair"), ("timm_resnet18", "repair"),
                                          ("cifar_vgg_stride", "repair"), ("mlp_bn", "reset"),
                                          ("timm_resnet18", "reset_repair"), ("cifar_vgg_stride", "reset_repair")])
def test_a_branch_is_the_merge_repaired_from_the_input(case, method):
    """The budget search branches candidates off a reference merge's sweep at their first changed layer,
    copying the corrections in front and continuing from the reference's activations; the result must be
    the merge REPAIR gives from the input, bit for bit, and the branch's logits its own. With RESET the
    branch also takes the BatchNorm statistics in front and continues RESET from the reference's train-mode
    activations: the same merge as RESET by a pass from the input (``reset_norms``), then REPAIR."""
    p = helpers_prepared(case, repair=method, repair_unmerged=True)
    groups = list(p.spec.groups)
    base_plans = p.plans(0.2)
    resets = method != "repair"
    reference = Sweep.start(counted(p.build(base_plans, repair=None), resets), base_plans, p.stats, p.calibration,
                            unmerged=True, correct=method != "reset", normed=not resets, reset=resets)
    x = torch.cat([x for x, _ in p.calibration])
    firsts = []
    for changed in (groups[0], groups[len(groups) // 2], groups[-1]):  # in forward order
        plans = p.plans({g: (0.6 if g == changed else 0.2) for g in groups})
        first = shared_prefix(p.spec.layers, plans, base_plans)
        assert changed in (p.spec.layers[first].in_group, p.spec.layers[first].out_group)
        firsts.append(first)
        branch = reference.branch(counted(p.build(plans, repair=None), resets), plans, correct=method != "reset")
        same_as_fresh(branch, p.build(plans), x)
    assert firsts == sorted(firsts) and firsts[-1] > 0  # some branch started past the input
    same_as_fresh(reference, p.build(base_plans), x)
    assert shared_prefix(p.spec.layers, base_plans, p.plans(0.2)) == len(p.spec.layers)


@pytest.mark.parametrize("case", ["mlp_bn", "timm_resnet18"])
def test_activations_spilled_to_disk_give_the_same_merge(case):
    """With no memory for activations every chunk waits in the temporary folder between steps; REPAIR and the
    budget search (whose branches fork spilled chunks) give the same merge bit for bit."""
    p = helpers_prepared(case, repair="repair")
    plans = p.plans(0.3)
    sweep = Sweep.start(p.build(plans, repair=None), plans, p.stats, p.calibration, unmerged=True, memory=0)
    assert sweep.acts.chunks.spilled == len(sweep.acts.chunks) > 1
    folder = sweep.acts.chunks.folder
    want = p.build(plans).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in sweep.run().state_dict().items())
    del sweep
    assert not folder.exists()  # the temporary folder goes with its activations
    a, b, data = make(case, 1), make(case, 2), labelled(case)
    for method in ("repair", "reset_repair"):  # RESET's own activations spill too
        spilled = hubmerge.merge(a, b, data, budget=0.3, repair=method, activation_memory=1e-9).model.state_dict()
        kept = hubmerge.merge(a, b, data, budget=0.3, repair=method).model.state_dict()
        assert spilled.keys() == kept.keys() and all(torch.equal(v, kept[k]) for k, v in spilled.items())


@pytest.mark.parametrize("family", ["vit", "convnext", "mobilenetv3"])
def test_repair_of_a_full_merge_corrects_every_output(family):
    """A full merge's REPAIR corrects every conv/linear output to the interpolated targets and leaves a
    self-merge unchanged, whether the merge is held in the plain architecture (ViT: no partial merging) or
    partitioned (ConvNeXt with LayerNorms, MobileNetV3 with BatchNorms)."""
    from test_families import batch, make

    a, b = make(family, 1), make(family, 2)
    calib = [(batch(family, 8, seed=s), None) for s in (1, 2)]
    p = Prepared(a, b, calib, MergeOptions.parse(repair="repair"))
    plans = p.plans(0.0)
    plain, model = p.build(plans, repair=None), p.build(plans)
    assert torch.isfinite(model(batch(family))).all()
    matched = {g: q.shared_b for g, q in plans.items()}
    checked = 0
    for out in p.spec.outputs:
        if out.norm:
            continue
        got = layer_moments(model.net, [out.name], p.calibration)[out.name]
        index = p.spec.gather(f"{out.name}.weight", 0, matched)
        sa, sb = p.stats.layers_a[out.name], p.stats.layers_b[out.name]
        target = (sa.std + sb.std[index]) / 2
        live = (target > 1e-6) & (got.std > 1e-6)
        assert torch.allclose(got.std[live], target[live], rtol=1e-6), out.name
        assert torch.allclose(got.mean, (sa.mean + sb.mean[index]) / 2, atol=1e-6), out.name
        checked += 1
    assert checked > 0
    if family != "mobilenetv3":  # its SE units see 16 samples: ties among dead units make a self-merge inexact
        same = Prepared(a, make(family, 1), calib, MergeOptions.parse(repair="repair"))
        x = batch(family)
        assert (same.build(same.plans(0.0))(x) - a(x)).abs().max() < 1e-9
    first = p.spec.outputs[0]
    folded = first.norm or first.name  # where the first correction was folded (partitioned or plain)
    before, after = plain.net.get_submodule(folded).state_dict(), model.net.get_submodule(folded).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_repair_scales_a_weight_standardised_conv_through_its_gain():
    """An NF-Net standardises every conv's weights, so scaling them changes nothing: REPAIR folds the scale
    into the per-unit gain, and every corrected output of a partial merge (kept-apart units toward their
    endpoint) then has its target mean and std."""
    p = family_prepared("nfnet")
    plans = p.plans(0.3)
    model = p.build(plans)
    todo = corrections(model, plans, p.stats, unmerged=True)
    assert sum(type(model.layer(c.name)).__name__ == "PartitionedStdConv" for c in todo) >= 20
    got = layer_moments(model.net, [c.name for c in todo], p.calibration)
    for c in todo:
        live = c.mask & (c.std > 1e-6)
        assert torch.allclose(got[c.name].std[live], c.std[live], rtol=1e-8), c.name
        assert torch.allclose(got[c.name].mean[c.mask], c.mean[c.mask], atol=1e-8 * float(c.std.max())), c.name


def test_repair_corrects_a_token_layers_shared_copy_and_leaves_the_endpoints_copies():
    """A Mixer with its stream widened runs a copy of each token MLP layer per stream section: REPAIR measures
    the merged copy on the shared channels and sets its outputs to their targets, the one-pass sweep doing what
    a pass from the input per layer does; A's and B's copies keep their endpoint's weights."""
    p = family_prepared("mixer")
    plans = p.plans(0.3)
    plain, model = p.build(plans, repair=None), p.build(plans)
    todo = {c.name: c for c in corrections(plain, plans, p.stats)}
    shared = [name for name in todo if name.endswith(".merged")]
    assert len(shared) == 8  # every token MLP's fc1 (fc2 writes tokens, which are no units)
    got = layer_moments(model.net, shared, p.calibration)
    for name in shared:
        c = todo[name]
        assert torch.allclose(got[name].std[c.mask], c.std[c.mask], rtol=1e-8), name
        assert torch.allclose(got[name].mean[c.mask], c.mean[c.mask], atol=1e-8 * float(c.std.max())), name
    stepped = layer_by_layer(p.build(plans, repair=None), plans, p.stats, p.calibration, True).state_dict()
    for k, v in model.state_dict().items():
        assert (v - stepped[k]).abs().max() <= 1e-10 * stepped[k].abs().max().clamp_min(1e-300), k
        if ".of_a." in k or ".of_b." in k:
            assert torch.equal(v, plain.state_dict()[k]), k


def test_reset_branches_only_where_it_can_and_the_budget_search_starts_the_others_from_the_input():
    """MobileViT's transformer blocks are modules fx keeps whole, with BatchNorm convs and corrected linears in
    one node: a candidate whose first change is inside such a block after a correction cannot continue RESET
    from the reference (RESET had to pass the block for that correction); one whose first change is in front
    of any such correction can, and gives the merge from the input bit for bit."""
    from test_families import batch, make as make_family

    calib = [(batch("mobilevit", 8, seed=s), None) for s in (1, 2)]
    p = Prepared(make_family("mobilevit", 1), make_family("mobilevit", 2), calib,
                 MergeOptions.parse(repair="reset_repair", repair_unmerged=True))
    base = p.plans(0.2)
    groups = list(p.spec.groups)
    ks = [{g: (0.6 if g == changed else 0.2) for g in groups} for changed in groups[:2] + groups[-6::3]]
    firsts = [shared_prefix(p.spec.layers, p.plans(k), base) for k in ks]
    reference = Sweep.start(counted(p.build(base, repair=None)), base, p.stats, p.calibration, unmerged=True,
                            normed=False, reset=True)
    x = torch.cat([x for x, _ in p.calibration])
    exact = 0
    for i in sorted(range(len(ks)), key=firsts.__getitem__):
        plans = p.plans(ks[i])
        if reference.branches_exactly(plans):
            same_as_fresh(reference.branch(counted(p.build(plans, repair=None)), plans), p.build(plans), x)
            exact += 1
        else:
            with pytest.raises(ValueError, match="start this merge from the input"):
                reference.branch(p.build(plans, repair=None), plans)
    assert 0 < exact < len(ks)
    same_as_fresh(reference, p.build(base), x)
