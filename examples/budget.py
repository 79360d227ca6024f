"""Issue "budget": barrier after REPAIR per allocator and budget, on real offline data.

Pairs: VGG11 (×0.25) from different seeds, VGG11 trained on two disjoint halves of the data, ResNet20
from different seeds, a small ConvNeXt (``convnext_atto``, depths 1-1-2-1, dims 16-64: LayerNorm
streams, widened through partitioned norms), a small ViT (patch 4, depth 4, width 64, 2 heads: heads
kept apart whole), an EVA-02 of the same size (rotary q/k kept in order inside each head), a small
ResNeXt (grouped convs), a small Swin (relative position bias tables, patch merging), GhostNet (ghost modules) and timm's test NF-Net (weight-standardised convs) from different seeds,
all on Fashion-MNIST. For budgets {0.05, 0.1, 0.22, 0.4} and the allocators uniform / adaptive / benefit /
greedy, prints accuracy and loss barrier on held-out data, the measured parameter increase and each
allocation's wall time, and writes a PNG plot per pair.

    python examples/budget.py --pairs vgg-seeds vgg-halves resnet-seeds
    python examples/budget.py --pairs convnext-seeds convnext-ls1-seeds --budgets 0.1 0.22 --allocators uniform benefit
    python examples/budget.py --pairs vit-seeds --budgets 0.1 0.22 --allocators uniform benefit --cross interpolate
    python examples/budget.py --pairs eva-seeds --budgets 0.1 0.22 --allocators uniform benefit --cross interpolate
    python examples/budget.py --pairs resnext-seeds swin-seeds --budgets 0.1 0.22 --allocators uniform benefit
    python examples/budget.py --pairs ghostnet-seeds --budgets 0.1 0.22 --allocators uniform benefit
    python examples/budget.py --pairs nfnet-seeds --budgets 0.1 0.22 --allocators uniform benefit
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import hubmerge  # noqa: E402
from hubmerge import demo  # noqa: E402
from hubmerge.hub import load_endpoint  # noqa: E402

PAIRS = {
    "vgg-seeds": ("hubmerge_vgg11", dict(width_multiplier=0.25, in_chans=1, img_size=32, num_classes=10), "seeds"),
    "vgg-halves": ("hubmerge_vgg11", dict(width_multiplier=0.25, in_chans=1, img_size=32, num_classes=10), "halves"),
    "resnet-seeds": ("hubmerge_resnet20", dict(width_multiplier=1, in_chans=1, num_classes=10), "seeds"),
    "convnext-seeds": ("convnext_atto", dict(depths=[1, 1, 2, 1], dims=[16, 32, 48, 64], in_chans=1, num_classes=10),
                       "seeds"),
    # layer scales starting at 1 instead of timm's 1e-6, so the block MLPs matter after 3 epochs
    "convnext-ls1-seeds": ("convnext_atto", dict(depths=[1, 1, 2, 1], dims=[16, 32, 48, 64], ls_init_value=1.0,
                                                 in_chans=1, num_classes=10), "seeds"),
    # the ViT of examples/full_merge.py: patch 4, depth 4, width 64, 2 heads (kept apart whole)
    "vit-seeds": ("vit_tiny_patch16_224", dict(patch_size=4, img_size=32, depth=4, embed_dim=64, num_heads=2,
                                               in_chans=1, num_classes=10), "seeds"),
    # an EVA-02 of the ViT's size: rotary q/k (each head's channels kept in order, heads kept apart whole), a gated
    # MLP, an inner norm
    "eva-seeds": ("eva02_tiny_patch14_224", dict(patch_size=4, img_size=32, depth=4, embed_dim=64, num_heads=2,
                                                 in_chans=1, num_classes=10), "seeds"),
    # a ResNeXt (grouped convs, 8 blocks of 2–16 channels, widened block by block), one bottleneck per stage
    "resnext-seeds": ("resnet50", dict(layers=[1, 1, 1, 1], channels=[16, 32, 64, 128], cardinality=8, base_width=8,
                                       in_chans=1, num_classes=10), "seeds"),
    # a Swin (window attention with relative position bias tables, shifted windows, patch merging): patch 2,
    # windows of 4×4 tokens, two stages of two blocks, width 32
    "swin-seeds": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=32,
                                                        depths=[2, 2], num_heads=[2, 4], in_chans=1, num_classes=10),
                   "seeds"),
    # a GhostNet at width 0.5 (ghost modules: concatenated primary and cheap features, cut to out_chs)
    "ghostnet-seeds": ("ghostnet_050", dict(in_chans=1, num_classes=10), "seeds"),
    # timm's test NF-Net (weight-standardised convs with a gain, grouped convs, SE; no norms at all)
    "nfnet-seeds": ("test_nfnet", dict(in_chans=1, num_classes=10), "seeds"),
}
# norm-free networks diverge at the demo's learning rate without adaptive gradient clipping (as NF-Nets train)
AGC = {"nfnet-seeds": 0.04}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.22, 0.4])
    ap.add_argument("--allocators", nargs="+", default=["uniform", "adaptive", "benefit", "greedy"])
    ap.add_argument("--train-samples", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--calib-samples", type=int, default=500)
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--greedy-step", type=float, default=0.25)
    ap.add_argument("--cross", default="fill", choices=["fill", "interpolate"])
    ap.add_argument("--cache", type=Path, default=Path("examples/out/endpoints"))
    ap.add_argument("--plots", type=Path, default=Path("examples/out"))
    args = ap.parse_args()

    train = demo.subset(demo.load("fashion-mnist", "train", 32), args.train_samples)
    evaluation = demo.subset(demo.load("fashion-mnist", "test", 32), args.eval_samples, seed=2)
    for pair in args.pairs:
        arch, model_args, kind = PAIRS[pair]
        if kind == "halves":
            half = len(train) // 2
            x, y = train.tensors
            sets = (demo.TensorDataset(x[:half], y[:half]), demo.TensorDataset(x[half:], y[half:]))
            fa, fb = demo.endpoints(arch, model_args, train, args.cache, epochs=args.epochs,
                                    tag="-fashion-mnist-halves", train_sets=sets)
        else:  # timm architectures are cached by their model_args, as examples/full_merge.py caches them
            tag = "-fashion-mnist" + ("" if arch.startswith("hubmerge_") else f"-{demo.args_tag(model_args)}")
            fa, fb = demo.endpoints(arch, model_args, train, args.cache, epochs=args.epochs, tag=tag,
                                    agc=AGC.get(pair))
        a, b = load_endpoint(str(fa)).model, load_endpoint(str(fb)).model
        calib = demo.subset(train, args.calib_samples, seed=1)
        ref = hubmerge.merge(a, b, calib, evaluation=evaluation, gamma=0.0, cross=args.cross).report
        m = ref.metrics
        print(f"\n== {pair}: {arch}, A {100 * m['a'].accuracy:.2f}%, B {100 * m['b'].accuracy:.2f}%, "
              f"ensemble {100 * m['ensemble'].accuracy:.2f}%, full merge {100 * m['full_merge'].accuracy:.2f}%, "
              f"+REPAIR {100 * m['full_merge_repair'].accuracy:.2f}% (barrier {100 * ref.barrier.accuracy:.2f}pp / "
              f"{ref.barrier.loss:.3f})")
        print(f"{'allocator':9s} {'budget':>6s} {'+params':>8s} {'barrier acc':>12s} {'barrier loss':>13s} "
              f"{'evals':>6s} {'alloc s':>8s}", flush=True)
        curves = {}
        for allocator in args.allocators:
            for budget in args.budgets:
                r = hubmerge.merge(a, b, calib, evaluation=evaluation, budget=budget, allocator=allocator,
                                   cross=args.cross, greedy_step=args.greedy_step).report
                evals = next((t["evaluations"] for t in r.trace if "evaluations" in t), 0)
                print(f"{allocator:9s} {budget:6.2f} {100 * r.param_increase:7.1f}% "
                      f"{100 * r.barrier.accuracy:10.2f}pp {r.barrier.loss:13.3f} {evals:6d} "
                      f"{r.timings['allocation']:8.1f}", flush=True)
                curves.setdefault(allocator, []).append((r.param_increase, r.barrier.accuracy, r.barrier.loss))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for allocator, pts in curves.items():
            axes[0].plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=allocator)
            axes[1].plot([100 * p[0] for p in pts], [p[2] for p in pts], marker="o", label=allocator)
        for ax, name in zip(axes, ("accuracy barrier after REPAIR (pp)", "loss barrier after REPAIR")):
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xlabel("non-zero parameter increase (%)")
            ax.set_ylabel(name)
            ax.legend()
        fig.suptitle(f"{pair}: barrier vs budget by allocator")
        args.plots.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plots / f"budget_{pair}.png", dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
