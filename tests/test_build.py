"""The exact invariants of method §4, for every adapter (random float64 weights)."""

import pytest
import timm
import torch

from hubmerge.evaluate import Ensemble

from conftest import CASES, inputs, partial_gamma
from helpers import prepared


@pytest.mark.parametrize("cross", ["interpolate", "fill"])
@pytest.mark.parametrize("alpha", [0.3, 0.5])
def test_gamma_one_everywhere_is_the_logit_averaged_ensemble(case, cross, alpha):
    p = prepared(case, alpha=alpha, cross=cross)
    model = p.build(p.plans(1.0), repair=None)
    x = inputs(case)
    ensemble = Ensemble(p.model_a, p.model_b, alpha=alpha)(x)
    assert (model(x) - ensemble).abs().max() <= 1e-10
    assert all(s[1] == 0 for s in model.partition.values())


@pytest.mark.parametrize("alpha,side", [(0.0, "a"), (1.0, "b")])
@pytest.mark.parametrize("gamma", [0.0, "partial", 1.0])
def test_alpha_zero_is_a_and_alpha_one_is_b(case, alpha, side, gamma):
    p = prepared(case, alpha=alpha, cross="interpolate")
    model = p.build(p.plans(partial_gamma(case) if gamma == "partial" else gamma), repair=None)
    x = inputs(case)
    endpoint = p.model_a if side == "a" else p.model_b
    assert (model(x) - endpoint(x)).abs().max() <= 1e-10


def test_gamma_zero_is_the_full_merge_of_the_plain_architecture(case):
    """γ=0 has no A-only/B-only units; its materialised form loads into plain timm and is the
    permute-then-interpolate merge computed independently here."""
    from hubmerge.spec import permute_state

    p = prepared(case)
    plans = p.plans(0.0)
    model = p.build(plans, repair=None)
    assert all(ka == kb == 0 for ka, _, kb in model.partition.values())
    name, args, _ = CASES[case]
    plain = timm.create_model(name, **args).double().eval()
    plain.load_state_dict(model.materialize().state_dict(), strict=True)
    perms = {g: pl.shared_b for g, pl in plans.items()}
    sb = permute_state(p.spec, p.model_b.state_dict(), perms)
    reference = timm.create_model(name, **args).double().eval()
    reference.load_state_dict({k: (v + sb[k]) / 2 if v.is_floating_point() else v
                               for k, v in p.model_a.state_dict().items()})
    x = inputs(case)
    assert (plain(x) - reference(x)).abs().max() <= 1e-10
    assert (model(x) - reference(x)).abs().max() <= 1e-10


@pytest.mark.parametrize("cross", ["interpolate", "fill"])
@pytest.mark.parametrize("partial", ["forced", "adaptive", "topk", "random"])
def test_partitioned_forward_equals_zero_padded_forward(case, cross, partial):
    p = prepared(case, cross=cross, partial=partial, epsilon=0.3)
    model = p.build(p.plans(partial_gamma(case)), repair=None)
    assert sum(ka for ka, _, _ in model.partition.values()) > 0
    wide = model.materialize()
    x = inputs(case)
    assert (model(x) - wide(x)).abs().max() <= 1e-10
    assert sum(q.numel() for q in wide.parameters()) > sum(q.numel() for q in model.parameters())


def test_fill_differs_from_interpolate_in_hidden_layers_only():
    p_int, p_fill = prepared("mlp", cross="interpolate"), prepared("mlp", cross="fill")
    plans = p_int.plans(0.4)
    a, b = p_int.build(plans, repair=None), p_fill.build(plans, repair=None)
    ha, hb = (m.layer("blocks.1.fc").dense().weight for m in (a, b))
    ka_in, _, kb_in = plans["blocks.0.fc"].sizes
    ka, m, _ = plans["blocks.1.fc"].sizes
    shared = slice(ka, ka + m)
    assert ka_in and kb_in and m
    assert torch.allclose(2 * ha[shared, :ka_in], hb[shared, :ka_in])  # A-only columns: (1−α)·W_A vs W_A
    assert torch.allclose(2 * ha[shared, -kb_in:], hb[shared, -kb_in:])  # B-only columns: α·P(W_B) vs P(W_B)
    assert torch.equal(ha[shared, ka_in:-kb_in], hb[shared, ka_in:-kb_in])  # shared × shared interpolates in both
    assert torch.equal(ha[:ka], hb[:ka]) and torch.equal(ha[ka + m:], hb[ka + m:])  # unmerged rows: W_A, P(W_B)
    assert torch.equal(a.layer("head").dense().weight, b.layer("head").dense().weight)  # logits interpolate


def test_per_group_gamma():
    p = prepared("timm_resnet18")
    groups = list(p.spec.groups)
    model = p.build(p.plans({groups[0]: 1.0, groups[3]: 0.5}), repair=None)
    assert model.partition[groups[0]][1] == 0
    assert model.partition[groups[3]][0] == round(0.5 * p.spec.groups[groups[3]].width)
    assert all(model.partition[g][0] == 0 for g in groups if g not in (groups[0], groups[3]))


def test_layers_without_a_zero_block_are_stored_whole():
    """Next to a fully merged group a layer has no zero block: one dense block, no per-forward joins."""
    p = prepared("timm_resnet18")
    model = p.build(p.plans({"layer1.0.conv2": 0.5, "layer1.1.conv1": 0.5}), repair=None)
    blocks = {l.name: [b for b, _ in model.layer(l.name).blocks()] for l in p.spec.layers}
    assert blocks["layer1.1.conv1"] == ["a_side", "shared_from_b", "b_only"]  # partial in, partial out
    assert blocks["layer1.0.conv2"] == ["whole"]  # merged in, partial out
    assert blocks["layer2.0.conv1"] == ["whole"]  # partial in, merged out
    x = inputs("timm_resnet18")
    assert (model(x) - model.materialize()(x)).abs().max() <= 1e-10
