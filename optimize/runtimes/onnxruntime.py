"""ONNX Runtime runner: CPU and CUDA execution providers, each only when the installed build has it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optimize.errors import RuntimeMissingError, StageError, first_line
from optimize.lazy import lazy
from optimize.runtimes.base import DeviceRunner, Runner, TensorSpec

np = lazy("numpy")

ort = lazy("onnxruntime")
torch = lazy("torch")

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
        version = ort.__version__
    except ImportError as e:
        return f"onnxruntime cannot be imported ({e})"
    provider = PROVIDERS.get(target)
    if provider is None:
        return f"unknown ONNX Runtime target {target!r}"
    available = ort.get_available_providers()
    if provider not in available:
        return (
            f"the installed onnxruntime {version} has no {provider} "
            f"(it has {', '.join(available)}); install onnxruntime-gpu on a CUDA machine"
        )
    return None


class OnnxRuntimeRunner(Runner):
    """An ONNX Runtime InferenceSession restricted to exactly one execution provider."""

    def __init__(self, model_path: Path, target: str = "onnxruntime-cpu", threads: int | None = None) -> None:
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


_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "float64": "float64", "int64": "int64",
                 "int32": "int32", "int8": "int8", "uint8": "uint8", "bool": "bool"}  # fmt: skip


class OnnxRuntimeCudaRunner(DeviceRunner):
    """ONNX Runtime's CUDA provider on our own CUDA stream (`user_compute_stream`, ONNX Runtime ≥ 1.17), with
    inputs and outputs bound to device buffers (IOBinding), so it is staged, computed, fetched and timed with
    CUDA events like every GPU runner. Output shapes are learned once per input shape (a first run with
    buffers ONNX Runtime allocates), then outputs go to our own buffers."""

    def __init__(self, model_path: Path, threads: int | None = None) -> None:
        self.target = "onnxruntime-cuda"
        self.model_path = Path(model_path)
        self.stream = torch.cuda.Stream()
        self._device_id = torch.cuda.current_device()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        provider = (
            "CUDAExecutionProvider",
            {"device_id": str(self._device_id), "user_compute_stream": str(self.stream.cuda_stream)},
        )
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=[provider])
        except Exception as e:
            raise StageError(f"{self.model_path.name}: ONNX Runtime cannot load the model: {first_line(e)}") from None
        if self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeMissingError(
                f"{self.model_path.name}: ONNX Runtime would not run on CUDAExecutionProvider "
                f"(it chose {self.session.get_providers()[0]}); no fallback is taken"
            )
        self.inputs = [_spec(x) for x in self.session.get_inputs()]
        self.outputs = [_spec(x) for x in self.session.get_outputs()]
        self._binding = self.session.io_binding()
        self._run_options = ort.RunOptions()
        # Return once the work is enqueued on our stream; the caller synchronises it.
        self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._device: dict[str, Any] = {}
        self._host_in: dict[str, Any] = {}
        self._host_out: dict[str, Any] = {}
        self._out_shapes: dict[tuple[tuple[int, ...], ...], list[tuple[int, ...]]] = {}
        self._staged = torch.cuda.Event()

    def _torch_dtype(self, spec: TensorSpec) -> Any:
        return getattr(torch, _TORCH_DTYPES.get(spec.dtype, "float32"))

    def _buffer(self, store: dict[str, Any], spec: TensorSpec, shape: tuple[int, ...], **kw: Any) -> Any:
        buf = store.get(spec.name)
        if buf is None or tuple(buf.shape) != shape:
            buf = torch.empty(shape, dtype=self._torch_dtype(spec), **kw)
            store[spec.name] = buf
        return buf

    def prepare(self, feeds: dict[str, np.ndarray]) -> None:
        """Copy the feeds into pinned host buffers in the inputs' types (host work, not timed)."""
        self._staged.synchronize()  # the last stage's copies have read the buffers
        for spec in self.inputs:
            value = torch.from_numpy(np.ascontiguousarray(feeds[spec.name]))
            host = self._buffer(self._host_in, spec, tuple(value.shape), pin_memory=True)
            host.copy_(value)  # float feeds take the input's float type, as the CPU runner does

    def stage(self) -> None:
        """Copy the prepared inputs to device buffers on the stream and bind them; bind the output buffers."""
        with torch.cuda.stream(self.stream):
            shapes = []
            for spec in self.inputs:
                host = self._host_in[spec.name]
                dev = self._buffer(self._device, spec, tuple(host.shape), device="cuda")
                dev.copy_(host, non_blocking=True)
                self._binding.bind_input(
                    spec.name, "cuda", self._device_id, np.dtype(spec.dtype), list(dev.shape), dev.data_ptr()
                )
                shapes.append(tuple(host.shape))
            self._staged.record(self.stream)
            key = tuple(shapes)
            if key not in self._out_shapes:  # learn the output shapes for these input shapes once
                for spec in self.outputs:
                    self._binding.bind_output(spec.name, "cuda", self._device_id)
                self.stream.synchronize()
                self.session.run_with_iobinding(self._binding)
                self._out_shapes[key] = [tuple(v.shape()) for v in self._binding.get_outputs()]
            for spec, shape in zip(self.outputs, self._out_shapes[key], strict=True):
                dev = self._buffer(self._device, spec, shape, device="cuda")
                self._buffer(self._host_out, spec, shape, pin_memory=True)
                self._binding.bind_output(
                    spec.name, "cuda", self._device_id, np.dtype(spec.dtype), list(shape), dev.data_ptr()
                )

    def compute(self) -> None:
        """Enqueue the session on the stream."""
        self.session.run_with_iobinding(self._binding, self._run_options)

    def fetch(self) -> None:
        """Enqueue the device → pinned host copies of the outputs."""
        with torch.cuda.stream(self.stream):
            for spec in self.outputs:
                self._host_out[spec.name].copy_(self._device[spec.name], non_blocking=True)

    def outputs_host(self) -> dict[str, np.ndarray]:
        """The fetched outputs as numpy arrays."""
        return {spec.name: self._host_out[spec.name].numpy().copy() for spec in self.outputs}

    def close(self) -> None:
        """Drop the session and the buffers."""
        self.stream.synchronize()
        self.session = None  # type: ignore[assignment]
        self._device.clear()
        self._host_in.clear()
        self._host_out.clear()
