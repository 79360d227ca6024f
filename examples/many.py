"""Issue "ZipIt! and N-way": N-way full and partial merges of endpoints from four seeds, against their ensembles.

Endpoints of examples/panel.py's architectures (Fashion-MNIST, trained here reproducibly and cached), from
seeds 0-3. For N = 2, 3, 4: the mean accuracy of the first N endpoints, their ensemble (equal logit average),
their N-way full merge (``hubmerge.merge_many``: MergeMany alignment to endpoint 0, equal weights, the
default correction ``repair="auto"``) and their N-way partial merges at each ``--gammas`` (that share of
every group's merged units, the least correlated, kept apart by each endpoint), with the parameter increase
over one endpoint, on held-out test images.

    python examples/many.py                       # the MLP and ResNet20 (about 50 min here with training)
    python examples/many.py --pairs vgg-seeds
"""

from __future__ import annotations

import time

import torch

import hubmerge
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
    args = ap.parse_args()
    done = load_results(args)
    for name, pair, train, evaluation, calib in each_pair(args):
        models = [m for seeds in ((0, 1), (2, 3)) for m in trained(pair, train, args, seeds)]
        rows = done.setdefault(name, {})
        if "endpoints" not in rows:  # measured once, kept with the results
            rows["endpoints"] = [evaluate(m, evaluation).accuracy for m in models]
        for n in (2, 3, 4):
            if str(n) not in rows:
                t0 = time.perf_counter()
                merged = hubmerge.merge_many(models[:n], calib).model
                rows[str(n)] = dict(ensemble=evaluate(Average(models[:n]), evaluation).accuracy,
                                    merged=evaluate(merged, evaluation).accuracy, seconds=time.perf_counter() - t0)
                save_results(args, done)
            for gamma in args.gammas:
                key = f"{n}@{gamma}"
                if key not in rows:
                    t0 = time.perf_counter()
                    result = hubmerge.merge_many(models[:n], calib, gamma=gamma)
                    rows[key] = dict(merged=evaluate(result.model, evaluation).accuracy,
                                     params=result.report.param_increase, seconds=time.perf_counter() - t0)
                    save_results(args, done)
        print(f"\n== {name}: {pair.architecture}, endpoints "
              + ", ".join(f"{100 * a:.2f}%" for a in rows["endpoints"]) + "\n")
        print("| N | mean endpoint | ensemble (params) | N-way full merge | "
              + " | ".join(f"partial γ={g} (params)" for g in args.gammas) + " | full merge seconds |\n|"
              + "---|" * (5 + len(args.gammas)))
        for n in (2, 3, 4):
            r, mean = rows[str(n)], sum(rows["endpoints"][:n]) / n
            cells = [f"{100 * rows[f'{n}@{g}']['merged']:.2f}% (+{100 * rows[f'{n}@{g}']['params']:.0f}%)"
                     for g in args.gammas]
            print(f"| {n} | {100 * mean:.2f}% | {100 * r['ensemble']:.2f}% (+{100 * (n - 1)}%) | "
                  f"{100 * r['merged']:.2f}% | " + " | ".join(cells) + f" | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
