"""ONNX Runtime runner: CPU and CUDA execution providers, each only when the installed build has it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from optimize.errors import RuntimeMissingError, StageError, first_line
from optimize.runtimes.base import Runner, TensorSpec

PROVIDERS = {"onnxruntime-cpu": "CPUExecutionProvider", "onnxruntime-cuda": "CUDAExecutionProvider"}

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def unavailable_reason(target: str) -> str | None:
    """None when the installed onnxruntime has the provider for `target`, else why not."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return f"onnxruntime cannot be imported ({e})"
    provider = PROVIDERS.get(target)
    if provider is None:
        return f"unknown ONNX Runtime target {target!r}"
    available = ort.get_available_providers()
    if provider not in available:
        return (
            f"the installed onnxruntime {ort.__version__} has no {provider} "
            f"(it has {', '.join(available)}); install onnxruntime-gpu on a CUDA machine"
        )
    return None


class OnnxRuntimeRunner(Runner):
    """An ONNX Runtime InferenceSession restricted to exactly one execution provider."""

    def __init__(self, model_path: Path, target: str = "onnxruntime-cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        self.target = target
        self.model_path = Path(model_path)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # Idle sessions must not spin their threads: benchmark runners are timed interleaved, and a
        # spinning neighbour steals the cores from the session being timed (measured: 2x on 2 cores).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        provider = PROVIDERS[target]
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=[provider])
        except Exception as e:
            raise StageError(f"{self.model_path.name}: ONNX Runtime cannot load the model: {first_line(e)}") from None
        if self.session.get_providers()[0] != provider:
            raise RuntimeMissingError(
                f"{self.model_path.name}: ONNX Runtime would not run on {provider} "
                f"(it chose {self.session.get_providers()[0]}); no fallback is taken"
            )
        self.inputs = [_spec(x) for x in self.session.get_inputs()]
        self.outputs = [_spec(x) for x in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        # Float inputs take any float feed: a variant with FP16 I/O (keep_io_types: false) is fed the
        # same FP32 arrays as its baseline.
        self._float_inputs = {s.name: np.dtype(s.dtype) for s in self.inputs if s.dtype in _FLOATS}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch on the session's provider (float feeds are cast to the input's float type)."""
        if self._float_inputs:
            feeds = {k: _cast(v, self._float_inputs.get(k)) for k, v in feeds.items()}
        values = self.session.run(self._output_names, feeds)
        return dict(zip(self._output_names, values, strict=True))

    def close(self) -> None:
        """Drop the session."""
        self.session = None  # type: ignore[assignment]


_FLOATS = ("float16", "float32", "float64")


def _cast(value: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    if dtype is None or value.dtype == dtype or value.dtype.kind != "f":
        return value
    return value.astype(dtype)


def _spec(arg: object) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape)  # type: ignore[attr-defined]
    return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)  # type: ignore[attr-defined]
