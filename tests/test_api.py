"""The Python API (`from optimize import run, load_recipe`): light to import, a typed result for a run that reached
its gates, an OptimizeError with the run directory for one that did not, and the caller's file descriptors,
sys.stdout/sys.stderr and logging as they were."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import optimize
from optimize import OptimizeError, RegisteredVersion, RunResult, load_recipe, run

HEAVY = ("torch", "onnxruntime", "onnx", "mlflow", "transformers", "numpy")


def test_import_optimize_imports_nothing_else_and_the_api_names_no_heavy_library(tmp_path: Path) -> None:
    probe = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import optimize\n"
        "plain = sorted(set(sys.modules) - before)\n"
        "from optimize import RunResult, load_recipe, run\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print(json.dumps([plain, heavy]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [["optimize"], []]


def test_unknown_names_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        optimize.nope  # noqa: B018
    assert set(optimize.__all__) >= {"run", "load_recipe", "RunResult", "OptimizeError"}


def test_load_recipe(write_recipe) -> None:
    recipe = load_recipe(write_recipe())
    assert isinstance(recipe, optimize.Recipe)
    assert (recipe.name, [v.name for v in recipe.precision.variants]) == ("tiny", ["fp16"])
    with pytest.raises(OptimizeError) as e:
        load_recipe(write_recipe({"precison": {}}, name="bad.yaml"))
    assert e.value.exit_code == 2 and "precison: unknown key; did you mean 'precision'?" in str(e.value)


# --- the caller's descriptors ----------------------------------------------------------------------------------


def _file_of(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _fds_onto(files: set[tuple[int, int]]) -> set[int]:
    """The open descriptors of this process that refer to one of `files`."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if _file_of(int(name)) in files:
                out.add(int(name))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return out


@contextmanager
def untouched() -> Iterator[list[tuple[str, int]]]:
    """Records every os.dup/dup2/close that touches fd 0, 1 or 2 in the block; after it checks that there were none,
    that fds 0-2 are the same files, that no other descriptor points at them, and that sys.stdout, sys.stderr and
    the root logger are the objects they were. (Not a fixture: pytest's own capture moves fds between phases.)"""
    std = {fd: _file_of(fd) for fd in (0, 1, 2)}
    onto = _fds_onto(set(std.values()))
    streams = (sys.stdout, sys.stderr)
    root = (list(logging.root.handlers), logging.root.level)
    calls: list[tuple[str, int]] = []
    real = {name: getattr(os, name) for name in ("dup", "dup2", "close")}

    def spy(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            fds = args[1:2] if name == "dup2" else args[:1]
            calls.extend((name, fd) for fd in fds if fd in (0, 1, 2))
            return real[name](*args, **kwargs)

        return call

    for name in real:
        setattr(os, name, spy(name))
    try:
        yield calls
    finally:
        for name, fn in real.items():
            setattr(os, name, fn)
    assert calls == []
    assert {fd: _file_of(fd) for fd in (0, 1, 2)} == std
    assert _fds_onto(set(std.values())) == onto
    assert (sys.stdout, sys.stderr) == streams
    assert (list(logging.root.handlers), logging.root.level) == root


def test_the_check_sees_a_redirect(tmp_path: Path) -> None:
    """`untouched` is not blind: the CLI's capture of fds 1 and 2 (which the Python API does not use) fails it."""
    from optimize.console import capture_output

    with pytest.raises(AssertionError), untouched() as calls:
        with capture_output(tmp_path / "x.log"):
            pass
    assert ("dup2", 1) in calls and ("dup2", 2) in calls


def test_a_run_from_python(write_recipe, tmp_path: Path) -> None:
    recipe = write_recipe()
    store = f"sqlite:///{tmp_path / 'registry.db'}"
    with untouched():
        result = run(recipe, tracking_uri=store)

    assert isinstance(result, RunResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.status = "failed"  # type: ignore[misc]
    assert (result.status, result.exit_code, result.passed) == ("passed", 0, True)
    assert result.run_dir.is_absolute() and result.run_dir.parent == (tmp_path / "runs" / "tiny").resolve()
    assert (result.recipe, result.recipe_file, result.run_id) == ("tiny", recipe.resolve(), result.run_dir.name)
    assert [(v.name, v.status, v.target) for v in result.variants] == [("fp16", "passed", "onnxruntime-cpu")]
    assert result.variants[0].cosine_min > 0.99
    assert result.registered == (RegisteredVersion("fp16", "tiny", 1, already_registered=False),)
    assert result.registered[0].uri == "models:/tiny/1"
    assert (result.alias, result.alias_uri, result.tracking_uri) == ("candidate", "models:/tiny@candidate", store)
    assert result.mlflow_run_id and result.report_html.is_file() and result.report_md.is_file()
    # What the CLI prints with --json is this result.
    out = result.as_json()
    assert (out["status"], out["exit_code"], out["error"], out["run_dir"]) == ("passed", 0, None, str(result.run_dir))
    assert out["registered"][0]["uri"] == "models:/tiny/1"

    # A failed gate is a result too (every stage from the cache), not an exception.
    strict = write_recipe({"gates": ["size.bytes <= 10"]}, name="strict.yaml")
    with untouched():
        failed = run(strict, register=False)
    assert (failed.status, failed.exit_code, failed.passed, failed.registered) == ("failed", 1, False, ())
    assert failed.variants[0].status == "failed" and "size.bytes" in failed.variants[0].reason
    assert failed.alias_uri is None


def test_a_run_that_stops_raises_with_its_run_directory(write_recipe, tmp_path: Path) -> None:
    with untouched(), pytest.raises(OptimizeError) as e:
        run(write_recipe({"model": {"entry_point": "tinynet:raises"}}), register=False)
    assert e.value.exit_code == 2 and "tinynet:raises raised ValueError: boom" in str(e.value)
    assert e.value.run_dir is not None and e.value.run_dir.parent == (tmp_path / "runs" / "tiny").resolve()
    assert json.loads((e.value.run_dir / "manifest.json").read_text())["status"] == "failed"

    with pytest.raises(OptimizeError) as e:
        run(write_recipe({"precison": {}}, name="bad.yaml"))
    assert e.value.exit_code == 2 and e.value.run_dir is None
    with pytest.raises(OptimizeError) as e:
        run(write_recipe(), require_targets=["gpu"])
    assert e.value.exit_code == 2 and str(e.value).startswith("require_targets: unknown target 'gpu'")


def test_python_output_of_a_stage_goes_to_its_log_and_a_kept_reference_outlives_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the Python API does instead of redirecting fds: sys.stdout and sys.stderr point to the stage's log for
    the stage; a logging handler made during a stage (a library imported there) writes to the log of the stage
    running, and after the stages to the stream it replaced, never to a closed file."""
    from optimize.console import capture_python_output

    before = sys.stderr
    logger = logging.getLogger("optimize-test-library")
    logger.propagate = False
    with capture_python_output(tmp_path / "a.log"):
        print("from print")
        handler = logging.StreamHandler()  # binds sys.stderr as it is now
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.warning("during a")
    try:
        with capture_python_output(tmp_path / "b.log"):
            logger.warning("during b")
        assert sys.stderr is before
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
    assert (tmp_path / "a.log").read_text() == "from print\nduring a\n"
    assert (tmp_path / "b.log").read_text() == "during b\n"
    assert capsys.readouterr().err == "after\n"
