"""Calibration and evaluation data: whatever the user has, as batches of (inputs, labels or None).

Accepted: a torch ``DataLoader`` (or any re-iterable of tensors, ``(x, y)`` tuples or dicts), a torch
``Dataset``, or a Hugging Face ``datasets.Dataset`` whose image and label columns are found by type or
name and preprocessed as the endpoint's timm ``pretrained_cfg`` says (size, channels, mean/std).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from .distributed import shard, world
from .errors import DataError, UsageError

Batches = Union[DataLoader, Iterable]
IMAGE_NAMES = ("image", "img", "pixel_values", "images", "x", "input", "inputs")
LABEL_NAMES = ("label", "labels", "y", "target", "targets", "class", "fine_label")

# Progress bars are for people at a terminal; the CLI's --quiet turns them off for everything.
SHOW_PROGRESS = {"enabled": True}


def progress_bar(it: Iterable, desc: str | bool, total: int | None = None) -> Iterable:
    """Wrap ``it`` in a tqdm bar on stderr when ``desc`` is given and stderr is a terminal."""
    if not desc or not SHOW_PROGRESS["enabled"] or not sys.stderr.isatty():
        return it
    return tqdm(it, desc=str(desc), total=total, leave=False, file=sys.stderr)


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        x = next((batch[k] for k in IMAGE_NAMES if k in batch), None)
        if x is None:
            raise DataError(f"batch dict has no input key (one of {IMAGE_NAMES}); keys: {sorted(batch)}")
        return x, next((batch[k] for k in LABEL_NAMES if k in batch), None)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise DataError(f"cannot read a batch of type {type(batch).__name__}: yield tensors, (x, y) or dicts")


def batches(data: Batches, device: torch.device | str = "cpu", progress: str | bool = False
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Iterate ``(x, y)`` on ``device``; ``y`` is None for label-free data. In a process group, this
    process's share of the batches (:func:`hubmerge.distributed.shard`)."""
    rank, size = world()
    total = len(range(rank, len(data), size)) if hasattr(data, "__len__") else None
    for batch in progress_bar(shard(data), progress, total):
        x, y = _split(batch)
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise DataError("a batch of inputs holds NaN or infinite values; clean the data first")
        yield x.to(device), (None if y is None else y.to(device))


MAX_SIDE = 8192  # an image side larger than this is a typo (an input_size of 10**6 would allocate terabytes)


@dataclass(frozen=True)
class Preprocess:
    """Image → normalised float tensor of ``input_size`` (C, H, W), as the endpoint was trained and as timm
    evaluates it: timm's own ``create_transform`` (resize the shorter side to ``size / crop_pct`` with
    ``interpolation``, centre-crop, normalise), never a stretch to the target shape."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise DataError(f"input_size must be (channels, height, width), got {self.input_size}")
        c = self.input_size[0]
        if c not in (1, 3):
            raise DataError(f"images have 1 (greyscale) or 3 (RGB) channels; input_size asks for {c}")
        if len(self.mean) != c or len(self.std) != c:
            raise DataError(f"mean {self.mean} and std {self.std} need one value per input channel ({c}); give the "
                            "model's own (command line: --mean M,.. --std S,..; Python: preprocess=Preprocess(...))")
        if min(self.std) <= 0:
            raise DataError(f"std must be positive, got {self.std}")
        if not 0 < self.crop_pct <= 1:
            raise DataError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if max(self.input_size[1:]) > MAX_SIDE:
            raise DataError(f"input_size {self.input_size}: sides above {MAX_SIDE} pixels are not classifier inputs")
        transform = create_transform(input_size=self.input_size, interpolation=self.interpolation, mean=self.mean,
                                     std=self.std, crop_pct=self.crop_pct, crop_mode=self.crop_mode)
        object.__setattr__(self, "_transform", transform)

    @classmethod
    def from_model(cls, model: torch.nn.Module, *, input_size: tuple[int, ...] | None = None,
                   mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> Preprocess:
        """The preprocessing in the model's ``pretrained_cfg`` (resolved as timm resolves it); a field given
        here replaces the stored one. ``input_size``, ``mean`` and ``std`` are never guessed: one that is
        neither stored nor given is an error, since data normalised differently from training silently
        lowers every measured accuracy."""
        cfg = getattr(model, "pretrained_cfg", None) or {}
        given = {"input_size": input_size or cfg.get("input_size"), "mean": mean or cfg.get("mean"),
                 "std": std or cfg.get("std")}
        missing = [k for k, v in given.items() if not v]
        if missing:
            raise DataError(f"the model's pretrained_cfg has no {', '.join(missing)}: give "
                            f"{', '.join(missing)} (command line: --input-size C,H,W --mean M,.. --std S,..)")
        resolved = resolve_data_config(pretrained_cfg={**cfg, **given})
        return cls(tuple(int(v) for v in given["input_size"]), tuple(float(v) for v in given["mean"]),
                   tuple(float(v) for v in given["std"]), resolved["interpolation"], float(resolved["crop_pct"]),
                   resolved["crop_mode"])

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as stored in a merged model's config and card."""
        return {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}

    def __call__(self, image: Any) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            array = np.asarray(image)
            if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
                array = np.moveaxis(array, 0, -1)  # (C, H, W) → (H, W, C)
            if array.ndim not in (2, 3):
                raise DataError(f"an image must be 2-D (H, W) or 3-D (H, W, C or C, H, W), got shape {array.shape}")
            if array.dtype != np.uint8:
                raise DataError(f"an image array must hold uint8 pixels (0..255), got {array.dtype}; "
                                "give PIL images or uint8 arrays")
            image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
        return self._transform(image.convert("L" if self.input_size[0] == 1 else "RGB"))


def find_columns(ds: Any, image_column: str | None = None, label_column: str | None = None
                 ) -> tuple[str, str | None]:
    """The image column (by ``Image`` feature type or a usual name) and the label column (``ClassLabel``
    or a usual name; None when there is none, which is fine for label-free calibration)."""
    import datasets

    features = ds.features
    for given in (image_column, label_column):
        if given is not None and given not in features:
            raise DataError(f"column {given!r} not in the dataset; columns: {list(features)}")
    image = image_column or next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    image = image or next((k for k in IMAGE_NAMES if k in features), None)
    if image is None:
        raise DataError(f"no image column found among {list(features)}; name it with image_column=/--image-column")
    label = label_column or next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    label = label or next((k for k in LABEL_NAMES if k in features), None)
    return image, label


class HFImages(Dataset):
    """A ``datasets.Dataset`` seen as (image tensor, label) pairs."""

    def __init__(self, ds: Any, preprocess: Preprocess, image_column: str | None = None,
                 label_column: str | None = None):
        self.ds = ds
        self.preprocess = preprocess
        self.image, self.label = find_columns(ds, image_column, label_column)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        try:
            row = self.ds[int(i)]
        except (OSError, ValueError) as exc:  # a corrupt or unreadable image file (PIL's decoding errors)
            raise DataError(f"row {i}: cannot decode the image ({exc})") from None
        x = self.preprocess(row[self.image])
        return (x, torch.as_tensor(row[self.label])) if self.label else x


def as_batches(data: Any, *, preprocess: Preprocess | None = None, batch_size: int = 256,
               image_column: str | None = None, label_column: str | None = None) -> Batches:
    """Turn a DataLoader, torch Dataset or ``datasets.Dataset`` into re-iterable batches."""
    if data is None:
        raise DataError("no data given")
    if iter(data) is data:  # a generator or iterator: hubmerge passes over the data several times
        raise DataError(f"data must be re-iterable (a list of batches, a DataLoader or a Dataset), not a "
                        f"{type(data).__name__}, which is used up after one pass")
    if type(data).__module__.startswith("datasets"):
        if len(data) == 0:
            raise DataError("the dataset is empty")
        if preprocess is None:
            raise DataError("a datasets.Dataset needs a Preprocess (taken from the endpoint's pretrained_cfg)")
        data = HFImages(data, preprocess, image_column, label_column)
    if isinstance(data, Dataset):
        if len(data) == 0:
            raise DataError("the dataset is empty")
        if type(data) is TensorDataset:  # not a subclass, whose __getitem__ may transform each sample
            return TensorBatches(data, batch_size)
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    return data


class TensorBatches:
    """A ``TensorDataset``'s batches in order, as slices of its tensors (views, nothing copied), instead of a
    DataLoader indexing and collating it sample by sample on every pass a merge makes (the README's resnet18
    full merge: median 1.44 s through a DataLoader, 1.31 s sliced). The same tensors as the DataLoader's."""

    def __init__(self, data: TensorDataset, batch_size: int):
        self.tensors, self.batch_size = data.tensors, batch_size

    def __len__(self) -> int:
        return -(-len(self.tensors[0]) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for start in range(0, len(self.tensors[0]), self.batch_size):
            yield tuple(t[start:start + self.batch_size] for t in self.tensors)


SPLIT = re.compile(r"([\w.-]+)(?:\[(\d*)(%?):(\d*)(%?)\])?")
PLAIN_NAMES = ("train", "test", "validation", "calibration")  # what a folder holding one split-less dataset takes


def parse_split(split: str) -> tuple[str, slice | None, bool]:
    """``train``, ``train[:2000]`` or ``train[10%:50%]`` → (name, row slice, whether in percent); anything
    else is a usage error (the ``datasets`` slice syntax, with both bounds of one kind)."""
    found = SPLIT.fullmatch(split or "")
    if found is None or found[3] != found[5] and found[2] and found[4]:
        raise UsageError(f"split {split!r} must look like train, train[:2000], train[100:200] or train[:10%]")
    name, lo, pct_lo, hi, pct_hi = found.groups()
    if "[" not in split:
        return name, None, False
    percent = bool(pct_lo or pct_hi)
    if (pct_lo and not lo) or (pct_hi and not hi):
        raise UsageError(f"split {split!r}: a % needs a number before it")
    if percent and any(int(v) > 100 for v in (lo, hi) if v):
        raise UsageError(f"split {split!r}: percentages go up to 100")
    return name, slice(int(lo) if lo else None, int(hi) if hi else None), percent


def _rows(ds: Any, rows: slice | None, percent: bool) -> Any:
    if rows is None:
        return ds
    n = len(ds)
    scale = (lambda v: v * n // 100) if percent else (lambda v: v)
    lo = 0 if rows.start is None else min(n, scale(rows.start))
    hi = n if rows.stop is None else min(n, scale(rows.stop))
    return ds.select(range(lo, max(lo, hi)))


def check_request(split: str, samples: int | None) -> tuple[str, slice | None, bool]:
    """A split (parsed, see :func:`parse_split`) and a sample count as a user gives them, checked before
    anything is downloaded."""
    if samples is not None and samples < 1:
        raise UsageError(f"samples must be at least 1, got {samples} (leave it out for every row)")
    return parse_split(split)


def load_dataset_ref(ref: str, split: str = "train", samples: int | None = None, seed: int = 0) -> Any:
    """A ``datasets.Dataset`` from a hub id, a ``save_to_disk`` folder, parquet file(s) or an image
    folder; ``split`` may carry a slice (``train[:2000]``); ``samples`` draws a seeded random subset."""
    import datasets

    name, rows, percent = check_request(split, samples)
    path = Path(ref)
    try:
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if name not in ds:
                    raise DataError(f"{ref}: no split {name!r}; splits: {list(ds)}")
                ds = ds[name]
            elif (str(ds.split) if ds.split else None) not in (name, None) or not ds.split and name not in PLAIN_NAMES:
                raise DataError(f"{ref} holds one dataset ({ds.split or 'no split name'}), not a split {name!r}; "
                                f"give its split name or one of {PLAIN_NAMES}")
            ds = _rows(ds, rows, percent)
        elif path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
            files = str(path) if path.is_file() else sorted(str(p) for p in path.glob("*.parquet"))
            ds = datasets.load_dataset("parquet", data_files={split.split("[")[0]: files}, split=split)
        elif path.is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
        else:
            ds = datasets.load_dataset(ref, split=split)
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"cannot load dataset {ref!r} split {split!r}: {exc}") from exc
    except ConnectionError as exc:
        raise DataError(f"dataset {ref!r} is not local and the hub is unreachable ({exc})") from exc
    if len(ds) == 0:
        raise DataError(f"dataset {ref!r} split {split!r} is empty")
    if samples is not None and samples < len(ds):
        ds = ds.shuffle(seed=seed).select(range(samples))
    return ds
