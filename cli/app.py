"""``hubmerge`` command line: parses, calls the library, reports, exits.

Exit codes: 0 ok, 1 unexpected failure, 2 bad usage, 3 bad input (models, data, files), 4 remote failure.
Errors are one line on stderr (a traceback only with ``--debug``); ``--json`` prints one JSON object on
stdout and nothing else there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from enum import Enum
from inspect import Parameter, signature  # (the `inspect` command below takes the module's name)
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import typer
import yaml

# no rich markup: help texts show "[@revision]" and "train[:2000]" as written
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None)
log = logging.getLogger("hubmerge")


NONE = "none"  # how the command line and --config say None for an optional choice (``--repair none``)


def _cli_type(name: str, annotation: Any) -> Any:
    """The command-line type of a ``MergeOptions`` field: its literal values as choices (plus ``none`` for an
    optional one), a number or flag as itself; ``gamma``'s per-group dict form is for ``--config`` only."""
    args = get_args(annotation)
    optional = type(None) in args
    inner = next(a for a in args if a is not type(None)) if optional else annotation
    if get_origin(inner) is Literal:
        values = [*get_args(inner), *([NONE] if optional else [])]
        return Enum(name.title().replace("_", ""), {v: v for v in values}, type=str)
    if get_origin(annotation) is Union and not optional:  # float or per-group dict: a float here
        return args[0]
    return Optional[inner] if optional else inner


def _with_merge_options(command):
    """Give ``command`` one option per ``MergeOptions`` field, with the field's name, default, help and
    choices, so the command line, ``--config`` and the Python API take the same options and cannot drift
    apart; they reach the command as ``**options`` and are validated by ``MergeOptions`` itself."""
    from hubmerge.options import MergeOptions

    sig = signature(command)
    own = [p for p in sig.parameters.values() if p.kind is not Parameter.VAR_KEYWORD]
    extra = []
    for name, field in MergeOptions.model_fields.items():
        kind = _cli_type(name, field.annotation)
        choice = isinstance(kind, type) and issubclass(kind, Enum)
        flag = f"--{name.replace('_', '-')}"
        decls = [f"{flag}/--no-{name.replace('_', '-')}"] if kind is bool else [flag]
        default = NONE if field.default is None and choice else field.default
        option = typer.Option(default, *decls, help=field.description)
        extra.append(Parameter(name, Parameter.KEYWORD_ONLY, default=option, annotation=kind))
    command.__signature__ = sig.replace(parameters=own + extra)
    return command


def _merge_options(values: dict[str, Any]) -> dict[str, Any]:
    """The ``MergeOptions`` fields among the effective values, ``none`` read as None."""
    from hubmerge.options import MergeOptions

    return {k: None if values[k] == NONE else values[k] for k in MergeOptions.model_fields if k in values}


def _version(value: bool) -> None:
    if value:
        from hubmerge import __version__

        typer.echo(f"hubmerge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print hubmerge's version and exit")) -> None:
    """Partial merging of two independently trained timm models from the Hugging Face hub: aligned units are
    interpolated, poorly matched ones kept side by side, within a size budget. Heavy libraries load only
    when a command starts working, so help and usage errors answer at once."""


def _setup(quiet: bool, json_out: bool) -> None:
    """Progress bars and logging for a command that starts working (this is where heavy imports begin)."""
    import datasets
    from huggingface_hub.utils import disable_progress_bars

    from hubmerge.data import SHOW_PROGRESS

    SHOW_PROGRESS["enabled"] = not quiet
    if quiet or not sys.stderr.isatty():  # the libraries' own bars follow the same rule as ours
        datasets.disable_progress_bars()
        disable_progress_bars()
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING if quiet else logging.INFO,
                        format="%(message)s" if sys.stderr.isatty() else "hubmerge: %(message)s")
    for name in ("datasets", "huggingface_hub"):  # they print through their own handler: passed on to ours
        library = logging.getLogger(name)  # as well, each of their warnings appeared twice
        if library.handlers:
            library.propagate = False


def _fail(exc: BaseException, debug: bool) -> None:
    from hubmerge.errors import HubmergeError

    if debug:
        raise exc
    code = exc.exit_code if isinstance(exc, HubmergeError) else 1
    kind = "" if isinstance(exc, HubmergeError) else f"unexpected {type(exc).__name__}: "
    typer.echo(f"error: {kind}{exc} (rerun with --debug for a traceback)" if not isinstance(exc, HubmergeError)
               else f"error: {exc}", err=True)
    raise typer.Exit(code)


def _effective(ctx: typer.Context, config: Optional[Path], params: dict[str, Any]) -> dict[str, Any]:
    """Options from ``--config`` YAML, overridden by every option given on the command line."""
    from hubmerge.errors import UsageError

    values = dict(params)
    if config is None:
        return values
    try:
        recipe = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read --config {config}: {exc}") from exc
    if not isinstance(recipe, dict):
        raise UsageError(f"--config {config} must hold a mapping of option names to values")
    for key, value in recipe.items():
        name = key.replace("-", "_")
        if name not in values:
            raise UsageError(f"--config {config}: unknown option {key!r}")
        source = ctx.get_parameter_source(name)  # typer vendors click: compare the enum by name
        if source is None or source.name != "COMMANDLINE":
            values[name] = value
    return values


def _device(name: str) -> str:
    if name == "cpu":
        return name
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        from hubmerge.errors import UsageError

        raise UsageError("--device cuda but no CUDA device is available; use --device cpu or auto")
    return name


def _numbers(value: Any, name: str, kind: type) -> tuple | None:
    """``"0.5,0.5,0.5"`` (command line) or a list (``--config``) → a tuple of ``kind``."""
    from hubmerge.errors import UsageError

    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        return tuple(kind(p) for p in parts)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--{name.replace('_', '-')} takes comma-separated numbers, got {value!r}") from exc


def _preprocess(values: dict[str, Any]) -> dict[str, tuple]:
    """The preprocessing fields given on the command line (they replace the endpoint's own)."""
    kinds = {"input_size": int, "mean": float, "std": float}
    given = {k: _numbers(values[k], k, kind) for k, kind in kinds.items()}
    return {k: v for k, v in given.items() if v is not None}


INPUT_SIZE_HELP = "input C,H,W for datasets (default: the endpoint's pretrained_cfg)"
MEAN_HELP = "per-channel normalisation mean, comma-separated (default: the endpoint's pretrained_cfg)"
STD_HELP = "per-channel normalisation std, comma-separated (default: the endpoint's pretrained_cfg)"


def _enum(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


@app.command()
@_with_merge_options
def run(
    ctx: typer.Context,
    model_a: Optional[str] = typer.Argument(None, help="endpoint A: hub id[@revision] or local folder"),
    model_b: Optional[str] = typer.Argument(None, help="endpoint B: hub id[@revision] or local folder"),
    more_models: Optional[list[str]] = typer.Argument(
        None, help="further endpoints: an N-way merge of all of them (MergeMany alignment to endpoint A; "
        "partial with --gamma or --budget, up to N-1; a zip with --align zip, partial with --zip-depth or --budget)"),
    weights: Optional[str] = typer.Option(None, help="N-way merge: the endpoints' weights, comma-separated "
                                                     "(default equal; normalised to sum 1)"),
    calib: Optional[str] = typer.Option(None, help="calibration data: hub dataset id, save_to_disk folder, parquet, image folder"),
    calib_split: str = typer.Option("train", help="split, optionally sliced: train[:2000]"),
    calib_samples: Optional[int] = typer.Option(2000, help="random calibration samples (seeded)"),
    eval: Optional[str] = typer.Option(None, help="evaluation data (same forms as --calib)"),
    eval_split: str = typer.Option("test", help="evaluation split"),
    image_column: Optional[str] = typer.Option(None, help="image column (found automatically if omitted)"),
    label_column: Optional[str] = typer.Option(None, help="label column (found automatically if omitted)"),
    input_size: Optional[str] = typer.Option(None, help=INPUT_SIZE_HELP),
    mean: Optional[str] = typer.Option(None, help=MEAN_HELP),
    std: Optional[str] = typer.Option(None, help=STD_HELP),
    out: Optional[Path] = typer.Option(None, help="write the merged repo folder here"),
    overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
    push: bool = typer.Option(False, help="upload the result to the hub"),
    repo_id: Optional[str] = typer.Option(None, help="target repo (default: <user>/<a>-<b>-hubmerge)"),
    private: bool = typer.Option(False, help="create the repo private"),
    revision: Optional[str] = typer.Option(None, help="branch to push to"),
    config: Optional[Path] = typer.Option(None, help="YAML recipe with the same option names"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON report on stdout"),
    quiet: bool = typer.Option(False, help="no progress bars or info logs"),
    debug: bool = typer.Option(False, help="show tracebacks"),
    **merge_options: Any,
) -> None:
    """Merge two or more endpoints, fully or partially, write a loadable repo folder and/or push it.
    Every merge option (``MergeOptions``) is an option here and a key in ``--config``, by the same name."""
    try:
        from hubmerge.errors import UsageError
        from hubmerge.options import MergeOptions
        from hubmerge.output import check_out

        params = {k: _enum(v) for k, v in ctx.params.items()}
        values = _effective(ctx, config, {k: v for k, v in params.items() if k != "config"})
        if not values["model_a"] or not values["model_b"]:
            raise UsageError("give two endpoints: hubmerge run MODEL_A MODEL_B (or model_a/model_b in --config)")
        if values["out"] is None and not values["push"]:
            raise UsageError("say where the result goes: --out DIR, --push, or both")
        options = _merge_options(values)
        # usage errors before torch loads: the options, and an --out that must not be touched
        more = tuple(values["more_models"] or ())
        MergeOptions.parse(**options).check_budget(2 + len(more))
        out = Path(values["out"]) if values["out"] else None
        inputs = tuple(v for v in (values["model_a"], values["model_b"], *more, values["calib"], values["eval"]) if v)
        check_out(out, values["overwrite"], inputs)
        _setup(quiet or os.environ.get("RANK", "0") != "0", json_out)  # under torchrun, rank 0 logs
        from hubmerge.release import DataRef, run as run_merge

        recipe = {k: v for k, v in values.items() if k not in ("json_out", "quiet", "debug", "overwrite")}
        recipe["out"] = str(recipe["out"]) if recipe["out"] else None
        calib_ref = values["calib"] and DataRef(values["calib"], values["calib_split"], values["calib_samples"],
                                                values["image_column"], values["label_column"])
        eval_ref = values["eval"] and DataRef(values["eval"], values["eval_split"], None, values["image_column"],
                                              values["label_column"])
        recipe["more_models"] = list(more) or None
        result = run_merge(
            values["model_a"], values["model_b"], *more, weights=_numbers(values["weights"], "weights", float),
            calib=calib_ref or None, evaluation=eval_ref or None,
            out=out, overwrite=values["overwrite"], push=values["push"],
            repo_id=values["repo_id"], private=values["private"], revision=values["revision"], recipe=recipe,
            preprocess=_preprocess(values), **{**options, "device": _device(options["device"])},
        )
    except Exception as exc:  # noqa: BLE001 - the CLI's one place that turns errors into exit codes
        _fail(exc, debug)
    if not result.main:  # under torchrun, rank 0 reports for every process
        return
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
        return
    _print_report(result)


def _print_report(result) -> None:
    r = result.report
    if r.metrics:
        tasks = [t["name"] for t in r.tasks]  # separate tasks: each on its own samples and outputs
        typer.echo(f"{'model':20s} {'accuracy':>9s} {'loss':>8s}" + "".join(f" {'task ' + t:>9s}" for t in tasks))
        for name, m in r.metrics.items():
            per_task = "".join(f" {100 * m.tasks[t].accuracy:8.2f}%" if t in m.tasks else f" {'':9s}" for t in tasks)
            typer.echo(f"{name:20s} {100 * m.accuracy:8.2f}% {m.loss:8.4f}{per_task}")
        typer.echo(f"barrier: {100 * r.barrier.accuracy:.2f} pp accuracy, {r.barrier.loss:.4f} loss")
    typer.echo(f"size: +{100 * r.param_increase:.1f}% parameters, +{100 * r.flop_increase:.1f}% FLOPs "
               f"over one endpoint ({r.endpoint_params:,} parameters)")
    if result.output:
        typer.echo(f"written to {result.output}")
    if result.repo_url:
        typer.echo(f"pushed: {result.repo_url}")


def _load_any(ref: str):
    """A merged repo (has ``partition`` in its config) or an endpoint."""
    from hubmerge import PartialMergedModel
    from hubmerge.hub import CONFIG, load_endpoint, read_config, resolve

    config = read_config(resolve(ref, patterns=[CONFIG]))
    if "partition" in config:
        return PartialMergedModel.from_pretrained(ref)
    return load_endpoint(ref).model


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="endpoint or merged model: hub id[@revision] or folder"),
    data: str = typer.Option(..., help="dataset: hub id, save_to_disk folder, parquet, image folder"),
    split: str = typer.Option("test"),
    samples: Optional[int] = typer.Option(None, help="random subset size (seeded)"),
    seed: int = typer.Option(0),
    input_size: Optional[str] = typer.Option(None, help=INPUT_SIZE_HELP.replace("endpoint", "model")),
    mean: Optional[str] = typer.Option(None, help=MEAN_HELP.replace("endpoint", "model")),
    std: Optional[str] = typer.Option(None, help=STD_HELP.replace("endpoint", "model")),
    json_out: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False),
    debug: bool = typer.Option(False),
) -> None:
    """Accuracy and cross-entropy of an endpoint or a merged model (and per task, for a merge of separate
    tasks: labels index its joint outputs, each task's accuracy is on its samples and its own outputs)."""
    _setup(quiet, json_out)
    try:
        from hubmerge.data import HFImages, Preprocess, load_dataset_ref
        from hubmerge.evaluate import evaluate

        net = _load_any(model)
        pre = Preprocess.from_model(net, **_preprocess(dict(input_size=input_size, mean=mean, std=std)))
        ds = HFImages(load_dataset_ref(data, split, samples, seed), pre)
        metrics = evaluate(net, ds, progress="evaluating")
    except Exception as exc:  # noqa: BLE001
        _fail(exc, debug)
    if json_out:
        typer.echo(json.dumps({"model": model, **dataclasses.asdict(metrics)}))
        return
    typer.echo(f"{model}: accuracy {100 * metrics.accuracy:.2f}%, loss {metrics.loss:.4f} "
               f"({metrics.samples} samples)")
    for task, m in metrics.tasks.items():
        typer.echo(f"  task {task}: accuracy {100 * m.accuracy:.2f}%, loss {m.loss:.4f} ({m.samples} samples)")


@app.command()
def inspect(
    model: str = typer.Argument(..., help="endpoint or merged model: hub id[@revision] or folder"),
    json_out: bool = typer.Option(False, "--json"),
    debug: bool = typer.Option(False),
) -> None:
    """Architecture family and permutation groups; for a merged model its partition and costs."""
    _setup(True, json_out)
    try:
        from hubmerge import PartialMergedModel
        from hubmerge.arch_specs import spec_for
        from hubmerge.cost import CostModel

        net = _load_any(model)
        merged = isinstance(net, PartialMergedModel)
        spec = net.spec if merged else spec_for(net)
        info = {"model": model, "family": spec.family, "support": spec.support,
                "partial_merging": spec.partial is None, "partial_unavailable_because": spec.partial, "groups": []}
        for g, grp in spec.groups.items():
            touched = list(dict.fromkeys(n for n, _ in spec.group_axes(g)))
            info["groups"].append({"name": g, "width": grp.width, "normalised": grp.normalised,
                                   "ordered": grp.ordered,  # a rotary embedding pairs its units by position
                                   "parameters": touched, "cannot_widen_because": spec.fixed.get(g)})
        info["attention"] = [{"module": h.module, "heads": [list(head) for head in h.heads],
                              "tables": [key for key, _ in h.tables]} for h in spec.heads]
        info["tied"] = [list(tie) for tie in spec.ties]  # a grouped conv's blocks, widened alike
        # layers run along another axis (token MLPs), one copy per section of the groups passing them by
        info["across"] = [{"layer": a.layer, "groups": [s.group for s in a.axis]} for a in spec.across]
        info["layers"] = [layer.name for layer in spec.layers]  # forward order: what zip_depth counts
        if merged:
            for row, h in zip(info["attention"], spec.heads):
                row["heads_apart"] = h.apart(net.partition)
            costs = CostModel(spec, net.net, tuple(net.input_size or net.pretrained_cfg["input_size"]))
            report = costs(net.partition)
            for row in info["groups"]:
                row["partition"] = list(net.partition[row["name"]])
                row["params"] = report.groups[row["name"]].params
                row["flops"] = report.groups[row["name"]].flops
            info["increase"] = costs.increase(net.partition)
            info["endpoints"] = net.endpoints
            info["tasks"] = [{**t.to_dict(), "outputs": t.span} for t in net.tasks or ()]
    except Exception as exc:  # noqa: BLE001
        _fail(exc, debug)
    if json_out:
        typer.echo(json.dumps(info))
        return
    fixed = sum(row["cannot_widen_because"] is not None for row in info["groups"])
    support = {"partial": "partial merges and budgets" + (f", {fixed} of the groups keep their width (marked *)"
                                                         if fixed else ""),
               "some": f"partial merges and budgets, {fixed} of the groups always merged (marked *)",
               "full": f"full merges only (partial merging needs: {info['partial_unavailable_because']})"}
    typer.echo(f"{model}: family {info['family']}, {len(info['groups'])} groups; {support[info['support']]}")
    for row in info["groups"]:
        part = f"  A-only/shared/B-only {row['partition']}  params {row['params']:,}" if merged else ""
        why = f"  * {row['cannot_widen_because']}" if row["cannot_widen_because"] else \
            "  (units in order: a rotary embedding pairs them by position)" if row["ordered"] else ""
        typer.echo(f"  {row['name']:28s} width {row['width']:5d}{part}  ({len(row['parameters'])} tensors: "
                   f"{', '.join(row['parameters'][:3])}{', …' if len(row['parameters']) > 3 else ''}){why}")
    for row in info["attention"]:
        apart = f"; {row['heads_apart']} kept apart, so the merge runs {len(row['heads']) + row['heads_apart']}" \
            if merged else ""
        shown = ", ".join("/".join(head) for head in row["heads"][:2]) + (", …" if len(row["heads"]) > 2 else "")
        tables = f"; per-head table {', '.join(row['tables'])}" if row["tables"] else ""
        typer.echo(f"  attention {row['module']}: {len(row['heads'])} heads (q/k and v groups {shown}), each merged "
                   f"or kept apart whole{apart}{tables}")
    for tie in info["tied"]:
        typer.echo(f"  grouped conv blocks {tie[0]} … {tie[-1]} ({len(tie)} groups): widened alike")
    for row in info["across"]:
        typer.echo(f"  {row['layer']} runs along another axis: one copy per section of {', '.join(row['groups'])}")
    if info["layers"]:
        typer.echo("layers in forward order (--zip-depth N zips the groups the first N write): "
                   + ", ".join(f"{i} {name}" for i, name in enumerate(info["layers"])))
    if merged:
        inc = info["increase"]
        typer.echo(f"increase over one endpoint: +{100 * inc['params']:.1f}% parameters, +{100 * inc['flops']:.1f}% FLOPs")
        for t in info["tasks"]:
            typer.echo(f"task {t['name']}: outputs {t['outputs']} ({t['classes']} classes)")


@app.command()
def archs(
    derive: bool = typer.Option(False, "--derive", help="trace each family's tiny model now and show what its "
                                "derived spec supports, and why not more (about 15 s on 2 CPU cores)"),
    json_out: bool = typer.Option(False, "--json"),
    debug: bool = typer.Option(False),
) -> None:
    """Tested architecture families and how far each is supported: partial merges and budgets (of every group,
    or of some, the others always merged), or full merges (any other timm model is traced too: ``hubmerge
    inspect MODEL`` shows what it supports). The table is what the family test checks; ``--derive`` derives it
    again from the tracer."""
    rows = []
    try:
        from hubmerge.arch_specs import families

        for name, fam in families().items():
            row = {"family": name, "architecture": fam.architecture, "model_args": fam.model_args,
                   "support": fam.support}
            if derive:
                from hubmerge.arch_specs import build_model, spec_for

                spec = spec_for(build_model(fam.architecture, {**fam.model_args, "num_classes": 10}), fam.input_size)
                copied = spec.copied()
                row.update(derived=spec.support, why_not_partial=spec.partial or next(
                    (why for g, why in spec.fixed.items() if g not in copied), None))
            rows.append(row)
    except Exception as exc:  # noqa: BLE001
        _fail(exc, debug)
    if json_out:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        level = {"partial": "partial merges, budgets", "some": "partial (some groups)",
                 "full": "full merges"}[row.get("derived", row["support"])]
        why = f"  ({row['why_not_partial']})" if row.get("why_not_partial") else ""
        typer.echo(f"{row['family']:14s} {level:24s} tested on {row['architecture']} {row['model_args'] or ''}{why}")
    mismatch = [r["family"] for r in rows if "derived" in r and r["derived"] != r["support"]]
    if mismatch:
        typer.echo(f"error: derived support differs from the tested table for {mismatch}", err=True)
        raise typer.Exit(1)


@app.command("demo-data")
def demo_data(
    folder: Path = typer.Argument(Path("runs/demo"), help="where endpoints and data go"),
    dataset: str = typer.Option("digits", help="digits (ships with scikit-learn) or fashion-mnist (Debian package)"),
    epochs: int = typer.Option(20, help="training epochs per endpoint"),
    quiet: bool = typer.Option(False),
    debug: bool = typer.Option(False),
) -> None:
    """Train (or reuse) two example MLP endpoints from different seeds on real offline data, and write
    calibration and test sets as datasets folders, ready for `hubmerge run`."""
    _setup(quiet, False)
    try:
        from hubmerge.demo import prepare

        paths = prepare(folder, dataset, epochs)
    except Exception as exc:  # noqa: BLE001
        _fail(exc, debug)
    typer.echo(f"endpoints: {paths['a']} {paths['b']}\ncalibration: {paths['calib']}\ntest: {paths['test']}")


def main() -> None:
    app()
