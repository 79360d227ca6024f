"""Issue "traced specs": is widening a LayerNorm stream worth its cost, or only the groups inside blocks?

ConvNeXt's and ViT's residual streams are normalised by LayerNorms; hubmerge widens them through
partitioned norms (A-view and B-view normalised apart). This compares, on the trained ConvNeXt and ViT pairs
of ``examples/full_merge.py`` / ``examples/budget.py`` (Fashion-MNIST, two seeds), uniform γ applied to
(a) only the MLP hidden units, (b) only the attention heads (ViT; kept apart whole, round(γ·heads) per
module), (c) only the streams (groups a partitioned norm normalises), (d) every group, each after REPAIR,
and prints the parameter increase and the barriers. The benefit allocator's choice at the same budgets is
in ``examples/budget.py``.

    python examples/widening.py --gammas 0.1 0.25 0.5
    python examples/widening.py --model-args '{"ls_init_value": 1.0}'
    python examples/widening.py --pair vit --gammas 0.25 0.5 1.0 [--cross interpolate]

timm's ConvNeXt starts its layer scales at 1e-6; after the demo trainer's 3 SGD epochs they are still
below 0.003, so the block MLPs barely contribute and widening them changes little. ``--model-args`` adds
to (or replaces) the default model_args, for example a pair whose layer scales start at 1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import hubmerge
from hubmerge import demo
from hubmerge.evaluate import barrier, evaluate
from hubmerge.hub import load_endpoint

PAIRS = {
    "convnext": ("convnext_atto", dict(depths=[1, 1, 2, 1], dims=[16, 32, 48, 64], in_chans=1, num_classes=10)),
    "vit": ("vit_tiny_patch16_224", dict(patch_size=4, img_size=32, depth=4, embed_dim=64, num_heads=2, in_chans=1,
                                         num_classes=10)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="convnext", choices=list(PAIRS))
    ap.add_argument("--gammas", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    ap.add_argument("--cross", default="fill", choices=["fill", "interpolate"])
    ap.add_argument("--model-args", type=json.loads, default={}, help="JSON, added to the default model_args")
    ap.add_argument("--train-samples", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--calib-samples", type=int, default=500)
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--cache", type=Path, default=Path("examples/out/endpoints"))
    args = ap.parse_args()

    train = demo.subset(demo.load("fashion-mnist", "train", 32), args.train_samples)
    evaluation = demo.subset(demo.load("fashion-mnist", "test", 32), args.eval_samples, seed=2)
    calib = demo.subset(train, args.calib_samples, seed=1)
    arch, defaults = PAIRS[args.pair]
    model_args = {**defaults, **args.model_args}
    fa, fb = demo.endpoints(arch, model_args, train, args.cache, epochs=args.epochs,
                            tag=f"-fashion-mnist-{demo.args_tag(model_args)}")
    a, b = load_endpoint(str(fa)).model, load_endpoint(str(fb)).model
    prepared = hubmerge.Prepared(a, b, calib, hubmerge.MergeOptions(cross=args.cross))  # statistics once
    data = prepared.batches(evaluation)
    met_a, met_b = evaluate(a, data), evaluate(b, data)
    spec = prepared.spec
    streams, heads = {s.group for n in spec.norms for s in n.axis}, spec.head_of()
    scopes = {"mlp hidden": [g for g in spec.groups if g not in streams and g not in heads],
              "heads": list(heads), "streams": sorted(streams), "all groups": list(spec.groups)}
    scopes = {scope: groups for scope, groups in scopes.items() if groups}
    full = barrier(met_a, met_b, evaluate(prepared.build(prepared.plans(0.0)), data))
    print(f"\n{arch} {model_args}: A {100 * met_a.accuracy:.2f}%, B {100 * met_b.accuracy:.2f}%, full merge + "
          f"REPAIR barrier {100 * full.accuracy:.2f}pp / {full.loss:.3f}; groups: "
          + ", ".join(f"{len(groups)} {scope}" for scope, groups in scopes.items()))
    print(f"{'scope':14s} {'gamma':>5s} {'+params':>8s} {'+flops':>7s} {'barrier acc':>12s} {'barrier loss':>13s}")
    for gamma in args.gammas:
        for scope, groups in scopes.items():
            plans = prepared.plans({g: gamma for g in groups})
            bar = barrier(met_a, met_b, evaluate(prepared.build(plans), data))
            increase = prepared.costs.increase(prepared.partition(plans))
            print(f"{scope:14s} {gamma:5.2f} {100 * increase['params']:7.1f}% {100 * increase['flops']:6.1f}% "
                  f"{100 * bar.accuracy:10.2f}pp {bar.loss:13.3f}", flush=True)


if __name__ == "__main__":
    main()
