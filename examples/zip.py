"""Issue "ZipIt! and N-way": zip (ZipIt!) against the permutation merge, side by side, on real data.

The pairs of examples/panel.py (Fashion-MNIST, trained here reproducibly and cached), among them ResNet20 on
disjoint class halves (A sees classes 0-4, B 5-9, both with 10-way heads), and ``resnet-tasks``: the same
halves with a 5-way head each (separate tasks: every merge keeps both heads, its 10 outputs are A's 5 then
B's 5). For each: the endpoints, their ensemble, the permutation full merge and zip at several within-model
shares β (β=0 is the permutation merge), partial zips (the groups of the first layers zipped, the rest kept
apart: one head per model) at several depths, and hubmerge's partial merge (benefit allocation) at the
parameter budget of each partial zip, each with the default correction (``repair="auto"``). Reported: joint
accuracy (argmax over all 10 outputs) and, per task (classes 0-4, 5-9), the accuracy on that task's test
images with the argmax over the task's own outputs.

    python examples/zip.py
    python examples/zip.py --pairs resnet-classes --betas 0.25 0.5

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
from hubmerge.arch_specs import spec_for
from hubmerge.data import as_batches, batches
from hubmerge.evaluate import Ensemble

from panel import PAIRS, RESNET, Pair, each_pair, load_results, parser, save_results, trained  # examples/ on the path

# the class halves again, each endpoint with a 5-way head of its own (separate tasks: the merge concatenates them)
TASK_PAIRS = {"resnet-tasks": Pair("hubmerge_resnet20", {**RESNET, "num_classes": 5}, "tasks")}

TASKS = {"0-4": torch.arange(5), "5-9": torch.arange(5, 10)}


@torch.no_grad()
def accuracies(model: torch.nn.Module, data) -> dict[str, float]:
    """Joint accuracy over the 10 classes and each task's accuracy among its own classes, on its images."""
    logits, labels = [], []
    model.eval()
    for x, y in batches(as_batches(data, batch_size=500)):
        logits.append(model(x.to(next(model.parameters()).dtype)).float())
        labels.append(y)
    logits, labels = torch.cat(logits), torch.cat(labels)
    out = {"joint": (logits.argmax(1) == labels).double().mean().item()}
    for task, classes in TASKS.items():
        mine = torch.isin(labels, classes)
        guess = classes[logits[mine][:, classes].argmax(1)]
        out[task] = (guess == labels[mine]).double().mean().item()
    return out


def endpoints(a: torch.nn.Module, b: torch.nn.Module, separate: bool) -> dict[str, torch.nn.Module]:
    """A, B and their ensemble as the report measures them: for separate tasks each endpoint answering the
    joint outputs (its own classes, 0 for the other task's) and the ensemble their outputs side by side."""
    if not separate:
        return {"A": a, "B": b, "ensemble": Ensemble(a, b)}
    tasks = hubmerge.tasks.resolve([a, b], ["a", "b"], "separate")
    ja, jb = (hubmerge.tasks.joint(m, t, tasks)[0] for m, t in zip((a, b), tasks))
    return {"A": ja, "B": jb, "ensemble": Ensemble(ja, jb, weights=(1.0, 1.0))}


def merged(a, b, calib, evaluation, **options) -> dict:
    """One merge (default settings but ``options``): accuracies, time, size and zip pairs."""
    t0 = time.perf_counter()
    result = hubmerge.merge(a, b, calib, **options)
    return dict(accuracies(result.model, evaluation), seconds=time.perf_counter() - t0,
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
        a, b = trained(pair, train, args)
        rows = done.setdefault(name, {})
        separate = pair.split == "tasks"  # 5 classes each and no label names: say the tasks are separate
        task = {"tasks": "separate"} if separate else {}
        for key, model in endpoints(a, b, separate).items():
            if key not in rows:  # measured once, kept with the results
                rows[key] = accuracies(model, evaluation)
        layers = len(spec_for(a, tuple(calib.tensors[0].shape[1:])).layers)
        runs = {("permute (full merge)" if beta == 0 else f"zip β={beta:g}"): dict(zip_beta=beta)
                for beta in [0.0, *args.betas]}
        runs.update({f"partial zip, depth {round(f * layers)}/{layers}": dict(zip_depth=round(f * layers))
                     for f in args.depths})
        for key, options in runs.items():
            if key not in rows:
                rows[key] = merged(a, b, calib, evaluation, align="zip", **options, **task)
                save_results(args, done)
        # hubmerge's partial merge (benefit allocation, default settings) at each partial zip's parameter budget,
        # and at its FLOP budget
        for unit, label in (("params", "budget"), ("flops", "FLOP budget")):
            for budget in sorted({round(r[unit], 3) for k, r in list(rows.items()) if k.startswith("partial zip")}):
                key = f"partial merge, {label} {budget:g}"
                if 0 < budget < 1 and key not in rows:
                    rows[key] = merged(a, b, calib, evaluation, budget=budget, budget_unit=unit, **task)
                    save_results(args, done)
        print(f"\n== {name}: {pair.architecture} ({pair.split})\n")
        print("| model | joint | task 0-4 | task 5-9 | within pairs | params, FLOPs |\n|---|---|---|---|---|---|")
        for key, r in rows.items():
            size = f"+{100 * r['params']:.0f}%, +{100 * r['flops']:.0f}%" if "params" in r else ""
            print(f"| {key} | {100 * r['joint']:.2f}% | {100 * r['0-4']:.2f}% | {100 * r['5-9']:.2f}% | "
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
            ax.scatter([100], [100 * rows["ensemble"]["joint"]], marker="*", s=80, label="ensemble")
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
