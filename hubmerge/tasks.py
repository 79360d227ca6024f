"""Endpoints of different tasks (issue 14, ZipIt!'s setting): one merged model that answers every task.

Endpoints answer separate tasks when their class counts differ, when their label names (timm's
``pretrained_cfg['label_names']``, a hub config's ``label_names``) differ, or when ``tasks="separate"`` says
so. Their classifiers are then not averaged but kept apart: the merged model's outputs are every task's
outputs one after the other (endpoint ``a``'s classes first), each computed by its own endpoint's classifier
from the merged features. So γ=1 gives every endpoint's own logits side by side (the ensemble of separate
tasks) and γ=0 one backbone with one head per task.

Two steps carry this through every stage without a stage of its own:

- :func:`joint` gives each endpoint the output of the union: its classifier rows at its task's outputs, zero
  rows elsewhere. The endpoints then have one shape, and the spec, statistics, alignment, costs and
  evaluation see ordinary endpoints (the logits are fixed positions, never matched).
- :func:`owned` divides each endpoint's task rows by its weight before the build. Every build path combines
  fixed positions as ``Σ_m w_m·T_m``; with task rows ``W_t / w_t`` on their owner and zero elsewhere that is
  exactly ``W_t``, whichever layout (partitioned, plain, matched, zipped) holds the classifier. A weight of 0
  would drop its task, so separate tasks need every weight above 0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .arch_specs import architecture_of, build_model
from .errors import IncompatibleModelsError, UnsupportedModelError, UsageError


@dataclass(frozen=True)
class Task:
    """One endpoint's task: its ``classes`` outputs start at ``start`` in the merged model's outputs."""

    name: str
    start: int
    classes: int
    labels: tuple[str, ...] | None = None

    @property
    def outputs(self) -> slice:
        return slice(self.start, self.start + self.classes)

    @property
    def span(self) -> str:
        """Its outputs as the card and ``hubmerge inspect`` show them: ``first–last``."""
        return f"{self.start}–{self.start + self.classes - 1}"

    def to_dict(self) -> dict:
        return {"name": self.name, "start": self.start, "classes": self.classes,
                "labels": list(self.labels) if self.labels else None}

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        return cls(d["name"], int(d["start"]), int(d["classes"]), tuple(d["labels"]) if d.get("labels") else None)


def label_names(model: nn.Module) -> tuple[str, ...] | None:
    """The model's class names in output order, from ``pretrained_cfg['label_names']`` (a list, or timm's
    ``{index: name}`` form); None where it names none."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if not names:
        return None
    if isinstance(names, dict):
        names = [names.get(i, names.get(str(i))) for i in range(len(names))]
    if any(n is None for n in names):
        raise UnsupportedModelError("pretrained_cfg['label_names'] skips class indices; give a name for every class")
    return tuple(str(n) for n in names)


def _classes(model: nn.Module, name: str) -> int:
    classes = getattr(model, "num_classes", None)
    if not isinstance(classes, int) or classes <= 0:
        raise UsageError(f"endpoint {name} has no classifier (num_classes={classes!r}); separate tasks merge "
                         "classifiers into one output per task")
    return classes


def resolve(models: list[nn.Module], names: list[str], mode: str) -> tuple[Task, ...] | None:
    """The endpoints' tasks where they answer separate ones (``mode`` ``"auto"``: where their class counts or
    label names differ), else None: one task, whose logits are averaged."""
    counts = [getattr(m, "num_classes", None) for m in models]
    labels = [label_names(m) for m in models]
    differ = len(set(counts)) > 1 or (all(labels) and len(set(labels)) > 1)
    if mode == "shared" or (mode == "auto" and not differ):
        if len(set(counts)) > 1:
            raise IncompatibleModelsError(f"the endpoints' class counts differ ({dict(zip(names, counts))}): one "
                                          "task's logits cannot be averaged; merge them as separate tasks "
                                          "(tasks='separate', or tasks='auto', the default)")
        return None
    out, start = [], 0
    for model, name, names_ in zip(models, names, labels):
        classes = _classes(model, name)
        if names_ and len(names_) != classes:
            raise UnsupportedModelError(f"endpoint {name} names {len(names_)} classes in label_names but has "
                                        f"{classes} outputs; fix its pretrained_cfg['label_names']")
        out.append(Task(name, start, classes, names_))
        start += classes
    return tuple(out)


def outputs(tasks: tuple[Task, ...]) -> int:
    """How many outputs the merged model of ``tasks`` has."""
    return tasks[-1].start + tasks[-1].classes


def union_labels(tasks: tuple[Task, ...]) -> list[str] | None:
    """The merged model's output names, ``task/label`` (a task named by its endpoint), where every task names
    its classes; None otherwise."""
    if not all(t.labels for t in tasks):
        return None
    return [f"{t.name}/{label}" for t in tasks for label in t.labels]


@torch.no_grad()
def joint(model: nn.Module, task: Task, tasks: tuple[Task, ...]) -> tuple[nn.Module, tuple[str, ...]]:
    """``model`` answering the union of ``tasks``: rebuilt with every task's outputs, its own classifier rows
    at its task's outputs and zero rows elsewhere, so it computes its own logits there and 0 for the other
    tasks; and the keys of its classifier tensors (those whose shape follows ``num_classes``)."""
    architecture, args = architecture_of(model)
    total = outputs(tasks)
    own = ("num_classes", "label_names", "label_descriptions")  # the endpoint's task, not the union's
    cfg = {k: v for k, v in (getattr(model, "pretrained_cfg", None) or {}).items() if k not in own}
    param = next(model.parameters())
    wide = build_model(architecture, {**args, "num_classes": total}, cfg).to(param.device, param.dtype)
    state, placed, classifier = model.state_dict(), wide.state_dict(), []
    if set(state) != set(placed):
        raise UnsupportedModelError(f"{architecture} with num_classes={total} has other tensors than with "
                                    f"{task.classes} ({sorted(set(state) ^ set(placed))[:4]}); hubmerge cannot give "
                                    "it the outputs of every task")
    for key, t in state.items():
        if placed[key].shape == t.shape:
            placed[key] = t
            continue
        if t.shape[0] != task.classes or placed[key].shape[0] != total or placed[key].shape[1:] != t.shape[1:]:
            raise UnsupportedModelError(f"{architecture}: {key} changes shape {tuple(t.shape)} → "
                                        f"{tuple(placed[key].shape)} with num_classes, not along its class axis; "
                                        "hubmerge cannot tell which of its entries belong to which class")
        rows = torch.zeros_like(placed[key])
        rows[task.outputs] = t
        placed[key] = rows
        classifier.append(key)
    wide.load_state_dict(placed, strict=True)
    names = union_labels(tasks)
    if names:
        wide.pretrained_cfg = {**wide.pretrained_cfg, "label_names": names}
    return wide.eval(), tuple(classifier)


def check_weights(weights: tuple[float, ...]) -> None:
    """Separate tasks need every endpoint weighted above 0: a weight of 0 would drop its task's classifier."""
    if any(w <= 0 for w in weights):
        raise UsageError(f"endpoint weights {tuple(weights)}: separate tasks need every endpoint weighted above 0 "
                         "(a weight of 0 drops its task's classifier); use alpha strictly between 0 and 1")


@torch.no_grad()
def owned(models: list[nn.Module], tasks: tuple[Task, ...], classifier: tuple[str, ...],
          weights: tuple[float, ...]) -> list[nn.Module]:
    """Copies of the :func:`joint` endpoints with each one's task rows of the ``classifier`` tensors divided
    by its weight, so that a build, which combines the classifier's rows as ``Σ_m w_m·T_m``, gives every
    task's rows its own classifier's values (see the module docstring)."""
    check_weights(weights)
    out = []
    for model, task, w in zip(models, tasks, weights):
        scaled = copy.deepcopy(model)
        state = scaled.state_dict()
        for key in classifier:
            state[key][task.outputs] /= w
        out.append(scaled)
    return out
