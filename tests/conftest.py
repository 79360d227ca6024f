"""Small random-weight endpoints of every adapter family, in float64 so invariants can be checked tightly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import datasets
from hubmerge.arch_specs import randomize_
from hubmerge.demo import save_timm

# pytest-xdist runs one worker per core (``-n auto``, pyproject.toml): each takes its share of the cores, so
# that the workers' intra-op threads do not oversubscribe them
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# (timm name, model_args, input shape): one or more per adapter family, tiny enough for a CPU test run.
CASES = {
    "mlp_bn": ("hubmerge_mlp", dict(depth=2, width=12, bn=True, img_size=6), (1, 6, 6)),
    "mlp": ("hubmerge_mlp", dict(depth=3, width=10, bn=False, img_size=6), (1, 6, 6)),
    "cifar_vgg_stride": ("hubmerge_vgg11", dict(width_multiplier=1 / 32, img_size=64), (3, 64, 64)),
    "cifar_resnet20": ("hubmerge_resnet20", dict(num_classes=7), (3, 16, 16)),
    "timm_resnet18": ("resnet18", dict(channels=(4, 8, 8, 12), num_classes=5), (3, 32, 32)),
    "timm_resnet50": ("resnet50", dict(channels=(4, 4, 8, 8), num_classes=5), (3, 32, 32)),
    "timm_vgg11_bn": ("vgg11_bn", dict(mlp_ratio=1 / 512, num_classes=5), (3, 32, 32)),
}


def make(case: str, seed: int) -> torch.nn.Module:
    name, args, _ = CASES[case]
    model = timm.create_model(name, **args)
    model.model_args = dict(args)  # what a user passes: timm does not keep create_model's kwargs
    return randomize_(model, seed).double().eval()


def inputs(case: str, n: int = 6, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *CASES[case][2], generator=gen, dtype=torch.float64)


def labelled(case: str, batches: int = 2, n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A few labelled batches of random inputs (labels cover the model's classes)."""
    classes = CASES[case][1].get("num_classes", 10)
    return [(inputs(case, n, seed=i), torch.arange(n) % classes) for i in range(batches)]


@pytest.fixture(params=sorted(CASES))
def case(request) -> str:
    return request.param


def partial_gamma(case: str) -> float:
    """A γ strictly between 0 and 1 for tests of partial merges: small for timm VGG, whose 4096-wide
    fixed fc2 makes each padded assignment cost seconds."""
    return 0.05 if case == "timm_vgg11_bn" else 0.35


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Two tiny MLP endpoints in timm hub format and a labelled ``save_to_disk`` dataset, for CLI runs."""
    root = tmp_path_factory.mktemp("cli")
    args = dict(depth=2, width=12, bn=True, img_size=8, num_classes=10)
    for i in (0, 1):
        save_timm(randomize_(timm.create_model("hubmerge_mlp", **args), i), root / f"ep{i}", "hubmerge_mlp", args)
    rng = np.random.default_rng(0)
    datasets.Dataset.from_dict(
        {"image": [rng.integers(0, 255, (8, 8), dtype=np.uint8) for _ in range(40)], "label": [i % 10 for i in range(40)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}),
    ).save_to_disk(str(root / "data"))
    return root


def base(root: Path, *extra: str) -> list[str]:
    """``hubmerge run`` arguments for the ``local`` endpoints and data."""
    return ["run", str(root / "ep0"), str(root / "ep1"), "--calib", str(root / "data"), "--quiet", *extra]
