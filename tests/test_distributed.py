"""Many processes, one merge: two CPU processes in a gloo process group split every pass over the data and
produce the merge one process does (float64: weights to 1e-10 relative), from Python and through torchrun."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import hubmerge
from hubmerge.data import batches

from conftest import base, labelled, make

SETTINGS = {  # the benefit search with REPAIR sweeps; greedy with RESET (BatchNorm statistics summed) and the
    # per-batch correlation estimator (batch stds summed); zip (within-model moments summed)
    "benefit": ("timm_resnet18", dict(budget=0.3, allocator="benefit", repair="repair")),
    "greedy-reset": ("mlp_bn", dict(budget=0.3, allocator="greedy", greedy_step=0.5, repair="reset",
                                    correlation="batch")),
    "zip": ("mlp", dict(align="zip", zip_beta=1.0, repair="repair")),
    "three-way": ("mlp", dict(repair="repair")),  # every pair's moments summed; merged by merge_many
}


def merged(setting: str) -> dict:
    case, options = SETTINGS[setting]
    calib, evaluation = labelled(case, batches=4), labelled(case, batches=3, n=5)
    if setting == "three-way":
        result = hubmerge.merge_many([make(case, s) for s in (1, 2, 3)], calib, evaluation=evaluation, **options)
    else:
        result = hubmerge.merge(make(case, 1), make(case, 2), calib, evaluation=evaluation, **options)
    return {"state": result.model.state_dict(), "partition": result.report.partition, "within": result.report.within,
            "metrics": {k: (m.accuracy, m.loss, m.samples) for k, m in result.report.metrics.items()},
            "batches": len(list(batches(calib)))}


def _worker(rank: int, size: int, port: int, setting: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        found = merged(setting)
        torch.save(found, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_two_processes_merge_as_one(setting, tmp_path):
    out = str(tmp_path / "found")
    mp.spawn(_worker, args=(2, free_port(), setting, out), nprocs=2)
    alone = merged(setting)
    for rank in (0, 1):
        found = torch.load(f"{out}.{rank}")
        assert found["batches"] == alone["batches"] // 2  # each process read only its share
        assert found["partition"] == alone["partition"] and found["within"] == alone["within"]
        if "budget" in SETTINGS[setting][1]:
            assert any(ka for ka, _, _ in found["partition"].values())  # the allocation widened something
        elif setting == "zip":
            assert sum(sum(w) for w in found["within"].values())  # the zip paired some units within a model
        for k, v in alone["state"].items():
            got = found["state"][k]
            if v.is_floating_point():
                assert (got - v).abs().max() <= 1e-10 * v.abs().max().clamp_min(1e-300), k
            else:
                assert torch.equal(got, v), k
        for name, (acc, loss, n) in alone["metrics"].items():
            got = found["metrics"][name]
            assert got[0] == acc and got[2] == n and abs(got[1] - loss) <= 1e-12 * abs(loss), name


def test_torchrun_runs_the_cli_merge_once(local, tmp_path):
    """The documented way: ``torchrun --nproc_per_node 2 --no-python hubmerge run ...``; rank 0 writes the
    result and prints the report once, and it is the merge of a single process (float32 endpoints: to
    float32 rounding; the allocation is the same)."""
    exe = Path(sys.executable).with_name("hubmerge")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    args = ["--calib-samples", "40", "--batch-size", "8", "--budget", "0.3", "--eval", str(local / "data"),
            "--eval-split", "train"]
    alone = subprocess.run([str(exe), *base(local, *args, "--out", str(tmp_path / "alone"))], env=env,
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "--no-python", str(exe), *base(local, *args, "--out", str(tmp_path / "two"))],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("barrier:") == 1 and two.stdout.count("written to") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone", "two"]
    want, got = load_file(tmp_path / "alone" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert want.keys() == got.keys()
    for k, v in want.items():
        assert torch.allclose(got[k], v, rtol=1e-4, atol=1e-5), k
    report = [line for line in alone.stdout.splitlines() if line.startswith(("merged", "size"))]
    assert report == [line for line in two.stdout.splitlines() if line.startswith(("merged", "size"))]
