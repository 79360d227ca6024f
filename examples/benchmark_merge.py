"""Issue 13: what a merge costs, in multiples of one endpoint's forward pass over the calibration set.

In one process, per pair: T_fwd (endpoint A's forward pass over the calibration set, the median of three),
then the stages of a full merge with REPAIR (statistics of both endpoints, alignment, build + REPAIR,
evaluation of the report's six models on the evaluation set) and of a ``benefit`` allocation at budget 0.1,
each in seconds and as a multiple of T_fwd. Goals: statistics + alignment + build + REPAIR ≤ 4 T_fwd (the
statistics pass runs both endpoints, so it alone is about 2), and a benefit allocation ≤ 1.5 × groups ×
T_fwd (groups as the allocator counts them: an attention's heads are one). Rounds are interleaved over the
pairs (``--repeats``), since this machine is shared and noisy.

Pairs (Fashion-MNIST at 32×32, trained from two seeds, cached in ``--cache``): ``resnet18`` with channels
16–128; ``vit`` (ViT-Tiny layout: patch 4, depth 4, width 64, 2 heads, kept apart whole);
``convnext`` (convnext_atto, depths 1-1-2-1, dims 16–64).

    python examples/benchmark_merge.py --pairs resnet18 vit convnext --repeats 2

``--memory 1000 8000`` instead measures peak memory (the process's maximum resident set) of a full merge
with REPAIR and a benefit allocation at ``--budget``, once per calibration-set size, each in a fresh
process, with ``--activation-memory`` GiB of activations kept in memory (the rest is spilled to disk):

    python examples/benchmark_merge.py --pairs resnet18 --memory 1000 8000 --activation-memory 0.01
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import hubmerge
from hubmerge import demo
from hubmerge.arch_specs import spec_for
from hubmerge.data import as_batches, batches
from hubmerge.hub import load_endpoint
from hubmerge.partial import choices

PAIRS = {
    "resnet18": ("resnet18", dict(channels=[16, 32, 64, 128], in_chans=1, num_classes=10)),
    "vit": ("vit_tiny_patch16_224", dict(patch_size=4, img_size=32, depth=4, embed_dim=64, num_heads=2, in_chans=1,
                                         num_classes=10)),
    "convnext": ("convnext_atto", dict(depths=[1, 1, 2, 1], dims=[16, 32, 48, 64], in_chans=1, num_classes=10)),
}


@torch.no_grad()
def forward_seconds(model: torch.nn.Module, data) -> float:
    """Median wall time of three passes of ``model`` over ``data`` (the batches as the merge reads them)."""
    model.eval()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for x, _ in batches(data):
            model(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", nargs="+", default=["resnet18", "vit"], choices=list(PAIRS))
    ap.add_argument("--calib-samples", type=int, default=2000)
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--train-samples", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path("examples/out/endpoints"))
    ap.add_argument("--memory", nargs="+", type=int, help="calibration sizes to measure peak memory at")
    ap.add_argument("--activation-memory", type=float, default=4.0, help="GiB of activations REPAIR keeps")
    ap.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)  # one measurement, in a child
    args = ap.parse_args()
    if args.memory:
        for pair in args.pairs:
            for n in args.memory:
                child = [sys.executable, __file__, "--peak", "--pairs", pair, "--calib-samples", str(n),
                         "--activation-memory", str(args.activation_memory), "--budget", str(args.budget),
                         "--cache", str(args.cache), "--train-samples", str(args.train_samples)]
                peak = subprocess.run(child, check=True, capture_output=True, text=True).stdout.split()[-1]
                print(f"{pair:9s} calibration {n:6d}: peak memory {peak} MiB (activations kept in memory: "
                      f"{args.activation_memory} GiB)", flush=True)
        return

    torch.set_num_threads(torch.get_num_threads())
    train = demo.subset(demo.load("fashion-mnist", "train", 32), args.train_samples)
    calib = demo.subset(train, args.calib_samples, seed=1)
    evaluation = demo.subset(demo.load("fashion-mnist", "test", 32), args.eval_samples, seed=2)
    if args.peak:  # the child of --memory: one full merge and one allocation, then the peak resident set
        (pair,) = args.pairs
        arch, model_args = PAIRS[pair]
        fa, fb = demo.endpoints(arch, model_args, train, args.cache, epochs=args.epochs,
                                tag=f"-fashion-mnist-{demo.args_tag(model_args)}")
        a, b = load_endpoint(str(fa)).model, load_endpoint(str(fb)).model
        hubmerge.merge(a, b, calib, gamma=0.0, activation_memory=args.activation_memory)
        hubmerge.merge(a, b, calib, budget=args.budget, activation_memory=args.activation_memory)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        return
    models = {}
    for pair in args.pairs:
        arch, model_args = PAIRS[pair]
        fa, fb = demo.endpoints(arch, model_args, train, args.cache, epochs=args.epochs,
                                tag=f"-fashion-mnist-{demo.args_tag(model_args)}")
        models[pair] = load_endpoint(str(fa)).model, load_endpoint(str(fb)).model

    print(f"calibration {args.calib_samples}, evaluation {args.eval_samples}, {torch.get_num_threads()} threads; "
          "seconds (multiple of T_fwd)")
    print(f"{'pair':9s} {'T_fwd':>7s} {'statistics':>14s} {'alignment':>14s} {'build+REPAIR':>14s} "
          f"{'merge total':>14s} {'evaluation':>14s} {'groups':>6s} {'benefit ' + str(args.budget):>16s} "
          f"{'/groups':>7s} {'evals':>5s}")
    for _ in range(args.repeats):
        for pair, (a, b) in models.items():
            t_fwd = forward_seconds(a, as_batches(calib, batch_size=256))
            full = hubmerge.merge(a, b, calib, evaluation=evaluation, gamma=0.0).report
            t = full.timings
            merge_total = t["statistics"] + t["alignment"] + t["build"]

            def cell(seconds: float) -> str:
                return f"{seconds:6.2f} ({seconds / t_fwd:4.1f})"

            groups = len(choices(spec_for(a)))  # what the allocator widens: groups, an attention's heads once
            row = (f"{pair:9s} {t_fwd:7.3f} {cell(t['statistics']):>14s} {cell(t['alignment']):>14s} "
                   f"{cell(t['build']):>14s} {cell(merge_total):>14s} {cell(t['evaluation']):>14s} {groups:6d}")
            try:
                budget = hubmerge.merge(a, b, calib, budget=args.budget, allocator="benefit").report
            except hubmerge.UsageError:  # a family that takes full merges only
                print(f"{row} {'full merges only':>16s}", flush=True)
                continue
            alloc = budget.timings["allocation"]
            evals = next(r["evaluations"] for r in budget.trace if "evaluations" in r)
            print(f"{row} {alloc:7.2f} ({alloc / t_fwd:5.1f}) {alloc / (groups * t_fwd):7.2f} {evals:5d}", flush=True)


if __name__ == "__main__":
    main()
