"""One-line error text: long messages keep their start and their end (where C++ runtimes put the reason)."""

from __future__ import annotations

from optimize.errors import first_line


def test_first_line_keeps_both_ends_of_a_long_message() -> None:
    where = "model.cc:202 onnxruntime::Model::Model(onnx::ModelProto&&, " + "x" * 400
    text = first_line(RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : {where} Unsupported model IR version: 12"))
    assert text.startswith("[ONNXRuntimeError] : 1 : FAIL : model.cc:202")
    assert text.endswith("Unsupported model IR version: 12")
    assert " … " in text and len(text) <= 303


def test_first_line_of_short_coloured_and_empty_messages() -> None:
    assert first_line(ValueError("\x1b[31mbad\x1b[0m input\nsecond line")) == "bad input"
    assert first_line(KeyError()) == "KeyError"
