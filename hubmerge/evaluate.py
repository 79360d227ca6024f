"""Evaluation (method §6): accuracy and cross-entropy, the logit-averaged ensemble, barriers."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce

import torch
import torch.nn.functional as F
from torch import nn

from .data import Batches, Preprocess, as_batches, batches
from .distributed import total
from .errors import DataError
from .tasks import Task


@dataclass(frozen=True)
class Metrics:
    """Accuracy and mean cross-entropy over every output; for a model of separate tasks also ``tasks``: per
    task, the same on that task's samples with only its own outputs competing (a task without samples in the
    data is left out)."""

    accuracy: float
    loss: float
    samples: int
    tasks: dict[str, Metrics] = field(default_factory=dict)


@dataclass(frozen=True)
class Barrier:
    """Interpolated endpoints minus the merge (accuracy) and merge minus endpoints (loss); negative is
    better than the endpoints' average."""

    accuracy: float
    loss: float


class Ensemble(nn.Module):
    """The logit average (1−α)·f_A + α·f_B, the reference ceiling of a partial merge; of any number of models
    with ``weights`` (the endpoints of separate tasks, each answering its own outputs, weigh 1 each)."""

    def __init__(self, *models: nn.Module, alpha: float = 0.5, weights: tuple[float, ...] | None = None):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.weights = tuple(weights) if weights is not None else (1 - alpha, alpha)
        if len(self.weights) != len(models):
            raise ValueError(f"{len(models)} models, {len(self.weights)} weights")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce(torch.add, [w * m(x) for w, m in zip(self.weights, self.members)])


@torch.no_grad()
def logits(model: nn.Module, data: Batches, device: torch.device | str = "cpu") -> torch.Tensor:
    """All logits of ``model`` on ``data``, concatenated (used for label-free agreement scores)."""
    model.eval().to(device)
    return torch.cat([model(x).double().cpu() for x, _ in batches(data, device)])


@dataclass
class _Tally:
    correct: int = 0
    loss: float = 0.0
    n: int = 0

    def add(self, out: torch.Tensor, y: torch.Tensor) -> None:
        self.correct += (out.argmax(1) == y).sum().item()
        self.loss += F.cross_entropy(out.double(), y, reduction="sum").item()
        self.n += len(y)


def _check_labels(y: torch.Tensor | None, classes: int) -> torch.Tensor:
    if y is None:
        raise DataError("evaluation data has no labels; give a label column or (x, y) batches")
    if y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1:
        raise DataError(f"labels must be a 1-D integer class index per sample, got {y.dtype} of shape {tuple(y.shape)}")
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise DataError(f"labels run from {y.min().item()} to {y.max().item()}, but the model has {classes} classes "
                        f"(0..{classes - 1})")
    return y


@torch.no_grad()
def evaluate_all(models: dict[str, nn.Module], data: Batches, device: torch.device | str = "cpu",
                 ensembles: dict[str, dict[str, float]] | None = None, progress: str | bool = False,
                 tasks: tuple[Task, ...] | None = None) -> dict[str, Metrics]:
    """Accuracy and cross-entropy of several models in one pass over labelled batches (the data is read and
    preprocessed once). ``ensembles[name] = {a: 1−α, b: α}`` scores the weighted logit average of models
    (for two, (1−α)·a + α·b as :class:`Ensemble` computes it) from their logits, without running them again.
    With ``tasks`` (models of separate tasks, labels indexing their joint outputs), each task is also scored
    on its own samples and outputs."""
    ensembles, tasks = ensembles or {}, tasks or ()
    for m in models.values():
        m.eval().to(device)
    names = [*models, *ensembles]
    tally = {(name, task): _Tally() for name in names for task in [None, *tasks]}
    for x, y in batches(data, device, progress):
        outs = {name: m(x) for name, m in models.items()}
        outs.update({name: reduce(torch.add, [w * outs[k] for k, w in parts.items()])
                     for name, parts in ensembles.items()})
        y = _check_labels(y, next(iter(outs.values())).shape[1])
        for name, out in outs.items():
            tally[name, None].add(out, y)
            for task in tasks:
                mine = (y >= task.start) & (y < task.start + task.classes)
                tally[name, task].add(out[mine][:, task.outputs], y[mine] - task.start)
    # each process tallied its own batches (one all-reduce for every model's sums)
    sums = total(torch.tensor([[t.correct, t.loss, t.n] for t in tally.values()], dtype=torch.float64))[0]
    if not tally or sums[0, 2] == 0:
        raise DataError("evaluation data is empty")
    found = {key: (c / n, loss / n, int(n)) for key, (c, loss, n) in zip(tally, sums.tolist()) if n}
    return {name: Metrics(*found[name, None], tasks={t.name: Metrics(*found[name, t]) for t in tasks
                                                      if (name, t) in found}) for name in names}


def evaluate(model: nn.Module, data: Batches, device: torch.device | str = "cpu",
             progress: str | bool = False, batch_size: int = 256) -> Metrics:
    """Top-1 accuracy and mean cross-entropy on labelled data (a DataLoader, a torch Dataset, or a
    ``datasets.Dataset`` preprocessed from the model's ``pretrained_cfg``); per task too for a merge of
    separate tasks (its ``tasks``)."""
    if type(data).__module__.startswith("datasets"):
        data = as_batches(data, preprocess=Preprocess.from_model(model), batch_size=batch_size)
    else:
        data = as_batches(data, batch_size=batch_size)
    tasks = getattr(model, "tasks", None)  # a merge of separate tasks
    return evaluate_all({"model": model}, data, device, progress=progress, tasks=tasks)["model"]


def barrier(a: Metrics, b: Metrics, merged: Metrics, alpha: float = 0.5) -> Barrier:
    """Accuracy and loss barrier of ``merged`` against the α-interpolated endpoints."""
    return weighted_barrier([a, b], (1 - alpha, alpha), merged)


def weighted_barrier(endpoints: list[Metrics], weights: tuple[float, ...], merged: Metrics,
                     tasks: tuple[Task, ...] | None = None) -> Barrier:
    """Accuracy and loss barrier of ``merged`` against the endpoints' weighted mean (an N-way merge's); for
    separate ``tasks``, of its per-task figures against each endpoint's on its own task (the weighted mean
    over the tasks the data has)."""
    if tasks:
        have = [(w, m.tasks[t.name], merged.tasks[t.name]) for w, m, t in zip(weights, endpoints, tasks)
                if t.name in merged.tasks]
        if not have:
            raise DataError("the evaluation data has no samples of any task")
        norm = sum(w for w, _, _ in have)
        return Barrier(accuracy=sum(w * (own.accuracy - got.accuracy) for w, own, got in have) / norm,
                       loss=sum(w * (got.loss - own.loss) for w, own, got in have) / norm)
    return Barrier(
        accuracy=sum(w * m.accuracy for w, m in zip(weights, endpoints)) - merged.accuracy,
        loss=merged.loss - sum(w * m.loss for w, m in zip(weights, endpoints)),
    )
