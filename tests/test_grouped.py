"""Grouped convs (ResNeXt, RegNet) and TF-"same" convs (EfficientNetV2) widen: each block of a grouped conv is laid
out ``[A-only | shared | B-only]`` on its own and the blocks widen alike (tied groups), so the merged conv stays
one grouped conv stored as grouped blocks without its zero blocks. The family test (tests/test_families.py)
checks the invariants of whole models; these check the pieces."""

import json

import pytest
import timm
import torch
from timm.layers import Conv2dSame
from torch import nn
from typer.testing import CliRunner

import hubmerge
from hubmerge.cli.app import app
from hubmerge.errors import CheckpointError
from hubmerge.partial import choices, plan
from hubmerge.partitioned import PartitionedLayer
from hubmerge.repair import Correction, corrections, fold
from hubmerge.statistics import layer_moments

from test_families import FAMILIES, batch, make


@pytest.fixture(scope="module")
def resnext():
    a, b = make("resnext", 1), make("resnext", 2)
    calib = [(batch("resnext", 8, seed=s), None) for s in (1, 2)]
    return a, b, calib, hubmerge.Prepared(a, b, calib, hubmerge.MergeOptions(repair=None))


def test_the_blocks_of_each_grouped_conv_are_tied(resnext):
    a, _, _, p = resnext
    grouped = {l.name: l for l in p.spec.layers if l.blocks > 1}
    convs = {n for n, m in a.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels}
    assert set(grouped) == convs
    ties = {tuple(sorted(t)) for t in p.spec.ties}
    for layer in grouped.values():
        assert layer.blocks == a.get_submodule(layer.name).groups == 4
        assert tuple(sorted({s.group for s in layer.out_axis})) in ties
    tied = [c for c in choices(p.spec) if c.tied]
    assert len(tied) == len(p.spec.ties) and all(set(c.groups) in map(set, p.spec.ties) for c in tied)


@pytest.mark.parametrize("gamma", ["adaptive", "one block"])
def test_tied_blocks_keep_equally_many_units_apart(resnext, gamma):
    _, _, _, p = resnext
    if gamma == "adaptive":  # thresholds split a different number of pairs in each block: all keep the most apart
        plans = plan(p.spec, p.scores, 1.0, "adaptive", epsilon=0.3)
    else:  # γ given to one block goes to all of them
        first = p.spec.ties[0][0]
        plans = plan(p.spec, p.scores, {first: 0.5})
        assert all(plans[g].sizes == (1, 1, 1) for g in p.spec.ties[0])
    for tie in p.spec.ties:
        assert len({plans[g].sizes for g in tie}) == 1, tie
    assert any(plans[g].sizes[0] for tie in p.spec.ties for g in tie)


def test_a_partition_that_widens_tied_blocks_unequally_is_refused(resnext):
    _, _, _, p = resnext
    partition = {g: [0, grp.width, 0] for g, grp in p.spec.groups.items()}
    partition[p.spec.ties[0][0]] = [1, p.spec.groups[p.spec.ties[0][0]].width - 1, 1]
    with pytest.raises(CheckpointError, match="grouped conv"):
        hubmerge.PartialMergedModel(p.architecture, p.model_args, partition, input_size=list(p.input_size))


def grouped_layer(seed: int = 0) -> tuple[PartitionedLayer, nn.Conv2d, torch.Tensor]:
    """A partitioned grouped conv (3 blocks; outputs 2 A-only, 3 shared, 1 B-only per block; inputs 1, 2, 2 per
    block) with random blocks, its dense zero-padded twin, and an input."""
    gen = torch.Generator().manual_seed(seed)
    template = nn.Conv2d(15, 18, 3, padding=1, groups=3).double()
    out_sections = torch.tensor([0, 0, 1, 1, 1, 2] * 3)
    in_sections = torch.tensor([0, 1, 1, 2, 2])
    layer = PartitionedLayer(template, out_sections, in_sections).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return layer, layer.dense(), torch.randn(2, 15, 6, 6, generator=gen, dtype=torch.float64)


def test_a_grouped_layer_runs_its_blocks_as_the_zero_padded_grouped_conv():
    layer, dense, x = grouped_layer()
    assert [b for b, _ in layer.blocks()] == ["a_side", "shared_from_b", "b_only"]
    assert all(m.groups == 3 for _, m in layer.blocks())
    w = dense.weight.view(3, 6, 5, 3, 3)
    sections = torch.tensor([0, 0, 1, 1, 1, 2])
    cols = torch.tensor([0, 1, 1, 2, 2])
    zero = ((sections[:, None] == 0) & (cols[None, :] == 2)) | ((sections[:, None] == 2) & (cols[None, :] == 0))
    assert (w[:, zero] == 0).all() and (w[:, ~zero] != 0).all()  # the zero blocks, and only they, are left out
    stored = sum(m.weight.numel() for _, m in layer.blocks())
    assert stored == int((~zero).sum()) * 3 * 9
    assert (layer(x) - dense(x)).abs().max() <= 1e-12 * dense(x).abs().max()
    layer.execution = "dense"
    with torch.no_grad():
        assert torch.equal(layer(x), dense(x))


def test_repair_folds_into_the_rows_of_a_grouped_layer():
    layer, _, x = grouped_layer(1)
    gen = torch.Generator().manual_seed(5)
    scale, shift = torch.rand(18, generator=gen, dtype=torch.float64) + 0.5, torch.randn(18, generator=gen,
                                                                                        dtype=torch.float64)
    before = layer(x)
    rows = [(sub, layer.layout.rows(block)) for block, sub in layer.blocks()]
    net = nn.Sequential(layer)
    fold(net, Correction(0, "0", None, rows, scale, scale, torch.ones(18, dtype=torch.bool)), scale, shift)
    want = before * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    assert (layer(x) - want).abs().max() <= 1e-12 * want.abs().max()


def test_a_grouped_merge_is_repaired_to_its_targets(resnext):
    """REPAIR of a partial ResNeXt merge sets the shared units of the grouped convs to the interpolated
    statistics (the correction folds into their BatchNorm, a running mean and weight per unit of every block)."""
    a, b, calib, _ = resnext
    model = hubmerge.merge(a, b, calib, gamma=0.5, repair="repair", partial="topk").model
    p = hubmerge.Prepared(a, b, calib, hubmerge.MergeOptions(repair="repair", partial="topk"))
    plans = p.plans(0.5)

    plain = p.build(plans, repair=None)
    checked = 0
    for c in corrections(plain, plans, p.stats):
        if p.spec.layers[c.index].blocks == 1:
            continue
        got = layer_moments(model.net, [c.name], calib)[c.name]
        fixed, orig = model.net.get_submodule(c.norm), plain.net.get_submodule(c.norm)
        s = (fixed.weight / orig.weight).detach().double()
        t = orig.running_mean.double() - s * fixed.running_mean.double()
        mean, std = s * got.mean + t, s.abs() * got.std
        live = c.mask & (c.std > 1e-6) & (std > 1e-6)
        assert c.mask.any() and (~c.mask).any()  # shared units corrected, units kept apart left alone
        assert torch.allclose(mean[c.mask], c.mean[c.mask], atol=1e-8), c.name
        assert torch.allclose(std[live], c.std[live], rtol=1e-8), c.name
        checked += 1
    assert checked == sum(l.blocks > 1 for l in p.spec.layers)


def test_tf_same_convs_stay_same_padded_when_partitioned():
    a, b = make("efficientnetv2", 1), make("efficientnetv2", 2)
    calib = [(batch("efficientnetv2", seed=s), None) for s in (1, 2)]
    model = hubmerge.merge(a, b, calib, gamma=0.5, repair=None).model
    same = [n for n, m in a.named_modules() if isinstance(m, Conv2dSame)]
    assert same
    for name in same:
        part = model.net.get_submodule(name)
        subs = [m for _, m in part.blocks()] if isinstance(part, PartitionedLayer) else [part]
        assert all(isinstance(m, Conv2dSame) for m in subs), name
    assert FAMILIES["efficientnetv2"].support == "partial" and timm.is_model("tf_efficientnetv2_b0")


def test_inspect_lists_the_tied_blocks(resnext, tmp_path):
    a, b, calib, p = resnext
    hubmerge.merge(a, b, calib, gamma=0.5, repair=None, partial="topk").model.save_pretrained(tmp_path)
    info = json.loads(CliRunner().invoke(app, ["inspect", str(tmp_path), "--json"]).stdout)
    assert info["tied"] == [list(t) for t in p.spec.ties]
    sizes = {row["name"]: tuple(row["partition"]) for row in info["groups"]}
    assert all(len({sizes[g] for g in tie}) == 1 and sizes[tie[0]][0] for tie in info["tied"])
    text = CliRunner().invoke(app, ["inspect", str(tmp_path)]).output
    assert f"grouped conv blocks {p.spec.ties[0][0]} …" in text and "widened alike" in text
