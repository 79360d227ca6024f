import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from typer.testing import CliRunner

import datasets
from hubmerge import PartialMergedModel
from hubmerge.arch_specs import randomize_
from hubmerge.cli.app import app
from hubmerge.demo import save_timm

from conftest import base

runner = CliRunner()


def test_run_writes_a_loadable_folder_and_a_json_report(local, tmp_path):
    result = runner.invoke(app, base(local, "--eval", str(local / "data"), "--gamma", "0.25", "--out",
                                     str(tmp_path / "m"), "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["output"] == str(tmp_path / "m")
    assert set(report["report"]["metrics"]) >= {"a", "b", "ensemble", "merged"}
    assert report["report"]["timings"]["total"] > 0
    model = PartialMergedModel.from_pretrained(tmp_path / "m")
    assert model.partition["blocks.0.fc"] == (3, 9, 3)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "barrier_vs_params.png",
                                                                  "config.json", "model.safetensors"]


def test_config_file_round_trips_and_command_line_wins(local, tmp_path):
    recipe = {"model_a": str(local / "ep0"), "model_b": str(local / "ep1"), "calib": str(local / "data"),
              "budget": 0.3, "allocator": "uniform", "cross": "fill", "out": str(tmp_path / "m")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", "--config", str(tmp_path / "recipe.yaml"), "--cross", "interpolate",
                                 "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    options = json.loads(result.stdout)["report"]["options"]
    assert options["budget"] == 0.3 and options["allocator"] == "uniform"
    assert options["cross"] == "interpolate"  # the command line wins over the file
    card = (tmp_path / "m" / "README.md").read_text()
    embedded = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert embedded["budget"] == 0.3 and embedded["cross"] == "interpolate"
    # the recipe embedded in the card reproduces the merge
    (tmp_path / "again.yaml").write_text(yaml.safe_dump({**embedded, "out": str(tmp_path / "again")}))
    again = runner.invoke(app, ["run", "--config", str(tmp_path / "again.yaml"), "--quiet"])
    assert again.exit_code == 0, again.output
    one = (tmp_path / "m" / "model.safetensors").read_bytes()
    assert one == (tmp_path / "again" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("args,code,message", [
    (["--budget", "1.5", "--out", "x"], 2, "budget must be in [0, 1]"),
    (["--allocator", "magic", "--out", "x"], 2, "magic"),
    (["--push"], 2, "token"),
    (["--out", "{existing}"], 2, "not empty"),
    (["--align", "zip", "--gamma", "0.3", "--out", "x"], 2, "keeps units apart by depth only"),
])
def test_bad_usage_is_one_line_and_exit_2_before_any_work(local, tmp_path, args, code, message, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "f").write_text("x")
    args = [a.replace("{existing}", str(tmp_path / "existing")) for a in args]
    result = runner.invoke(app, ["run", "no/such-model-a", "no/such-model-b", *args])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_zip_from_the_command_line(local, tmp_path):
    """``--align zip --zip-beta``: the report counts the within-model pairs, the card says it is a zip."""
    result = runner.invoke(app, base(local, "--eval", str(local / "data"), "--align", "zip", "--zip-beta", "1",
                                     "--out", str(tmp_path / "m"), "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    assert report["options"]["align"] == "zip" and report["options"]["zip_beta"] == 1.0
    assert set(report["within"]) == set(report["partition"])
    card = (tmp_path / "m" / "README.md").read_text()
    assert "zipped merge** (ZipIt!)" in card and "Stoica" in card and "zip_beta: 1.0" in card


def test_three_endpoints_make_an_n_way_merge_that_its_recipe_reproduces(local, tmp_path):
    """``hubmerge run A B C --weights --budget``: the report names every endpoint, the budget (above one
    endpoint's size, below the ensemble's two more) is spent, the card says what the merge is, and the recipe
    in the card (with the third endpoint and the weights) reruns to the same weights."""
    args = dict(depth=2, width=12, bn=True, img_size=8, num_classes=10)
    save_timm(randomize_(timm.create_model("hubmerge_mlp", **args), 2), tmp_path / "ep2", "hubmerge_mlp", args)
    three = ["run", str(local / "ep0"), str(local / "ep1"), str(tmp_path / "ep2")]
    result = runner.invoke(app, [*three, "--calib", str(local / "data"), "--eval", str(local / "data"), "--weights",
                                 "2,1,1", "--budget", "1.2", "--out", str(tmp_path / "m"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["report"]
    assert list(report["metrics"]) == ["a", "b", "c", "ensemble", "full_merge", "merged"]
    assert report["weights"] == [0.5, 0.25, 0.25]
    assert 1.0 < report["param_increase"] <= 1.2 and report["allocation"]
    card = (tmp_path / "m" / "README.md").read_text()
    assert "# 3-way merge of" in card and "weights 0.5, 0.25, 0.25" in card and "| k_A | shared | k_B | k_C |" in card
    recipe = _card_recipe(tmp_path / "m")
    assert recipe["more_models"] == [str(tmp_path / "ep2")] and recipe["weights"] == "2,1,1"
    (tmp_path / "again.yaml").write_text(yaml.safe_dump({**recipe, "out": str(tmp_path / "again")}))
    again = runner.invoke(app, ["run", "--config", str(tmp_path / "again.yaml"), "--quiet"])
    assert again.exit_code == 0, again.output
    written = [(tmp_path / f / "model.safetensors").read_bytes() for f in ("m", "again")]
    assert written[0] == written[1]
    two = runner.invoke(app, base(local, "--weights", "1,1", "--out", str(tmp_path / "two")))
    assert two.exit_code == 2 and "--weights weigh the endpoints of an N-way merge" in two.output
    over = runner.invoke(app, [*three, "--budget", "2.5", "--out", str(tmp_path / "over")])
    assert over.exit_code == 2 and "budget must be in [0, 2] for 3 endpoints" in over.output
    zipped = runner.invoke(app, [*three, "--calib", str(local / "data"), "--align", "zip", "--zip-beta", "1",
                                 "--out", str(tmp_path / "zip"), "--json", "--quiet"])
    assert zipped.exit_code == 0, zipped.output
    assert all(len(w) == 3 for w in json.loads(zipped.stdout)["report"]["within"].values())
    assert "N-way zipped merge** (ZipIt!)" in (tmp_path / "zip" / "README.md").read_text()
    deep = runner.invoke(app, [*three, "--calib", str(local / "data"), "--align", "zip", "--zip-depth", "1",
                               "--out", str(tmp_path / "deep"), "--quiet"])
    assert deep.exit_code == 0, deep.output
    card = (tmp_path / "deep" / "README.md").read_text()
    assert "N-way zipped merge** (ZipIt!)" in card and "partial zip (`zip_depth` 1)" in card


def test_missing_calibration_where_needed_is_usage_error(local, tmp_path):
    result = runner.invoke(app, ["run", str(local / "ep0"), str(local / "ep1"), "--budget", "0.2", "--out",
                                 str(tmp_path / "m")])
    assert result.exit_code == 2 and "--calib" in result.output


def test_bad_input_exits_3_and_remote_failure_4(local, tmp_path, monkeypatch):
    other = tmp_path / "other"
    args = dict(depth=1, width=4, img_size=8, num_classes=5)
    save_timm(timm.create_model("hubmerge_mlp", **args), other, "hubmerge_mlp", args)
    result = runner.invoke(app, ["run", str(local / "ep0"), str(other), "--calib", str(local / "data"),
                                 "--out", str(tmp_path / "m")])
    assert result.exit_code == 3 and "differ" in result.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["run", "nobody/none", str(local / "ep1"), "--calib", str(local / "data"),
                                 "--out", str(tmp_path / "m2"), "--align", "weight", "--repair", "none"])
    assert result.exit_code == 4, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_inspect_and_archs_print_what_they_promise(local, tmp_path):
    result = runner.invoke(app, ["inspect", str(local / "ep0"), "--json"])
    info = json.loads(result.stdout)
    assert info["family"] == "mlp" and [g["width"] for g in info["groups"]] == [12, 12]
    assert "blocks.0.fc.weight" in info["groups"][0]["parameters"]
    runner.invoke(app, base(local, "--gamma", "0.5", "--out", str(tmp_path / "m")))
    merged = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "m"), "--json"]).stdout)
    assert merged["groups"][0]["partition"] == [6, 6, 6] and merged["increase"]["params"] > 0
    text = runner.invoke(app, ["inspect", str(tmp_path / "m")]).output
    assert "A-only/shared/B-only [6, 6, 6]" in text
    assert info["layers"] == ["blocks.0.fc", "blocks.1.fc", "head"]  # what zip_depth counts
    assert "layers in forward order (--zip-depth N zips the groups the first N write): 0 blocks.0.fc" in text
    archs = runner.invoke(app, ["archs"]).output
    for family in ("mlp", "cifar_vgg", "vgg", "resnet", "cifar_resnet", "vit", "convnext"):
        assert family in archs


def test_inspect_marks_the_groups_that_cannot_widen(tmp_path):
    # RexNet adds its shortcut to the first channels of a wider output (x[:, :C] += shortcut): that cut keeps the
    # channels it cuts at their width
    args = dict(width_mult=0.25, num_classes=3)
    save_timm(timm.create_model("rexnet_100", **args), tmp_path / "rexnet", "rexnet_100", args)
    info = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "rexnet"), "--json"]).stdout)
    assert info["support"] == "some"
    fixed = {g["name"]: g["cannot_widen_because"] for g in info["groups"] if g["cannot_widen_because"]}
    assert len(fixed) == 15 and "takes its channels apart by position" in fixed["features.1.conv_pwl.conv"]
    text = runner.invoke(app, ["inspect", str(tmp_path / "rexnet")]).output
    assert "46 groups; partial merges and budgets, 15 of the groups always merged (marked *)" in text
    assert "features.1.conv_pwl.conv     width    19" in text and "* an op takes its channels apart by position" in text
    # EVA's rotary heads are kept apart whole, their q/k channels in order: nothing is fixed
    args = dict(img_size=28, depth=2, embed_dim=24, num_heads=2, num_classes=3)
    save_timm(timm.create_model("eva02_tiny_patch14_224", **args), tmp_path / "eva", "eva02_tiny_patch14_224", args)
    info = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "eva"), "--json"]).stdout)
    assert info["support"] == "partial" and not any(g["cannot_widen_because"] for g in info["groups"])
    assert [g["name"] for g in info["groups"] if g["ordered"]] == ["blocks.0.attn", "blocks.0.attn#2", "blocks.1.attn",
                                                                   "blocks.1.attn#2"]
    text = runner.invoke(app, ["inspect", str(tmp_path / "eva")]).output
    row = next(line for line in text.splitlines() if line.startswith("  blocks.0.attn "))
    assert row.endswith("(units in order: a rotary embedding pairs them by position)")
    # a token MLP's hidden units keep their width, yet the family takes partial merges: it runs a copy per section
    args = dict(img_size=64, mlp_ratio=(0.05, 0.05), num_classes=3)
    save_timm(timm.create_model("mixer_s32_224", **args), tmp_path / "mixer", "mixer_s32_224", args)
    text = runner.invoke(app, ["inspect", str(tmp_path / "mixer")]).output
    assert "17 groups; partial merges and budgets, 8 of the groups keep their width (marked *)" in text
    assert "blocks.0.mlp_tokens.fc1 runs along another axis: one copy per section of stem.proj" in text


def test_archs_derive_traces_every_family_and_agrees_with_the_table():
    result = runner.invoke(app, ["archs", "--derive", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["family"]: r for r in json.loads(result.stdout)}
    assert all(r["derived"] == r["support"] for r in rows.values())
    assert rows["convnext"]["derived"] == "partial" and rows["convnext"]["why_not_partial"] is None
    assert rows["vit"]["derived"] == "partial"  # heads kept apart whole
    assert rows["densenet"]["derived"] == "partial"  # concatenations widen piece by piece
    assert rows["ghostnet"]["derived"] == "partial"  # its channel cut keeps every channel, and follows the width
    assert rows["nfnet"]["derived"] == "partial"  # each endpoint's view standardised on its own
    assert "weight its forward computes" in rows["resnetv2_bit"]["why_not_partial"]  # standardised, no gain
    assert rows["mixer"]["derived"] == rows["maxvit"]["derived"] == "partial"  # token MLP copies; heads whole
    assert rows["beit"]["derived"] == "partial"  # its attention run sized by its heads
    assert rows["eva02"]["derived"] == "partial"  # rotary q/k in order, heads kept apart whole


def test_eval_command(local):
    result = runner.invoke(app, ["eval", str(local / "ep0"), "--data", str(local / "data"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples"] == 40


def test_preprocessing_override_is_used_recorded_and_reused_by_eval(local, tmp_path):
    result = runner.invoke(app, base(local, "--eval", str(local / "data"), "--gamma", "0.25", "--mean", "0.3",
                                     "--std", "0.2", "--out", str(tmp_path / "m"), "--json"))
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["report"]["metrics"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["preprocess"] == {"input_size": [1, 8, 8], "mean": [0.3], "std": [0.2], "interpolation": "bilinear",
                                    "crop_pct": 1.0, "crop_mode": "center"}

    def loss(*args):
        out = runner.invoke(app, ["eval", *args, "--data", str(local / "data"), "--json", "--quiet"])
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout)["loss"]

    # the merge measured endpoint A with the override, not with A's own mean/std (0.5)
    assert loss(str(local / "ep0"), "--mean", "0.3", "--std", "0.2") == pytest.approx(metrics["a"]["loss"], rel=1e-9)
    assert loss(str(local / "ep0")) != pytest.approx(metrics["a"]["loss"], rel=1e-3)
    # the merged model carries the preprocessing it was measured with
    assert loss(str(tmp_path / "m")) == pytest.approx(metrics["merged"]["loss"], rel=1e-9)


@pytest.mark.parametrize("args,code,message", [
    (["--mean", "0.3,0.3"], 3, "one value per input channel"),
    (["--std", "zero"], 2, "--std takes comma-separated numbers"),
    (["--input-size", "1,8"], 3, "(channels, height, width)"),
])
def test_bad_preprocessing_override_is_a_clear_error(local, args, code, message):
    result = runner.invoke(app, ["eval", str(local / "ep0"), "--data", str(local / "data"), *args])
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output


def test_real_subprocess_json_has_nothing_else_on_stdout(local, tmp_path):
    exe = Path(sys.executable).with_name("hubmerge")
    proc = subprocess.run([str(exe), *base(local, "--gamma", "0.2", "--out", str(tmp_path / "m"), "--json")],
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if not k.startswith("HF_")})
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1
    assert json.loads(proc.stdout)["report"]["partition"]["blocks.0.fc"] == [2, 10, 2]
    bad = subprocess.run([str(exe), "run", "a", "b", "--alpha", "3", "--out", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_help_version_and_usage_errors_do_not_load_torch():
    """``--help``, ``--version`` and usage errors answer without importing torch or timm (they took 4-5 s
    and 900 MB when the CLI imported them to build its choices); help keeps ``[@revision]`` as written."""
    code = """
import sys
from typer.testing import CliRunner
from hubmerge.cli.app import app
runner = CliRunner()
help = runner.invoke(app, ["run", "--help"])
assert help.exit_code == 0 and "hub id[@revision]" in help.output, help.output
version = runner.invoke(app, ["--version"])
assert version.exit_code == 0 and version.output.startswith("hubmerge "), version.output
bad = runner.invoke(app, ["run", "a", "b", "--budget", "1.5", "--out", "x"])
assert bad.exit_code == 2 and "budget must be in [0, 1]" in bad.output, bad.output
unsafe = runner.invoke(app, ["run", "a", "b", "--out", "."])
assert unsafe.exit_code == 2 and "working folder" in unsafe.output, unsafe.output
heavy = sorted(m for m in ("torch", "timm", "datasets") if m in sys.modules)
assert not heavy, heavy
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _card_recipe(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    block = text.split("## Recipe")[1].split("```yaml\n")[1].split("```")[0]
    return yaml.safe_load(block)


@pytest.mark.parametrize("made_by", ["cli", "python"])
def test_a_cards_recipe_reproduces_its_merge_bit_for_bit_from_another_folder(local, tmp_path, monkeypatch, made_by):
    """The recipe in a card, whether the merge came from the CLI or from ``release.run()``, reruns with
    ``hubmerge run --config`` from another working folder and gives the same weights; ``repair: reset`` and
    the options the CLI once lacked (epsilon, score, batch_size) survive the round trip."""
    from hubmerge.release import DataRef, run as release_run

    first = tmp_path / "first"
    settings = dict(gamma=0.25, partial="adaptive", epsilon=0.1, repair="reset", batch_size=16, score="loss")
    if made_by == "cli":
        monkeypatch.chdir(local)  # relative references in the command line
        args = ["run", "ep0", "ep1", "--calib", "data", "--out", str(first), "--quiet", "--gamma", "0.25",
                "--partial", "adaptive", "--epsilon", "0.1", "--repair", "reset", "--batch-size", "16",
                "--score", "loss"]
        assert runner.invoke(app, args).exit_code == 0
    else:
        release_run(str(local / "ep0"), str(local / "ep1"), calib=DataRef(str(local / "data")), out=first,
                    **settings)
    recipe = _card_recipe(first)
    assert {k: recipe[k] for k in settings} == settings
    recipe["out"] = str(tmp_path / "second")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["run", "--config", str(tmp_path / "recipe.yaml"), "--quiet"])
    assert result.exit_code == 0, result.output
    again = PartialMergedModel.from_pretrained(tmp_path / "second").state_dict()
    want = PartialMergedModel.from_pretrained(first).state_dict()
    assert again.keys() == want.keys() and all(torch.equal(again[k], want[k]) for k in want)


# bad inputs found by trying the CLI as a user would (issue 12): each one clear line, the documented exit
# code (2 usage, 3 bad input), before any merge work; they used to end in raw library exceptions, a
# misleading message, or a silent wrong answer
BAD_RUNS = [
    (lambda r: [str(r / "ep0"), "/nonexistent/ep1"], [], 3, "/nonexistent/ep1: no such local folder"),
    (lambda r: [str(r / "ep0"), "user/../x"], [], 3, "neither a local folder nor a hub repo id"),
    (lambda r: [str(r / "ep0"), str(r / "ep1")], ["--calib-samples", "-5"], 2, "must be at least 1"),
    (lambda r: [str(r / "ep0"), str(r / "ep1")], ["--calib-split", "train[abc]"], 2, "must look like train"),
    (lambda r: [str(r / "ep0"), str(r / "ep1")], ["--device", "tpu"], 2, "device must be cpu, cuda"),
    (lambda r: [str(r / "ep0"), str(r / "ep1")], ["--push", "--repo-id", "bad..id"], 2, "is not a hub repo id"),
]


@pytest.mark.parametrize("endpoints,extra,code,message", BAD_RUNS)
def test_bad_run_inputs_are_one_clear_line(local, tmp_path, endpoints, extra, code, message):
    args = ["run", *endpoints(local), "--calib", str(local / "data"), "--out", str(tmp_path / "m"), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("split,code,message", [
    ("nosuch", 3, "holds one dataset (no split name), not a split 'nosuch'"),
    ("test[:10%]", 0, "(4 samples)"),  # datasets' percent slices work on save_to_disk folders too
    ("test[5%:2]", 2, "must look like train"),
    ("test[:101%]", 2, "percentages go up to 100"),
])
def test_eval_splits_are_parsed_not_ignored(local, split, code, message):
    result = runner.invoke(app, ["eval", str(local / "ep0"), "--data", str(local / "data"), "--split", split,
                                 "--quiet"])
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output


def test_push_to_an_unreachable_hub_is_a_remote_error(local, tmp_path):
    """A connection error of huggingface_hub's HTTP client (not an OSError) used to exit 1 as 'unexpected'."""
    exe = Path(sys.executable).with_name("hubmerge")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")},
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_unused", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([str(exe), *base(local, "--push", "--repo-id", "user/merged")], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 4, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "cannot reach the hub" in lines[0], proc.stderr


def test_a_broken_or_oversized_endpoint_config_is_refused_before_allocating(local, tmp_path):
    """Invalid JSON used to exit 1; a width of 10**9 in model_args tried to allocate hundreds of GB."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(local / "ep0", bad)
    args = ["run", str(bad), str(local / "ep1"), "--calib", str(local / "data"), "--out", str(tmp_path / "m")]
    (bad / "config.json").write_text("{not json")
    result = runner.invoke(app, args)
    assert result.exit_code == 3 and "config.json is not valid JSON" in result.output, result.output
    config = json.loads((local / "ep0" / "config.json").read_text())
    config["model_args"]["width"] = 10**9
    (bad / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, args)
    assert result.exit_code == 3 and "GiB for its weights" in result.output, result.output
    config["model_args"]["width"] = "wide"
    (bad / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, args)
    assert result.exit_code == 3 and "does not take model_args" in result.output, result.output


def test_an_endpoint_built_with_img_size_is_fed_that_size(tmp_path):
    """timm's stored cfg keeps its default 224 for a ViT built with img_size=32; the merge used to resize
    the data to 224 and fail. The model_args decide the size the model takes."""
    rng = np.random.default_rng(0)
    args = dict(img_size=32, depth=1, embed_dim=24, num_heads=2, num_classes=10)
    for i in (0, 1):
        model = randomize_(timm.create_model("vit_tiny_patch16_224", **args), i)
        save_timm(model, tmp_path / f"ep{i}", "vit_tiny_patch16_224", args)
    assert json.loads((tmp_path / "ep0" / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 224, 224]
    datasets.Dataset.from_dict(
        {"image": [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(8)], "label": list(range(8))},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}),
    ).save_to_disk(str(tmp_path / "data"))
    result = runner.invoke(app, ["run", str(tmp_path / "ep0"), str(tmp_path / "ep1"), "--calib", str(tmp_path / "data"),
                                 "--out", str(tmp_path / "m"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert list(PartialMergedModel.from_pretrained(tmp_path / "m").pretrained_cfg["input_size"]) == [3, 32, 32]


def test_library_warnings_appear_once():
    """datasets and huggingface_hub log through their own stderr handler; passed on to the CLI's handler too,
    each of their warnings used to print twice."""
    code = """
import logging
from hubmerge.cli.app import _setup
_setup(False, False)
logging.getLogger("datasets").warning("from datasets")
logging.getLogger("huggingface_hub").warning("from the hub")
logging.getLogger("hubmerge").warning("from hubmerge")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [sum(m in line for line in lines) for m in ("from datasets", "from the hub", "from hubmerge")] == [1, 1, 1]
