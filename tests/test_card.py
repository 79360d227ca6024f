"""The model card: what a user shares must hold up outside the happy path."""

import subprocess
import sys

from huggingface_hub import ModelCard
from typer.testing import CliRunner

import hubmerge
from hubmerge.card import build
from hubmerge.cli.app import app

from conftest import base, labelled, make

runner = CliRunner()


def test_the_cards_usage_code_runs_as_written(local, tmp_path):
    out = tmp_path / "m"
    assert runner.invoke(app, base(local, "--gamma", "0.25", "--out", str(out))).exit_code == 0
    code = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    proc = subprocess.run([sys.executable, "-c", code + "\nprint(tuple(logits.shape))"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "(1, 10)"


def test_local_endpoints_are_not_hub_metadata_and_commits_are_not_none(local, tmp_path):
    out = tmp_path / "m"
    assert runner.invoke(app, base(local, "--eval", str(local / "data"), "--out", str(out))).exit_code == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None and card.data.datasets is None  # local folders are not Hub repos
    assert card.data.pipeline_tag == "image-classification" and card.data.library_name == "hubmerge"
    assert f"Partial merge of {local / 'ep0'} and {local / 'ep1'}" in card.text
    assert "@ `None`" not in card.text and "a local folder (no commit)" in card.text
    assert "The *barrier* is" in card.text and "Git Re-Basin" in card.text and "REPAIR" in card.text


def test_hub_references_become_metadata_and_model_index():
    a, b, data = make("mlp_bn", 1), make("mlp_bn", 2), labelled("mlp_bn")
    result = hubmerge.merge(a, b, data, evaluation=data, gamma=0.2,
                            endpoints={"a": {"id": "user/mlp-a", "commit": "a" * 40},
                                       "b": {"id": "user/mlp-b@v1", "commit": "b" * 40}})
    card = build(result.model, result.report, repo_id="user/merged", datasets=("user/calib", "user/test"),
                 evaluation="user/test")
    assert card.data.base_model == ["user/mlp-a", "user/mlp-b"] and card.data.base_model_relation == "merge"
    assert card.data.datasets == ["user/calib", "user/test"]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"accuracy": result.report.metrics["merged"].accuracy,
                       "loss": result.report.metrics["merged"].loss}
    assert "model-index" in str(card) and f"commit `{'a' * 40}`" in card.text


def test_save_pretrained_writes_hubmerges_card_not_the_mixins(tmp_path):
    a, b, data = make("mlp_bn", 1), make("mlp_bn", 2), labelled("mlp_bn")
    hubmerge.merge(a, b, data, gamma=0.2).model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "Partial merge of endpoint A and endpoint B" in text and "PytorchModelHubMixin" not in text
    assert "| blocks.0.fc |" in text  # the partition
