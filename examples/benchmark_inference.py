"""Issues "partial merging" and 13: inference speed of partitioned merges against their alternatives.

Times one endpoint, merges at uniform γ (``--gammas``) and budget merges of the benefit allocator
(``--budgets``), each in three forms: its blocks (``partitioned``), the per-layer choice of
:meth:`~hubmerge.PartialMergedModel.plan_execution` (``planned``: blocks or one zero-padded op per layer,
timed on this batch, or the whole model as its zero-padded copy where that is faster), and the zero-padded
equivalent (``zero-padded``), plus the two-model ensemble, on the same
batch, in one process, interleaved round by round. Prints median times as ratios to one endpoint next to
the parameter and FLOP increase. Targets: a partitioned or planned model ≤ (1 + FLOP increase + 0.05)× one
endpoint, and planned never slower than zero-padded. Budgets count FLOPs unless ``--budget-unit params``
(a parameter budget spent on early, high-resolution layers adds far more FLOPs than parameters). Weights are random (speed does not depend on them;
the budget merges' allocation, measured by agreement on random data, only decides which groups widen).
The last column, time ratio ÷ FLOP ratio, separates what the layout computes from how efficiently the
kernels run it: 1.00 means the model runs at the endpoint's speed per FLOP.

    python examples/benchmark_inference.py --arch hubmerge_vgg11 --width 0.5 --batch 64 [--channels-last]
    python examples/benchmark_inference.py --arch vit_tiny_patch16_224 --batch 64 \
        --model-args '{"patch_size": 4, "img_size": 32, "depth": 4, "embed_dim": 64, "num_heads": 4}'
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import hubmerge
from hubmerge.api import Prepared
from hubmerge.arch_specs import build_model, input_size_of, randomize_
from hubmerge.evaluate import Ensemble
from hubmerge.options import MergeOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="hubmerge_vgg11")
    ap.add_argument("--width", type=float, default=0.5, help="width multiplier of hubmerge's VGG / ResNet")
    ap.add_argument("--model-args", type=json.loads, default=None, help="timm model_args (JSON) instead of --width")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--gammas", nargs="+", type=float, default=[0.1, 0.22, 0.5])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.22])
    ap.add_argument("--budget-unit", default="flops", choices=["params", "flops"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--channels-last", action="store_true", help="run every model in channels_last memory format")
    args = ap.parse_args()
    if args.model_args is not None:
        margs = args.model_args
    else:
        margs = dict(width_multiplier=args.width if "resnet" not in args.arch else int(args.width))
    a = randomize_(build_model(args.arch, margs), 1).eval()  # (records its model_args, which a merge rebuilds by)
    b = randomize_(build_model(args.arch, margs), 2).eval()
    size = input_size_of(a) or a.pretrained_cfg["input_size"]  # a model built with img_size takes that size
    calib = [torch.randn(64, *size) for _ in range(2)]
    x = torch.randn(args.batch, *size)
    prepared = Prepared(a, b, calib, MergeOptions.parse(repair=None))
    merges = {f"γ={g}": prepared.build(prepared.plans(g)) for g in args.gammas}
    for budget in args.budgets:
        merges[f"budget {budget}"] = hubmerge.merge(a, b, calib, budget=budget, budget_unit=args.budget_unit,
                                                    repair=None).model
    models = {"endpoint": a, "ensemble": Ensemble(a, b)}
    increase = {"endpoint": {"params": 0.0, "flops": 0.0}, "ensemble": {"params": 1.0, "flops": 1.0}}
    for name, merged in merges.items():
        models.update({f"partitioned {name}": merged, f"planned {name}": copy.deepcopy(merged),
                       f"zero-padded {name}": merged.materialize().eval()})
        inc = prepared.costs.increase(merged.partition)
        increase.update({f"partitioned {name}": inc, f"planned {name}": inc})
        # the zero-padded model computes every unit against every unit: all-shared groups of the wide width
        increase[f"zero-padded {name}"] = prepared.costs.increase({k: (0, sum(s), 0) for k, s in merged.partition.items()})
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    models = {k: m.to(args.device, memory_format=memory_format) for k, m in models.items()}
    x = x.to(args.device).contiguous(memory_format=memory_format)
    for name in merges:  # planned where it runs, on the batch it runs
        choice = models[f"planned {name}"].plan_execution(x)
        whole = models[f"planned {name}"].execution == "zero-padded"
        dense = sum(c == "dense" for c in choice.values())
        print(f"{name}: " + ("the whole model runs zero-padded" if whole else
                             f"{dense} of {len(choice)} split layers run zero-padded"))
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(x)  # warm-up
        for _ in range(args.rounds):
            for name, m in models.items():
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(x)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["endpoint"])
    print(f"{args.arch} {json.dumps(margs)}, batch {args.batch} at {tuple(size)}, {args.device}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'model':28s} {'+params':>8s} {'+FLOPs':>8s} {'ms':>8s} {'× endpoint':>11s} {'target ≤':>9s} {'÷ FLOPs':>8s}")
    for name, t in times.items():
        med, inc = statistics.median(t), increase[name]
        target = f"{1 + inc['flops'] + 0.05:.2f}" if name.startswith(("partitioned", "planned")) else ""
        print(f"{name:28s} {100 * inc['params']:7.1f}% {100 * inc['flops']:7.1f}% {1000 * med:8.2f} "
              f"{med / base:10.2f}× {target:>9s} {med / base / (1 + inc['flops']):8.2f}")


if __name__ == "__main__":
    main()
