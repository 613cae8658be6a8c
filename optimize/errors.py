"""One exception family; the CLI maps each class to its documented exit code and one line on stderr."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from pathlib import Path


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text (or its type name), for one-line messages."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # some libraries (torch) colour their messages
    if not text:
        return type(e).__name__
    line = text.splitlines()[0]
    if len(line) <= limit:
        return line
    # Keep both ends: C++ runtimes put their source location first and the reason last.
    return f"{line[: limit // 2]} … {line[-(limit // 2) :]}"


class OptimizeError(Exception):
    """Base of every error the CLI reports as one line. `exit_code` is the process exit status; `run_dir` is the
    run directory of the `optimize run` that failed, where it had one (set by the pipeline)."""

    exit_code = 3
    run_dir: Path | None = None


class RecipeError(OptimizeError):
    """Bad recipe, bad input data or bad usage: the user must change what they gave us (exit 2)."""

    exit_code = 2


class StageError(OptimizeError):
    """A stage ran and failed (export mismatch, NaN in FP16 outputs, ...) (exit 3)."""

    exit_code = 3


class RuntimeMissingError(OptimizeError):
    """A runtime or device that the recipe or command line requires is not available here (exit 4)."""

    exit_code = 4


class RegistryUnreachableError(OptimizeError):
    """The MLflow registry could not be reached; the run directory is kept (exit 5)."""

    exit_code = 5


class GateFailedError(OptimizeError):
    """What is asked for did not pass its gates: promoting a version whose gates failed, a smoke check
    over its latency budget (exit 1, as a failed gate in `optimize run`)."""

    exit_code = 1


class IntegrityError(OptimizeError):
    """An artifact is not what was gated: its sha256 differs from the recorded one, or its outputs differ
    from the recorded golden outputs beyond the tolerance (exit 6). No alias is moved."""

    exit_code = 6


class NotAuthorisedError(OptimizeError):
    """The registry refused the credentials (MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)
    or the permission for this change (exit 7)."""

    exit_code = 7


class RunInterrupted(OptimizeError):
    """The user interrupted (Ctrl-C): what finished is kept, and a rerun resumes from the stage cache (130)."""

    exit_code = 130


def no_space(e: BaseException) -> OSError | None:
    """The full-disk (or exhausted-quota) error behind `e`, if there is one: `e` itself, or an error it was
    raised from or while handling. Stages wrap a library's failure in a one-line StageError (`from None`
    hides the chain from the traceback, not from `__context__`), and a full disk is still the cause."""
    for cur in exception_chain(e):
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return cur
    return None


def exception_chain(e: BaseException) -> Iterator[BaseException]:
    """`e`, then what it was raised from or while handling, and so on (each once: a chain can loop)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__
