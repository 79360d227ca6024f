"""The hub pipeline: pull the endpoints, calibrate from ``datasets``, merge, write a repo folder, push once.

``hubmerge run`` is a thin shell over :func:`run`; a release pipeline can call it from Python with the same
names. Everything that can be checked without downloads (options, token, output folder, data presence) is
checked first; the result is staged in a temporary folder and only then moved into place or uploaded in
one commit, so no half-written folder or repo is ever left behind (the output folder's guard and its
replacement by rename are :mod:`hubmerge.output`).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from . import card
from .api import MergeReport, merge, merge_many
from .data import HFImages, Preprocess, check_request, load_dataset_ref
from .distributed import is_main, session
from .errors import UsageError
from .partial import endpoint_names
from .hub import load_endpoint, remote_errors, split_revision
from .options import MergeOptions
from .output import check_out, move_into_place, recover, staging_for, usual_permissions
from .partitioned import PartialMergedModel


@dataclass
class RunResult:
    """The merge, its report, and where rank 0 of a process group (or the only process) put it; ``main`` is
    False in the other processes, which write nothing."""

    model: PartialMergedModel
    report: MergeReport
    output: Path | None
    repo_url: str | None
    main: bool = True

    def to_dict(self) -> dict:
        return {"report": self.report.to_dict(), "output": str(self.output) if self.output else None,
                "repo_url": self.repo_url}


@dataclass(frozen=True)
class DataRef:
    """Where calibration or evaluation data comes from."""

    ref: str
    split: str = "train"
    samples: int | None = None
    image_column: str | None = None
    label_column: str | None = None


def _recipe(refs: tuple[str, ...], weights: tuple[float, ...] | None, calib: DataRef | None,
            evaluation: DataRef | None, out: Path | None, opts: MergeOptions) -> dict:
    """The recipe of a merge made from Python, in ``hubmerge run --config`` names (what the CLI records)."""
    data: dict[str, Any] = {}
    if calib is not None:
        data.update(calib=calib.ref, calib_split=calib.split, calib_samples=calib.samples)
    if evaluation is not None:
        data.update(eval=evaluation.ref, eval_split=evaluation.split)
    if calib or evaluation:
        data.update(image_column=(calib or evaluation).image_column, label_column=(calib or evaluation).label_column)
    a, b, *more = refs
    return {"model_a": a, "model_b": b, "more_models": more or None, "weights": list(weights) if weights else None,
            **data, "out": str(out) if out else None, **opts.model_dump(mode="json")}


def _resolvable(recipe: dict) -> dict:
    """The recipe with local folders as absolute paths, so it reruns from any working folder."""
    def resolve(key: str, value: Any) -> Any:
        if isinstance(value, list):
            return [resolve(key, v) for v in value]
        local = isinstance(value, str) and (key == "out" or Path(value).expanduser().exists())
        return str(Path(value).expanduser().resolve()) if local else value

    keys = ("model_a", "model_b", "more_models", "calib", "eval", "out")
    return {k: resolve(k, v) if k in keys else v for k, v in recipe.items()}


def _token(push: bool, token: str | None) -> str | None:
    token = token or get_token()
    if push and not token:
        raise UsageError("pushing needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def _dataset(ref: DataRef | None, preprocess: Preprocess, seed: int) -> HFImages | None:
    if ref is None:
        return None
    ds = load_dataset_ref(ref.ref, ref.split, ref.samples, seed)
    return HFImages(ds, preprocess, ref.image_column, ref.label_column)


def _default_repo(api: HfApi, refs: tuple[str, ...], token: str) -> str:
    with remote_errors("who am I (for the default repo name)"):
        user = api.whoami(token=token)["name"]
    name = "-".join(Path(split_revision(x)[0]).name for x in refs)
    return f"{user}/{name}-hubmerge"


def run(a: str, b: str, *more: str, weights: tuple[float, ...] | None = None, calib: DataRef | None = None,
        evaluation: DataRef | None = None,
        out: Path | None = None, overwrite: bool = False, push: bool = False, repo_id: str | None = None,
        private: bool = False, revision: str | None = None, token: str | None = None,
        model_class: type | None = None, recipe: dict | None = None, preprocess: dict | None = None,
        options: MergeOptions | None = None, **overrides: Any) -> RunResult:
    """Merge endpoints ``a`` and ``b`` (hub ids, ``id@revision`` or local folders) and write/push the result;
    with ``more`` endpoints, the N-way merge of all of them (:func:`~hubmerge.api.merge_many`, weighted by
    ``weights``, default equal; partial where ``gamma`` > 0).

    ``options``: a :class:`~hubmerge.options.MergeOptions`, and/or its fields as keywords (which win).
    ``recipe`` is the effective recipe to embed in the card (the CLI passes its merged command line and
    ``--config``; from Python it is built from these arguments); ``preprocess`` replaces fields
    (``input_size``, ``mean``, ``std``) of endpoint A's ``pretrained_cfg`` for the datasets, and is recorded
    in the merged model.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the processes join one process group, split every pass over the
    data between them (:mod:`hubmerge.distributed`) and compute the same merge; rank 0 writes and pushes
    it, the others return it with no ``output`` or ``repo_url``.
    """
    opts = MergeOptions.combine(options, overrides)
    opts.check_budget(2 + len(more))
    if repo_id is not None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            raise UsageError(f"--repo-id {repo_id!r} is not a hub repo id (user/name): {exc}") from None
    for ref in (calib, evaluation):
        if ref is not None:  # split syntax and sample counts, before any download
            check_request(ref.split, ref.samples)
    token = _token(push, token)
    if weights is not None and not more:
        raise UsageError("--weights weigh the endpoints of an N-way merge (three or more); two endpoints weigh "
                         "1-alpha and alpha: use --alpha")
    check_out(out, overwrite, (a, b, *more, *(d.ref for d in (calib, evaluation) if d)))
    if calib is None and opts.needs_data:
        raise UsageError("this merge needs calibration data (--calib): activation matching, REPAIR and budget "
                         "allocation measure activations; use --align weight --repair none for a data-free merge")
    with session(opts.device) as device:
        return _run((a, b, *more), weights, calib, evaluation, out, push, repo_id, private, revision, token,
                    model_class, recipe, preprocess, opts.model_copy(update={"device": device}))


def _run(refs: tuple[str, ...], weights: tuple[float, ...] | None, calib: DataRef | None,
         evaluation: DataRef | None, out: Path | None, push: bool, repo_id: str | None, private: bool,
         revision: str | None, token: str | None, model_class: type | None, recipe: dict | None,
         preprocess: dict | None, opts: MergeOptions) -> RunResult:
    """:func:`run` after its checks, in this process of a process group (or alone): every process merges,
    one writes and pushes."""
    main = is_main()
    if out is not None and main:
        recover(out)
    api = HfApi(token=token)
    if push and repo_id is None and main:
        repo_id = _default_repo(api, refs, token)
    t0 = time.perf_counter()
    loaded = [load_endpoint(r, token=token, device=opts.device, model_class=model_class) for r in refs]
    download_s = time.perf_counter() - t0
    pre = Preprocess.from_model(loaded[0].model, **(preprocess or {}))
    data = dict(evaluation=_dataset(evaluation, pre, opts.seed), preprocess=pre,
                endpoints={k: e.describe() for k, e in zip(endpoint_names(len(loaded)), loaded)},
                **opts.model_dump())
    if len(loaded) > 2:
        result = merge_many([e.model for e in loaded], _dataset(calib, pre, opts.seed), weights=weights, **data)
    else:
        result = merge(loaded[0].model, loaded[1].model, _dataset(calib, pre, opts.seed), **data)
    result.report.timings["download"] = download_s
    if not main:  # the other processes computed the same merge
        return RunResult(result.model, result.report, None, None, main=False)
    staging = staging_for(out)
    try:
        result.model.save_pretrained(staging)
        card.write(staging, result.model, result.report,
                   repo_id=repo_id or str(out.expanduser().resolve() if out else "path/to/folder"),
                   recipe=_resolvable(recipe or _recipe(refs, weights, calib, evaluation, out, opts)),
                   datasets=tuple(d.ref for d in (calib, evaluation) if d),
                   evaluation=evaluation.ref if evaluation else None,
                   licenses=tuple(e.model.pretrained_cfg.get("license") for e in loaded))
        usual_permissions(staging)
        url = None
        if push:
            t1 = time.perf_counter()
            url = _push(api, staging, repo_id, private=private, revision=revision, report=result.report, refs=refs)
            result.report.timings["upload"] = time.perf_counter() - t1
        if out is not None:
            move_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return RunResult(result.model, result.report, out, url)


def _push(api: HfApi, folder: Path, repo_id: str, *, private: bool, revision: str | None, report: MergeReport,
          refs: tuple[str, ...]) -> str:
    """Create the repo (and branch) and upload the staged folder in one commit."""
    o = report.options
    names = ", ".join(refs[:-1]) + f" and {refs[-1]}"
    if o["align"] == "zip":
        kind = f"{len(refs)}-way zipped" if len(refs) > 2 else "zipped"
        message = f"hubmerge: {kind} merge of {names}, zip_beta {o['zip_beta']}"
    else:
        how = f"budget {o['budget']} ({o['allocator']})" if o["budget"] is not None else f"gamma {o['gamma']}"
        kind = f"{len(refs)}-way" if len(refs) > 2 else "partial"
        message = f"hubmerge: {kind} merge of {names}, {how}, +{100 * report.param_increase:.1f}% params"
    with remote_errors(f"pushing to {repo_id}"):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision, commit_message=message)
    return str(getattr(info, "commit_url", info))
