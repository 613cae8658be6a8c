"""The one child-process launcher (optimize/child.py), on real child processes."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from optimize.child import child_env, run_python
from optimize.errors import StageError


def test_a_child_that_succeeds_returns_its_output() -> None:
    result = run_python(
        ["-c", "import sys; print('out'); print('err', file=sys.stderr)"], timeout_s=60, on_timeout="too slow"
    )
    assert result.returncode == 0
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"


def test_a_failing_child_is_one_line_naming_its_last_error_line_and_the_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "stage.log"
    result = run_python(["-c", "raise ValueError('the reason')"], timeout_s=60, on_timeout="too slow", log_path=log)
    assert result.returncode == 1
    assert result.tail == "ValueError: the reason"
    error = result.error("probe failed", log)
    assert isinstance(error, StageError) and error.exit_code == 3
    assert str(error) == f"probe failed (exit 1): ValueError: the reason (log: {log})"
    assert "\n" not in str(error)
    assert "Traceback (most recent call last)" in log.read_text()  # the whole stderr is kept in the log


def test_a_silent_failure_says_no_output() -> None:
    result = run_python(["-c", "raise SystemExit(7)"], timeout_s=60, on_timeout="too slow")
    assert str(result.error("it failed")) == "it failed (exit 7): no output"


def test_a_child_over_its_timeout_is_killed_with_what_it_started(tmp_path: Path) -> None:
    """The child starts a grandchild that would outlive it; the timeout kills the whole process group."""
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    started = time.monotonic()
    with pytest.raises(StageError, match=r"^stopped after 2 s$"):
        run_python(["-c", script], timeout_s=2, on_timeout="stopped after 2 s")
    assert time.monotonic() - started < 20
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # reaped by init, which may take a moment
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {grandchild} still runs after the timeout")


def test_the_child_imports_from_the_parents_sys_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module only this process can import (on its sys.path, not in PYTHONPATH) imports in the child too."""
    (tmp_path / "only_here_mod.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert str(tmp_path) in child_env()["PYTHONPATH"].split(os.pathsep)
    result = run_python(["-c", "import only_here_mod; print(only_here_mod.VALUE)"], timeout_s=60, on_timeout="slow")
    assert (result.returncode, result.stdout) == (0, "42\n"), result.stderr
    found = run_python(["-c", "import optimize; print(optimize.__file__)"], timeout_s=60, on_timeout="slow")
    assert Path(found.stdout.strip()).parent == Path(sys.modules["optimize"].__file__).parent


def test_progress_events_come_back_on_the_pipe_and_stdout_can_stay_uncaptured() -> None:
    script = (
        "import json, os, sys\n"
        "with os.fdopen(int(sys.argv[1]), 'w') as pipe:\n"
        "    for i in range(3):\n"
        "        pipe.write(json.dumps({'step': i}) + '\\n')\n"
        "    pipe.write('not json\\n')\n"
    )
    events: list[dict[str, int]] = []
    result = run_python(["-c", script], timeout_s=60, on_timeout="slow", progress=events.append, capture_stdout=False)
    assert result.returncode == 0, result.stderr
    assert events == [{"step": 0}, {"step": 1}, {"step": 2}]
    assert result.stdout == ""


def test_echoed_stderr_goes_to_sys_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    script = "import sys; sys.stderr.write('to the log\\n')"
    run_python(["-c", script], timeout_s=60, on_timeout="slow", echo_stderr=True)
    assert capsys.readouterr().err == "to the log\n"


def test_the_working_directory_is_the_callers_choice(tmp_path: Path) -> None:
    result = run_python(["-c", "import os; print(os.getcwd())"], timeout_s=60, on_timeout="slow", cwd=tmp_path)
    assert Path(result.stdout.strip()).resolve() == tmp_path.resolve()
