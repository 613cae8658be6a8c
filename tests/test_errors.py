"""One-line error text: long messages keep their start and their end (where C++ runtimes put the reason);
a full disk is found behind the one-line error a stage wraps it in."""

from __future__ import annotations

import errno

from optimize.errors import StageError, first_line, no_space


def test_first_line_keeps_both_ends_of_a_long_message() -> None:
    where = "model.cc:202 onnxruntime::Model::Model(onnx::ModelProto&&, " + "x" * 400
    text = first_line(RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : {where} Unsupported model IR version: 12"))
    assert text.startswith("[ONNXRuntimeError] : 1 : FAIL : model.cc:202")
    assert text.endswith("Unsupported model IR version: 12")
    assert " … " in text and len(text) <= 303


def test_first_line_of_short_coloured_and_empty_messages() -> None:
    assert first_line(ValueError("\x1b[31mbad\x1b[0m input\nsecond line")) == "bad input"
    assert first_line(KeyError()) == "KeyError"


def _wrapped(cause: BaseException) -> StageError:
    """What a stage does with a library's failure: one line, raised `from None`."""
    try:
        try:
            raise cause
        except Exception as e:
            raise StageError(f"precision.variants[1]: INT8 quantisation failed: {first_line(e)}") from None
    except StageError as wrapped:
        return wrapped


def test_a_full_disk_is_found_behind_a_stage_error() -> None:
    """The INT8 wrapper once turned ENOSPC into a quantisation failure, and the run never said the disk was
    full: the error under the wrapper is what the pipeline reports."""
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/work/int8/trial0.onnx")
    assert no_space(_wrapped(full)) is full
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert no_space(quota) is quota
    caused = StageError("export failed")
    caused.__cause__ = full
    assert no_space(caused) is full


def test_other_errors_are_not_a_full_disk() -> None:
    assert no_space(_wrapped(OSError(errno.EACCES, "Permission denied", "/x"))) is None
    assert no_space(_wrapped(ValueError("bad graph"))) is None
    loop = StageError("a")
    other = StageError("b")
    loop.__context__, other.__context__ = other, loop  # a cycle ends the walk
    assert no_space(loop) is None
