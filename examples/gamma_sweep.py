"""Issue "partial merging": uniform γ sweep with and without REPAIR, for both cross-block rules.

Prints accuracy / loss barrier against the parameter increase for γ ∈ {0, 0.1, …, 1} and writes a PNG
plot. Reuses the endpoints trained by examples/full_merge.py (same cache and arguments).

    python examples/gamma_sweep.py --dataset fashion-mnist --arch hubmerge_vgg11 --width 0.25
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hubmerge import demo  # noqa: E402
from hubmerge.api import Prepared  # noqa: E402
from hubmerge.evaluate import Ensemble, barrier, evaluate  # noqa: E402
from hubmerge.hub import load_endpoint  # noqa: E402
from hubmerge.options import MergeOptions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist", choices=demo.DATASETS)
    ap.add_argument("--arch", default="hubmerge_vgg11")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--train-samples", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--calib-samples", type=int, default=2000)
    ap.add_argument("--eval-samples", type=int, default=5000)
    ap.add_argument("--cache", type=Path, default=Path("examples/out/endpoints"))
    ap.add_argument("--plot", type=Path, default=Path("examples/out/gamma_sweep.png"))
    args = ap.parse_args()

    img = 32
    model_args = dict(width_multiplier=args.width, in_chans=1, img_size=img, num_classes=10)
    train = demo.subset(demo.load(args.dataset, "train", img), args.train_samples)
    calib = demo.subset(train, args.calib_samples, seed=1)
    evaluation = demo.subset(demo.load(args.dataset, "test", img), args.eval_samples, seed=2)
    fa, fb = demo.endpoints(args.arch, model_args, train, args.cache, epochs=args.epochs, tag=f"-{args.dataset}")
    a, b = load_endpoint(str(fa)).model, load_endpoint(str(fb)).model
    ma, mb = evaluate(a, evaluation), evaluate(b, evaluation)
    ens = evaluate(Ensemble(a, b), evaluation)
    print(f"A {100 * ma.accuracy:.2f}%  B {100 * mb.accuracy:.2f}%  ensemble {100 * ens.accuracy:.2f}% "
          f"(barrier {100 * barrier(ma, mb, ens).accuracy:.2f}pp / {barrier(ma, mb, ens).loss:.3f})")
    gammas = [round(0.1 * i, 1) for i in range(11)]
    curves = {}
    print(f"{'cross':11s} {'repair':9s} {'gamma':>5s} {'+params':>8s} {'acc':>7s} {'barrier acc':>12s} {'barrier loss':>13s}")
    for cross in ("interpolate", "fill"):
        prepared = Prepared(a, b, calib, MergeOptions.parse(cross=cross, repair="repair"))  # its targets: every layer
        for repair in (None, "repair"):
            points = []
            for g in gammas:
                plans = prepared.plans(g)
                met = evaluate(prepared.build(plans, repair=repair), evaluation)
                bar = barrier(ma, mb, met)
                inc = prepared.costs.increase(prepared.partition(plans))["params"]
                points.append((inc, bar.accuracy, bar.loss))
                print(f"{cross:11s} {str(repair):9s} {g:5.1f} {100 * inc:7.1f}% {100 * met.accuracy:6.2f}% "
                      f"{100 * bar.accuracy:10.2f}pp {bar.loss:13.3f}", flush=True)
            curves[(cross, repair)] = points
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (cross, repair), pts in curves.items():
        for ax, i in zip(axes, (1, 2)):
            ax.plot([100 * p[0] for p in pts], [p[i] * (100 if i == 1 else 1) for p in pts], marker="o",
                    label=f"{cross}, {'REPAIR' if repair else 'no REPAIR'}")
    for ax, name in zip(axes, ("accuracy barrier (pp)", "loss barrier")):
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("non-zero parameter increase over one endpoint (%)")
        ax.set_ylabel(name)
        ax.legend()
    fig.suptitle(f"{args.arch} ×{args.width} on {args.dataset}: uniform γ sweep")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110, bbox_inches="tight")
    print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
