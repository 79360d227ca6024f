"""Every tested family (``arch_specs/families.py``), tiny and random in float64: the derived spec is exact, and
the family supports exactly what the table declares.

For each family: random permutations of every group (ordered groups, whose units a rotary embedding pairs by
position, permuted only as whole heads, and checked to change the logits when permuted within) leave the
logits unchanged; α=1 with γ=0, no REPAIR and
``cross="interpolate"`` is B's function; γ=0 at α=0.5 loads into plain timm (strict) and equals the
independently computed permute-and-average merge, which zip alignment at β=0 gives bit for bit (a zip at
β=0.5 loads into plain timm too). Families declared ``partial`` also give the logit-averaged ensemble at γ=1;
those declared ``some`` (some groups cannot widen) instead give B's function at γ=0.5 with α=1, leave their
fixed groups merged and refuse a γ for one. Both give A's function at γ=0.5 with α=0, count their parameters
as the cost model says, and run a ``budget=0.1`` merge (benefit-allocated; uniformly for the families where
the table says why) that saves, reloads strictly and computes the same outputs; families declared ``full``
refuse γ>0 and budgets with the reason, and that refusal is what the test checks (no family is skipped)."""

import pytest
import timm
import torch
from torch import nn

import hubmerge
from hubmerge.arch_specs import families, randomize_, spec_for
from hubmerge.cost import CostModel
from hubmerge.errors import UnsupportedModelError, UsageError
from hubmerge.evaluate import Ensemble
from hubmerge.partitioned import PartitionedNorm, SectionwiseLayer
from hubmerge.spec import permute_heads, permute_state

FAMILIES = families()


def make(name: str, seed: int) -> nn.Module:
    fam = FAMILIES[name]
    model = timm.create_model(fam.architecture, num_classes=10, **fam.model_args)
    model.model_args = {"num_classes": 10, **fam.model_args}
    return randomize_(model, seed).double().eval()


def batch(name: str, n: int = 4, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *FAMILIES[name].input_size, generator=gen, dtype=torch.float64)


def relative(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).abs().max() / y.abs().max()).item()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family(name, tmp_path):
    a, b = make(name, 1), make(name, 2)
    x = batch(name)
    calib = [(batch(name, seed=s), None) for s in (1, 2)]
    spec = spec_for(a, FAMILIES[name].input_size)
    support = FAMILIES[name].support
    assert spec.support == support, spec.partial or spec.fixed

    # random permutations of every group (but within ordered groups, whose units a rotary embedding pairs by
    # position), and of every attention's heads as wholes, leave the function unchanged
    gen = torch.Generator().manual_seed(3)
    perms = {g: torch.randperm(grp.width, generator=gen) for g, grp in spec.groups.items()}
    assert any((p != torch.arange(len(p))).any() for p in perms.values())
    ordered = [g for g, grp in spec.groups.items() if grp.ordered]
    orders = {h.module: torch.randperm(len(h.heads), generator=gen) for h in spec.heads}
    moved = make(name, 1)
    in_place = {g: torch.arange(len(p)) if g in ordered else p for g, p in perms.items()}
    moved.load_state_dict(permute_heads(spec, permute_state(spec, moved.state_dict(), in_place), orders))
    assert relative(moved(x), a(x)) <= 1e-10
    if ordered:  # and they are ordered: permuted within, the function changes
        moved.load_state_dict(permute_state(spec, a.state_dict(), {g: perms[g] for g in ordered}))
        assert relative(moved(x), a(x)) > 1e-3

    # α=1, γ=0, interpolate, no REPAIR: B exactly
    at_b = hubmerge.merge(a, b, calib, alpha=1.0, repair=None, cross="interpolate").model
    assert relative(at_b(x), b(x)) <= 1e-10

    # γ=0 at α=0.5: the permute-and-average merge, in plain timm
    result = hubmerge.merge(a, b, calib, repair=None)
    assert all(ka == kb == 0 for ka, _, kb in result.model.partition.values())
    plain = make(name, 0)
    plain.load_state_dict(result.model.materialize().state_dict(), strict=True)
    heads = {m: torch.tensor(o) for m, o in result.report.head_orders.items()}  # B's heads as matched to A's
    sb = permute_state(spec, permute_heads(spec, b.state_dict(), heads), result_perms(result, spec, calib, a, b))
    reference = make(name, 0)
    reference.load_state_dict({k: (v + sb[k]) / 2 if v.is_floating_point() else v for k, v in a.state_dict().items()})
    assert relative(plain(x), reference(x)) <= 1e-10
    assert relative(result.model(x), reference(x)) <= 1e-10
    # zip alignment with no within-model share is this merge, bit for bit
    zipped = hubmerge.merge(a, b, calib, repair=None, align="zip", zip_beta=0.0).model.state_dict()
    assert zipped.keys() == result.model.state_dict().keys()
    assert all(torch.equal(zipped[k], v) for k, v in result.model.state_dict().items())
    # a zip with within-model pairs is a full merge too: it loads into plain timm
    zipped = hubmerge.merge(a, b, calib, repair=None, align="zip", zip_beta=0.5).model
    plain.load_state_dict(zipped.materialize().state_dict(), strict=True)
    assert torch.isfinite(zipped(x)).all() and relative(plain(x), zipped(x)) <= 1e-10

    if support in ("partial", "some"):
        if support == "partial":
            ensemble = hubmerge.merge(a, b, calib, gamma=1.0, repair=None).model
            assert relative(ensemble(x), Ensemble(a, b)(x)) <= 1e-10
        else:  # the fixed groups are always merged, so no γ is the ensemble: at α=1 shared units are B's
            at_b = hubmerge.merge(a, b, calib, gamma=0.5, alpha=1.0, repair=None, cross="interpolate",
                                  partial="topk").model
            assert any(ka for ka, _, _ in at_b.partition.values())
            assert not any(at_b.partition[g][0] for g in spec.fixed)
            assert relative(at_b(x), b(x)) <= 1e-10
            fixed = next(iter(spec.fixed))
            with pytest.raises(UsageError, match="cannot widen"):
                hubmerge.merge(a, b, calib, gamma={fixed: 0.5}, repair=None)
        # half the units apart: at α=0 every shared unit and every view of a partitioned norm is A's
        at_a = hubmerge.merge(a, b, calib, gamma=0.5, alpha=0.0, repair=None, cross="interpolate",
                              partial="topk").model  # topk: one plain assignment per group, fast
        assert any(ka for ka, _, _ in at_a.partition.values())
        assert relative(at_a(x), a(x)) <= 1e-10
        # the cost model counts every stored parameter (norms and layer scales included)
        costs = CostModel(spec, a, FAMILIES[name].input_size)
        assert costs.endpoint.params == sum(p.numel() for p in a.parameters())
        assert costs(at_a.partition).total.params == sum(p.numel() for p in at_a.parameters())
        budget = hubmerge.merge(a, b, calib, budget=0.1, allocator=FAMILIES[name].budget_allocator).model
        budget.save_pretrained(tmp_path)
        again = hubmerge.PartialMergedModel.from_pretrained(tmp_path).double()
        assert torch.equal(again(x), budget(x))
    else:
        with pytest.raises(UsageError, match="partial merging"):
            hubmerge.merge(a, b, calib, gamma=0.5, repair=None)
        with pytest.raises(UsageError, match="partial merging"):
            hubmerge.merge(a, b, calib, budget=0.1, repair=None)


def result_perms(result, spec, calib, a, b) -> dict[str, torch.Tensor]:
    """The B permutation of a full merge, from the same public pipeline pieces the merge used."""
    p = hubmerge.Prepared(a, b, calib, hubmerge.MergeOptions(repair=None))
    return {g: plan.shared_b for g, plan in p.plans(0.0).items()}


def test_an_unknown_op_on_units_is_refused_with_its_name():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.conv(x).cumsum(1).mean((2, 3)))

    with pytest.raises(UnsupportedModelError, match="'cumsum'.*module '<model>'|'cumsum'"):
        spec_for(Odd(), (3, 4, 4))


def test_a_wrong_spec_is_caught_by_the_permutation_test():
    """The invariance check can fail: dropping one parameter from the spec breaks the function."""
    model = make("resnet", 0)
    spec = spec_for(model, FAMILIES["resnet"].input_size)
    broken = type(spec)(spec.family, spec.groups, {k: v for k, v in spec.axes.items() if k != "layer1.0.bn1.weight"},
                        spec.layers, spec.partial)
    gen = torch.Generator().manual_seed(3)
    perms = {g: torch.randperm(grp.width, generator=gen) for g, grp in spec.groups.items()}
    x = batch("resnet")
    before = model(x)
    model.load_state_dict(permute_state(broken, model.state_dict(), perms))
    assert relative(model(x), before) > 1e-3


def test_a_widened_layer_norm_needs_its_partitioned_views():
    """The ensemble check can fail: normalising a widened ConvNeXt stream as one plain LayerNorm over
    A's and B's units together (instead of the A-view and the B-view) is not the ensemble."""
    a, b = make("convnext", 1), make("convnext", 2)
    x = batch("convnext")
    ensemble = hubmerge.merge(a, b, [(batch("convnext", seed=1), None)], gamma=1.0, repair=None).model
    assert relative(ensemble(x), Ensemble(a, b)(x)) <= 1e-10
    replaced = 0
    for name, module in list(ensemble.net.named_modules()):
        if isinstance(module, PartitionedNorm) and type(module.view).__name__ == "LayerNorm" and module.dim == -1:
            plain = nn.LayerNorm(len(module.weight), eps=module.view.eps).double()
            plain.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(ensemble.net.get_submodule(parent), child, plain)
            replaced += 1
    assert replaced
    assert relative(ensemble(x), Ensemble(a, b)(x)) > 1e-3


class _Concat(nn.Module):
    """Two convs concatenated, then a head; ``cut``: the concatenation is cut at that channel position first
    (GhostNet cuts ``[:, :out_chs]``, all of it in some configurations)."""

    def __init__(self, cut: int | None):
        super().__init__()
        self.cut = cut
        self.left, self.right = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(cut or 8, 2)

    def forward(self, x):
        y = torch.cat([self.left(x), self.right(x)], 1)
        return self.head((y if self.cut is None else y[:, :self.cut]).mean((2, 3)))


@pytest.mark.parametrize("cut", [6, 8])
def test_a_concatenation_widens_unless_channels_are_cut_by_position(cut):
    """Widened pieces concatenate in the per-piece layout; a cut at the endpoint's channel position would
    take the wrong channels of the widened tensor, even a cut that keeps every channel (its module is not
    known to follow the width), so the groups of the tensor it cuts keep their width."""
    assert spec_for(_Concat(cut=None), (3, 4, 4)).support == "partial"
    spec = spec_for(_Concat(cut=cut), (3, 4, 4))
    assert not spec.widenable() and "takes its channels apart by position" in spec.partial


class _TokenMix(nn.Module):
    """Two convs concatenated on channels, then a linear along the tokens with the same weights for every channel
    (a token-mixing layer), a residual, and a head."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 3, 1)
        self.tokens = nn.Linear(16, 16)
        self.head = nn.Linear(7, 2)

    def forward(self, x):
        y = torch.cat([self.left(x), self.right(x)], 1).flatten(2)
        return self.head((y + self.tokens(y)).mean(2))


def test_a_token_layer_runs_one_copy_per_section_of_the_units_passing_it_by():
    """The traced spec records the token layer with both concatenated groups on its channel dim, so both widen;
    the partitioned copies, given an interleaved order of sections (two segments), compute each channel with its
    section's copy, as each endpoint computed its own channels."""
    spec = spec_for(_TokenMix(), (3, 4, 4))
    assert spec.support == "partial" and spec.widenable() == ["left", "right"]
    (across,) = spec.across
    assert across.layer == "tokens" and across.dim == -2 and [s.group for s in across.axis] == ["left", "right"]
    sections = torch.tensor([0, 1, 1, 2, 0, 1, 2, 2])  # two segments, each [A-only | shared | B-only]
    layer = SectionwiseLayer(nn.Linear(5, 3).double(), sections, -2)
    assert layer.order is not None and [name for name, _, _ in layer.copies()] == ["of_a", "merged", "of_b"]
    assert [n for _, _, n in layer.copies()] == [2, 3, 3]
    for _, copy, _ in layer.copies():
        torch.nn.init.normal_(copy.weight)
    x = torch.randn(2, len(sections), 5, dtype=torch.float64)
    expected = torch.stack([layer.copies()[int(s)][1](x[:, i]) for i, s in enumerate(sections)], 1)
    assert torch.allclose(layer(x), expected, rtol=1e-12, atol=0)
