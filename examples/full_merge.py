"""Issue "engine foundation": full merge with and without REPAIR on real offline data.

Trains (or reuses) two endpoints of a literature architecture from different seeds, merges them at
α=0.5 with activation and weight matching, and prints accuracy/loss of the endpoints, the ensemble, the
full merge and the full merge + REPAIR / RESET, with the barriers.

    python examples/full_merge.py --dataset fashion-mnist --arch hubmerge_vgg11 --width 0.25
    python examples/full_merge.py --arch convnext_atto --model-args '{"depths": [1, 1, 2, 1], "dims": [16, 32, 48, 64]}'
    python examples/full_merge.py --arch vit_tiny_patch16_224 \
        --model-args '{"patch_size": 4, "img_size": 32, "depth": 4, "embed_dim": 64, "num_heads": 2}'

Any timm architecture works with ``--model-args`` (``in_chans`` and ``num_classes`` are added); families
without partial merging (see the README) still take full merges with REPAIR. For a model with attention
heads, activation and weight matching are also run with the heads kept in their order (``match_heads=False``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

import hubmerge
from hubmerge import demo
from hubmerge.arch_specs import spec_for
from hubmerge.evaluate import barrier
from hubmerge.hub import load_endpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist", choices=demo.DATASETS)
    ap.add_argument("--arch", default="hubmerge_vgg11")
    ap.add_argument("--width", type=float, default=0.25, help="width multiplier (VGG) / width (MLP)")
    ap.add_argument("--model-args", type=json.loads, default=None,
                    help="timm model_args as JSON, for any other architecture (replaces --width)")
    ap.add_argument("--train-samples", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--calib-samples", type=int, default=2000)
    ap.add_argument("--eval-samples", type=int, default=5000)
    ap.add_argument("--cache", type=Path, default=Path("examples/out/endpoints"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    img = 8 if args.dataset == "digits" else (28 if "mlp" in args.arch else 32)
    tag = f"-{args.dataset}"
    if args.model_args is not None:
        model_args = dict(args.model_args, in_chans=1, num_classes=10)
        tag += "-" + demo.args_tag(model_args)
    elif "mlp" in args.arch:
        model_args = dict(depth=3, width=int(args.width), img_size=img, in_chans=1, num_classes=10)
    elif "resnet" in args.arch:
        model_args = dict(width_multiplier=int(args.width), in_chans=1, num_classes=10)
    else:
        model_args = dict(width_multiplier=args.width, in_chans=1, img_size=img, num_classes=10)
    train = demo.subset(demo.load(args.dataset, "train", img), args.train_samples)
    test = demo.load(args.dataset, "test", img)
    calib = demo.subset(train, args.calib_samples, seed=1)
    evaluation = demo.subset(test, args.eval_samples, seed=2)
    fa, fb = demo.endpoints(args.arch, model_args, train, args.cache, epochs=args.epochs, tag=tag)
    a, b = load_endpoint(str(fa)).model, load_endpoint(str(fb)).model

    rows = {}
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in a.modules())
    has_heads = bool(spec_for(a).heads)
    runs = [("activation", True), ("weight", True)] + ([("activation", False), ("weight", False)] if has_heads else [])
    for align, heads in runs:
        for repair in (None, "repair", "reset") if has_bn else (None, "repair"):
            result = hubmerge.merge(a, b, calib, evaluation=evaluation, align=align, repair=repair, gamma=0.0,
                                    match_heads=heads)
            m = result.report.metrics
            rows.setdefault("A", m["a"])
            rows.setdefault("B", m["b"])
            rows.setdefault("ensemble", m["ensemble"])
            kept = "" if heads else ", heads in order"
            rows[f"full merge ({align}{kept}, {repair or 'no repair'})"] = m["merged"]
    size = json.dumps(args.model_args) if args.model_args is not None else f"×{args.width}"
    print(f"\n{args.arch} {size} on {args.dataset}: {args.train_samples} training samples, "
          f"{args.epochs} epochs, calibration {args.calib_samples}, evaluation {args.eval_samples}")
    print(f"{'model':50s} {'acc':>7s} {'loss':>7s} {'barrier acc':>12s} {'barrier loss':>13s}")
    for name, met in rows.items():
        bar = barrier(rows["A"], rows["B"], met)
        print(f"{name:50s} {100 * met.accuracy:6.2f}% {met.loss:7.3f} {100 * bar.accuracy:10.2f}pp {bar.loss:13.3f}")


if __name__ == "__main__":
    main()
