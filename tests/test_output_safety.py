"""The output folder is the one place hubmerge deletes anything: nothing but a previous hubmerge result may
ever be replaced, a replacement is never half done, and a killed run leaves a loadable result."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hubmerge import PartialMergedModel
from hubmerge.cli.app import app
from hubmerge.output import OLD, STAGING, recover

from conftest import base

runner = CliRunner()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder with a sentinel file, a home folder of its own, and a non-hubmerge folder."""
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "sentinel.txt").write_text("keep me")
    (work / "notes" / "draft.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "work"))
    return work


@pytest.mark.parametrize("out, extra, message", [
    ("", (), "working folder"),
    (".", ("--overwrite",), "working folder"),
    ("..", ("--overwrite",), "working folder"),
    ("/", ("--overwrite",), "working folder or one of its parents"),  # / is a parent of every working folder
    ("~", ("--overwrite",), "working folder"),  # HOME is the working folder here
    ("notes", ("--overwrite",), "not a hubmerge result"),
    ("sentinel.txt", ("--overwrite",), "is a file"),
    ("missing/m", (), "does not exist"),
    ("notes", (), "not empty"),
])
def test_a_dangerous_or_unusable_out_is_refused_before_any_work(local, workdir, out, extra, message):
    before = snapshot(workdir.parent)
    result = runner.invoke(app, base(local, "--out", out, *extra))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert snapshot(workdir.parent) == before


@pytest.mark.parametrize("inside", ["ep0", "data", "."])
def test_an_input_or_a_folder_holding_one_is_refused(local, workdir, inside):
    before = snapshot(local)
    result = runner.invoke(app, base(local, "--out", str(local / inside), "--overwrite"))
    assert result.exit_code == 2 and "holds the input" in result.output, result.output
    assert snapshot(local) == before


def test_overwrite_replaces_a_previous_result_with_the_users_permissions(local, workdir):
    old_umask = os.umask(0o027)
    try:
        assert runner.invoke(app, base(local, "--gamma", "0.2", "--out", "m")).exit_code == 0
        first = snapshot(workdir / "m")
        result = runner.invoke(app, base(local, "--gamma", "0.5", "--out", "m", "--overwrite"))
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.output
    assert snapshot(workdir / "m") != first
    assert PartialMergedModel.from_pretrained(workdir / "m").partition["blocks.0.fc"] == (6, 6, 6)
    assert (workdir / "m").stat().st_mode & 0o777 == 0o750
    assert all((workdir / "m" / f).stat().st_mode & 0o777 == 0o640 for f in ("config.json", "model.safetensors"))
    assert not [p for p in workdir.iterdir() if p.name.startswith(".hubmerge")]


def test_a_result_moved_aside_by_a_killed_run_is_restored(tmp_path):
    out = tmp_path / "m"
    aside = tmp_path / f"{OLD}-m-0123abcd"
    aside.mkdir()
    (aside / "config.json").write_text('{"hubmerge_version": "0.3.0"}')
    staged = tmp_path / f"{STAGING}-m-xyz"
    staged.mkdir()
    (staged / "model.safetensors").write_bytes(b"partial")
    recover(out)
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_run_killed_at_any_moment_leaves_the_old_or_the_new_result(local, tmp_path):
    """SIGKILL a real ``hubmerge run --overwrite`` at moments spread over its run time: the folder always
    loads, as the old merge (γ=0.2) or the new one (γ=0.5), and the next run cleans up after it."""
    exe = Path(sys.executable).with_name("hubmerge")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    out = tmp_path / "o" / "m"
    out.parent.mkdir()

    def command(gamma: str) -> list[str]:
        return [str(exe), *base(local, "--gamma", gamma, "--out", str(out), "--overwrite")]

    subprocess.run(command("0.2"), check=True, env=env, capture_output=True, timeout=300)
    shutil.copytree(out, tmp_path / "old")
    t0 = time.perf_counter()
    subprocess.run(command("0.5"), check=True, env=env, capture_output=True, timeout=300)
    duration = time.perf_counter() - t0
    seen = set()
    for fraction in (0.5, 0.9, 0.97, 1.0):
        shutil.rmtree(out)
        shutil.copytree(tmp_path / "old", out)
        proc = subprocess.Popen(command("0.5"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(fraction * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        recover(out)  # what the next run does first
        seen.add(PartialMergedModel.from_pretrained(out).partition["blocks.0.fc"])
        assert [p.name for p in out.parent.iterdir()] == ["m"]
    assert seen <= {(2, 10, 2), (6, 6, 6)}
