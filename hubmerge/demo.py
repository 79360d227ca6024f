"""Offline demo data and endpoints: Fashion-MNIST (Debian's ``dataset-fashion-mnist``) or sklearn digits,
and two endpoints of one architecture trained from different seeds, cached on disk as timm-format repos
(``config.json`` + ``model.safetensors``) so a second run reuses them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from timm.utils import adaptive_clip_grad
from torch.utils.data import DataLoader, TensorDataset

from .arch_specs import build_model
from .data import progress_bar
from .errors import DataError

log = logging.getLogger("hubmerge")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("fashion-mnist", "digits")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        raw = f.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(name: str, split: str, img_size: int) -> TensorDataset:
    """Images scaled to [-1, 1] (mean/std 0.5, as the literature models' pretrained_cfg says), resized."""
    if name == "fashion-mnist":
        prefix = "train" if split == "train" else "t10k"
        files = [FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz", FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"]
        if not all(f.is_file() for f in files):
            raise DataError(f"Fashion-MNIST not found under {FASHION_DIR}: run "
                            "`apt-get install -y dataset-fashion-mnist`, or use --dataset digits")
        x, y = _idx(files[0]).astype(np.float32) / 255.0, _idx(files[1]).astype(np.int64)
    elif name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        rng = np.random.default_rng(0)
        order = rng.permutation(len(d.target))
        cut = int(0.7 * len(order))
        idx = order[:cut] if split == "train" else order[cut:]
        x, y = d.images[idx].astype(np.float32) / 16.0, d.target[idx].astype(np.int64)
    else:
        raise DataError(f"unknown demo dataset {name!r}; choose one of {DATASETS}")
    t = torch.from_numpy(x)[:, None]
    if t.shape[-1] != img_size:
        t = F.interpolate(t, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return TensorDataset((t - 0.5) / 0.5, torch.from_numpy(y))


def subset(ds: TensorDataset, n: int, seed: int = 0) -> TensorDataset:
    """``n`` random samples, reproducible by ``seed``."""
    x, y = ds.tensors
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return TensorDataset(x[keep], y[keep])


def train(architecture: str, model_args: dict, data: TensorDataset, *, seed: int, epochs: int = 3,
          lr: float = 0.05, batch_size: int = 128, agc: float | None = None) -> torch.nn.Module:
    """SGD with momentum and a one-cycle schedule; deterministic for a seed on CPU. ``agc``: timm's adaptive
    gradient clipping at that factor, which norm-free networks (NF-Nets) need to train at this rate."""
    torch.manual_seed(seed)
    model = build_model(architecture, model_args)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * len(loader))
    model.train()
    for epoch in range(epochs):
        for x, y in progress_bar(loader, f"training {architecture} seed {seed} epoch {epoch + 1}/{epochs}"):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if agc is not None:
                adaptive_clip_grad(model.parameters(), agc)
            opt.step()
            sched.step()
    return model.eval()


def save_timm(model: torch.nn.Module, folder: Path, architecture: str, model_args: dict) -> None:
    """A timm hub-format folder: what ``timm.models.push_to_hf_hub`` uploads."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "architecture"}
    config = {"architecture": architecture, "num_classes": model_args.get("num_classes", 10),
              "num_features": 0, "model_args": model_args, "pretrained_cfg": cfg}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                folder / "model.safetensors")


def args_tag(model_args: dict) -> str:
    """A short stable name for ``model_args``, so cached endpoints of different sizes never collide."""
    return hashlib.sha1(json.dumps(model_args, sort_keys=True).encode()).hexdigest()[:8]


def endpoints(architecture: str, model_args: dict, train_data: TensorDataset, cache: Path, *,
              seeds: tuple[int, ...] = (0, 1), epochs: int = 3, tag: str = "",
              train_sets: tuple[TensorDataset, ...] | None = None, agc: float | None = None
              ) -> tuple[Path, ...]:
    """One endpoint folder per seed, trained from different seeds (or on the different data of
    ``train_sets``, one set per seed) unless already cached (``agc``: see :func:`train`; it is part of the
    folder's name)."""
    tag += "" if agc is None else f"-agc{agc:g}"
    folders = []
    for i, seed in enumerate(seeds):
        folder = cache / f"{architecture}{tag}-seed{seed}"
        if not (folder / "model.safetensors").is_file():
            log.info("training endpoint %s", folder.name)
            data = train_sets[i] if train_sets else train_data
            save_timm(train(architecture, model_args, data, seed=seed, epochs=epochs, agc=agc), folder,
                      architecture, model_args)
        folders.append(folder)
    return tuple(folders)


def _to_hf(ds: TensorDataset):
    """Back to a ``datasets.Dataset`` of uint8 images (undoing the [-1, 1] scaling) and class labels."""
    import datasets

    x, y = ds.tensors
    images = ((x[:, 0] * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return datasets.Dataset.from_dict(
        {"image": list(images), "label": y.tolist()},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}),
    )


def prepare(folder: Path, dataset: str = "digits", epochs: int = 20) -> dict[str, Path]:
    """Endpoints (two MLPs, seeds 0 and 1) and calibration/test ``save_to_disk`` folders for the quick start."""
    img, width = (8, 64) if dataset == "digits" else (28, 256)
    model_args = dict(depth=3, width=width, bn=False, in_chans=1, img_size=img, num_classes=10)
    train_set, test_set = load(dataset, "train", img), load(dataset, "test", img)
    a, b = endpoints("hubmerge_mlp", model_args, train_set, folder, epochs=epochs, tag=f"-{dataset}")
    paths = {"a": a, "b": b, "calib": folder / f"{dataset}-calib", "test": folder / f"{dataset}-test"}
    if not paths["calib"].is_dir():
        _to_hf(subset(train_set, 1000, seed=1)).save_to_disk(str(paths["calib"]))
    if not paths["test"].is_dir():
        _to_hf(test_set).save_to_disk(str(paths["test"]))
    return paths
