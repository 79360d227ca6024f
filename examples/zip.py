"""Issue "ZipIt! and N-way": zip (ZipIt!) against the permutation merge, side by side, on real data.

The pairs of examples/panel.py (Fashion-MNIST, trained here reproducibly and cached), among them ResNet20 on
disjoint class halves (A sees classes 0-4, B 5-9, both with 10-way heads), and ``resnet-tasks``: the same
halves with a 5-way head each (separate tasks: every merge keeps both heads, its 10 outputs are A's 5 then
B's 5); and ``resnet-tasks3``, three endpoints on classes 0-2, 3-5 and 6-8 with a 3-way head each (an N-way
merge of separate tasks, scored on the test images of those nine classes). For each: the endpoints, their
ensemble, the permutation full merge (N-way: MergeMany) and zip at several within-model
shares β (β=0 is the permutation merge), partial zips (the groups of the first layers zipped, the rest kept
apart: one head per model) at several depths, and hubmerge's partial merge (benefit allocation) at the
parameter budget of each partial zip, each with the default correction (``repair="auto"``). Reported: joint
accuracy (argmax over all outputs) and, per task (classes 0-4, 5-9; or 0-2, 3-5, 6-8), the accuracy on that
task's test images with the argmax over the task's own outputs.

    python examples/zip.py
    python examples/zip.py --pairs resnet-classes --betas 0.25 0.5
    python examples/zip.py --pairs resnet-tasks3 --results examples/out/zip-tasks3.json

Tables go to stdout, the plot of joint accuracy against parameter increase next to the results file
(``examples/out/zip.png``).

About 25 min here for the zips of all nine pairs once their endpoints are cached, and about an hour more for
the partial merges at the same budgets (parameters and FLOPs).
"""

from __future__ import annotations

import json
import time

import torch

import hubmerge
import hubmerge.tasks
from hubmerge import demo
from hubmerge.arch_specs import spec_for
from hubmerge.data import as_batches, batches
from hubmerge.evaluate import Ensemble

from panel import (PAIRS, RESNET, TASK_CLASSES, Pair, each_pair, load_results, parser,  # examples/ is on the path
                   save_results, trained)

# separate tasks (the merge concatenates the heads): the class halves again, each endpoint with a 5-way head of
# its own; and three endpoints on classes 0-2, 3-5 and 6-8 with 3-way heads (an N-way merge of separate tasks)
TASK_PAIRS = {"resnet-tasks": Pair("hubmerge_resnet20", {**RESNET, "num_classes": 5}, "tasks"),
              "resnet-tasks3": Pair("hubmerge_resnet20", {**RESNET, "num_classes": 3}, "tasks3")}


def task_classes(pair: Pair) -> dict[str, torch.Tensor]:
    """The classes of each task the pair's merges are scored on, by name ("0-4"): the class halves unless the
    endpoints' split says otherwise."""
    ranges = TASK_CLASSES.get(pair.split, TASK_CLASSES["tasks"])
    return {f"{lo}-{hi - 1}": torch.arange(lo, hi) for lo, hi in ranges}


def of_classes(data: demo.TensorDataset, classes: torch.Tensor) -> demo.TensorDataset:
    """The samples of ``data`` whose label is one of ``classes`` (resnet-tasks3 leaves class 9 out)."""
    x, y = data.tensors
    keep = torch.isin(y, classes)
    return demo.TensorDataset(x[keep], y[keep])


@torch.no_grad()
def accuracies(model: torch.nn.Module, data, tasks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Joint accuracy over the tasks' classes (on their images) and each task's accuracy among its own classes,
    on its images."""
    logits, labels = [], []
    model.eval()
    for x, y in batches(as_batches(data, batch_size=500)):
        logits.append(model(x.to(next(model.parameters()).dtype)).float())
        labels.append(y)
    logits, labels = torch.cat(logits), torch.cat(labels)
    every = torch.cat(list(tasks.values()))
    seen = torch.isin(labels, every)
    out = {"joint": (every[logits[seen][:, every].argmax(1)] == labels[seen]).double().mean().item()}
    for task, classes in tasks.items():
        mine = torch.isin(labels, classes)
        guess = classes[logits[mine][:, classes].argmax(1)]
        out[task] = (guess == labels[mine]).double().mean().item()
    return out


def endpoints(models: list[torch.nn.Module], separate: bool) -> dict[str, torch.nn.Module]:
    """The endpoints (A, B, …) and their ensemble as the report measures them: for separate tasks each endpoint
    answering the joint outputs (its own classes, 0 for the other tasks') and the ensemble their outputs side
    by side."""
    names = [chr(ord("A") + i) for i in range(len(models))]
    if not separate:
        return {**dict(zip(names, models)), "ensemble": Ensemble(*models, weights=(1 / len(models),) * len(models))}
    tasks = hubmerge.tasks.resolve(models, [n.lower() for n in names], "separate")
    joint = [hubmerge.tasks.joint(m, t, tasks)[0] for m, t in zip(models, tasks)]
    return {**dict(zip(names, joint)), "ensemble": Ensemble(*joint, weights=(1.0,) * len(joint))}


def merged(models, calib, evaluation, classes, **options) -> dict:
    """One merge of the endpoints (default settings but ``options``): accuracies (on the tasks' ``classes``),
    time, size and zip pairs."""
    t0 = time.perf_counter()
    result = hubmerge.merge(list(models), calib, **options)
    return dict(accuracies(result.model, evaluation, classes), seconds=time.perf_counter() - t0,
                within=sum(sum(w) for w in result.report.within.values()),
                params=result.report.param_increase, flops=result.report.flop_increase)


def main() -> None:
    pairs = {**PAIRS, **TASK_PAIRS}
    ap = parser(__doc__, "zip.json", list(pairs), list(pairs))
    ap.add_argument("--betas", nargs="+", type=float, default=[0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75],
                    help="partial zips (at the default zip_beta) to these fractions of the layers")
    args = ap.parse_args()
    done = load_results(args)
    for name, pair, train, evaluation, calib in each_pair(args, pairs):
        separate = pair.split in TASK_CLASSES  # heads alike and no label names: say the tasks are separate
        models = trained(pair, train, args, seeds=tuple(range(len(TASK_CLASSES[pair.split]))) if separate else (0, 1))
        tasks, task = task_classes(pair), {"tasks": "separate"} if separate else {}
        calib, evaluation = (of_classes(d, torch.cat(list(tasks.values()))) for d in (calib, evaluation))
        rows = done.setdefault(name, {})
        for key, model in endpoints(models, separate).items():
            if key not in rows:  # measured once, kept with the results
                rows[key] = accuracies(model, evaluation, tasks)
                if key == "ensemble":
                    rows[key].update(params=len(models) - 1, flops=len(models) - 1)
        layers = len(spec_for(models[0], tuple(calib.tensors[0].shape[1:])).layers)
        runs = {("permute (full merge)" if beta == 0 else f"zip β={beta:g}"): dict(zip_beta=beta)
                for beta in [0.0, *args.betas]}
        runs.update({f"partial zip, depth {round(f * layers)}/{layers}": dict(zip_depth=round(f * layers))
                     for f in args.depths})
        for key, options in runs.items():
            if key not in rows:
                rows[key] = merged(models, calib, evaluation, tasks, align="zip", **options, **task)
                save_results(args, done)
        # hubmerge's partial merge (benefit allocation, default settings) at each partial zip's parameter budget,
        # and at its FLOP budget
        for unit, label in (("params", "budget"), ("flops", "FLOP budget")):
            for budget in sorted({round(r[unit], 3) for k, r in list(rows.items()) if k.startswith("partial zip")}):
                key = f"partial merge, {label} {budget:g}"
                if 0 < budget < len(models) - 1 and key not in rows:
                    rows[key] = merged(models, calib, evaluation, tasks, budget=budget, budget_unit=unit, **task)
                    save_results(args, done)
        print(f"\n== {name}: {pair.architecture} ({pair.split})\n")
        print(f"| model | joint | {' | '.join(f'task {t}' for t in tasks)} | within pairs | params, FLOPs |\n"
              f"|---|---|{'---|' * len(tasks)}---|---|")
        for key, r in rows.items():
            size = f"+{100 * r['params']:.0f}%, +{100 * r['flops']:.0f}%" if "params" in r else ""
            print(f"| {key} | {100 * r['joint']:.2f}% | {' | '.join(f'{100 * r[t]:.2f}%' for t in tasks)} | "
                  f"{r.get('within', '')} | {size} |", flush=True)
    panel = args.results.with_name("panel.json")
    merges = json.loads(panel.read_text()) if panel.is_file() else {}
    plot({n: done[n] for n in args.pairs}, merges if merges.get("run") == done["run"] else {},
         args.results.with_suffix(".png"))


def plot(results: dict, panel: dict, path) -> None:
    """Joint accuracy against the parameter increase (left) and the FLOP increase (right), one row per pair:
    the permutation merge and the full zips (at +0%), the partial zips, the ensemble (+100%), hubmerge's
    benefit-allocated partial merges at the partial zips' budgets in that unit, and, by parameters, the
    panel's (examples/panel.py's results on the same data, default settings) where ``panel`` has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(8, 3 * len(results)), squeeze=False)
    for (left, right), (name, rows) in zip(axes, results.items()):
        by = ((left, "params", "partial merge, budget"), (right, "flops", "partial merge, FLOP budget"))
        for ax, unit, label in by:
            zips = [r for k, r in rows.items() if k.startswith("zip")]
            for prefix, style, legend in (("partial zip", "o-", "partial zip"), (label + " ", "v-", "partial merge")):
                line = sorted((r for k, r in rows.items() if k.startswith(prefix)), key=lambda r: r[unit])
                ax.plot([100 * r[unit] for r in line], [100 * r["joint"] for r in line], style, label=legend)
            ax.scatter([0] * len(zips), [100 * r["joint"] for r in zips], marker="x", label="full zip (β)")
            ax.scatter([0], [100 * rows["permute (full merge)"]["joint"]], marker="s", label="permute")
            ensemble = rows["ensemble"]
            ax.scatter([100 * ensemble.get(unit, 1)], [100 * ensemble["joint"]], marker="*", s=80, label="ensemble")
            ax.set_title(f"{name}, by {unit}", fontsize=9)
            ax.set_xlabel(f"{'parameter' if unit == 'params' else 'FLOP'} increase (%)", fontsize=8)
            ax.set_ylabel("joint accuracy (%)", fontsize=8)
        cells = panel.get(name, {})
        default = "reset, fill" if cells.get("endpoints", {}).get("bn") else "repair, fill"
        budgets = sorted((c for k, c in cells.items() if k.startswith(f"{default} @ ")), key=lambda c: c["increase"])
        if budgets:
            left.plot([100 * c["increase"] for c in budgets], [100 * c["accuracy"] for c in budgets], "d--",
                      label="partial merge (panel budgets)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
