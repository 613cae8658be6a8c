"""Runtimes: one small Runner interface over ONNX Runtime (CPU/CUDA) and, on GPU runners, TensorRT.

A runtime that is asked for and is not available raises RuntimeMissingError (exit 4); nothing falls
back silently to another runtime.
"""

from __future__ import annotations

from pathlib import Path

from optimize.errors import RuntimeMissingError
from optimize.runtimes.base import Runner, TensorSpec

__all__ = ["Runner", "TensorSpec", "open_runner", "unavailable_reason", "require"]


def unavailable_reason(target: str) -> str | None:
    """None when `target` can run on this machine, else why not (one line)."""
    if target.startswith("onnxruntime-"):
        from optimize.runtimes.onnxruntime import unavailable_reason as ort_reason

        return ort_reason(target)
    if target == "tensorrt":
        from optimize.runtimes.tensorrt import unavailable_reason as trt_reason

        return trt_reason()
    return f"unknown target {target!r}"


def require(target: str, why: str) -> None:
    """Raise RuntimeMissingError (exit 4) when `target` cannot run here."""
    reason = unavailable_reason(target)
    if reason:
        raise RuntimeMissingError(f"{why}: target {target} is not available: {reason}")


def open_runner(target: str, model_path: Path, threads: int | None = None) -> Runner:
    """Open a runner for `model_path` on `target` (raises RuntimeMissingError when it cannot run here)."""
    require(target, "runner")
    if target.startswith("onnxruntime-"):
        from optimize.runtimes.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(model_path, target, threads)
    raise RuntimeMissingError(f"runner: no runner for target {target!r}")
