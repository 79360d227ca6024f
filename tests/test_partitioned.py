import json

import pytest
import safetensors.torch
import torch

from hubmerge import PartialMergedModel
from hubmerge.partitioned import PartitionedLayer
from hubmerge.cost import CostModel
from hubmerge.errors import CheckpointError

from conftest import inputs
from helpers import prepared


@pytest.fixture
def saved(tmp_path):
    p = prepared("timm_resnet18", cross="fill")
    model = p.build(p.plans(0.3))
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def test_save_load_roundtrip_gives_identical_outputs(saved):
    model, path = saved
    loaded = PartialMergedModel.from_pretrained(path).double()
    x = inputs("timm_resnet18")
    assert torch.equal(model(x), loaded(x))
    config = json.loads((path / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["cross"] == "fill"
    assert config["partition"] == {g: list(s) for g, s in model.partition.items()}
    assert "hubmerge_version" in config
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_stored_tensors_are_only_the_nonzero_blocks(saved):
    model, path = saved
    stored = safetensors.torch.load_file(path / "model.safetensors")
    blocks = {k.split(".")[-2] for k in stored if k.startswith("net.layer1.0.conv1.")}
    assert blocks == {"a_side", "shared_from_b", "b_only"}
    # the logits and the stem have no zero block (fixed output / fixed input): one block each
    assert {k.split(".")[-2] for k in stored if k.startswith(("net.fc.", "net.conv1."))} == {"whole"}
    params = {k for k, _ in model.named_parameters()}
    stored_params = sum(t.numel() for k, t in stored.items() if k in params)
    closed_form = CostModel(model.spec, model.net, (3, 32, 32))(model.partition).total.params
    assert stored_params == sum(p.numel() for p in model.parameters()) == closed_form


def _tamper(path, fn):
    state = safetensors.torch.load_file(path / "model.safetensors")
    fn(state)
    safetensors.torch.save_file(state, path / "model.safetensors")


def test_missing_tensor_fails_to_load(saved):
    _, path = saved
    _tamper(path, lambda s: s.pop("net.layer1.0.conv1.shared_from_b.weight"))
    with pytest.raises(CheckpointError, match="missing.*net.layer1.0.conv1.shared_from_b.weight"):
        PartialMergedModel.from_pretrained(path)


def test_mismatch_from_another_hubmerge_version_names_both_versions(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hubmerge_version": "0.0.1"}))
    _tamper(path, lambda s: s.pop("net.layer1.0.conv1.b_only.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*written by hubmerge 0\.0\.1.*hubmerge==0\.0\.1"):
        PartialMergedModel.from_pretrained(path)


def test_extra_tensor_fails_to_load(saved):
    _, path = saved
    _tamper(path, lambda s: s.__setitem__("net.fc.extra", torch.zeros(1)))
    with pytest.raises(CheckpointError, match="unexpected"):
        PartialMergedModel.from_pretrained(path)


def test_wrong_shape_fails_to_load(saved):
    _, path = saved
    key = "net.layer1.0.conv1.shared_from_b.weight"
    _tamper(path, lambda s: s.__setitem__(key, s[key][:, :-1].clone()))
    with pytest.raises(CheckpointError, match="wrong shapes"):
        PartialMergedModel.from_pretrained(path)


def test_truncated_file_fails_to_load(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        PartialMergedModel.from_pretrained(path)


def test_pickle_only_checkpoint_is_refused(saved):
    model, path = saved
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        PartialMergedModel.from_pretrained(path)


def test_inconsistent_partition_in_config_is_refused(saved):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    group = next(iter(config["partition"]))
    config["partition"][group][0] += 1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not hold all"):
        PartialMergedModel.from_pretrained(path)


def test_planned_execution_computes_the_same_and_keeps_the_blocks(saved):
    """Each layer may run as one zero-padded op joined from its blocks; the outputs stay the merge's, the
    stored state stays the blocks, a block changed in place (as REPAIR folds) is joined again, and training
    runs the blocks."""
    model, _ = saved
    x = inputs("timm_resnet18")
    want, keys = model(x), set(model.state_dict())
    layers = [m for m in model.net.modules() if isinstance(m, PartitionedLayer) and not hasattr(m, "whole")]
    assert layers and set(model.plan_execution(x, repeats=1).values()) <= {"blocks", "dense"}
    for m in layers:
        m.execution = "dense"
    with torch.no_grad():
        assert (model(x) - want).abs().max() <= 1e-12 * want.abs().max()
        assert set(model.state_dict()) == keys
        layers[0].a_side.weight.mul_(2.0)
        changed = model(x)
    assert (changed - want).abs().max() > 1e-6  # joined again from the changed block
    for m in layers:
        m.execution = "blocks"
    with torch.no_grad():
        assert (model(x) - changed).abs().max() <= 1e-12 * changed.abs().max()
    layers[0].execution = "dense"
    model(x).sum().backward()  # with gradients the blocks run, so they receive them
    assert layers[0].a_side.weight.grad is not None


def test_the_zero_padded_form_of_the_whole_model_computes_the_same_and_is_made_again_when_a_tensor_changes(saved):
    """The whole model may run as its plain zero-padded copy (what plan_execution keeps where it is the fastest
    form): the outputs stay the merge's, the state stays the blocks, a tensor changed in place (a block, a
    BatchNorm's running statistics) or replaced makes it again, and hooks, training and gradients run the
    blocks."""
    model, _ = saved
    x = inputs("timm_resnet18")
    want, keys = model(x), set(model.state_dict())
    assert model.plan_execution(x, repeats=1).keys() and model.execution in ("layers", "zero-padded")
    model.execution = "zero-padded"
    layer = next(m for m in model.net.modules() if isinstance(m, PartitionedLayer) and not hasattr(m, "whole"))
    norm = next(m for m in model.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        assert (model(x) - want).abs().max() <= 1e-12 * want.abs().max()
        plain = model.__dict__["_plain"][2]
        assert model(x) is not None and model.__dict__["_plain"][2] is plain  # kept while nothing changes
        assert set(model.state_dict()) == keys
        norm.running_var.mul_(4.0)
        rescaled = model(x)
        assert (rescaled - want).abs().max() > 1e-6
        layer.a_side.weight.mul_(2.0)
        changed = model(x)
        assert (changed - rescaled).abs().max() > 1e-6
        model.execution = "layers"
        assert (model(x) - changed).abs().max() <= 1e-12 * changed.abs().max()
        model.execution = "zero-padded"
        seen = []
        handle = layer.register_forward_hook(lambda *_: seen.append(1))
        model(x)
        handle.remove()
        assert seen  # a hooked module runs: the blocks do
        layer.a_side.weight.div_(2.0)
        norm.running_var.div_(4.0)
        assert (model(x) - want).abs().max() <= 1e-12 * want.abs().max()
        norm.weight = torch.nn.Parameter(norm.weight * 3.0)  # a tensor replaced, not changed in place
        assert (model(x) - want).abs().max() > 1e-6
        model.execution = "layers"
        tripled = model(x)
        model.execution = "zero-padded"
        assert (model(x) - tripled).abs().max() <= 1e-12 * tripled.abs().max()
    model(x).sum().backward()
    assert layer.a_side.weight.grad is not None


@pytest.mark.parametrize("cross", ["interpolate", "fill"])
def test_a_partitioned_standardised_conv_runs_alike_in_every_form(cross):
    """An NF-Net's weight-standardised convs standardise each endpoint's view of their inputs: the blocks,
    the zero-padded form and the materialised model compute the same, a gain changed in place (as REPAIR
    folds) is standardised again, and gradients reach the raw blocks and the gain."""
    from test_families import batch, make
    from hubmerge.partitioned import PartitionedStdConv
    import hubmerge

    a, b = make("nfnet", 1), make("nfnet", 2)
    x = batch("nfnet")
    model = hubmerge.merge(a, b, [(batch("nfnet", seed=1), None)], gamma=0.5, repair=None, cross=cross).model
    layers = [m for m in model.net.modules() if isinstance(m, PartitionedStdConv) and not hasattr(m, "whole")]
    assert len(layers) >= 10
    with torch.no_grad():
        want = model(x)
        assert (model.materialize()(x) - want).abs().max() <= 1e-12 * want.abs().max()
        for m in layers:
            m.execution = "dense"
        assert (model(x) - want).abs().max() <= 1e-12 * want.abs().max()
        layers[0].gain.mul_(2.0)
        changed = model(x)
        for m in layers:
            m.execution = "blocks"
        assert (changed - want).abs().max() > 1e-6
        assert (model(x) - changed).abs().max() <= 1e-12 * changed.abs().max()
    model(x).sum().backward()
    assert layers[0].a_side.weight.grad is not None and layers[0].gain.grad is not None
