"""TensorRT target. The engine build and runner land with the TensorRT issue; until then the target
reports itself unavailable with the reason, so a recipe that requires it exits 4 and an optional
one is reported as skipped — never replaced by another runtime."""

from __future__ import annotations

import importlib.util


def unavailable_reason() -> str | None:
    """Why the tensorrt target cannot run here (always a reason in this version)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (GPU runners: pip install 'optimize[gpu]' in NVIDIA's TensorRT container)"
    return "this version of optimize does not build TensorRT engines yet"
