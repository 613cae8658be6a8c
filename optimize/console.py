"""Terminal output: a live stage display on stderr, and capture of noisy library output into log files."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.markup import escape

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


class Progress:
    """Shows the running stage with a spinner and prints one line per finished stage with its time."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.timings: list[dict[str, object]] = []

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[dict[str, object]]:
        """Run a stage: spinner while it runs, a ✓/✗ line with seconds after; yields a dict for details."""
        record: dict[str, object] = {"stage": name, "what": what}
        t0 = time.perf_counter()
        con = console()
        try:
            if self.quiet:
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
