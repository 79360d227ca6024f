"""The output folder: the one place hubmerge deletes anything, so it is guarded.

``--out`` may not be the working folder, one of its parents, the home folder, the file-system root, or a
folder holding an input endpoint or dataset, and ``--overwrite`` replaces only a previous hubmerge result
(a ``config.json`` written by hubmerge), never other files. A result is written to a staging folder beside
``--out`` and replaced by rename: the old result is moved aside, the new one moved in, the old one removed,
so the path holds a complete result at every moment but the instant between the two renames; what a killed
run leaves beside it (``.hubmerge-staging-<name>-*``, ``.hubmerge-old-<name>-*``) is restored or removed by
the next run to the same ``--out``. Light on imports: the CLI checks ``--out`` before loading torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from .errors import UsageError

log = logging.getLogger(__name__)
STAGING, OLD = ".hubmerge-staging", ".hubmerge-old"  # prefixes of the folders a run keeps beside --out


def _is_result(folder: Path) -> bool:
    """Whether ``folder`` holds a hubmerge result (what ``--overwrite`` may replace)."""
    try:
        return "hubmerge_version" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_out(out: Path | None, overwrite: bool, inputs: tuple[str, ...] = ()) -> None:
    """Refuse an output folder whose replacement could destroy anything but a previous hubmerge result, or
    that cannot be written, before any work. ``inputs``: the endpoints' and datasets' references (local
    folders among them must stay untouched)."""
    if out is None:
        return
    if not str(out).strip():
        raise UsageError("--out is empty; give the folder to write the merged model to")
    target = out.expanduser().resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == cwd or target in cwd.parents:
        raise UsageError(f"--out {out} is the working folder or one of its parents; give a new or empty folder")
    if target == home or target == Path(target.anchor):
        raise UsageError(f"--out {out} is the home folder or the file-system root; give a new or empty folder")
    for ref in inputs:
        path = Path(ref).expanduser()
        if path.exists() and (target == path.resolve() or target in path.resolve().parents):
            raise UsageError(f"--out {out} holds the input {ref}; write the merge somewhere else")
    if target.exists() and not target.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if not target.parent.is_dir():
        raise UsageError(f"--out {out}: its parent folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot write to its parent folder {target.parent}")
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise UsageError(f"output folder {out} exists and is not empty; pass --overwrite or choose another --out")
        if not _is_result(target):
            raise UsageError(f"--out {out} holds files that are not a hubmerge result; --overwrite replaces only "
                             "a previous merge, so choose a new or empty folder")


def recover(out: Path) -> None:
    """Clean up after a run to ``out`` that was killed: a result moved aside while ``out`` is missing is
    moved back; other staging folders are removed."""
    leftovers = sorted(out.parent.glob(f"{STAGING}-{out.name}-*")) + sorted(out.parent.glob(f"{OLD}-{out.name}-*"))
    for folder in leftovers:
        if folder.name.startswith(OLD) and not out.exists() and _is_result(folder):
            log.warning("restoring %s from an interrupted run (it was being replaced)", out)
            folder.rename(out)
        else:
            log.warning("removing %s, left behind by an interrupted run", folder)
            shutil.rmtree(folder)


def staging_for(out: Path | None) -> Path:
    """A fresh folder for the result, beside ``out`` so it can be renamed into place."""
    return Path(tempfile.mkdtemp(prefix=f"{STAGING}-{out.name}-" if out else f"{STAGING}-",
                                 dir=out.parent if out else None))


def usual_permissions(folder: Path) -> None:
    """Give the folder and its files the permissions the user's umask gives new ones: ``mkdtemp`` makes
    the folder private, and safetensors writes its file through a private temporary file."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def move_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging``: the old result is moved aside first and removed last."""
    old = None
    if out.exists():
        old = out.parent / f"{OLD}-{out.name}-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old)
