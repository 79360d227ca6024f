import pytest
import timm
import torch
from torch import nn

from hubmerge.arch_specs import architecture_of, build_model, families, spec_for
from hubmerge.errors import UnsupportedModelError
from hubmerge.spec import Layer, PermutationSpec, permute_state

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


def test_a_wrong_spec_is_caught_by_the_permutation_test():
    """The invariance test must be able to fail: a spec that forgets a norm breaks the function."""
    model = make("timm_resnet18", 0)
    spec = spec_for(model)
    broken = PermutationSpec(spec.family, spec.groups, tuple(
        Layer(l.name, l.out_group, l.in_group, None if l.name == "layer1.0.conv1" else l.norm, l.in_repeat)
        for l in spec.layers))
    x = inputs("timm_resnet18")
    before = model(x)
    model.load_state_dict(permute_state(broken, model.state_dict(), random_perms(spec)))
    assert (model(x) - before).abs().max() > 1e-3
    with pytest.raises(UnsupportedModelError, match="does not cover"):
        broken.validate(model)


def test_flatten_stride_is_in_the_spec():
    spec = spec_for(make("cifar_vgg_stride", 0))
    assert spec.layers[-1].in_repeat == 4  # 64x64 input -> 2x2 map before the classifier


def test_residual_stream_ties_layers_into_one_group():
    spec = spec_for(make("timm_resnet18", 0))
    writers = [l.name for l in spec.layers if l.out_group == "layer2"]
    assert writers == ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"]
    assert spec.groups["layer2"].observe == ("layer2.0", "layer2.1")


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
    spec = spec_for(model)
    assert spec.layers[-1].out_group is None and spec.layers[0].in_group is None
    assert architecture_of(model) == (name, architecture_of(model)[1])


def test_architecture_rebuilds_the_same_shapes(case):
    model = make(case, 0)
    name, args = architecture_of(model)
    rebuilt = build_model(name, args)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_unsupported_model_names_the_families():
    with pytest.raises(UnsupportedModelError) as err:
        spec_for(nn.Sequential(nn.Linear(3, 3)))
    for family in families():
        assert family in str(err.value)
    assert "register_adapter" in str(err.value)


def test_unsupported_variants_are_refused_clearly():
    with pytest.raises(UnsupportedModelError, match="deep stems"):
        spec_for(timm.create_model("resnet18d", num_classes=3))
    with pytest.raises(UnsupportedModelError, match="grouped"):
        spec_for(timm.create_model("resnext50_32x4d", num_classes=3))
    with pytest.raises(UnsupportedModelError, match="Unknown model|no hubmerge adapter"):
        build_model("no_such_model", {})
