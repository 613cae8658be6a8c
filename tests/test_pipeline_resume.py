"""Never redo, never lose: a run killed with SIGKILL at a stage boundary or in the middle of a stage leaves
nothing a later run trusts, and the same command again completes with the results of an uninterrupted run;
two identical runs at once both finish, with one export between them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_pipeline_cache import _hits, _recipe

from optimize.cache import StageCache

pytestmark = pytest.mark.slow


def _start(recipe: Path, cache: Path, runs: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OPTIMIZE_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "optimize", "run", str(recipe), "--no-register", "-q", "--runs-dir", str(runs)]
    return subprocess.Popen(
        cmd,
        cwd=recipe.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a shell: SIGINT delivered and handled by default, whatever this test process inherited (a
        # child started with SIGINT ignored or blocked keeps it so, and Ctrl-C could not be tested)
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _deterministic(run_dir: Path) -> dict[str, Any]:
    """What an interrupted and an uninterrupted run must share: artifacts, accuracy, sizes, verdict."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    verdict = json.loads((run_dir / "verdict.json").read_text())
    return {
        "sha256": {n: m["sha256"] for n, m in metrics["variants"].items()},
        "accuracy": {n: r["onnxruntime-cpu"].get("accuracy") for n, r in metrics["results"].items()},
        "size": {n: r["onnxruntime-cpu"]["size"] for n, r in metrics["results"].items()},
        "verdict": {v: s["status"] for v, s in verdict["variants"].items()},
    }


def _wait_for(condition: Any, proc: subprocess.Popen[str], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.01)


def _entries(cache: Path, stage: str) -> list[Path]:
    """The finished entries of a stage, read while the run renames folders under it."""
    try:
        return [p for p in (cache / "stages" / stage).glob("[!.]*/*/entry.json")]
    except FileNotFoundError:  # a temporary folder became an entry while glob walked it: look again
        return []


def _producing(cache: Path, stage: str) -> bool:
    try:
        return any(p.name.startswith(".tmp-") for p in (cache / "stages" / stage).iterdir())
    except FileNotFoundError:
        return False


KILL_POINTS = {
    "after export": lambda c: bool(_entries(c, "export")),
    "in the middle of precision": lambda c: _producing(c, "precision"),
    "after precision": lambda c: len(_entries(c, "precision")) == 2,
    "after evaluate": lambda c: len(_entries(c, "evaluate")) == 3,
    "in the middle of benchmark": lambda c: _producing(c, "benchmark"),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One folder with the tiny model and recipe (the ONNX export records where the module's source lies,
    so every run compared here runs from this folder), and what an uninterrupted run there gives."""
    folder = tmp_path_factory.mktemp("resume")
    _copy_tiny(folder)
    recipe = _recipe(folder)
    proc = _start(recipe, folder / "cache-uninterrupted", folder / "runs-uninterrupted")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    (run_dir,) = (folder / "runs-uninterrupted" / "tiny").iterdir()
    return recipe, _deterministic(run_dir)


def _copy_tiny(folder: Path) -> None:
    import numpy as np
    from conftest import TINY_MODULE

    (folder / "tinynet.py").write_text(TINY_MODULE)
    rng = np.random.default_rng(0)
    np.savez(folder / "tiny.npz", x=rng.standard_normal((64, 8)).astype(np.float32), label=rng.integers(0, 4, 64))
    rng = np.random.default_rng(1)
    np.savez(folder / "tiny-calib.npz", x=rng.standard_normal((64, 8)).astype(np.float32), label=rng.integers(0, 4, 64))


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_run_killed_anywhere_finishes_on_rerun_with_the_same_results(
    point: str, uninterrupted: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    recipe, expected = uninterrupted
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    proc = _start(recipe, cache, runs)
    _wait_for(lambda: KILL_POINTS[point](cache), proc, point)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    (killed,) = (runs / "tiny").iterdir()
    assert json.loads((killed / "manifest.json").read_text())["status"] != "done"
    # every entry left behind is whole (verified on read); nothing half-made is an entry
    store = StageCache(cache)
    for info in store.entries():
        assert store.lookup(info.stage, info.key) is not None, info
    again = _start(recipe, cache, runs)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    (rerun,) = [d for d in (runs / "tiny").iterdir() if d != killed]
    assert _deterministic(rerun) == expected
    hits = _hits(json.loads((rerun / "manifest.json").read_text()))
    assert hits["export:fp32"] is True  # every kill point is after the export finished


def test_two_identical_runs_at_once_both_finish_with_one_export(tmp_path: Path) -> None:
    _copy_tiny(tmp_path)
    recipe, cache, runs = _recipe(tmp_path), tmp_path / "cache", tmp_path / "runs"
    procs = [_start(recipe, cache, runs) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (runs / "tiny").iterdir()]
    assert len(manifests) == 2
    exports = sorted(_hits(m)["export:fp32"] for m in manifests)
    assert exports == [False, True], "one run exported, the other took its export"
    assert len(_entries(cache, "export")) == 1


def test_ctrl_c_ends_with_one_line_and_the_rerun_resumes(uninterrupted: tuple[Path, dict[str, Any]], tmp_path: Path):
    recipe, expected = uninterrupted
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    proc = _start(recipe, cache, runs)
    _wait_for(lambda: _producing(cache, "precision"), proc, "precision")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    (stopped,) = (runs / "tiny").iterdir()
    assert proc.returncode == 130, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert lines == [
        f"error: interrupted; {stopped} keeps what finished, and the same command again takes every finished "
        "stage from the stage cache"
    ], err[-2000:]
    assert "Traceback" not in err
    assert json.loads((stopped / "manifest.json").read_text())["status"] == "interrupted"
    assert not list((cache / "stages").glob("*/.tmp-*")), "the interrupted producer left its temporary folder"
    again = _start(recipe, cache, runs)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    (rerun,) = [d for d in (runs / "tiny").iterdir() if d != stopped]
    assert _deterministic(rerun) == expected
    assert _hits(json.loads((rerun / "manifest.json").read_text()))["export:fp32"] is True


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs (the machines that run this suite run it as root); unmounted afterwards."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_ends_with_one_line_and_the_rerun_resumes(
    uninterrupted: tuple[Path, dict[str, Any]], tmp_path: Path, small_disk: Path
) -> None:
    """The run directory's disk fills up in the middle of the run: one line saying so and how much room is
    left where, nothing half-written trusted, and once there is room the same command finishes."""
    recipe, expected = uninterrupted
    cache, runs = tmp_path / "cache", small_disk / "runs"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024 - 48 * 1024))  # room for the run's first files, not its artifacts
    proc = _start(recipe, cache, runs)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 3, err[-2000:]
    (full,) = (runs / "tiny").iterdir()
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: no space left on device"), line
    assert f"run directory {full} has " in line and f"stage cache {cache} has " in line, line
    assert "the same command again resumes from the stage cache" in line
    assert "Traceback" not in err
    assert json.loads((full / "manifest.json").read_text())["status"] != "done"
    assert not [p for p in full.rglob("*") if p.name.startswith(".") and p.is_file()], "a temporary file was left"
    store = StageCache(cache)
    for info in store.entries():
        assert store.lookup(info.stage, info.key) is not None, info
    filler.unlink()
    again = _start(recipe, cache, runs)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    (rerun,) = [d for d in (runs / "tiny").iterdir() if d != full]
    assert _deterministic(rerun) == expected
