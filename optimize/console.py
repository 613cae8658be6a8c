"""Terminal output: a live stage display on stderr (with progress bars on a terminal), and capture of noisy
library output into log files."""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import IO, Any

from rich import progress as bars
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from optimize import progress as progress_api

_console: Console | None = None


def console() -> Console:
    """The console for progress and results. It writes to a duplicate of the original stderr, so
    `capture_output` (which redirects fds 1 and 2 into a log) never swallows it."""
    global _console
    if _console is None:
        stream: IO[str]
        try:
            stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
        except (OSError, ValueError, AttributeError):
            stream = sys.stderr
        _console = Console(file=stream, highlight=False, soft_wrap=True)
    return _console


def stdout_console() -> Console:
    """A console for a command's tables on stdout. Piped into a file or a CI log it is 160 columns wide (rich
    would wrap every table at 80) unless COLUMNS says otherwise."""
    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    return Console(highlight=False, width=wide)


@contextmanager
def capture_output(log_path: Path) -> Iterator[None]:
    """Send everything written to fds 1 and 2 (Python and C++ alike) to `log_path` for the block."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# The logs of the stages running now under `capture_python_output`, innermost last.
_stage_logs: list[IO[str]] = []


class _StageStream(io.TextIOBase):
    """sys.stdout or sys.stderr while a stage runs under `capture_python_output`: writes go to the log of the stage
    running now, and outside stages to the stream this one replaced. A library that keeps a reference (a logging
    handler made while a stage imported it binds sys.stderr) thus writes to the log of the stage it runs in, and
    after the run where it would have written, never to a closed file."""

    def __init__(self, replaced: IO[str]) -> None:
        super().__init__()
        self._replaced = replaced

    def _target(self) -> IO[str]:
        return _stage_logs[-1] if _stage_logs else self._replaced

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def fileno(self) -> int:
        return self._target().fileno()

    def isatty(self) -> bool:
        return self._target().isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target(), "encoding", None) or "utf-8"


@contextmanager
def capture_python_output(log_path: Path) -> Iterator[None]:
    """Send what Python code writes to sys.stdout and sys.stderr to `log_path` for the block, leaving fds 1 and
    2 alone (the Python API: the caller's descriptors are the caller's; native code prints where it would)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        _stage_logs.append(log)
        try:
            with redirect_stdout(_StageStream(sys.stdout)), redirect_stderr(_StageStream(sys.stderr)):
                yield
        finally:
            _stage_logs.remove(log)


@contextmanager
def console_to(stream: IO[str] | None) -> Iterator[Console]:
    """For the block, progress and warnings go to `stream` (the Python API: the caller's sys.stderr as it is
    when the call starts), not to the duplicate of fd 2 that `console()` makes; the console before is put back."""
    global _console
    saved = _console
    _console = Console(file=stream, highlight=False, soft_wrap=True)
    try:
        yield _console
    finally:
        _console = saved


class _Only(bars.ProgressColumn):
    """A column shown only on the stage's line (`bar=False`) or only on its bars (`bar=True`)."""

    def __init__(self, column: bars.ProgressColumn, bar: bool) -> None:
        super().__init__()
        self.column, self.bar = column, bar

    def render(self, task: bars.Task) -> Any:
        return self.column.render(task) if task.fields.get("bar", False) == self.bar else Text("")


class _Bar:
    """One bar under the running stage (an `optimize.progress.Progress`), made on its first `start`."""

    def __init__(self, display: bars.Progress) -> None:
        self._display = display
        self._task: bars.TaskID | None = None

    def start(self, total: int, what: str) -> None:
        if self._task is None:
            self._task = self._display.add_task(f"  {what}", total=total, bar=True)
        else:
            self._display.reset(self._task, total=total, completed=0, description=f"  {what}")

    def advance(self, n: int = 1) -> None:
        if self._task is not None:
            self._display.advance(self._task, n)


class Progress:
    """Shows the running stage (a spinner; on a terminal, with the bars its loops report under it) and prints
    one line per finished stage with its time. Under -q nothing is shown; off a terminal (a CI log) only the
    one line per stage."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.timings: list[dict[str, object]] = []
        self._display: bars.Progress | None = None  # the running stage's, on a terminal

    def bar(self) -> progress_api.Progress:
        """A new bar under the running stage for a stage function to report to; one that shows nothing under
        -q, off a terminal, or outside a stage."""
        return _Bar(self._display) if self._display is not None else progress_api.NO_PROGRESS

    @contextmanager
    def _bars(self, con: Console, name: str, what: str) -> Iterator[None]:
        """The stage's line and its bars, live on a terminal; gone when the stage ends (its ✓ line stays).
        Output of libraries is not redirected into the display: it goes to the stage's log."""
        display = bars.Progress(
            _Only(bars.SpinnerColumn("dots"), bar=False),
            bars.TextColumn("{task.description}", markup=False),
            _Only(bars.BarColumn(), bar=True),
            _Only(bars.MofNCompleteColumn(), bar=True),
            bars.TimeElapsedColumn(),
            console=con,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        display.add_task(f"{name}: {what}", total=None)
        self._display = display
        try:
            with display:
                yield
        finally:
            self._display = None

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[dict[str, object]]:
        """Run a stage: spinner while it runs, a ✓/✗ line with seconds after; yields a dict for details."""
        record: dict[str, object] = {"stage": name, "what": what}
        t0 = time.perf_counter()
        con = console()
        try:
            if self.quiet:
                yield record
            elif con.is_terminal:
                with self._bars(con, name, what):
                    yield record
            else:
                with con.status(f"[bold]{name}[/]: {escape(what)}", spinner="dots"):
                    yield record
        except BaseException:
            record["seconds"] = round(time.perf_counter() - t0, 3)
            record["status"] = "failed"
            self.timings.append(record)
            if not self.quiet:
                con.print(f"[red]✗[/] {name:<10} {record['seconds']:>7.1f} s  {escape(what)}")
            raise
        record["seconds"] = round(time.perf_counter() - t0, 3)
        record["status"] = "done"
        self.timings.append(record)
        if not self.quiet:
            detail = record.get("detail")
            con.print(f"[green]✓[/] {name:<10} {record['seconds']:>7.1f} s  {escape(str(detail or what))}")


class Say:
    """The run's messages beside its stage lines, on stderr: `warn` (something the user should act on or
    know when reading the numbers; shown under --quiet too) and `note` (what the run decided for them;
    hidden under --quiet)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def warn(self, text: str) -> None:
        console().print(f"[yellow]warning[/]: {escape(text)}", highlight=False)

    def note(self, text: str) -> None:
        if not self.quiet:
            console().print(f"  note: {escape(text)}", highlight=False)

    def line(self, text: str) -> None:
        """A progress line of a stage (a fallback trial, an engine being built); hidden under --quiet."""
        if not self.quiet:
            console().print(f"  {escape(text)}", highlight=False)
