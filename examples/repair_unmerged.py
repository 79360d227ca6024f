"""Issue "partial merging": REPAIR of shared units only (thesis default) vs also renormalising unmerged
units toward their own endpoint's statistics, on the Fashion-MNIST VGG11 pair of examples/full_merge.py.

    python examples/repair_unmerged.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hubmerge import demo
from hubmerge.api import Prepared
from hubmerge.evaluate import barrier, evaluate
from hubmerge.hub import load_endpoint
from hubmerge.options import MergeOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("examples/out/endpoints"))
    ap.add_argument("--gammas", nargs="+", type=float, default=[0.1, 0.3, 0.5])
    args = ap.parse_args()
    model_args = dict(width_multiplier=0.25, in_chans=1, img_size=32, num_classes=10)
    train = demo.subset(demo.load("fashion-mnist", "train", 32), 20000)
    calib = demo.subset(train, 2000, seed=1)
    evaluation = demo.subset(demo.load("fashion-mnist", "test", 32), 5000, seed=2)
    fa, fb = demo.endpoints("hubmerge_vgg11", model_args, train, args.cache, tag="-fashion-mnist")
    a, b = load_endpoint(str(fa)).model, load_endpoint(str(fb)).model
    ma, mb = evaluate(a, evaluation), evaluate(b, evaluation)
    print(f"{'cross':11s} {'gamma':>5s} {'shared only':>22s} {'+ unmerged':>22s}")
    for cross in ("fill", "interpolate"):
        shared = Prepared(a, b, calib, MergeOptions.parse(cross=cross))
        both = Prepared(a, b, calib, MergeOptions.parse(cross=cross, repair_unmerged=True))
        for g in args.gammas:
            cells = []
            for p in (shared, both):
                met = evaluate(p.build(p.plans(g)), evaluation)
                bar = barrier(ma, mb, met)
                cells.append(f"{100 * met.accuracy:6.2f}% {100 * bar.accuracy:5.2f}pp {bar.loss:6.3f}")
            print(f"{cross:11s} {g:5.1f} {cells[0]:>22s} {cells[1]:>22s}", flush=True)


if __name__ == "__main__":
    main()
