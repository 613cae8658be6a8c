"""The one console's messages beside the stage lines: a warning is shown under --quiet too, a note and a
stage's progress line are not; text is printed as it is (no Rich markup is read from it)."""

from __future__ import annotations

import io

from optimize.console import Say, console_to


def _said(quiet: bool) -> str:
    out = io.StringIO()
    with console_to(out):
        say = Say(quiet)
        say.warn("latency CV above 5% for [fp16]")
        say.note("int8: accuracy-aware fallback off")
        say.line("engine fp16: building")
    return out.getvalue()


def test_warnings_are_shown_under_quiet_and_notes_are_not() -> None:
    assert _said(quiet=True) == "warning: latency CV above 5% for [fp16]\n"
    assert _said(quiet=False) == (
        "warning: latency CV above 5% for [fp16]\n  note: int8: accuracy-aware fallback off\n  engine fp16: building\n"
    )
