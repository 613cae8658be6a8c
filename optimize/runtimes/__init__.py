"""Runtimes: one small Runner interface over ONNX Runtime (CPU/CUDA), torch (the source model, CPU/CUDA)
and, on GPU runners, TensorRT.

A runtime that is asked for and is not available raises RuntimeMissingError (exit 4); nothing falls
back silently to another runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optimize.errors import RuntimeMissingError, StageError
from optimize.runtimes import onnxruntime as ort_runtime
from optimize.runtimes import tensorrt as trt_runtime
from optimize.runtimes import torch as torch_runtime
from optimize.runtimes.base import DeviceRunner, Runner, TensorSpec
from optimize.runtimes.torch import TorchArtifact, supports

__all__ = [
    "DeviceRunner",
    "Runner",
    "TensorSpec",
    "TorchArtifact",
    "open_runner",
    "unavailable_reason",
    "require",
    "runtime_libraries",
    "target_refuses",
]


def unavailable_reason(target: str) -> str | None:
    """None when `target` can run on this machine, else why not (one line)."""
    if target.startswith("onnxruntime-"):
        return ort_runtime.unavailable_reason(target)
    if target == "tensorrt":
        return trt_runtime.unavailable_reason()
    if target.startswith("torch-"):
        return torch_runtime.unavailable_reason(target)
    return f"unknown target {target!r}"


def _torch_sees_cuda() -> bool:
    return torch_runtime.sees_cuda()


def require(target: str, why: str) -> None:
    """Raise RuntimeMissingError (exit 4) when `target` cannot run here."""
    reason = unavailable_reason(target)
    if reason:
        raise RuntimeMissingError(f"{why}: target {target} is not available: {reason}")


def open_runner(target: str, artifact: Path | TorchArtifact, threads: int | None = None) -> Runner:
    """Open a runner for `artifact` on `target` (raises RuntimeMissingError when it cannot run here).

    ONNX Runtime and TensorRT targets load a file (`artifact` is its path); the torch targets run the
    source module (`artifact` is a TorchArtifact). On torch-cpu, `threads` sets torch's thread count for
    the whole process (see TorchRunner); torch-cuda ignores it.
    """
    require(target, "runner")
    is_torch = target.startswith("torch-")
    if is_torch != isinstance(artifact, TorchArtifact):
        wanted = "a TorchArtifact (the source module)" if is_torch else "a model file"
        raise StageError(f"runner: target {target} runs {wanted}, not {type(artifact).__name__} {artifact!r:.80}")
    if target == "onnxruntime-cuda" and _torch_sees_cuda():
        # Device buffers and our own stream, so it is timed with CUDA events like every GPU runner.
        return ort_runtime.OnnxRuntimeCudaRunner(artifact, threads)  # type: ignore[arg-type]
    if target.startswith("onnxruntime-"):  # CPU, or CUDA without a CUDA torch: timed on the host clock
        return ort_runtime.OnnxRuntimeRunner(artifact, target, threads)  # type: ignore[arg-type]
    if target == "tensorrt":
        return trt_runtime.TensorRTRunner(artifact, target)  # type: ignore[arg-type]
    if isinstance(artifact, TorchArtifact):
        if target == "torch-cpu":
            return torch_runtime.TorchRunner(
                artifact.module, artifact.inputs, artifact.outputs, target, artifact.precision, threads
            )
        return torch_runtime.TorchCudaRunner(artifact.module, artifact.inputs, artifact.outputs, artifact.precision)
    raise RuntimeMissingError(f"runner: no runner for target {target!r}")


def target_refuses(target: str, recipe: Any, name: str, precision: str) -> str | None:
    """Why `target` does not run variant `name` (None when it does): torch runs the source module in FP32
    or FP16 autocast, not INT8; TensorRT compiles Q/DQ INT8, not ONNX Runtime's own INT8 operators."""
    if target.startswith("torch-"):
        return supports(precision)
    if target == "tensorrt" and precision == "int8":
        variant = next(v for v in recipe.precision.variants if v.name == name)
        if variant.backend == "onnxruntime-dynamic" or (
            variant.backend == "onnxruntime" and variant.quant_format == "qoperator"
        ):
            return (
                f"backend {variant.backend} writes ONNX Runtime's own INT8 operators; TensorRT takes Q/DQ INT8 "
                "(backend modelopt, or onnxruntime with quant_format qdq)"
            )
    return None


# The libraries whose versions change what each kind of target computes.
RUNTIME_LIBRARIES = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "numpy"),
    "tensorrt": ("tensorrt", "torch", "numpy"),
    "torch": ("torch", "numpy"),
}


def runtime_libraries(target: str) -> tuple[str, ...]:
    """The libraries whose versions change what `target` computes (part of its cache keys)."""
    return RUNTIME_LIBRARIES[target.split("-")[0]]
