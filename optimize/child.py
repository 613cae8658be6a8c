"""The one way optimize starts a child Python process: the benchmark's memory probe, the TensorRT engine build
and ModelOpt calibration each run in one, so that a crash, a hang or a library that patches its neighbours
stays out of the pipeline's process.

The launcher gives every child the parent's `sys.path` (a source checkout imports the same optimize), a
timeout after which the child's whole process group is killed, the child's stderr for the error message
(its last line, one-line StageError) and, where asked, a pipe of JSON progress events.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimize.errors import StageError

# How long the parent waits for the progress relay to drain after the child ended (a grandchild that
# inherited the pipe may keep it open; the events it would still send are not worth a hang).
RELAY_JOIN_S = 10.0


@dataclass(frozen=True)
class ChildResult:
    """How a child process ended: its exit status and what it wrote (stdout is "" when not captured)."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def tail(self) -> str:
        """The last non-empty line of the child's stderr (where a traceback ends in the error), or `no output`."""
        return (self.stderr.strip().splitlines() or ["no output"])[-1]

    def error(self, what: str, log_path: Path | None = None) -> StageError:
        """A one-line StageError: `{what} (exit N): {last stderr line}`, naming the log when there is one."""
        where = f" (log: {log_path})" if log_path is not None else ""
        return StageError(f"{what} (exit {self.returncode}): {self.tail}{where}")


def child_env() -> dict[str, str]:
    """This process's environment with PYTHONPATH set to its `sys.path` (absolute), so that a child imports the
    same optimize and libraries, from a source checkout too."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}


def run_python(
    args: Sequence[str],
    *,
    timeout_s: float,
    on_timeout: str,
    cwd: Path | None = None,
    capture_stdout: bool = True,
    echo_stderr: bool = False,
    log_path: Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> ChildResult:
    """Run `python ARGS` (this interpreter) in a child process and wait for it.

    - `timeout_s`: past it the child and everything it started (its process group) are killed, and a
      StageError with the message `on_timeout` is raised. Ctrl-C in the parent kills them too.
    - `capture_stdout`: keep the child's stdout in the result; else it writes to this process's fd 1.
      Its stderr is always kept; `echo_stderr` also writes it to `sys.stderr` (a stage's log) when the child
      ends, and `log_path`, when given, has it appended (the file is then named by `ChildResult.error`).
    - `progress`: a pipe is opened and its write end's fd number is appended to the child's arguments; every
      JSON object the child writes on it, one per line, is handed to `progress` as it comes (in a thread).

    A non-zero exit is not an error here: the caller reads the result (`ChildResult.error` makes the message).
    """
    argv = [sys.executable, *args]
    read_fd = write_fd = -1
    if progress is not None:
        read_fd, write_fd = os.pipe()
        argv.append(str(write_fd))
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if capture_stdout else None,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=child_env(),
            cwd=cwd,
            pass_fds=(write_fd,) if progress is not None else (),
            start_new_session=True,  # its own process group: a timeout kills what it started too
        )
    except BaseException:
        if progress is not None:
            os.close(read_fd)
        raise
    finally:
        if progress is not None:
            os.close(write_fd)  # the child holds its own copy: the pipe closes when the child ends
    relay = None
    if progress is not None:
        relay = threading.Thread(target=_relay, args=(read_fd, progress), daemon=True)
        relay.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stdout, stderr = _kill(proc)
        _keep(stderr, echo_stderr, log_path)
        raise StageError(on_timeout) from None
    except BaseException:  # Ctrl-C: the child must not outlive the run
        _kill(proc)
        raise
    if relay is not None:
        relay.join(timeout=RELAY_JOIN_S)
    _keep(stderr or "", echo_stderr, log_path)
    return ChildResult(proc.returncode, stdout or "", stderr or "")


def _kill(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Kill the child's process group, reap it, and return what it wrote up to then."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()
    try:  # everything in the group is gone; a process that left the group may still hold the pipes
        stdout, stderr = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        return "", ""
    return stdout or "", stderr or ""


def _keep(stderr: str, echo: bool, log_path: Path | None) -> None:
    if echo and stderr:
        sys.stderr.write(stderr)
    if log_path is not None and stderr:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8", errors="replace") as log:
            log.write(stderr if stderr.endswith("\n") else stderr + "\n")


def _relay(fd: int, progress: Callable[[dict[str, Any]], None]) -> None:
    """Read the child's JSON lines from `fd` until every writer has closed it, handing each object to `progress`."""
    with os.fdopen(fd, encoding="utf-8", errors="replace") as pipe:
        for line in pipe:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                progress(event)
