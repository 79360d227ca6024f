"""Issue "ZipIt! and N-way": zip (ZipIt!) against the permutation merge, side by side, on real data.

The pairs of examples/panel.py (Fashion-MNIST, trained here reproducibly and cached), among them ResNet20 on
disjoint class halves (A sees classes 0-4, B 5-9, both with 10-way heads). For each: the endpoints, their
ensemble, the permutation full merge and zip at several within-model shares β (β=0 is the permutation merge),
and partial zips (the groups of the first layers zipped, the rest kept apart: one head per model) at several
depths, each with the default correction (``repair="auto"``). Reported: joint accuracy (argmax over all 10
classes) and, per task (classes 0-4, 5-9), the accuracy on that task's test images with the argmax over the
task's own classes.

    python examples/zip.py
    python examples/zip.py --pairs resnet-classes --betas 0.25 0.5

Tables go to stdout, the plot of joint accuracy against parameter increase next to the results file
(``examples/out/zip.png``).

About 25 min here for all eight pairs once their endpoints are cached.
"""

from __future__ import annotations

import json
import time

import torch

import hubmerge
from hubmerge.arch_specs import spec_for
from hubmerge.data import as_batches, batches
from hubmerge.evaluate import Ensemble

from panel import PAIRS, each_pair, load_results, parser, save_results, trained  # examples/ is on the path

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


def main() -> None:
    ap = parser(__doc__, "zip.json", list(PAIRS), list(PAIRS))
    ap.add_argument("--betas", nargs="+", type=float, default=[0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75],
                    help="partial zips (at the default zip_beta) to these fractions of the layers")
    args = ap.parse_args()
    done = load_results(args)
    for name, pair, train, evaluation, calib in each_pair(args):
        a, b = trained(pair, train, args)
        rows = done.setdefault(name, {})
        for key, model in (("A", a), ("B", b), ("ensemble", Ensemble(a, b))):
            if key not in rows:  # measured once, kept with the results
                rows[key] = accuracies(model, evaluation)
        layers = len(spec_for(a, tuple(calib.tensors[0].shape[1:])).layers)
        runs = {("permute (full merge)" if beta == 0 else f"zip β={beta:g}"): dict(zip_beta=beta)
                for beta in [0.0, *args.betas]}
        runs.update({f"partial zip, depth {round(f * layers)}/{layers}": dict(zip_depth=round(f * layers))
                     for f in args.depths})
        for key, options in runs.items():
            if key not in rows:
                t0 = time.perf_counter()
                result = hubmerge.merge(a, b, calib, align="zip", **options)
                rows[key] = dict(accuracies(result.model, evaluation), seconds=time.perf_counter() - t0,
                                 within=sum(sum(w) for w in result.report.within.values()),
                                 params=result.report.param_increase, flops=result.report.flop_increase)
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
    """Joint accuracy against the parameter increase, one panel per pair: the permutation merge and the full
    zips (at +0%), the partial zips, the ensemble (+100%), and hubmerge's benefit-allocated partial merges
    with the default settings where ``panel`` (examples/panel.py's results on the same data) has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(results))
    rows_of_panels = (len(results) + cols - 1) // cols
    fig, axes = plt.subplots(rows_of_panels, cols, figsize=(4 * cols, 3.2 * rows_of_panels), squeeze=False)
    for ax, (name, rows) in zip(axes.flat, results.items()):
        zips = [r for k, r in rows.items() if k.startswith("zip")]
        partial = sorted((r for k, r in rows.items() if k.startswith("partial")), key=lambda r: r["params"])
        ax.plot([100 * r["params"] for r in partial], [100 * r["joint"] for r in partial], "o-", label="partial zip")
        ax.scatter([0] * len(zips), [100 * r["joint"] for r in zips], marker="x", label="full zip (β)")
        ax.scatter([0], [100 * rows["permute (full merge)"]["joint"]], marker="s", label="permute")
        ax.scatter([100], [100 * rows["ensemble"]["joint"]], marker="*", s=80, label="ensemble")
        cells = panel.get(name, {})
        default = "reset, fill" if cells.get("endpoints", {}).get("bn") else "repair, fill"
        budgets = sorted((c for k, c in cells.items() if k.startswith(f"{default} @ ")), key=lambda c: c["increase"])
        if budgets:
            ax.plot([100 * c["increase"] for c in budgets], [100 * c["accuracy"] for c in budgets], "d--",
                    label="partial merge (benefit)")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("parameter increase (%)", fontsize=8)
        ax.set_ylabel("joint accuracy (%)", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
