"""Attention heads in partial merges: a head is merged or kept apart whole, and a kept-apart head is one
more head of the merged attention (``tests/test_families.py`` checks the invariants for ViT and DeiT)."""

import pytest
import torch
from timm.layers.attention import Attention
from typer.testing import CliRunner

import hubmerge
from hubmerge.arch_specs import spec_for
from hubmerge.cli.app import app
from hubmerge.errors import CheckpointError
from hubmerge.partitioned import PartialMergedModel, PartitionedLayer

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


def test_an_attention_module_of_unknown_head_count_takes_full_merges_only():
    class OwnAttention(Attention):  # a subclass may compute its shapes otherwise: not known
        pass

    model = make("deit", 1)
    for block in model.blocks:
        own = OwnAttention(24, num_heads=2, qkv_bias=True).double()
        own.load_state_dict(block.attn.state_dict())
        block.attn = own
    spec = spec_for(model, FAMILIES["deit"].input_size)
    assert spec.heads and "OwnAttention, whose head count hubmerge does not know" in spec.partial


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
