"""Progress of the long loops inside a stage (benchmark iterations, calibration batches, fallback trials,
TensorRT build phases), as one small interface the stage code reports to. The pipeline decides what shows
it (bars on a terminal, nothing under -q or in a CI log); stage code never imports rich nor asks either."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """One bar: `start` begins it again (a count of `total` steps, described by `what`), `advance` moves it."""

    def start(self, total: int, what: str) -> None:
        """Begin counting `total` steps of `what` (restarts the bar at 0)."""
        ...

    def advance(self, n: int = 1) -> None:
        """`n` more steps done."""
        ...


class NoProgress:
    """Reports nowhere: the default of every stage function, and what -q and non-terminal runs get."""

    def start(self, total: int, what: str) -> None:
        """Nothing to show."""

    def advance(self, n: int = 1) -> None:
        """Nothing to show."""


NO_PROGRESS: Progress = NoProgress()
