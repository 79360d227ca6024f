"""The model card of a merged repo: hub metadata, settings, metrics, allocation, plot, usage."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402
from huggingface_hub import ModelCard, ModelCardData  # noqa: E402

from . import __version__  # noqa: E402
from .api import MergeReport  # noqa: E402

PLOT = "barrier_vs_params.png"

TEMPLATE = """---
{card_data}
---

# {title}

A **partial merge** of [`{a}`]({a_link}) and [`{b}`]({b_link}) made with
[hubmerge](https://pypi.org/project/hubmerge/) {version}: units that align well are interpolated, units
that do not are kept side by side, so the model sits between a full merge (same size) and the ensemble
(twice the size). It is stored and executed partitioned: only the non-zero blocks are in
`model.safetensors`.

## Method and settings

| setting | value |
|---|---|
{settings}

Endpoint commits: `{a}` @ `{commit_a}`, `{b}` @ `{commit_b}`.

## Metrics
{metrics}

## Allocation per group
{allocation}

## Recipe (reproduce with `hubmerge run --config recipe.yaml`)

```yaml
{recipe}
```

## How to use

```python
from hubmerge import PartialMergedModel

model = PartialMergedModel.from_pretrained("{repo_id}")
logits = model(images)  # preprocess as the endpoints: {preprocess}
plain = model.materialize()  # an equivalent zero-padded plain model, for inspection or export
```
"""


def _metrics(report: MergeReport) -> str:
    if not report.metrics:
        return "No evaluation data was given."
    rows = ["| model | accuracy | loss |", "|---|---|---|"]
    for name, m in report.metrics.items():
        rows.append(f"| {name} | {100 * m.accuracy:.2f}% | {m.loss:.4f} |")
    endpoint_params, endpoint_flops = report.endpoint_params, report.endpoint_flops
    size = (f"\nThis merge: {endpoint_params * (1 + report.param_increase):,.0f} non-zero parameters "
            f"(+{100 * report.param_increase:.1f}% over one endpoint's {endpoint_params:,}), "
            f"{endpoint_flops * (1 + report.flop_increase):,.0f} FLOPs per image "
            f"(+{100 * report.flop_increase:.1f}%). Barrier (accuracy / loss): "
            f"{100 * report.barrier.accuracy:.2f} pp / {report.barrier.loss:.4f}.")
    return "\n".join(rows) + "\n" + size + f"\n\n![barrier vs parameters]({PLOT})"


def _allocation(report: MergeReport) -> str:
    rows = ["| group | k_A | shared | k_B | γ | params added | benefit |", "|---|---|---|---|---|---|---|"]
    by_group = {r["group"]: r for r in report.allocation}
    for g, (ka, m, kb) in report.partition.items():
        r = by_group.get(g, {})
        benefit = r.get("benefit")
        rows.append(f"| {g} | {ka} | {m} | {kb} | {ka / (ka + m):.2f} | {r.get('params_added', '')} | "
                    f"{'' if benefit is None else f'{benefit:.4g}'} |")
    return "\n".join(rows)


def plot(report: MergeReport, path: Path) -> None:
    """Accuracy barrier against parameter increase: full merge, + REPAIR, this merge, ensemble."""
    m, a, b = report.metrics, report.metrics["a"], report.metrics["b"]
    ref = (a.accuracy + b.accuracy) / 2
    points = [("full merge", 0.0, m["full_merge"]), ("this merge", report.param_increase, m["merged"]),
              ("ensemble", 1.0, m["ensemble"])]
    if "full_merge_repair" in m:
        points.insert(1, ("full merge + REPAIR", 0.0, m["full_merge_repair"]))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, x, met in points:
        ax.scatter(100 * x, 100 * (ref - met.accuracy), label=name, s=50)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("non-zero parameter increase (%)")
    ax.set_ylabel("accuracy barrier (pp)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def write(folder: Path, report: MergeReport, *, repo_id: str, recipe: dict, endpoints: dict, datasets: list[str],
          licenses: list[str | None], preprocess: dict) -> ModelCard:
    """Write ``README.md`` (and the plot, when there are metrics) into ``folder``."""
    a, b = endpoints["a"], endpoints["b"]
    license_ = licenses[0] if len(set(licenses)) == 1 and licenses[0] else None
    data = ModelCardData(
        base_model=[a["id"], b["id"]], base_model_relation="merge", library_name="hubmerge",
        tags=["hubmerge", "model-merging", "partial-merging", "image-classification"],
        datasets=datasets or None, license=license_,
    )
    settings = "\n".join(f"| {k} | `{v}` |" for k, v in report.options.items())
    settings += f"\n| hubmerge version | `{__version__}` |"
    if report.metrics:
        plot(report, folder / PLOT)

    def link(ref: str) -> str:
        return ref if Path(ref).exists() else f"https://huggingface.co/{ref.split('@')[0]}"

    text = TEMPLATE.format(
        card_data=data.to_yaml(), title=repo_id.split("/")[-1], a=a["id"], b=b["id"], a_link=link(a["id"]),
        b_link=link(b["id"]), version=__version__, settings=settings, commit_a=a.get("commit"),
        commit_b=b.get("commit"), metrics=_metrics(report), allocation=_allocation(report),
        recipe=yaml.safe_dump(recipe, sort_keys=False).strip(), repo_id=repo_id, preprocess=preprocess,
    )
    card = ModelCard(text)
    card.save(folder / "README.md")
    return card
