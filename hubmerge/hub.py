"""Hub I/O: resolve repos (hub id[@revision] or local folder) with huggingface_hub, load safetensors only.

All network access goes through huggingface_hub (``snapshot_download``), so the standard cache,
``HF_TOKEN``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` apply. Its exceptions become hubmerge errors that say
what to do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from huggingface_hub import snapshot_download
from huggingface_hub.utils import validate_repo_id

try:  # the HTTP client of huggingface_hub 2.x, whose connection errors are not OSErrors
    from httpx2 import TransportError
except ImportError:  # huggingface_hub 1.x
    from httpx import TransportError
from huggingface_hub import errors as hf_errors

from . import __version__
from .arch_specs import build_model
from .errors import CheckpointError, RemoteError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
DEFAULT_TIMEOUT_S = 10.0  # an unreachable endpoint fails within seconds instead of hanging


@dataclass(frozen=True)
class Resolved:
    """A repo materialised on disk: where, and which commit it was (None for a local folder)."""

    folder: Path
    repo_id: str
    revision: str | None
    commit: str | None


def split_revision(ref: str) -> tuple[str, str | None]:
    """``user/name@rev`` → (``user/name``, ``rev``)."""
    repo, _, rev = ref.partition("@")
    return repo, (rev or None)


@contextmanager
def remote_errors(what: str) -> Iterator[None]:
    """Translate huggingface_hub / network exceptions into hubmerge errors naming ``what``."""
    try:
        yield
    except hf_errors.RevisionNotFoundError as exc:
        raise RemoteError(f"{what}: revision not found; check the branch, tag or commit after '@'") from exc
    except hf_errors.GatedRepoError as exc:
        raise RemoteError(f"{what}: the repo is gated; accept its terms on the hub and set HF_TOKEN") from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise RemoteError(f"{what}: repo not found (or private: set HF_TOKEN); check the id") from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        raise RemoteError(f"{what}: not in the local cache and the hub is unreachable or offline mode is on "
                          "(HF_HUB_OFFLINE=1); download it once online or give a local folder") from exc
    except hf_errors.HfHubHTTPError as exc:
        raise RemoteError(f"{what}: the hub refused the request ({str(exc).splitlines()[0]})") from exc
    except (OSError, TransportError) as exc:
        raise RemoteError(f"{what}: cannot reach the hub ({exc}); check HF_ENDPOINT and the network") from exc


def resolve(ref: str, revision: str | None = None, *, patterns: list[str] | None = None, token=None,
            cache_dir=None, local_files_only: bool = False, force_download: bool = False) -> Resolved:
    """A local folder as is, or a hub repo downloaded (only ``patterns``) into the standard cache."""
    if Path(ref).is_dir():
        return Resolved(Path(ref), ref, None, None)
    repo_id, at = split_revision(ref)
    revision = revision or at
    try:
        validate_repo_id(repo_id)
    except hf_errors.HFValidationError as exc:
        looks_local = ref.startswith(("/", ".", "~")) or Path(ref).exists()
        raise CheckpointError(f"{ref}: no such local folder" if looks_local else
                              f"{ref!r} is neither a local folder nor a hub repo id (user/name[@revision]): {exc}"
                              ) from None
    with remote_errors(f"{repo_id}@{revision or 'main'}"):
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token,
                                   cache_dir=cache_dir, local_files_only=local_files_only,
                                   force_download=force_download, etag_timeout=DEFAULT_TIMEOUT_S)
    folder = Path(folder)
    return Resolved(folder, repo_id, revision, folder.name)


def read_config(resolved: Resolved) -> dict:
    """The repo's ``config.json``, or a clear error."""
    path = resolved.folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{resolved.repo_id}: no {CONFIG}; is this a timm or hubmerge model repo?")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{resolved.repo_id}: {CONFIG} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{resolved.repo_id}: {CONFIG} must hold a JSON object, got {type(config).__name__}")
    return config


def load_weights(resolved: Resolved, device: str = "cpu") -> dict:
    """``model.safetensors`` as a state dict; pickle checkpoints are refused, truncation is reported."""
    path = resolved.folder / WEIGHTS
    if not path.is_file():
        raise CheckpointError(
            f"{resolved.repo_id}: no {WEIGHTS}. hubmerge loads safetensors only (pickle files can run code "
            "when loaded); convert the checkpoint with safetensors.torch.save_file and upload it"
        )
    try:
        return safetensors.torch.load_file(path, device=device)
    except Exception as exc:  # safetensors raises its own error type for truncated/corrupt headers
        raise CheckpointError(f"{resolved.repo_id}: {WEIGHTS} is corrupt or truncated ({exc})") from exc


def load_state_strict(model, state: dict, what: str) -> None:
    """``load_state_dict(strict=True)`` with the mismatch spelled out as a CheckpointError."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{what}: tensors missing {missing[:5]} / unexpected {extra[:5]}; "
                              "the file does not belong to this config")
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise CheckpointError(f"{what}: tensors with wrong shapes {wrong[:5]}; the file does not match its config")
    cast = [k for k, v in state.items() if expected[k].is_floating_point() and not v.is_floating_point()]
    if cast:  # load_state_dict would cast them silently
        raise CheckpointError(f"{what}: tensors stored as integers {cast[:5]} where the model has floating-point "
                              "weights; hubmerge does not cast a checkpoint")
    model.load_state_dict(state, strict=True)


def mixin_kwargs(cls, config: dict) -> dict:
    """The entries of ``config.json`` that a ``PyTorchModelHubMixin`` class's ``__init__`` takes."""
    return {k: config[k] for k in cls._hub_mixin_init_parameters if k in config}


def load_into(model, resolved: Resolved, device: str, what: str):
    """Load ``model.safetensors`` strictly into ``model``, keeping the stored precision instead of
    rounding it into the model's default float32."""
    state = load_weights(resolved, device)
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)
    if dtype is not None:
        model.to(dtype)
    load_state_strict(model, state, what)
    return model.to(device).eval()


def load_checkpoint(cls, *, model_id: str, revision, cache_dir, force_download: bool, local_files_only: bool,
                    token, map_location: str, model_kwargs: dict):
    """Build ``cls`` from its config and load its safetensors strictly (PartialMergedModel's loader)."""
    resolved = resolve(model_id, revision, patterns=[CONFIG, "*.safetensors"], token=token, cache_dir=cache_dir,
                       local_files_only=local_files_only, force_download=force_download)
    kwargs = {**mixin_kwargs(cls, read_config(resolved)), **model_kwargs}
    if "architecture" not in kwargs or "partition" not in kwargs:
        raise CheckpointError(f"{model_id}: {CONFIG} is not a hubmerge PartialMergedModel config")
    try:
        return load_into(cls(**kwargs), resolved, map_location, model_id)
    except CheckpointError as exc:
        written = kwargs.get("hubmerge_version")
        if written and written != __version__:  # the stored block layout may differ between versions
            raise CheckpointError(f"{exc} (written by hubmerge {written}, this is {__version__}: load it with "
                                  f"pip install hubmerge=={written})") from exc
        raise


@dataclass
class Endpoint:
    """A loaded endpoint and where it came from (recorded in the merged model's config and card)."""

    model: torch.nn.Module
    repo_id: str
    revision: str | None
    commit: str | None

    def describe(self) -> dict:
        return {"id": self.repo_id, "revision": self.revision, "commit": self.commit}


def load_endpoint(ref: str, revision: str | None = None, *, token=None, device: str = "cpu",
                  model_class: type | None = None, local_files_only: bool = False) -> Endpoint:
    """Load a timm-format repo (``architecture`` + ``model_args`` in ``config.json``), or, with
    ``model_class``, a ``PyTorchModelHubMixin`` repo of that class; safetensors only, strict."""
    resolved = resolve(ref, revision, patterns=[CONFIG, "*.safetensors"], token=token,
                       local_files_only=local_files_only)
    config = read_config(resolved)
    if model_class is not None:
        model = model_class(**mixin_kwargs(model_class, config))
    elif "architecture" in config:
        args = dict(config.get("model_args") or {})
        if "num_classes" in config:
            args.setdefault("num_classes", config["num_classes"])
        # timm's config keeps the class names at its top level (timm.models.load_model_config_from_hf)
        labels = {k: config[k] for k in ("label_names", "label_descriptions") if k in config}
        model = build_model(config["architecture"], args,
                            {**(config.get("pretrained_cfg") or {}), **labels, "architecture": config["architecture"]})
    else:
        raise CheckpointError(f"{ref}: {CONFIG} has no 'architecture' (timm format); for a "
                              "PyTorchModelHubMixin repo pass its model class")
    model = load_into(model, resolved, device, ref)
    return Endpoint(model, resolved.repo_id, resolved.revision, resolved.commit)
