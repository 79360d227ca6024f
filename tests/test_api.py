import datasets
import numpy as np
import pytest
import timm
import torch
from torch import nn

import hubmerge
from hubmerge.data import Preprocess
from hubmerge.errors import CheckpointError, DataError, IncompatibleModelsError, UnsupportedModelError, UsageError

from conftest import labelled, make


def test_merge_report_has_every_model_and_barrier():
    a, b = make("mlp_bn", 1), make("mlp_bn", 2)
    data = labelled("mlp_bn")
    result = hubmerge.merge(a, b, data, evaluation=data, gamma=0.2)
    report = result.report.to_dict()
    assert set(report["metrics"]) == {"a", "b", "ensemble", "full_merge", "full_merge_repair", "merged"}
    m = report["metrics"]
    assert report["barrier"]["accuracy"] == pytest.approx((m["a"]["accuracy"] + m["b"]["accuracy"]) / 2
                                                          - m["merged"]["accuracy"])
    assert 0 < report["param_increase"] < 1
    assert isinstance(result.model, hubmerge.PartialMergedModel)


def test_same_inputs_give_the_same_merged_weights():
    a, b = make("timm_resnet18", 1), make("timm_resnet18", 2)
    data = labelled("timm_resnet18")
    one = hubmerge.merge(a, b, data, gamma=0.3, partial="random", seed=4).model.state_dict()
    two = hubmerge.merge(a, b, data, gamma=0.3, partial="random", seed=4).model.state_dict()
    assert all(torch.equal(v, two[k]) for k, v in one.items())


def test_datasets_dataset_as_calibration_and_evaluation():
    a, b = make("mlp_bn", 1), make("mlp_bn", 2)
    rng = np.random.default_rng(0)
    ds = datasets.Dataset.from_dict(
        {"image": [rng.integers(0, 255, (6, 6), dtype=np.uint8) for _ in range(20)], "label": [i % 10 for i in range(20)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}),
    )
    result = hubmerge.merge(a.float(), b.float(), ds, evaluation=ds, gamma=0.1, batch_size=8)
    assert result.report.metrics["a"].samples == 20


def test_merged_model_keeps_the_endpoints_preprocessing_not_the_architecture_default(tmp_path):
    a, b = make("mlp_bn", 1), make("mlp_bn", 2)
    a.pretrained_cfg = {**a.pretrained_cfg, "mean": (0.3,), "std": (0.2,)}
    assert timm.create_model("hubmerge_mlp").pretrained_cfg["mean"] != (0.3,)
    result = hubmerge.merge(a, b, labelled("mlp_bn"), gamma=0.2)
    result.model.save_pretrained(tmp_path / "m")
    loaded = hubmerge.PartialMergedModel.from_pretrained(tmp_path / "m")
    assert Preprocess.from_model(loaded) == Preprocess.from_model(a)
    given = Preprocess(input_size=a.pretrained_cfg["input_size"], mean=(0.1,), std=(0.9,))
    assert hubmerge.merge(a, b, labelled("mlp_bn"), gamma=0.2, preprocess=given).model.preprocess == given.to_dict()


def test_different_architectures_are_refused():
    with pytest.raises(IncompatibleModelsError, match="different architectures"):
        hubmerge.merge(make("mlp", 0), make("timm_resnet18", 0), labelled("mlp"))


def test_different_class_counts_are_separate_tasks_and_refused_as_one():
    a = timm.create_model("hubmerge_mlp", depth=1, width=4, img_size=6, num_classes=3)
    b = timm.create_model("hubmerge_mlp", depth=1, width=4, img_size=6, num_classes=5)
    with pytest.raises(IncompatibleModelsError, match="class counts"):
        hubmerge.merge(a, b, [torch.randn(2, 1, 6, 6)], tasks="shared")
    assert hubmerge.merge(a, b, [torch.randn(2, 1, 6, 6)]).model.model_args["num_classes"] == 8


def test_model_that_timm_cannot_rebuild_is_refused():
    with pytest.raises(UnsupportedModelError, match="without pretrained_cfg\\['architecture'\\]"):
        hubmerge.merge(nn.Linear(2, 2), nn.Linear(2, 2), [torch.randn(2, 2)])


def test_empty_calibration_is_refused():
    with pytest.raises(DataError, match="empty"):
        hubmerge.merge(make("mlp", 0), make("mlp", 1), [])


def test_missing_calibration_is_refused_unless_data_free():
    with pytest.raises(DataError, match="calibration data"):
        hubmerge.merge(make("mlp", 0), make("mlp", 1), None)
    result = hubmerge.merge(make("mlp", 0), make("mlp", 1), None, align="weight", repair=None)
    assert result.report.metrics == {}


def test_bad_options_are_usage_errors_before_any_work():
    with pytest.raises(UsageError, match="alpha"):
        hubmerge.merge(None, None, None, alpha=2.0)
    with pytest.raises(UsageError, match="budget"):
        hubmerge.merge(None, None, None, budget=1.5)
    with pytest.raises(UsageError, match="allocator"):
        hubmerge.merge(None, None, None, allocator="magic")


def test_interpolation_curve_runs_from_a_to_b():
    a, b, data = make("mlp_bn", 1), make("mlp_bn", 2), labelled("mlp_bn")
    curve = hubmerge.interpolation_curve(a, b, data, data, alphas=(0.0, 0.5, 1.0), cross="interpolate",
                                         repair="repair")
    ea, eb = hubmerge.evaluate.evaluate(a, data), hubmerge.evaluate.evaluate(b, data)
    assert [row["alpha"] for row in curve] == [0.0, 0.5, 1.0]
    assert curve[0]["merge"]["loss"] == pytest.approx(ea.loss, abs=1e-9)
    assert curve[-1]["merge"]["loss"] == pytest.approx(eb.loss, abs=1e-9)
    assert curve[0]["repair"]["loss"] == pytest.approx(ea.loss, abs=1e-6)  # REPAIR toward A's own statistics
    assert curve[1]["merge"]["loss"] != curve[1]["repair"]["loss"]


def test_merge_takes_a_merge_options_object_and_keywords_win():
    a, b, data = make("mlp_bn", 1), make("mlp_bn", 2), labelled("mlp_bn")
    opts = hubmerge.MergeOptions(gamma=0.5, repair=None, cross="interpolate")
    by_object = hubmerge.merge(a, b, data, options=opts)
    by_keywords = hubmerge.merge(a, b, data, gamma=0.5, repair=None, cross="interpolate")
    x = data[0][0]
    assert torch.equal(by_object.model(x), by_keywords.model(x))
    overridden = hubmerge.merge(a, b, data, options=opts, gamma=0.0).model
    assert all(ka == kb == 0 for ka, _, kb in overridden.partition.values())  # the keyword won
    assert overridden.cross == "interpolate"  # the object's other fields stayed
    with pytest.raises(hubmerge.UsageError, match="MergeOptions"):
        hubmerge.merge(a, b, data, options={"gamma": 0.5})


def _broken(kind: str) -> nn.Module:
    model = make("mlp_bn", 2)
    if kind == "nan":
        with torch.no_grad():
            next(model.parameters())[0, 0] = float("nan")
    else:
        model.float()
    return model


@pytest.mark.parametrize("case,error,message", [
    ("nan", CheckpointError, "holds NaN or infinite values"),
    ("float32", IncompatibleModelsError, "dtypes differ"),
])
def test_broken_or_mismatched_weights_are_refused(case, error, message):
    """A NaN weight used to give a NaN model with no error; mixed dtypes a raw 'mat1 and mat2' error."""
    with pytest.raises(error, match=message):
        hubmerge.merge(make("mlp_bn", 1), _broken(case), labelled("mlp_bn"))


def test_bad_data_from_python_raises_hubmerges_errors():
    a, b, data = make("mlp_bn", 1), make("mlp_bn", 2), labelled("mlp_bn")
    with pytest.raises(DataError, match="re-iterable"):
        hubmerge.merge(a, b, (batch for batch in data))
    nan = [(x.clone().fill_(float("inf")), y) for x, y in data]
    with pytest.raises(DataError, match="NaN or infinite"):
        hubmerge.merge(a, b, nan)
    out_of_range = [(x, y + 10) for x, y in data]
    with pytest.raises(DataError, match="labels run from"):
        hubmerge.merge(a, b, data, evaluation=out_of_range)
    floats = [(x, y.double()) for x, y in data]
    with pytest.raises(DataError, match="integer class index"):
        hubmerge.merge(a, b, data, evaluation=floats)
    with pytest.raises(DataError, match="the model takes 1-channel images"):
        hubmerge.merge(a, b, [(x.expand(-1, 3, -1, -1), y) for x, y in data])
    pre = Preprocess((1, 6, 6), (0.5,), (0.5,))
    for shape in [(6,), (2, 1, 6, 6)]:
        with pytest.raises(DataError, match="2-D"):
            pre(np.zeros(shape, dtype=np.uint8))


def test_integer_weights_in_a_checkpoint_are_refused_not_cast(tmp_path):
    from safetensors.torch import save_file

    from hubmerge.demo import save_timm
    from hubmerge.hub import load_endpoint

    model = make("mlp_bn", 1).float()
    save_timm(model, tmp_path, "hubmerge_mlp", model.model_args)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].round().to(torch.int32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="stored as integers"):
        load_endpoint(str(tmp_path))


def test_one_evaluation_pass_gives_exactly_the_metrics_of_separate_ones():
    """The report evaluates all six models in one pass over the data, the ensemble from the endpoints'
    logits; the numbers are those of evaluating each model on its own."""
    from hubmerge.evaluate import Ensemble, evaluate

    a, b, data = make("mlp_bn", 1), make("mlp_bn", 2), labelled("mlp_bn")
    result = hubmerge.merge(a, b, data, evaluation=data, gamma=0.3)
    m = result.report.metrics
    assert list(m) == ["a", "b", "ensemble", "full_merge", "full_merge_repair", "merged"]
    assert m["a"] == evaluate(a, data) and m["b"] == evaluate(b, data)
    assert m["ensemble"] == evaluate(Ensemble(a, b), data)
    assert m["merged"] == evaluate(result.model, data)


def test_an_in_chans_1_timm_model_merges_from_tensors_and_asks_for_its_normalisation_for_datasets(caplog):
    """timm keeps its 3-channel ImageNet mean in the cfg of a model built with in_chans=1. Tensors are used
    as given, so the merge runs (and records no preprocessing, with a warning); a datasets.Dataset needs the
    model's own mean and std, and the error says how to give them."""
    from hubmerge.arch_specs import build_model, randomize_

    args = dict(channels=(4, 8, 8, 12), in_chans=1, num_classes=5)
    a, b = (randomize_(build_model("resnet18", args), seed).double() for seed in (1, 2))
    assert a.pretrained_cfg["input_size"] == (1, 224, 224) and len(a.pretrained_cfg["mean"]) == 3
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 1, 32, 32, generator=gen, dtype=torch.float64), torch.arange(4) % 5) for _ in range(2)]
    result = hubmerge.merge(a, b, data, gamma=0.2)
    assert result.model.preprocess is None and "records no preprocessing" in caplog.text
    images = datasets.Dataset.from_dict({"image": [np.zeros((32, 32), dtype=np.uint8)] * 2, "label": [0, 1]},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "label": datasets.ClassLabel(num_classes=5)}))
    with pytest.raises(DataError, match="give the model's own"):
        hubmerge.merge(a, b, images, gamma=0.2)
