"""Issue "defaults": the merge settings compared on a panel of endpoint pairs, not on one.

Pairs (Fashion-MNIST, trained here reproducibly and cached): VGG11 ×0.25 with BatchNorm (two seeds); ResNet20
with BatchNorm from two seeds, on disjoint class halves (A sees classes 0-4, B 5-9, both with 10-way heads)
and on a biased split (A sees 80% of classes 0-4 and 20% of 5-9, B the rest); an MLP (3 × 256) with and
without BatchNorm; a small ConvNeXt (LayerNorm streams, layer scale 1) and a small ViT (LayerNorm, heads).

Settings: the REPAIR variant (``repair``, ``reset``, and ``reset_repair`` where it differs from ``reset``:
some layer no BatchNorm reads), ``repair_unmerged``, the ``cross`` rule and the correlation estimator, at the
full merge and at budgets 0.05 / 0.1 / 0.22 with the benefit allocator. Settings without meaning for a pair
are left out (RESET without BatchNorm); at the full merge ``cross`` and ``repair_unmerged`` change nothing,
so those settings share one measurement. Prints, per pair, the accuracy / loss barrier on held-out data of
every setting, then each setting's mean rank per kind of model (with and without BatchNorm) over pairs and
budgets. Results are kept in ``--results`` (JSON), so an interrupted run continues where it stopped.

    python examples/panel.py
    python examples/panel.py --pairs mlp mlp-bn --budgets 0.1
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

import hubmerge
from hubmerge import demo
from hubmerge.arch_specs import spec_for
from hubmerge.evaluate import Ensemble, barrier, evaluate
from hubmerge.hub import load_endpoint
from hubmerge.repair import has_batchnorm

from budget import PAIRS as BUDGET_PAIRS  # examples/ is on the path of a script run from it

VGG = dict(width_multiplier=0.25, in_chans=1, img_size=32, num_classes=10)
RESNET = dict(width_multiplier=1, in_chans=1, num_classes=10)
MLP = dict(depth=3, width=256, in_chans=1, img_size=28, num_classes=10)


@dataclass(frozen=True)
class Pair:
    architecture: str
    model_args: dict
    # seeds: both on all data; classes: disjoint class halves (10-way heads); tasks: the same halves, each endpoint
    # with a 5-way head of its own classes (B's labels 0-4 are classes 5-9); tasks3: three endpoints on classes
    # 0-2, 3-5, 6-8 with 3-way heads; biased: 80/20 class mix
    split: str = "seeds"

    @property
    def img_size(self) -> int:
        return self.model_args.get("img_size", 32)


PAIRS = {
    "vgg-seeds": Pair("hubmerge_vgg11", VGG),
    "resnet-seeds": Pair("hubmerge_resnet20", RESNET),
    "resnet-classes": Pair("hubmerge_resnet20", RESNET, "classes"),
    "resnet-biased": Pair("hubmerge_resnet20", RESNET, "biased"),
    "mlp-bn": Pair("hubmerge_mlp", {**MLP, "bn": True}),
    "mlp": Pair("hubmerge_mlp", {**MLP, "bn": False}),
    # the pairs of examples/budget.py (its ConvNeXt with layer scales starting at 1)
    "convnext-seeds": Pair(*BUDGET_PAIRS["convnext-ls1-seeds"][:2]),
    "vit-seeds": Pair(*BUDGET_PAIRS["vit-seeds"][:2]),
}


@dataclass(frozen=True)
class Setting:
    name: str
    options: dict = field(default_factory=dict)

    def key(self, budget: float | None) -> str:
        """The results entry of this setting at ``budget`` (None: the full merge, which depends only on the
        REPAIR variant and the estimator: at γ=0 no unit is unmerged and no cross block exists)."""
        if budget is not None:
            return f"{self.name} @ {budget}"
        return json.dumps({k: v for k, v in self.options.items() if k in ("repair", "correlation")},
                          sort_keys=True) + " full"


def settings(has_bn: bool, reset_differs: bool) -> list[Setting]:
    """The settings that mean something for a pair: the REPAIR variants × ``repair_unmerged`` × ``cross``, and
    the thesis code's correlation estimator with each REPAIR variant at the other defaults."""
    repairs = ["repair"] + (["reset"] if has_bn else []) + (["reset_repair"] if reset_differs else [])
    out = []
    for repair in repairs:
        for cross in ("fill", "interpolate"):
            for unmerged in ((True, False) if repair != "reset" else (True,)):  # RESET re-estimates every unit
                name = f"{repair}, {cross}" + ("" if unmerged or repair == "reset" else ", shared only")
                out.append(Setting(name, dict(repair=repair, cross=cross, repair_unmerged=unmerged)))
        out.append(Setting(f"{repair}, fill, batch corr", dict(repair=repair, correlation="batch")))
    return out


# the disjoint class ranges of the splits whose endpoints have heads of their own (separate tasks: each endpoint's
# labels count from its range's first class); "tasks3" leaves class 9 out, so that the three heads are 3-way alike
TASK_CLASSES = {"tasks": ((0, 5), (5, 10)), "tasks3": ((0, 3), (3, 6), (6, 9))}


def split(train: torch.utils.data.TensorDataset, kind: str, seed: int = 0):
    """The training sets of a pair's endpoints (None: every endpoint trains on all of ``train``)."""
    if kind == "seeds":
        return None
    x, y = train.tensors
    if kind in TASK_CLASSES:
        return tuple(demo.TensorDataset(x[(y >= lo) & (y < hi)], y[(y >= lo) & (y < hi)] - lo)
                     for lo, hi in TASK_CLASSES[kind])
    low = y < 5
    if kind == "classes":
        return demo.TensorDataset(x[low], y[low]), demo.TensorDataset(x[~low], y[~low])
    # biased: each sample goes to A with probability 0.8 for classes 0-4 and 0.2 for 5-9, else to B
    to_a = torch.rand(len(y), generator=torch.Generator().manual_seed(seed)) < torch.where(low, 0.8, 0.2)
    return demo.TensorDataset(x[to_a], y[to_a]), demo.TensorDataset(x[~to_a], y[~to_a])


def reset_differs(model: torch.nn.Module, input_size: tuple[int, ...]) -> bool:
    """Whether ``reset_repair`` corrects some layer that ``reset`` leaves alone (a hidden layer no BatchNorm
    reads); otherwise the two are the same merge."""
    spec = spec_for(model, input_size)
    outputs = spec.layers if spec.partial is None else spec.outputs  # as repair.corrections reads them
    return has_batchnorm(model) and any(o.norm is None for o in outputs[:-1])


def measure(a, b, calib, evaluation, ma, mb, options: dict) -> dict:
    t0 = time.perf_counter()
    result = hubmerge.merge(a, b, calib, **options)
    seconds = time.perf_counter() - t0
    met = evaluate(result.model, evaluation)
    bar = barrier(ma, mb, met)
    return dict(accuracy=met.accuracy, loss=met.loss, barrier_accuracy=bar.accuracy, barrier_loss=bar.loss,
                increase=result.report.param_increase, seconds=seconds)


def parser(doc: str, results: str, pairs: list[str], choices: list[str]) -> argparse.ArgumentParser:
    """The arguments every Fashion-MNIST experiment of examples/ takes: which pairs, the data sizes, where the
    trained endpoints and the results are kept."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--pairs", nargs="+", default=pairs, choices=choices)
    ap.add_argument("--train-samples", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--calib-samples", type=int, default=500)
    ap.add_argument("--eval-samples", type=int, default=5000)
    ap.add_argument("--cache", type=Path, default=Path("examples/out/endpoints"))
    ap.add_argument("--results", type=Path, default=Path(f"examples/out/{results}"))
    return ap


def load_results(args: argparse.Namespace) -> dict:
    """The results measured so far, keyed by the data settings: a run with other settings is refused rather
    than mixed in."""
    run = {k: getattr(args, k) for k in ("train_samples", "epochs", "calib_samples", "eval_samples")}
    done = json.loads(args.results.read_text()) if args.results.is_file() else {"run": run}
    if done.get("run") != run:  # cells measured on other data must not mix with these
        raise SystemExit(f"{args.results} holds results measured with {done.get('run')}, not {run}: "
                         "pass another --results")
    return done


def save_results(args: argparse.Namespace, done: dict) -> None:
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(done, indent=1))


@functools.lru_cache(maxsize=None)
def _data(img_size: int, train_samples: int, eval_samples: int):
    train = demo.subset(demo.load("fashion-mnist", "train", img_size), train_samples)
    return train, demo.subset(demo.load("fashion-mnist", "test", img_size), eval_samples, seed=2)


def each_pair(args: argparse.Namespace, pairs: dict[str, Pair] = PAIRS):
    """For every pair of ``--pairs`` (names in ``pairs``): (name, pair, training set, evaluation set, calibration
    subset of the training set), the data at the pair's image size."""
    for name in args.pairs:
        pair = pairs[name]
        train, evaluation = _data(pair.img_size, args.train_samples, args.eval_samples)
        yield name, pair, train, evaluation, demo.subset(train, args.calib_samples, seed=1)


def trained(pair: Pair, train, args: argparse.Namespace, seeds: tuple[int, ...] = (0, 1)) -> list[torch.nn.Module]:
    """The pair's endpoints from ``seeds`` (trained on its split of ``train`` and cached, once): two, or one per
    training set of the split."""
    tag = f"-fashion-mnist{'' if pair.split == 'seeds' else '-' + pair.split}-{demo.args_tag(pair.model_args)}"
    folders = demo.endpoints(pair.architecture, pair.model_args, train, args.cache, seeds=seeds, epochs=args.epochs,
                             tag=tag, train_sets=split(train, pair.split))
    return [load_endpoint(str(f)).model for f in folders]


def main() -> None:
    ap = parser(__doc__, "panel.json", list(PAIRS), list(PAIRS))
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.22])
    args = ap.parse_args()
    done = load_results(args)
    for name, pair, train, evaluation, calib in each_pair(args):
        a, b = trained(pair, train, args)
        ma, mb = evaluate(a, evaluation), evaluate(b, evaluation)
        cells = done.setdefault(name, {})
        cells["endpoints"] = dict(a=ma.accuracy, b=mb.accuracy, bn=has_batchnorm(a))
        cells["ensemble"] = asdict(barrier(ma, mb, evaluate(Ensemble(a, b), evaluation)))
        ens = cells["ensemble"]
        print(f"\n== {name}: {pair.architecture} ({pair.split}), A {100 * ma.accuracy:.2f}%, "
              f"B {100 * mb.accuracy:.2f}%, ensemble barrier {100 * ens['accuracy']:.2f} pp / {ens['loss']:.3f}\n",
              flush=True)
        chosen = settings(has_batchnorm(a), reset_differs(a, tuple(calib.tensors[0].shape[1:])))
        for setting in chosen:
            for budget in [None, *args.budgets]:
                key = setting.key(budget)
                if key not in cells:
                    opts = dict(setting.options, gamma=0.0) if budget is None else dict(setting.options, budget=budget)
                    cells[key] = measure(a, b, calib, evaluation, ma, mb, opts)
                    save_results(args, done)
        report(name, chosen, args.budgets, cells)
    summary({n: done[n] for n in args.pairs}, args.budgets)


def cell(cells: dict, setting: Setting, budget: float | None) -> dict:
    return cells[setting.key(budget)]


def report(name: str, chosen: list[Setting], budgets: list[float], cells: dict) -> None:
    """One pair's table (markdown): accuracy barrier (pp) / loss barrier per setting and budget (full = full
    merge)."""
    heads = ["full merge"] + [f"benefit {b:g}" for b in budgets]
    print("| setting | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    for s in chosen:
        row = [cell(cells, s, b) for b in [None, *budgets]]
        print(f"| {s.name} | " + " | ".join(f"{100 * c['barrier_accuracy']:.2f} pp / {c['barrier_loss']:.3f}"
                                           for c in row) + " |", flush=True)


def summary(results: dict, budgets: list[float]) -> None:
    """Mean rank of every setting (1 = lowest barrier) per kind of model, over its pairs and the budgets, by
    accuracy and by loss barrier; ties share their mean rank."""
    for kind, bn in (("with BatchNorm", True), ("without BatchNorm", False)):
        pairs = {n: c for n, c in results.items() if c["endpoints"]["bn"] == bn}
        if not pairs:
            continue
        ranks: dict[str, dict[str, list[float]]] = {}
        for cells in pairs.values():
            names = sorted({k.split(" @ ")[0] for k in cells if " @ " in k})
            chosen = [s for s in settings(True, True) if s.name in names]
            for budget in [None, *budgets]:
                for measure_ in ("barrier_accuracy", "barrier_loss"):
                    values = [cell(cells, s, budget)[measure_] for s in chosen]
                    for s, r in zip(chosen, rankdata(values)):
                        ranks.setdefault(s.name, {}).setdefault(measure_, []).append(float(r))
                for s in chosen:
                    ranks[s.name].setdefault("accuracy barriers", []).append(cell(cells, s, budget)["barrier_accuracy"])
        print(f"\n== mean rank, models {kind} ({', '.join(pairs)}; full merge and budgets "
              f"{', '.join(f'{b:g}' for b in budgets)})\n")
        # the mean of loss barriers is left out: a pair trained on disjoint classes has losses 20x the others'
        print("| setting | mean rank, accuracy barrier | mean rank, loss barrier | mean accuracy barrier | cells |\n"
              "|---|---|---|---|---|")
        for s, r in sorted(ranks.items(), key=lambda kv: np.mean(kv[1]["barrier_accuracy"])):
            print(f"| {s} | {np.mean(r['barrier_accuracy']):.2f} | {np.mean(r['barrier_loss']):.2f} | "
                  f"{100 * np.mean(r['accuracy barriers']):.2f} pp | {len(r['barrier_loss'])} |")


if __name__ == "__main__":
    main()
