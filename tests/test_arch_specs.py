import pytest
import timm
import torch

from hubmerge.arch_specs import architecture_of, build_model, spec_for
from hubmerge.errors import UnsupportedModelError
from hubmerge.spec import permute_state

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
    model = timm.create_model("mixer_s32_224", num_classes=3, img_size=64, mlp_ratio=(0.05, 0.05))
    assert "along another unit axis" in spec_for(model, (3, 64, 64)).partial
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
