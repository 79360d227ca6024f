"""The model card of a merged model: hub metadata, what it is, settings, metrics, allocation, usage, citations.

Built from the merged model's own config (endpoints, settings, partition, preprocessing), so
``save_pretrained`` / ``push_to_hub`` of a :class:`~hubmerge.partitioned.PartialMergedModel` write it too;
the report of a merge adds metrics (also as ``model-index`` results where the evaluation data is on the
Hub), the allocation, a plot and the recipe. Metadata names Hub repos only: a local folder is not a model or
dataset on the Hub, so it is described in the text instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from . import __version__
from .evaluate import weighted_barrier
from .partial import apart_sizes, endpoint_names, padded
from .tasks import Task

if TYPE_CHECKING:
    from .api import MergeReport
    from .partitioned import PartialMergedModel
    from .spec import PermutationSpec

PLOT = "barrier_vs_params.png"
REFERENCES = """\
- Koch, *Partial Model Merging*, MSc thesis, 2023 (partial merging, buffers, benefit-factor budgets).
- Ainsworth, Hayase, Srinivasa, *Git Re-Basin: Merging Models modulo Permutation Symmetries*, ICLR 2023
  (activation and weight matching).
- Jordan, Sedghi, Saukh, Entezari, Neyshabur, *REPAIR: REnormalizing Permuted Activations for Interpolation
  Repair*, ICLR 2023."""

BIBTEX = """```bibtex
@inproceedings{ainsworth2023git,
  title={Git Re-Basin: Merging Models modulo Permutation Symmetries},
  author={Ainsworth, Samuel K. and Hayase, Jonathan and Srinivasa, Siddhartha}, booktitle={ICLR}, year={2023}}
@inproceedings{jordan2023repair,
  title={{REPAIR}: {RE}normalizing Permuted Activations for Interpolation Repair},
  author={Jordan, Keller and Sedghi, Hanie and Saukh, Olga and Entezari, Rahim and Neyshabur, Behnam},
  booktitle={ICLR}, year={2023}}
```"""

HUBMERGE = "[hubmerge](https://pypi.org/project/hubmerge/)"

PARTIAL = """A **partial merge** of {a} and {b} made with {hubmerge} {version}: units that align well are
interpolated, units that do not are kept side by side, so the model sits between a full merge (one
endpoint's size) and the ensemble (twice the size). It is stored and executed partitioned: only
the non-zero blocks are in `model.safetensors`."""

ZIPPED = """A **zipped merge** (ZipIt!) of {a} and {b} made with {hubmerge} {version}: units are merged
in correlated pairs, across the two models and, for up to a share β (`zip_beta`) of each model's units,
within one model.{depth}{within}"""

NWAY = """An **N-way merge** of {names} made with {hubmerge} {version}: every endpoint's units are
matched to the first one's order (MergeMany alignment on activations) and averaged with weights {weights},
{size}"""
NWAY_FULL = "so the model has one endpoint's size."
NWAY_ZIPPED = """An **N-way zipped merge** (ZipIt!) of {names} made with {hubmerge} {version}: every endpoint's
units are matched to the first one's order (MergeMany alignment on activations), except that up to a share β
(`zip_beta`) of each endpoint's units are merged in correlated pairs within that endpoint first; units are
averaged with weights {weights}.{depth}{within}"""
NWAY_PARTIAL = """except where their members correlate least: there each endpoint keeps its own unit (a partial merge,
{apart} of {units} merged units kept apart; the table below gives them per group)."""

ZIPIT = """
- Stoica, Bolya, Bjorner, Ramesh, Hearn, Hoffman, *ZipIt! Merging Models from Different Tasks without
  Training*, ICLR 2024 (zip: merging features within and across models)."""

TEMPLATE = """---
{card_data}
---

# {title}

{what}
{tasks}
## Method and settings

| setting | value |
|---|---|
{settings}

Endpoints: {endpoints}.

## Metrics
{metrics}

{barrier}

## Allocation per group
{allocation}
{recipe}
## How to use

```python
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from hubmerge import PartialMergedModel

model = PartialMergedModel.from_pretrained("{repo_id}").eval()
transform = create_transform(**resolve_data_config(model=model))  # the endpoints' preprocessing
channels = model.pretrained_cfg["input_size"][0]
image = Image.new("RGB", (320, 240))  # your image: Image.open("photo.jpg")
batch = transform(image.convert("L" if channels == 1 else "RGB")).unsqueeze(0)
with torch.no_grad():
    logits = model(batch)
plain = model.materialize()  # an equivalent zero-padded plain model, for inspection or export
```

## Citation

{citations}
"""


def _hub_id(ref: str | None) -> str | None:
    """``ref`` without its ``@revision`` if it names a Hub repo, None for a local path."""
    if not ref or Path(ref).expanduser().exists():
        return None
    repo = ref.split("@")[0]
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    return repo


def _endpoint(e: dict, fallback: str) -> tuple[str, str]:
    """(how the text names an endpoint, its provenance)."""
    ref = e.get("id") or fallback
    hub = _hub_id(ref)
    name = f"[`{ref}`](https://huggingface.co/{hub})" if hub else f"`{ref}`"
    where = f"commit `{e['commit']}`" if e.get("commit") else "a local folder (no commit)" if e else "given in Python"
    return name, f"{name} ({where})"


def _depth(depth: int | None) -> str:
    """What a zip's depth means for the model's size."""
    if depth is None:
        return " Every group is zipped, so the model has one endpoint's size."
    return (f" It is a partial zip (`zip_depth` {depth}): only the groups its first layers write are zipped; the "
            "later layers are each endpoint's own (one head per model, their logits averaged), stored partitioned.")


def _within(report: MergeReport | None) -> str:
    """How many units the zip merged within each model, from the report of the merge."""
    if report is None or not report.within:
        return ""
    names = [n.upper() for n in endpoint_names(len(next(iter(report.within.values()))))]
    counts = [sum(w[i] for w in report.within.values()) for i in range(len(names))]
    units = sum(report.partition[g][1] for g in report.within)
    if len(names) == 2:
        return (f" Of the {units:,} merged units, {counts[0]:,} are pairs of two units of A and {counts[1]:,} pairs "
                "of two units of B; the rest pair a unit of A with one of B.")
    held = ", ".join(f"{c:,} a pair of {n}'s" for c, n in zip(counts[1:], names[1:]))
    return (f" Of the {units:,} merged units, {counts[0]:,} hold a pair of A's units, {held} (one merged unit may "
            "hold the pairs of several endpoints); the rest hold one unit of every endpoint.")


def _heads(report: MergeReport | None, model: PartialMergedModel) -> str:
    """Which attention modules had an endpoint's heads matched to A's in another order, from the report of the
    merge."""
    if report is None or not report.endpoint_head_orders:
        return ""
    took = "; ".join(f"{len(orders)} of the {len(model.spec.heads)} attention modules took {name.upper()}'s heads "
                     "in another order" for name, orders in report.endpoint_head_orders.items())
    return f"\n\nThe endpoints' attention heads were matched to A's as wholes before their units; {took}."


BARRIER = """The *barrier* is how much worse the merge is than its endpoints: the α-weighted mean of the endpoints'
accuracy minus the merge's (percentage points), and the merge's cross-entropy minus the endpoints' weighted
mean. Lower is better; 0 means no loss, and the ensemble is usually below 0."""

TASK_BARRIER = """Joint accuracy and loss are over all outputs; a task's accuracy is on that task's samples with only
its own outputs competing. The *barrier* is how much worse the merge is than its endpoints, each on its own
task: the weighted mean over tasks of the endpoint's task accuracy minus the merge's (percentage points), and
of the merge's task cross-entropy minus the endpoint's. Lower is better; 0 means no loss."""

TASKS = """
## Tasks

The endpoints answer separate tasks, so their classifiers are kept apart: the model's outputs are each task's
outputs side by side, each computed by its own endpoint's classifier from the merged features
(`model.split(logits)` gives them per task; `model.tasks` says which are whose).

| task (endpoint) | outputs | classes | labels |
|---|---|---|---|
{rows}
"""


def _tasks(model: PartialMergedModel) -> str:
    """The card's table of which outputs answer which endpoint's task (nothing for one task)."""
    if not model.tasks:
        return ""
    rows = []
    for t in model.tasks:
        labels = ", ".join(t.labels[:10]) + (", …" if len(t.labels) > 10 else "") if t.labels else ""
        rows.append(f"| {t.name} | {t.span} | {t.classes} | {labels} |")
    return TASKS.format(rows="\n".join(rows))


def _metrics(report: MergeReport) -> str:
    if not report.metrics:
        return "No evaluation data was given."
    tasks = [t["name"] for t in report.tasks]
    rows = ["| model | " + ("joint accuracy" if tasks else "accuracy") + " | loss |"
            + "".join(f" task {t} |" for t in tasks), "|---|---|---|" + "---|" * len(tasks)]
    for name, m in report.metrics.items():
        per_task = "".join(f" {100 * m.tasks[t].accuracy:.2f}% |" if t in m.tasks else " |" for t in tasks)
        rows.append(f"| {name} | {100 * m.accuracy:.2f}% | {m.loss:.4f} |{per_task}")
    if "full_merge_repair" in report.metrics:
        rows.append(f"\n`full_merge_repair`: the full merge corrected as this merge was (`repair="
                    f"{report.options.get('repair')!r}`).")
    endpoint_params, endpoint_flops = report.endpoint_params, report.endpoint_flops
    size = (f"\nThis merge: {endpoint_params * (1 + report.param_increase):,.0f} non-zero parameters "
            f"(+{100 * report.param_increase:.1f}% over one endpoint's {endpoint_params:,}), "
            f"{endpoint_flops * (1 + report.flop_increase):,.0f} FLOPs per image "
            f"(+{100 * report.flop_increase:.1f}%). Barrier (accuracy / loss): "
            f"{100 * report.barrier.accuracy:.2f} pp / {report.barrier.loss:.4f}.")
    return "\n".join(rows) + "\n" + size + f"\n\n![barrier vs parameters]({PLOT})"


def _n_way_size(model: PartialMergedModel) -> str:
    """What an N-way merge keeps apart: nothing (a full merge, one endpoint's size) or per group the merged
    units whose members correlate least."""
    apart = sum(sizes[0] for sizes in model.partition.values())
    if not apart:
        return NWAY_FULL
    return NWAY_PARTIAL.format(apart=apart, units=sum(sizes[0] + sizes[1] for sizes in model.partition.values()))


def _allocation(spec: PermutationSpec, partition: dict, allocation: list[dict]) -> str:
    """One row per group, and per attention module one row counting its heads (merged or kept apart whole):
    the units each endpoint keeps apart (k_A, k_B, and k_C, … of an N-way merge) and the shared ones."""
    count = max(len(sizes) for sizes in partition.values())  # N+1 sections for N endpoints
    names = [n.upper() for n in endpoint_names(count - 1)]
    header = ["group", f"k_{names[0]}", "shared", *(f"k_{n}" for n in names[1:]), "γ", "params added", "benefit"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_group = {r["group"]: r for r in allocation}
    heads = spec.head_of()

    def row(name: str, label: str, sizes: tuple[int, ...]) -> str:
        r = by_group.get(name, {})
        benefit = r.get("benefit")
        sizes = padded(sizes, count)
        return (f"| {label} | {' | '.join(str(k) for k in sizes)} | {sizes[0] / (sizes[0] + sizes[1]):.2f} | "
                f"{r.get('params_added', '')} | {'' if benefit is None else f'{benefit:.4g}'} |")

    rows += [row(g, g, tuple(sizes)) for g, sizes in partition.items() if g not in heads]
    for h in spec.heads:
        apart = h.apart(partition)
        rows.append(row(h.module, f"{h.module} (heads)", apart_sizes(len(h.heads), apart, count - 1)))
    return "\n".join(rows)


def plot(report: MergeReport, path: Path) -> None:
    """Accuracy barrier against parameter increase: full merge, + its correction (the merge's ``repair``
    variant), this merge, ensemble."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report.metrics
    names = endpoint_names(len(report.weights))
    tasks = tuple(Task.from_dict(t) for t in report.tasks) or None
    points = [("full merge", 0.0, m["full_merge"]), ("this merge", report.param_increase, m["merged"]),
              ("ensemble", float(len(names) - 1), m["ensemble"])]
    if "full_merge_repair" in m:
        points.insert(1, (f"full merge + {report.options.get('repair', 'REPAIR')}", 0.0, m["full_merge_repair"]))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, x, met in points:
        bar = weighted_barrier([m[k] for k in names], tuple(report.weights), met, tasks).accuracy
        ax.scatter(100 * x, 100 * bar, label=name, s=50)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("non-zero parameter increase (%)")
    ax.set_ylabel("accuracy barrier (pp)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def build(model: PartialMergedModel, report: MergeReport | None = None, *, repo_id: str,
          recipe: dict | None = None, datasets: tuple[str, ...] = (), evaluation: str | None = None,
          licenses: tuple[str | None, ...] = ()) -> ModelCard:
    """The card of ``model``; with the ``report`` of its merge also metrics, allocation scores and the
    recipe. ``datasets``: calibration and evaluation references, ``evaluation`` the latter (its results go
    to ``model-index`` when it is a Hub dataset)."""
    ends = model.endpoints or {}
    keys = endpoint_names(len(model.weights))  # a, b (and c, … of an N-way merge)
    named = [_endpoint(ends.get(k, {}), f"endpoint {k.upper()}") for k in keys]
    hub_models = [h for h in (_hub_id(ends.get(k, {}).get("id")) for k in keys) if h]
    hub_data = [h for h in map(_hub_id, datasets) if h]
    license_ = licenses[0] if len(set(licenses)) == 1 and licenses[0] else None
    eval_hub = _hub_id(evaluation)
    results = None
    if report is not None and report.metrics and eval_hub:
        merged = report.metrics["merged"]
        results = [EvalResult(task_type="image-classification", dataset_type=eval_hub, dataset_name=eval_hub,
                              metric_type="accuracy", metric_value=merged.accuracy),
                   EvalResult(task_type="image-classification", dataset_type=eval_hub, dataset_name=eval_hub,
                              metric_type="loss", metric_value=merged.loss)]
    settings = report.options if report is not None else model.settings
    zipped, n_way = settings.get("align") == "zip", len(keys) > 2
    ids = [ends.get(k, {}).get("id") or f"endpoint {k.upper()}" for k in keys]
    kind = f"{len(keys)}-way merge" if n_way else "Zipped merge" if zipped else "Partial merge"
    title = f"{kind} of {', '.join(ids[:-1])} and {ids[-1]}"
    names = ", ".join(n for n, _ in named[:-1]) + f" and {named[-1][0]}"
    what = ((NWAY_ZIPPED if zipped else NWAY) if n_way else ZIPPED if zipped else PARTIAL).format(
        a=named[0][0], b=named[1][0], names=names, hubmerge=HUBMERGE, version=__version__, within=_within(report),
        depth=_depth(settings.get("zip_depth")), weights=", ".join(f"{w:.3g}" for w in model.weights),
        size=_n_way_size(model)) + _heads(report, model)
    tasks = _tasks(model)
    data = ModelCardData(
        base_model=hub_models or None, base_model_relation="merge" if hub_models else None,
        library_name="hubmerge", pipeline_tag="image-classification",
        tags=["hubmerge", "model-merging", "partial-merging", "image-classification"],
        datasets=hub_data or None, license=license_, model_name=repo_id.split("/")[-1],
        eval_results=results,
    )
    rows = [f"| {k} | `{v}` |" for k, v in settings.items()]
    rows += [f"| architecture | `{model.architecture}` `{model.model_args}` |",
             f"| preprocessing | `{model.preprocess}` |", f"| hubmerge version | `{__version__}` |"]
    if report is None:
        metrics = "Not recorded with this save: `hubmerge eval MODEL --data DATASET` measures accuracy and loss."
    elif not report.metrics:
        metrics = "No evaluation data was given."
    else:
        metrics = _metrics(report)
    text = TEMPLATE.format(
        card_data=data.to_yaml(), title=title, what=what, tasks=tasks, settings="\n".join(rows),
        barrier=TASK_BARRIER if model.tasks else BARRIER,
        endpoints=", ".join(f"{k.upper()} = {prov}" for k, (_, prov) in zip(keys, named)), metrics=metrics,
        allocation=_allocation(model.spec, model.partition, report.allocation if report is not None else []),
        recipe="" if recipe is None else ("\n## Recipe (reproduce with `hubmerge run --config recipe.yaml`)\n\n"
                                          f"```yaml\n{yaml.safe_dump(recipe, sort_keys=False).strip()}\n```\n"),
        repo_id=repo_id, citations=REFERENCES + (ZIPIT if zipped else "") + "\n\n" + BIBTEX,
    )
    return ModelCard(text)


def write(folder: Path, model: PartialMergedModel, report: MergeReport, *, repo_id: str, recipe: dict,
          datasets: tuple[str, ...], evaluation: str | None, licenses: tuple[str | None, ...]) -> ModelCard:
    """Write ``README.md`` (and the plot, when there are metrics) into ``folder``."""
    if report.metrics:
        plot(report, folder / PLOT)
    card = build(model, report, repo_id=repo_id, recipe=recipe, datasets=datasets, evaluation=evaluation,
                 licenses=licenses)
    card.save(folder / "README.md")
    return card
