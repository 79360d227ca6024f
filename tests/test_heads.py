"""Attention heads in partial merges: a head is merged or kept apart whole, and a kept-apart head is one
more head of the merged attention, with its own entries in per-head tables (``tests/test_families.py`` checks
the invariants for ViT, DeiT and Swin)."""

import json

import pytest
import torch
from timm.layers.attention import Attention
from torch import nn
from typer.testing import CliRunner

import hubmerge
from hubmerge.arch_specs import spec_for
from hubmerge.card import build
from hubmerge.cli.app import app
from hubmerge.errors import CheckpointError
from hubmerge.evaluate import Ensemble
from hubmerge.partitioned import PartialMergedModel, PartitionedLayer, PartitionedNorm
from hubmerge.spec import permute_heads
from hubmerge.trace import derive

from test_families import FAMILIES, batch, make, relative


@pytest.fixture(scope="module")
def deit():
    a, b = make("deit", 1), make("deit", 2)
    calib = [(batch("deit", seed=s), None) for s in (1, 2)]
    return a, b, calib


def test_heads_are_derived_per_attention_module(deit):
    a, _, _ = deit
    spec = spec_for(a, FAMILIES["deit"].input_size)
    assert [h.module for h in spec.heads] == ["blocks.0.attn", "blocks.1.attn"]
    for h in spec.heads:
        assert len(h.heads) == a.get_submodule(h.module).num_heads == 2
        for qk, v in h.heads:  # q/k dims and v dims of one head: one group each, 12 dims
            assert spec.groups[qk].width == spec.groups[v].width == 12
            assert spec.groups[qk].normalised  # attention mixes them: they cannot widen unit by unit


def test_kept_apart_heads_run_as_more_heads(deit):
    a, b, calib = deit
    x = batch("deit")
    model = hubmerge.merge(a, b, calib, gamma=0.5, repair=None).model  # one of the two heads apart per module
    for h in model.spec.heads:
        apart = [model.partition[qk][0] > 0 for qk, _ in h.heads]
        assert apart.count(True) == 1
        assert model.net.get_submodule(h.module).num_heads == 3
    qkv = model.net.get_submodule("blocks.0.attn.qkv")
    # its rows interleave sections (q, k, v of merged and kept-apart heads): stored in section order
    assert isinstance(qkv, PartitionedLayer) and qkv.out_order is not None and not hasattr(qkv, "whole")
    y = model(x)
    dense = model.materialize()
    assert relative(dense(x), y) <= 1e-12
    model.plan_execution(x, repeats=1)
    assert torch.equal(model(x), y) or relative(model(x), y) <= 1e-12


def test_a_head_kept_apart_in_part_is_refused(deit):
    a, b, calib = deit
    model = hubmerge.merge(a, b, calib, gamma=1.0, repair=None).model
    qk, v = model.spec.heads[0].heads[0]
    partition = {g: list(s) for g, s in model.partition.items()}
    n = model.spec.groups[v].width
    partition[v] = [0, n, 0]  # q/k dims apart, v dims merged: no longer one head
    with pytest.raises(CheckpointError, match="heads merge or stay apart whole"):
        PartialMergedModel(model.architecture, model.model_args, partition, input_size=model.input_size)


def test_an_attention_module_of_unknown_head_count_keeps_its_heads_and_input_merged():
    class OwnAttention(Attention):  # a subclass may compute its shapes otherwise: not known
        pass

    model = make("deit", 1)
    for block in model.blocks:
        own = OwnAttention(24, num_heads=2, qkv_bias=True).double()
        own.load_state_dict(block.attn.state_dict())
        block.attn = own
    spec = spec_for(model, FAMILIES["deit"].input_size)
    assert spec.heads and spec.partial is None
    fixed = {g for h in spec.heads for g in h.groups} | {"patch_embed.proj"}  # its heads and its input stream
    assert set(spec.fixed) == fixed
    assert "OwnAttention, whose head count hubmerge does not know" in spec.fixed["patch_embed.proj"]
    assert spec.widenable() == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]


def test_inspect_shows_the_heads_of_a_merge(deit, tmp_path):
    a, b, calib = deit
    hubmerge.merge(a, b, calib, gamma=0.5, repair=None).model.save_pretrained(tmp_path / "m")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "attention blocks.1.attn: 2 heads" in result.output
    assert "1 kept apart, so the merge runs 3" in result.output


def test_gamma_may_name_an_attention_module(deit):
    a, b, calib = deit
    model = hubmerge.merge(a, b, calib, gamma={"blocks.1.attn": 1.0}, repair=None).model
    assert [model.net.get_submodule(h.module).num_heads for h in model.spec.heads] == [2, 4]
    assert all(ka == 0 for g, (ka, _, _) in model.partition.items() if not g.startswith("blocks.1.attn"))


def test_the_card_counts_an_attention_in_heads(deit):
    a, b, calib = deit
    model = hubmerge.merge(a, b, calib, gamma=0.5, repair=None).model
    text = str(model.generate_model_card())
    assert "| blocks.0.attn (heads) | 1 | 1 | 1 | 0.50 |" in text
    assert "| blocks.0.attn.qkv |" not in text  # its head groups are counted in the heads row


@pytest.fixture(scope="module")
def swin():
    a, b = make("swin", 1), make("swin", 2)
    calib = [(batch("swin", seed=s), None) for s in (1, 2)]
    return a, b, calib


def test_a_relative_position_bias_follows_the_heads(swin, tmp_path):
    """Swin's attention adds a bias read head by head from its table: the tracer finds the table, and a merge
    that keeps one head of two apart runs three heads whose table columns are the merged head's interpolated
    entries, then A's and B's entries of the head kept apart."""
    a, b, calib = swin
    spec = spec_for(a, FAMILIES["swin"].input_size)
    assert [h.tables for h in spec.heads] == [((f"{h.module}.relative_position_bias_table", 1),) for h in spec.heads]
    result = hubmerge.merge(a, b, calib, gamma=0.5, repair=None, alpha=0.25)
    model = result.model
    # B's heads in the order the merge matched them to A's
    sa, sb = a.state_dict(), permute_heads(spec, b.state_dict(), {m: torch.tensor(o) for m, o in
                                                                    result.report.head_orders.items()})
    for h in model.spec.heads:
        key = h.tables[0][0]
        table = model.state_dict()[f"net.{key}"]
        apart = [model.partition[qk][0] > 0 for qk, _ in h.heads]
        assert apart.count(True) == 1 and table.shape[1] == 3
        assert model.net.get_submodule(h.module).num_heads == 3
        merged, kept = apart.index(False), apart.index(True)
        columns = {merged: [0.75 * sa[key][:, merged] + 0.25 * sb[key][:, merged]],
                   kept: [sa[key][:, kept], sb[key][:, kept]]}
        want = torch.stack([c for head in range(2) for c in columns[head]], 1)
        assert torch.equal(table, want)
    x = batch("swin")
    assert relative(model.materialize()(x), model(x)) <= 1e-12
    model.save_pretrained(tmp_path)
    assert torch.equal(PartialMergedModel.from_pretrained(tmp_path).double()(x), model(x))
    info = json.loads(CliRunner().invoke(app, ["inspect", str(tmp_path), "--json"]).stdout)
    assert [row["tables"] for row in info["attention"]] == [[h.tables[0][0]] for h in spec.heads]
    assert "per-head table layers.0.blocks.0.attn.relative_position_bias_table" in \
        CliRunner().invoke(app, ["inspect", str(tmp_path)]).output


def test_swin_patch_merging_normalises_each_endpoints_neighbours_apart(swin):
    """Patch merging normalises the channels of 2×2 neighbours together (a LayerNorm over four copies of the
    stream): widened, its A-view and B-view are gathered from the four copies. The ensemble check fails when
    that norm is one plain LayerNorm over A's and B's units together."""
    a, b, calib = swin
    x = batch("swin")
    ensemble = hubmerge.merge(a, b, calib, gamma=1.0, repair=None).model
    assert relative(ensemble(x), Ensemble(a, b)(x)) <= 1e-10
    norm = ensemble.net.get_submodule("layers.1.downsample.norm")
    assert isinstance(norm, PartitionedNorm) and norm.gathered  # four segments: gathered views
    plain = nn.LayerNorm(len(norm.weight), eps=norm.view.eps).double()
    plain.load_state_dict(norm.state_dict())
    ensemble.net.get_submodule("layers.1.downsample").norm = plain
    assert relative(ensemble(x), Ensemble(a, b)(x)) > 1e-3


class _Biased(nn.Module):
    """Two-head attention over 4 tokens whose scores add a bias read head by head from ``tables`` tables."""

    def __init__(self, tables: int):
        super().__init__()
        self.qkv, self.proj, self.head = nn.Linear(6, 12), nn.Linear(4, 6), nn.Linear(6, 2)
        self.tables = nn.ParameterList([nn.Parameter(torch.randn(7, 2)) for _ in range(tables)])
        offsets = torch.arange(4)[:, None] - torch.arange(4)[None, :] + 3  # relative positions, every row read
        self.register_buffer("index", offsets, persistent=False)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], 4, 3, 2, 2).permute(2, 0, 3, 1, 4).unbind(0)
        bias = sum(t[self.index.view(-1)].view(4, 4, 2).permute(2, 0, 1) for t in self.tables).unsqueeze(0)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.head(self.proj(y.transpose(1, 2).reshape(x.shape[0], 4, 4)).mean(1))


@pytest.mark.parametrize("tables", [1, 2])
def test_a_score_bias_follows_the_heads_only_from_one_table(tables):
    """The tracer knows the heads of an attention whose bias comes head by head from one table; a bias summed
    from two tables is not one table's, so that attention's heads are not derived: its q/k and v units keep
    their width, while the rest widens."""
    spec = derive(_Biased(tables), torch.randn(2, 4, 6), "test")
    if tables == 1:
        assert [h.tables for h in spec.heads] == [(("tables.0", 1),)] and spec.support == "partial"
    else:
        held = {s.group for s in spec.axes["qkv.weight"][0]}
        assert spec.heads == () and set(spec.fixed) == held and spec.widenable() == ["proj"]



class _Separate(nn.Module):
    """Two-head attention over 4 tokens with separate q, k and v projections (nothing cuts them) and a score bias
    from two tables: its heads are not known, so neither its q/k nor its v units may widen."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)
        self.proj, self.head = nn.Linear(4, 6), nn.Linear(6, 2)
        self.tables = nn.ParameterList([nn.Parameter(torch.randn(2, 4, 4)) for _ in range(2)])

    def forward(self, x):
        q, k, v = (p(x).reshape(x.shape[0], 4, 2, 2).transpose(1, 2) for p in (self.q, self.k, self.v))
        bias = (self.tables[0] + self.tables[1]).unsqueeze(0)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.head(self.proj(y.transpose(1, 2).reshape(x.shape[0], 4, 4)).mean(1))


def test_the_values_of_an_attention_of_unknown_heads_keep_their_width():
    spec = derive(_Separate(), torch.randn(2, 4, 6), "test")
    values = {s.group for s in spec.axes["v.weight"][0]}
    assert spec.heads == () and values and values <= set(spec.fixed)
    assert all("has heads hubmerge does not know" in spec.fixed[g] for g in values)
    assert "proj" in spec.widenable()


def _reordered_copy(name: str):
    """A model, a copy of it whose every group's units are permuted and whose heads are rolled by one in every
    attention (the same function), its spec, and those head orders."""
    from hubmerge.spec import permute_state

    a = make(name, 1)
    spec = spec_for(a, FAMILIES[name].input_size)
    gen = torch.Generator().manual_seed(5)
    perms = {g: torch.randperm(grp.width, generator=gen) for g, grp in spec.groups.items()}
    orders = {h.module: torch.roll(torch.arange(len(h.heads)), 1) for h in spec.heads}
    b = make(name, 1)
    b.load_state_dict(permute_heads(spec, permute_state(spec, a.state_dict(), perms), orders))
    return a, b, spec, orders


@pytest.mark.parametrize("name", ["vit", "swin", "mobilevit"])
def test_heads_are_matched_as_wholes(name):
    """B's heads are matched to A's as wholes before their units are: a model merged with a copy of itself
    whose heads are reordered (and every group's units permuted) is the model again, where matching head i
    to head i could not recover it; the statistics moved with B's heads are those of the moved B."""
    from hubmerge.alignment import head_orders
    from hubmerge.spec import head_sources
    from hubmerge.statistics import collect

    a, b, spec, orders = _reordered_copy(name)
    x, calib = batch(name), [(batch(name, 16, seed=s), None) for s in (1, 2)]
    assert relative(b(x), a(x)) <= 1e-10
    result = hubmerge.merge(a, b, calib, repair=None)
    merged = result.model
    assert relative(merged(x), a(x)) <= 1e-10
    assert set(result.report.head_orders) == set(orders)
    text = str(build(merged, result.report, repo_id="user/merged"))
    assert f"{len(orders)} of the {len(spec.heads)} attention modules took B's heads in another order" in text
    stats = collect(a, b, spec, calib)
    found = head_orders(spec, stats)
    assert found.keys() == orders.keys()
    back = {m: torch.argsort(o) for m, o in orders.items()}  # B's head i is A's head i-1: B's heads in A's order
    assert all(torch.equal(found[m], back[m]) for m in orders)
    moved = make(name, 1)
    moved.load_state_dict(permute_heads(spec, b.state_dict(), found))
    want, got = collect(a, moved, spec, calib), stats.with_b_moved(spec, head_sources(spec, found))
    for key, pm in want.points.items():
        assert torch.allclose(got.points[key].cross, pm.cross, rtol=1e-10, atol=1e-10), key
        assert torch.allclose(got.points[key].b.sumsq, pm.b.sumsq, rtol=1e-10, atol=1e-10), key
    for name_, m in want.layers_b.items():
        assert torch.allclose(got.layers_b[name_].sum, m.sum, rtol=1e-10, atol=1e-10), name_


@pytest.mark.parametrize("name", ["vit", "swin", "mobilevit"])
def test_weight_matching_matches_heads_as_wholes(name):
    """Without data, weight matching matches B's heads to A's as wholes too: a model merged with a copy of
    itself whose heads are reordered and whose units are permuted is the model again (with REPAIR too, from the
    statistics moved with B's heads), and not with the heads kept in their order."""
    from hubmerge.alignment import weight_head_orders

    a, b, spec, orders = _reordered_copy(name)
    x = batch(name)
    result = hubmerge.merge(a, b, align="weight", repair=None)
    assert relative(result.model(x), a(x)) <= 1e-10
    assert set(result.report.head_orders) == set(orders)
    found = weight_head_orders(spec, a.state_dict(), b.state_dict())
    assert all(torch.equal(found[m], torch.argsort(o)) for m, o in orders.items())
    # with calibration data the statistics move with B's heads: REPAIR then leaves the model as it is
    calib = [(batch(name, 16, seed=s), None) for s in (1, 2)]
    repaired = hubmerge.merge(a, b, calib, align="weight", repair="repair")
    assert relative(repaired.model(x), a(x)) <= 1e-10
    in_order = hubmerge.merge(a, b, align="weight", repair=None, match_heads=False)
    assert not in_order.report.head_orders
    assert relative(in_order.model(x), a(x)) > 1e-3  # (1.30 ViT, 1.03 Swin, 0.0043 MobileViT)
