import sys

import pytest
import timm
import torch
from timm.layers import apply_rot_embed_cat
from timm.models import register_model
from timm.models.beit import Attention as BeitAttention
from torch import nn

import hubmerge
from hubmerge.arch_specs import architecture_of, build_model, randomize_, spec_for
from hubmerge.arch_specs.literature import finish
from hubmerge.arch_specs.widths import CUT_TO
from hubmerge.errors import UnsupportedModelError
from hubmerge.evaluate import Ensemble
from hubmerge.spec import permute_state
from hubmerge.trace import derive

from conftest import inputs, make


def random_perms(spec, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {g: torch.randperm(grp.width, generator=gen) for g, grp in spec.groups.items()}


def test_random_permutation_of_every_group_leaves_outputs_unchanged(case):
    model = make(case, 0)
    spec = spec_for(model)
    x = inputs(case)
    before = model(x)
    perms = random_perms(spec)
    assert any((p != torch.arange(len(p))).any() for p in perms.values())
    model.load_state_dict(permute_state(spec, model.state_dict(), perms))
    assert (model(x) - before).abs().max() < 1e-10


def test_flatten_stride_is_in_the_spec():
    spec = spec_for(make("cifar_vgg_stride", 0))
    assert [s.repeat for s in spec.layers[-1].in_axis] == [4]  # 64x64 input -> 2x2 map before the classifier


def test_residual_stream_ties_layers_into_one_group():
    spec = spec_for(make("timm_resnet18", 0))
    writers = [l.name for l in spec.layers if l.out_group == "layer2.0.conv2"]
    assert writers == ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"]
    assert [p.module for p in spec.groups["layer2.0.conv2"].observe] == ["layer2.0.act2", "layer2.1.act2"]


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "vgg11", "vgg13", "vgg16", "vgg19",
                                  "vgg11_bn", "vgg19_bn", "hubmerge_vgg13", "hubmerge_vgg16", "hubmerge_vgg19"])
def test_every_named_architecture_has_a_valid_spec(name):
    args = dict(num_classes=3)
    if name.startswith("resnet"):
        args["channels"] = (2, 2, 2, 2)
    elif name.startswith("vgg"):
        args["mlp_ratio"] = 1 / 1024
    else:
        args["width_multiplier"] = 1 / 64
    model = timm.create_model(name, **args)
    model.model_args = args
    spec = spec_for(model)
    assert spec.partial is None
    assert spec.layers[-1].out_group is None and spec.layers[0].in_group is None
    assert architecture_of(model) == (name, architecture_of(model)[1])


def test_architecture_rebuilds_the_same_shapes(case):
    model = make(case, 0)
    name, args = architecture_of(model)
    rebuilt = build_model(name, args)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_a_python_model_without_model_args_is_rebuilt_only_when_that_is_exact():
    plain = timm.create_model("resnet18", num_classes=3)
    assert architecture_of(plain) == ("resnet18", {"num_classes": 3})
    with pytest.raises(UnsupportedModelError, match="set model.model_args"):
        architecture_of(timm.create_model("resnet18", num_classes=3, channels=(4, 4, 4, 4)))
    with pytest.raises(UnsupportedModelError, match="computes something else"):
        architecture_of(timm.create_model("resnet18", num_classes=3, act_layer="gelu"))


def test_families_without_partial_support_say_why():
    bit = timm.create_model("resnetv2_50x1_bit", num_classes=3, channels=(128, 128, 128, 128), stem_chs=32)
    spec = spec_for(bit, (3, 64, 64))
    assert "stages.0.blocks.0.downsample.conv (StdConv2d) convolves with a weight its forward computes" in spec.partial
    assert not spec.widenable()
    # a token-mixing MLP runs one copy per section of the stream, which widens; its own hidden units keep their width
    spec = spec_for(timm.create_model("mixer_s32_224", num_classes=3, img_size=64, mlp_ratio=(0.05, 0.05)),
                    (3, 64, 64))
    assert spec.support == "partial" and "stem.proj" in spec.widenable()
    assert sorted(spec.fixed) == [f"blocks.{i}.mlp_tokens.fc1" for i in range(8)] == sorted(spec.copied())
    assert "runs along another axis, one copy per section" in spec.fixed["blocks.0.mlp_tokens.fc1"]
    assert {(a.layer, a.dim, a.axis[0].group) for a in spec.across} == {
        (f"blocks.{i}.mlp_tokens.fc{j}", -2, "stem.proj") for i in range(8) for j in (1, 2)}
    # EVA's rotary embedding pairs each head's q/k channels by position: traced whole, those groups keep their
    # order (ordered) and move only with their heads, kept apart whole; everything widens
    spec = spec_for(timm.create_model("eva02_tiny_patch14_224", num_classes=3, img_size=28, depth=2, embed_dim=24,
                                      num_heads=2), (3, 28, 28))
    assert spec.support == "partial" and not spec.fixed and len(spec.heads) == 2
    assert [g for g, grp in spec.groups.items() if grp.ordered] == [g for h in spec.heads for g, _ in h.heads]
    with pytest.raises(UnsupportedModelError, match="Unknown model|does not know"):
        build_model("no_such_model", {})


def test_the_trace_input_follows_model_args_where_timms_default_cfg_does_not():
    args = dict(patch_size=4, img_size=16, depth=1, embed_dim=8, num_heads=2, in_chans=1, num_classes=3)
    model = timm.create_model("vit_tiny_patch16_224", **args)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    model.model_args = args
    assert spec_for(model).groups  # traced at (1, 16, 16)
    model.model_args = {"num_classes": 3}
    with pytest.raises(UnsupportedModelError, match=r"tracing VisionTransformer on an example input of shape"):
        spec_for(model)


class _ZeroPadded(nn.Module):
    """A layer whose bias is a trained half and a constant zero half (BEiT's q and v biases around a zero k bias):
    the zero buffer takes the units of the rows it is added to, and widens with them."""

    def __init__(self, num_classes: int = 2, **kwargs):
        super().__init__()
        self.fc1 = nn.Linear(4 * 4, 6, bias=False)
        self.b = nn.Parameter(torch.randn(3))
        self.register_buffer("z", torch.zeros(3), persistent=False)
        self.head = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1(x.flatten(1)) + torch.cat([self.b, self.z])))


@register_model
def hubmerge_test_zero_padded(pretrained: bool = False, num_classes: int = 2, in_chans: int = 1, img_size: int = 4,
                              **kwargs) -> _ZeroPadded:
    args = dict(num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    return finish(_ZeroPadded(num_classes), "hubmerge_test_zero_padded", args, kwargs, first_conv="fc1")


def test_a_constant_zero_buffer_takes_units_and_widens_with_zeros():
    a, b = (randomize_(timm.create_model("hubmerge_test_zero_padded"), s).double().eval() for s in (1, 2))
    spec = spec_for(a)
    assert [(z.key, [s.group for s in z.axis]) for z in spec.zeros] == [("z", ["fc1#2"])]
    assert spec.support == "partial" and [s.group for s in spec.axes["fc1.weight"][0]] == ["fc1", "fc1#2"]
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    calib = [(torch.randn(8, 1, 4, 4, dtype=torch.float64), None)]
    ensemble = hubmerge.merge(a, b, calib, gamma=1.0, repair=None).model
    assert torch.equal(ensemble.net.z, torch.zeros(6, dtype=torch.float64))  # 3 of A's and 3 of B's
    assert ((ensemble(x) - Ensemble(a, b)(x)).abs().max() / Ensemble(a, b)(x).abs().max()).item() <= 1e-10
    at_a = hubmerge.merge(a, b, calib, gamma=0.5, alpha=0.0, repair=None, partial="topk").model
    assert ((at_a(x) - a(x)).abs().max() / a(x).abs().max()).item() <= 1e-10


def test_a_ghost_module_keeping_every_channel_follows_the_width_and_one_cutting_some_refuses():
    from timm.models.ghostnet import GhostModule

    def ghost(out_chs: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), GhostModule(4, out_chs), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(out_chs, 2)).eval()

    spec = derive(ghost(6), torch.randn(2, 3, 8, 8), "test", CUT_TO)
    assert spec.support == "partial" and [(w.module, w.attribute) for w in spec.widths] == [("1", "out_chs")]
    assert [s.size for s in spec.widths[0].axis] == [3, 3]  # the primary features, then the cheap ones
    unknown = derive(ghost(6), torch.randn(2, 3, 8, 8), "test")  # a module not known to follow the width
    assert set(unknown.fixed) == {"1.primary_conv.0"} and unknown.widenable() == ["0"]
    assert "takes its channels apart by position" in unknown.fixed["1.primary_conv.0"]
    cutting = derive(ghost(5), torch.randn(2, 3, 8, 8), "test", CUT_TO)  # 6 channels cut to 5
    assert set(cutting.fixed) == {"1.primary_conv.0", "1.primary_conv.0#2"} and cutting.widenable() == ["0"]


def test_beit_widens_where_its_forward_sized_by_heads_computes_what_timms_does(monkeypatch):
    """BEiT's attention sizes its output by its input's width; a merged model runs hubmerge's forward sized by its
    heads, so heads and stream widen. That forward is checked against timm's on every model traced: one that
    computes something else (here: twice the output, as a changed timm release might) leaves heads and stream
    merged, saying why."""
    from hubmerge.arch_specs import attention

    def beit(**extra):
        return timm.create_model("beit_base_patch16_224", num_classes=3, img_size=32, depth=2, embed_dim=24,
                                 num_heads=2, **extra)

    spec = spec_for(beit(), (3, 32, 32))
    assert spec.support == "partial" and not spec.fixed and [h.module for h in spec.heads] == [
        "blocks.0.attn", "blocks.1.attn"]
    wrong = attention.WIDE_FORWARDS[BeitAttention]
    monkeypatch.setitem(attention.WIDE_FORWARDS, BeitAttention, lambda module, *a, **k: 2 * wrong(module, *a, **k))
    monkeypatch.setattr(hubmerge.arch_specs, "_SPECS", {})  # traced anew, not taken from the cache
    spec = spec_for(beit(), (3, 32, 32))
    assert spec.support == "some"
    assert "hubmerge's forward sized by its heads computes something else" in spec.fixed["patch_embed.proj"]


def rotated(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """A rotary embedding, as the model below calls it (by this module's global name, which the tracer wraps)."""
    return apply_rot_embed_cat(x, table)


def test_a_rotary_embedding_outside_attention_heads_keeps_its_units_in_order_and_width():
    class Rotary(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.table = nn.Linear(4, 8), nn.Linear(8, 2), torch.randn(16)

        def forward(self, x):
            return self.fc2(rotated(self.fc1(x), self.table))

    model = Rotary()
    spec = derive(model, torch.randn(3, 4), "test", rotary=((sys.modules[__name__], "rotated"),))
    assert spec.groups["fc1"].ordered and "rotary embedding pairs its units by position" in spec.fixed["fc1"]
    x = torch.randn(5, 4)
    before = model(x)
    model.load_state_dict(permute_state(spec, model.state_dict(), {"fc1": torch.arange(8).flip(0)}))
    assert (model(x) - before).abs().max() > 1e-3  # which is why: permuted, it computes something else
    # traced op by op, the table it multiplies by fixes the units instead: sound too, but an attention's heads
    # would then not be whole groups
    assert "fc1" not in derive(Rotary(), torch.randn(3, 4), "test").groups


@pytest.mark.parametrize("variant", [dict(), dict(qkv_fused=False), dict(scale_attn_inner=True),
                                     dict(rope_rotate_half=True, num_reg_tokens=1), dict(use_rot_pos_emb=False)])
def test_eva_runs_a_forward_sized_by_its_heads_so_its_stream_widens_exactly(variant):
    """EVA's attention sizes its output by its input's width; a merged model runs hubmerge's forward sized by its
    heads (fused or separate q/k/v, the inner norm, either rotary layout, register tokens), so the stream widens,
    heads are kept apart whole (their rotary q/k channels in order), α=0 or α=1 give A's or B's function exactly
    and γ=1 the ensemble."""
    args = dict(num_classes=3, img_size=28, depth=2, embed_dim=24, num_heads=2, **variant)
    a, b = (randomize_(timm.create_model("eva02_tiny_patch14_224", **args), s).double().eval() for s in (1, 2))
    a.model_args = b.model_args = args
    gen = torch.Generator().manual_seed(0)
    x, calib = (torch.randn(4, 3, 28, 28, generator=gen, dtype=torch.float64) for _ in range(2))
    spec = spec_for(a, (3, 28, 28))
    assert "patch_embed.proj" in spec.widenable(), spec.fixed
    assert spec.support == "partial" and len(spec.heads) == 2
    assert any(grp.ordered for grp in spec.groups.values()) == (variant.get("use_rot_pos_emb") is not False)
    for alpha, endpoint in ((0.0, a), (1.0, b)):
        merged = hubmerge.merge(a, b, [(calib, None)], gamma=0.5, alpha=alpha, repair=None, cross="interpolate",
                                partial="topk").model
        assert merged.partition["patch_embed.proj"][0] == 12
        out = endpoint(x)
        assert ((merged(x) - out).abs().max() / out.abs().max()).item() <= 1e-10
    out = Ensemble(a, b)(x)  # every group widens: γ=1 is the ensemble
    ensemble = hubmerge.merge(a, b, [(calib, None)], gamma=1.0, repair=None).model(x)
    assert ((ensemble - out).abs().max() / out.abs().max()).item() <= 1e-10
    if not variant:  # weight matching keeps the rotary q/k channels in order too: α=1 is B; a zip pairs them in place
        zipped = hubmerge.Prepared(a, b, [(calib, None)], hubmerge.MergeOptions(repair=None, align="zip", zip_beta=1.0))
        ordered = [g for g, grp in spec.groups.items() if grp.ordered]
        in_place = torch.stack([torch.arange(12), torch.arange(12, 24)], 1)  # A's unit i with B's unit i
        assert ordered and all(torch.equal(zipped.matchings[g].members, in_place) for g in ordered)
        assert any(zipped.matchings[g].within != (0, 0) for g in spec.groups if g not in ordered)
        merged = hubmerge.merge(a, b, [(calib, None)], gamma=0.5, alpha=1.0, repair=None, cross="interpolate",
                                align="weight", partial="topk").model
        assert ((merged(x) - b(x)).abs().max() / b(x).abs().max()).item() <= 1e-10
