"""Issue "ZipIt! and N-way": N-way full and partial merges of endpoints from four seeds, against their ensembles.

Endpoints of examples/panel.py's architectures (Fashion-MNIST, trained here reproducibly and cached), from
seeds 0-3. For N = 2, 3, 4: the mean accuracy of the first N endpoints, their ensemble (equal logit average),
their N-way full merge (``hubmerge.merge_many``: MergeMany alignment to endpoint 0, equal weights, the
default correction ``repair="auto"``), their N-way partial merges at each ``--gammas`` (that share of
every group's merged units, the least correlated, kept apart by each endpoint) and, at each γ's parameter
increase as the budget, the N-way budgeted merge (``budget=…``, the benefit allocator: groups widened by
measured benefit instead of uniformly), with the parameter increase over one endpoint, on held-out test
images; and their N-way zips at each ``--betas`` (``align="zip"``: up to that share of each endpoint's units
merged in pairs within it, the rest aligned as the full merge aligns them; one endpoint's size), with how many
merged units hold a pair of one endpoint's units; and their partial zips at β=0.5 to each ``--depths``
(``zip_depth``, as a share of the layers: the groups the first layers write zipped, the later layers each
endpoint's own, their logits averaged), with the parameter and FLOP increase.

    python examples/many.py                       # the MLP and ResNet20 (13 min here once the endpoints are cached,
                                                  # and about 2 min more for the partial zips)
    python examples/many.py --pairs vgg-seeds
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import hubmerge
from hubmerge.arch_specs import spec_for
from hubmerge.evaluate import evaluate

from panel import PAIRS, each_pair, load_results, parser, save_results, trained  # examples/ is on the path


class Average(torch.nn.Module):
    """The equal logit average of several models."""

    def __init__(self, models: list[torch.nn.Module]):
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(m(x) for m in self.models) / len(self.models)


def main() -> None:
    ap = parser(__doc__, "many.json", ["mlp", "resnet-seeds"],
                [k for k, p in PAIRS.items() if p.split == "seeds"])
    ap.add_argument("--gammas", type=float, nargs="*", default=[0.1, 0.3],
                    help="the gammas of the N-way partial merges (default 0.1 0.3)")
    ap.add_argument("--betas", type=float, nargs="*", default=[0.5, 1.0],
                    help="the within-model shares of the N-way zips (default 0.5 1)")
    ap.add_argument("--depths", type=float, nargs="*", default=[0.25, 0.5, 0.75],
                    help="the depths of the N-way partial zips at β=0.5, as shares of the layers (default 0.25 0.5 "
                         "0.75)")
    args = ap.parse_args()
    done = load_results(args)
    for name, pair, train, evaluation, calib in each_pair(args):
        models = [m for seeds in ((0, 1), (2, 3)) for m in trained(pair, train, args, seeds)]
        rows = done.setdefault(name, {})
        if "endpoints" not in rows:  # measured once, kept with the results
            rows["endpoints"] = [evaluate(m, evaluation).accuracy for m in models]

        def measured(key: str, n: int, **options) -> dict:
            """The N-way merge of the first n endpoints with ``options`` (measured once, kept with the results)."""
            if "flops" not in rows.get(key, {}):
                t0 = time.perf_counter()
                result = hubmerge.merge_many(models[:n], calib, **options)
                rows[key] = dict(merged=evaluate(result.model, evaluation).accuracy,
                                 params=result.report.param_increase, flops=result.report.flop_increase,
                                 seconds=time.perf_counter() - t0,
                                 within=[sum(w) for w in zip(*result.report.within.values())])
                save_results(args, done)
            return rows[key]

        layers = len(spec_for(models[0], tuple(calib.tensors[0].shape[1:])).layers)  # what zip_depth counts
        depths = sorted({round(d * layers) for d in args.depths})
        for n in (2, 3, 4):
            if "ensemble" not in rows.get(f"{n}/ensemble", {}):
                rows[f"{n}/ensemble"] = dict(ensemble=evaluate(Average(models[:n]), evaluation).accuracy)
            measured(str(n), n)
            for gamma in args.gammas:
                # the same parameters as γ, spent where they measure most benefit
                measured(f"{n}@{gamma}/budget", n, budget=measured(f"{n}@{gamma}", n, gamma=gamma)["params"])
            for beta in args.betas:
                measured(f"{n}/zip@{beta}", n, align="zip", zip_beta=beta)
            for depth in depths:
                measured(f"{n}/zip@0.5/depth{depth}", n, align="zip", zip_beta=0.5, zip_depth=depth)
        print(f"\n== {name}: {pair.architecture}, endpoints "
              + ", ".join(f"{100 * a:.2f}%" for a in rows["endpoints"]) + "\n")
        print("| N | mean endpoint | ensemble (params) | N-way full merge | "
              + " | ".join(f"partial γ={g} (params / FLOPs) | budget at γ={g}'s params (params / FLOPs)"
                           for g in args.gammas)
              + " | full merge seconds |\n|" + "---|" * (5 + 2 * len(args.gammas)))

        def cell(row: dict) -> str:
            return f"{100 * row['merged']:.2f}% (+{100 * row['params']:.0f}% / +{100 * row['flops']:.0f}%)"

        for n in (2, 3, 4):
            mean = sum(rows["endpoints"][:n]) / n
            cells = [f"{cell(rows[f'{n}@{g}'])} | {cell(rows[f'{n}@{g}/budget'])}" for g in args.gammas]
            print(f"| {n} | {100 * mean:.2f}% | {100 * rows[f'{n}/ensemble']['ensemble']:.2f}% (+{100 * (n - 1)}%) | "
                  f"{100 * rows[str(n)]['merged']:.2f}% | " + " | ".join(cells)
                  + f" | {rows[str(n)]['seconds']:.1f} |", flush=True)
        print("\n| N | N-way full merge | " + " | ".join(f"zip β={b} (pairs within an endpoint)" for b in args.betas)
              + " | ensemble |\n|" + "---|" * (3 + len(args.betas)))
        for n in (2, 3, 4):
            zips = [rows[f"{n}/zip@{b}"] for b in args.betas]
            print(f"| {n} | {100 * rows[str(n)]['merged']:.2f}% | "
                  + " | ".join(f"{100 * z['merged']:.2f}% ({sum(z['within'])})" for z in zips)
                  + f" | {100 * rows[f'{n}/ensemble']['ensemble']:.2f}% |", flush=True)
        print("\n| N | full zip β=0.5 | " + " | ".join(f"partial zip to depth {d} of {layers} (params / FLOPs)"
                                                  for d in depths)
              + " | ensemble |\n|" + "---|" * (3 + len(depths)))
        for n in (2, 3, 4):
            cells = [cell(rows[f"{n}/zip@0.5/depth{d}"]) for d in depths]
            print(f"| {n} | {100 * measured(f'{n}/zip@0.5', n, align='zip', zip_beta=0.5)['merged']:.2f}% | "
                  + " | ".join(cells)
                  + f" | {100 * rows[f'{n}/ensemble']['ensemble']:.2f}% (+{100 * (n - 1)}%) |", flush=True)
        plot(rows, args.gammas, args.betas, depths, args.results.parent / f"many_{name}.png")


def plot(rows: dict, gammas: list[float], betas: list[float], depths: list[int], path: Path) -> None:
    """Accuracy against parameter increase per N: full merge, partial merges by γ and by budget, zips (at the
    full merge's size), partial zips at β=0.5, ensemble."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for n, color in zip((2, 3, 4), ("C0", "C1", "C2")):
        by_gamma = [rows[str(n)], *(rows[f"{n}@{g}"] for g in gammas)]
        ax.plot([100 * r["params"] for r in by_gamma], [100 * r["merged"] for r in by_gamma], "o-", color=color,
                label=f"N={n}: full merge, partial γ={', '.join(map(str, gammas))}")
        budgets = [rows[f"{n}@{g}/budget"] for g in gammas]
        ax.plot([100 * r["params"] for r in budgets], [100 * r["merged"] for r in budgets], "s", color=color,
                mfc="none", label=f"N={n}: budget (benefit) at γ's parameters")
        zips = [rows[f"{n}/zip@{b}"] for b in betas]
        ax.plot([100 * r["params"] for r in zips], [100 * r["merged"] for r in zips], "x", color=color,
                label=f"N={n}: zip β={', '.join(map(str, betas))}")
        partial = [rows[f"{n}/zip@0.5/depth{d}"] for d in depths]
        ax.plot([100 * r["params"] for r in partial], [100 * r["merged"] for r in partial], "^:", color=color,
                label=f"N={n}: partial zip β=0.5 to depth {', '.join(map(str, depths))}")
        ax.plot([100 * (n - 1)], [100 * rows[f"{n}/ensemble"]["ensemble"]], "*", color=color, ms=12,
                label=f"N={n}: ensemble")
    ax.set_xlabel("parameter increase over one endpoint (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # (beside the axes: the points stay visible)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
