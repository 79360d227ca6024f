"""End to end against a loopback Hub: push endpoints with timm, merge by repo id, push, load back.

huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE at import, so each scenario runs in a subprocess
with its own environment; it prints one JSON line of observations that the test checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from hub_server import TOKEN, HubServer

SETUP = """
import json, os, sys, traceback
import numpy as np, torch, timm, datasets
import hubmerge
from hubmerge.arch_specs import randomize_
from hubmerge.release import DataRef, run
from hubmerge.hub import load_endpoint
out = {}
def expect_error(name, fn):
    try:
        fn()
        out[name] = "no error"
    except hubmerge.HubmergeError as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
def endpoint(seed, **over):
    args = dict(depth=2, width=12, bn=True, img_size=8, num_classes=10)
    args.update(over)
    return randomize_(timm.create_model("hubmerge_mlp", **args), seed)
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = HubServer()
    home = tmp_path_factory.mktemp("hf_home")
    data = tmp_path_factory.mktemp("data")
    yield server, home, data
    server.stop()


def scenario(code: str, env: dict, timeout: int = 300) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full.update(env)
    proc = subprocess.run([sys.executable, "-c", SETUP + textwrap.dedent(code) + "\nprint(json.dumps(out))"],
                          env=full, capture_output=True, text=True, timeout=timeout, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hub_env(server, home, **extra) -> dict:
    return {"HF_ENDPOINT": server.url, "HF_HOME": str(home), "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1",
            **extra}


def test_push_endpoints_merge_by_repo_id_push_and_load_back(hub):
    server, home, data = hub
    out = scenario(f"""
        from timm.models import push_to_hf_hub
        from huggingface_hub import ModelCard
        for i, name in enumerate(["mlp-a", "mlp-b"]):
            m = endpoint(i)
            push_to_hf_hub(m, f"tester/{{name}}", model_args=m.model_args, safe_serialization=True)
        rng = np.random.default_rng(0)
        ds = datasets.Dataset.from_dict(
            {{"img": [rng.integers(0, 255, (8, 8), dtype=np.uint8) for _ in range(48)], "y": [i % 10 for i in range(48)]}},
            features=datasets.Features({{"img": datasets.Image(), "y": datasets.ClassLabel(num_classes=10)}}))
        ds.to_parquet("{data}/calib.parquet")
        ds.save_to_disk("{data}/calib_disk")
        result = run("tester/mlp-a", "tester/mlp-b@main", calib=DataRef("{data}/calib.parquet", samples=40),
                     evaluation=DataRef("{data}/calib_disk", "train[:32]"), push=True, repo_id="tester/merged",
                     gamma=0.3, batch_size=16)
        out["url"] = result.repo_url
        loaded = hubmerge.PartialMergedModel.from_pretrained("tester/merged")
        x = torch.randn(5, 1, 8, 8)
        out["same_outputs"] = bool(torch.equal(loaded(x), result.model(x)))
        card = ModelCard.load("tester/merged")
        out["base_model"] = card.data.base_model
        out["relation"] = card.data.base_model_relation
        out["library"] = card.data.library_name
        out["datasets"] = card.data.datasets
        out["pipeline_tag"] = card.data.pipeline_tag
        out["title"] = [line for line in card.text.splitlines() if line.startswith("# ")]
        out["card_has_table"] = "| merged |" in card.text and "barrier_vs_params.png" in card.text
        from huggingface_hub import HfApi
        out["files"] = sorted(HfApi().list_repo_files("tester/merged"))
        out["commits"] = result.report.endpoints
        out["eval_samples"] = result.report.metrics["a"]["samples"] if isinstance(result.report.metrics["a"], dict) else result.report.metrics["a"].samples
        branch = run("tester/mlp-a", "tester/mlp-b", calib=DataRef("{data}/calib.parquet"), push=True,
                     repo_id="tester/merged", revision="v2", gamma=0.1)
        out["branch_loads"] = hubmerge.PartialMergedModel.from_pretrained("tester/merged", revision="v2").partition != loaded.partition
    """, hub_env(server, home))
    assert out["same_outputs"] is True
    assert out["base_model"] == ["tester/mlp-a", "tester/mlp-b"]
    assert out["relation"] == "merge" and out["library"] == "hubmerge"
    assert out["datasets"] is None  # local files are not Hub datasets; the card's text names them
    assert out["card_has_table"] is True and out["title"] == ["# Partial merge of tester/mlp-a and tester/mlp-b"]
    assert out["pipeline_tag"] == "image-classification"
    assert out["files"] == ["README.md", "barrier_vs_params.png", "config.json", "model.safetensors"]
    assert all(len(e["commit"]) == 40 for e in out["commits"].values())
    assert out["eval_samples"] == 32
    assert out["branch_loads"] is True
    messages = server.store.repos["tester/merged"]["messages"]
    assert any(m.startswith("hubmerge: partial merge of tester/mlp-a and tester/mlp-b") for m in messages.values())


def test_offline_cache_and_clear_errors(hub):
    server, home, data = hub
    out = scenario(f"""
        from huggingface_hub import HfApi
        api = HfApi()
        m = endpoint(0)
        for name, model in (("other-arch", timm.create_model("resnet18", channels=(2, 2, 2, 2), num_classes=10)),
                            ("five-classes", endpoint(1, num_classes=5))):
            from timm.models import push_to_hf_hub
            push_to_hf_hub(model, f"tester/{{name}}", model_args=getattr(model, "model_args", {{"channels": (2, 2, 2, 2)}}),
                           safe_serialization=True)
        api.create_repo("tester/pickle-only")
        torch.save(m.state_dict(), "{data}/pytorch_model.bin")
        api.upload_file(path_or_fileobj="{data}/pytorch_model.bin", path_in_repo="pytorch_model.bin", repo_id="tester/pickle-only")
        api.upload_file(path_or_fileobj=json.dumps({{"architecture": "hubmerge_mlp"}}).encode(), path_in_repo="config.json", repo_id="tester/pickle-only")
        datasets.Dataset.from_dict({{"foo": [1, 2], "bar": [3, 4]}}).to_parquet("{data}/nocols.parquet")
        expect_error("repo_not_found", lambda: load_endpoint("tester/nope"))
        expect_error("revision_not_found", lambda: load_endpoint("tester/mlp-a@no-such-branch"))
        expect_error("no_safetensors", lambda: load_endpoint("tester/pickle-only"))
        calib = DataRef("{data}/calib.parquet")
        expect_error("arch_differs", lambda: run("tester/mlp-a", "tester/other-arch", calib=calib))
        expect_error("classes_differ", lambda: run("tester/mlp-a", "tester/five-classes", calib=calib, tasks="shared"))
        expect_error("no_image_column", lambda: run("tester/mlp-a", "tester/mlp-b", calib=DataRef("{data}/nocols.parquet")))
        os.environ.pop("HF_TOKEN")
        expect_error("push_without_token", lambda: run("tester/mlp-a", "tester/mlp-b", calib=calib, push=True))
    """, hub_env(server, home))
    assert out["repo_not_found"].startswith("RemoteError") and "repo not found" in out["repo_not_found"]
    assert out["revision_not_found"].startswith("RemoteError") and "revision not found" in out["revision_not_found"]
    assert out["no_safetensors"].startswith("CheckpointError") and "safetensors only" in out["no_safetensors"]
    assert out["arch_differs"].startswith("IncompatibleModelsError") and "different architectures" in out["arch_differs"]
    assert out["classes_differ"].startswith("IncompatibleModelsError") and "class counts" in out["classes_differ"]
    assert out["no_image_column"].startswith("DataError") and "no image column" in out["no_image_column"]
    assert out["push_without_token"].startswith("UsageError") and "HF_TOKEN" in out["push_without_token"]

    offline = scenario("""
        e = load_endpoint("tester/mlp-a")
        out["offline_commit"] = e.commit
        expect_error("offline_uncached", lambda: load_endpoint("tester/never-downloaded"))
    """, {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    assert len(offline["offline_commit"]) == 40
    assert offline["offline_uncached"].startswith("RemoteError") and "offline" in offline["offline_uncached"]

    t0 = time.monotonic()
    unreachable = scenario("""
        expect_error("unreachable", lambda: load_endpoint("tester/somewhere-else"))
    """, {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(home / "empty")})
    assert unreachable["unreachable"].startswith("RemoteError"), unreachable
    assert time.monotonic() - t0 < 60
