"""Issue "ZipIt! and N-way": N-way full merges of endpoints from four seeds, against their ensembles.

Endpoints of examples/panel.py's architectures (Fashion-MNIST, trained here reproducibly and cached), from
seeds 0-3. For N = 2, 3, 4: the mean accuracy of the first N endpoints, their ensemble (equal logit average)
and their N-way full merge (``hubmerge.merge_many``: MergeMany alignment to endpoint 0, equal weights, the
default correction ``repair="auto"``), on held-out test images.

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
        print(f"\n== {name}: {pair.architecture}, endpoints "
              + ", ".join(f"{100 * a:.2f}%" for a in rows["endpoints"]) + "\n")
        print("| N | mean endpoint | ensemble | N-way full merge | merge seconds |\n|---|---|---|---|---|")
        for n in (2, 3, 4):
            r, mean = rows[str(n)], sum(rows["endpoints"][:n]) / n
            print(f"| {n} | {100 * mean:.2f}% | {100 * r['ensemble']:.2f}% | {100 * r['merged']:.2f}% | "
                  f"{r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
