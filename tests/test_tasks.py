"""Endpoints of separate tasks (issue 14): the merged model's outputs are each endpoint's task side by side.

γ=1 gives every endpoint's own logits on its own outputs (the ensemble of separate tasks); a backbone
merged with a permuted copy of itself under another head is that backbone with both heads, by permutation,
zip, N-way and in a family that only takes full merges; the report scores each task on its own samples and
outputs; the saved model declares its tasks and label names.
"""

import json

import pytest
import timm
import torch
from typer.testing import CliRunner

import hubmerge
from hubmerge.arch_specs import randomize_, spec_for
from hubmerge.cli.app import app
from hubmerge.demo import save_timm
from hubmerge.errors import IncompatibleModelsError, UnsupportedModelError, UsageError
from hubmerge.evaluate import evaluate, evaluate_all
from hubmerge.partitioned import PartialMergedModel
from hubmerge.spec import permute_state

from test_families import FAMILIES, batch, relative

runner = CliRunner()


def task_model(name: str, seed: int, classes: int, labels: list[str] | None = None) -> torch.nn.Module:
    """A family's tiny model with a head of ``classes`` outputs (and class names, where given)."""
    fam = FAMILIES[name]
    model = timm.create_model(fam.architecture, num_classes=classes, **fam.model_args)
    model.model_args = {**fam.model_args, "num_classes": classes}
    if labels:
        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": labels}
    return randomize_(model, seed).double().eval()


def calibration(name: str) -> list:
    return [(batch(name, seed=s), None) for s in (1, 2)]


def rehead(backbone: torch.nn.Module, name: str, seed: int, classes: int) -> torch.nn.Module:
    """``backbone``'s units in a random order, under a random head of ``classes`` outputs."""
    other = task_model(name, seed, classes)
    spec = spec_for(backbone, FAMILIES[name].input_size)
    gen = torch.Generator().manual_seed(seed)
    perms = {g: torch.randperm(grp.width, generator=gen) for g, grp in spec.groups.items()}
    state = permute_state(spec, backbone.state_dict(), perms)
    head = {k: v for k, v in other.state_dict().items() if state[k].shape != v.shape}
    assert head, "the heads differ in shape"
    other.load_state_dict({**state, **head})
    return other


@pytest.mark.parametrize("name", ["mlp", "cifar_resnet", "vit", "convnext"])
def test_gamma_one_gives_each_endpoint_its_own_outputs(name):
    a, b = task_model(name, 1, 4), task_model(name, 2, 3)
    x = batch(name)
    for alpha in (0.5, 0.3):
        result = hubmerge.merge(a, b, calibration(name), gamma=1.0, repair=None, alpha=alpha)
        assert [t["classes"] for t in result.report.tasks] == [4, 3]
        assert relative(result.model(x), torch.cat([a(x), b(x)], 1)) <= 1e-10, alpha


@pytest.mark.parametrize("name", ["mlp", "cifar_resnet", "vit", "swin"])
def test_a_backbone_merged_with_itself_under_two_heads_is_that_backbone_with_both(name):
    a = task_model(name, 1, 4)
    b = rehead(a, name, 2, 3)
    x = batch(name)
    want = torch.cat([a(x), b(x)], 1)
    merged = hubmerge.merge(a, b, calibration(name), repair=None).model
    assert relative(merged(x), want) <= 1e-10
    plain = timm.create_model(merged.architecture, **merged.model_args).double().eval()
    plain.load_state_dict(merged.materialize().state_dict(), strict=True)
    assert merged.model_args["num_classes"] == 7 and relative(plain(x), want) <= 1e-10


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_zips_and_n_way_merges_keep_every_task(name):
    a = task_model(name, 1, 4)
    b, c = rehead(a, name, 2, 3), rehead(a, name, 3, 2)
    x, calib = batch(name), calibration(name)
    zipped = hubmerge.merge(a, b, calib, align="zip", zip_beta=0.5, repair=None).model
    assert relative(zipped(x), torch.cat([a(x), b(x)], 1)) <= 1e-10
    three = hubmerge.merge_many([a, b, c], calib, repair=None, weights=[0.2, 0.3, 0.5]).model
    assert relative(three(x), torch.cat([a(x), b(x), c(x)], 1)) <= 1e-10
    assert [t.classes for t in three.tasks] == [4, 3, 2] and list(three.split(three(x))) == ["a", "b", "c"]
    # a partial zip of the three: the zipped trunk is the backbone, each later layer and head its endpoint's own
    partial = hubmerge.merge_many([a, b, c], calib, repair=None, weights=[0.2, 0.3, 0.5], align="zip",
                                  zip_depth=1).model
    assert any(sizes[0] for sizes in partial.partition.values())  # some groups are kept apart
    assert relative(partial(x), torch.cat([a(x), b(x), c(x)], 1)) <= 1e-10


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_an_n_way_partial_merge_at_gamma_one_gives_each_endpoint_its_own_outputs(name):
    a, b, c = task_model(name, 1, 4), task_model(name, 2, 3), task_model(name, 3, 2)
    x = batch(name)
    three = hubmerge.merge_many([a, b, c], calibration(name), gamma=1.0, repair=None, weights=[0.2, 0.3, 0.5]).model
    assert relative(three(x), torch.cat([a(x), b(x), c(x)], 1)) <= 1e-10
    assert [t.classes for t in three.tasks] == [4, 3, 2]


def test_partial_zip_at_depth_zero_gives_each_endpoint_its_own_outputs():
    a, b, c = task_model("mlp", 1, 4), task_model("mlp", 2, 3), task_model("mlp", 3, 2)
    x = batch("mlp")
    merged = hubmerge.merge(a, b, calibration("mlp"), align="zip", zip_depth=0, repair=None).model
    assert relative(merged(x), torch.cat([a(x), b(x)], 1)) <= 1e-10
    three = hubmerge.merge_many([a, b, c], calibration("mlp"), align="zip", zip_depth=0, repair=None).model
    assert relative(three(x), torch.cat([a(x), b(x), c(x)], 1)) <= 1e-10


def test_tasks_are_told_apart_by_class_counts_and_label_names():
    four, three = task_model("mlp", 1, 4), task_model("mlp", 2, 3)
    with pytest.raises(IncompatibleModelsError, match="class counts differ.*tasks='separate'"):
        hubmerge.merge(four, three, calibration("mlp"), tasks="shared")
    with pytest.raises(UsageError, match="weighted above 0"):
        hubmerge.merge(four, three, calibration("mlp"), alpha=0.0)
    cats, dogs = (task_model("mlp", s, 2, names) for s, names in ((1, ["cat", "cow"]), (2, ["dog", "pig"])))
    separate = hubmerge.merge(cats, dogs, calibration("mlp"), repair=None).model
    assert separate.tasks and separate.pretrained_cfg["label_names"] == ["a/cat", "a/cow", "b/dog", "b/pig"]
    same = task_model("mlp", 2, 2, ["cat", "cow"])
    assert hubmerge.merge(cats, same, calibration("mlp"), repair=None).model.tasks is None
    forced = hubmerge.merge(cats, same, calibration("mlp"), repair=None, tasks="separate").model
    assert forced.model_args["num_classes"] == 4
    with pytest.raises(UnsupportedModelError, match="names 1 classes in label_names but has 2"):
        hubmerge.merge(cats, task_model("mlp", 2, 2, ["dog"]), calibration("mlp"), tasks="separate")


def test_the_report_scores_each_task_on_its_own_samples_and_outputs():
    a, b = task_model("mlp", 1, 4), task_model("mlp", 2, 3)
    gen = torch.Generator().manual_seed(4)
    data = [(batch("mlp", 8, seed=s), torch.randint(0, 7, (8,), generator=gen)) for s in (5, 6)]
    result = hubmerge.merge(a, b, calibration("mlp"), evaluation=data, gamma=0.5)
    m = result.report.metrics
    x, y = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
    out = result.model(x)
    for task, rows, offset in (("a", y < 4, 0), ("b", y >= 4, 4)):
        guess = out[rows][:, offset:offset + (4 if task == "a" else 3)].argmax(1)
        assert m["merged"].tasks[task].accuracy == (guess == y[rows] - offset).double().mean().item()
        assert m["merged"].tasks[task].samples == rows.sum().item()
    assert m["merged"].accuracy == (out.argmax(1) == y).double().mean().item()
    assert evaluate(result.model, data) == m["merged"]  # a merge of separate tasks is scored per task anywhere
    # the ensemble of separate tasks: each endpoint on its own outputs, side by side
    own = evaluate_all({"e": _Side(a, b)}, data, tasks=result.model.tasks)["e"]
    assert m["ensemble"].accuracy == own.accuracy and m["ensemble"].tasks == own.tasks
    want = 0.5 * sum(m[e].tasks[e].accuracy - m["merged"].tasks[e].accuracy for e in "ab")
    assert abs(result.report.barrier.accuracy - want) <= 1e-12


class _Side(torch.nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_the_saved_model_declares_its_tasks(tmp_path):
    a = task_model("cifar_resnet", 1, 4, ["t0", "t1", "t2", "t3"])
    b = task_model("cifar_resnet", 2, 3, ["u0", "u1", "u2"])
    model = hubmerge.merge(a, b, calibration("cifar_resnet"), gamma=0.5, repair=None).model
    model.save_pretrained(tmp_path / "m")
    back = PartialMergedModel.from_pretrained(tmp_path / "m")
    x = batch("cifar_resnet")
    assert torch.equal(back(x), model(x)) and back.tasks == model.tasks
    assert back.pretrained_cfg["label_names"][4:] == ["b/u0", "b/u1", "b/u2"]
    assert {k: v.shape[1] for k, v in back.split(back(x)).items()} == {"a": 4, "b": 3}
    card = (tmp_path / "m" / "README.md").read_text()
    assert "| b | 4–6 | 3 | u0, u1, u2 |" in card


def test_the_command_line_merges_separate_tasks_and_scores_each(local, tmp_path):
    """Endpoints of 6 and 4 classes, their names in timm's config.json: the labels 0-9 of the test data index
    the merged outputs (A's six, then B's four)."""
    args = dict(depth=2, width=12, bn=True, img_size=8)
    for name, classes in (("six", 6), ("four", 4)):
        save_timm(randomize_(timm.create_model("hubmerge_mlp", num_classes=classes, **args), classes),
                  tmp_path / name, "hubmerge_mlp", {**args, "num_classes": classes})
        config = json.loads((tmp_path / name / "config.json").read_text())
        config["label_names"] = [f"{name}{i}" for i in range(classes)]
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    out = tmp_path / "m"
    result = runner.invoke(app, ["run", str(tmp_path / "six"), str(tmp_path / "four"), "--calib", str(local / "data"),
                                 "--eval", str(local / "data"), "--gamma", "0.25", "--out", str(out), "--quiet",
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    assert [(t["name"], t["start"], t["classes"]) for t in report["tasks"]] == [("a", 0, 6), ("b", 6, 4)]
    assert sum(report["metrics"]["merged"]["tasks"][t]["samples"] for t in "ab") == 40
    assert "| b | 6–9 | 4 | four0, four1, four2, four3 |" in (out / "README.md").read_text()
    scored = runner.invoke(app, ["eval", str(out), "--data", str(local / "data"), "--json", "--quiet"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["tasks"] == report["metrics"]["merged"]["tasks"]
    text = runner.invoke(app, ["eval", str(out), "--data", str(local / "data"), "--quiet"]).stdout
    assert "task a: accuracy" in text and "task b: accuracy" in text
    shown = runner.invoke(app, ["inspect", str(out)]).stdout
    assert "task a: outputs 0–5 (6 classes)" in shown and "task b: outputs 6–9 (4 classes)" in shown
