"""TensorRT runner: loads a `.plan` built by `optimize.engine` (refusing one built for another GPU
architecture or TensorRT version) and runs it with TensorRT 10/11's name-based I/O: `set_input_shape`,
`set_tensor_address`, `execute_async_v3`. Device and pinned host buffers, the stream and the events that
time it are torch's, so every GPU runner is timed the same way.

Also the TensorRT pieces the engine stage shares with the runner (the module with its install hint, the GPU,
the logger, a plan's sidecar and the identity check): `optimize.engine` imports them from here."""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimize.errors import RecipeError, RuntimeMissingError, StageError, first_line
from optimize.files import sha256_file
from optimize.gpu import gpu
from optimize.lazy import lazy
from optimize.runtimes.base import DeviceRunner, TensorSpec

np = lazy("numpy")

torch = lazy("torch")

# TensorRT DataType member name → torch dtype attribute name.
_TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "FP8": "float8_e4m3fn",
}


def tensorrt() -> Any:
    """The `tensorrt` module, or RuntimeMissingError (exit 4) with how to get it."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as e:
        raise RuntimeMissingError(
            f"TensorRT is not installed ({first_line(e)}); on a GPU runner: pip install 'optimize[gpu]' "
            "in NVIDIA's TensorRT container"
        ) from None


@dataclass(frozen=True)
class Device:
    """The GPU an engine is built for or loaded on."""

    name: str
    compute_capability: str
    driver: str
    cuda: str

    @property
    def sm(self) -> str:
        """The compute capability without its dot (`90` for 9.0), as engine and cache names carry it."""
        return self.compute_capability.replace(".", "")


def current_device() -> Device:
    """GPU 0 of this machine (exit 4 when there is none)."""
    info = gpu(0)
    return Device(info.name, info.compute_capability, info.driver, info.cuda_driver)


def make_logger(trt: Any, lines: list[str]) -> Any:
    """A TensorRT logger that keeps every message (warnings and up) for the build log and error messages."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            name = getattr(severity, "name", str(severity))
            lines.append(f"[{name}] {msg}")

    return _Logger()


def device_memory_bytes(engine: Any) -> int | None:
    """Activation memory the engine needs on the device (the v2 property where the version has it)."""
    for attr in ("device_memory_size_v2", "device_memory_size"):
        try:
            return int(getattr(engine, attr))
        except AttributeError:
            continue
    return None


def read_sidecar(plan_path: Path) -> dict[str, Any]:
    """The JSON sidecar beside a plan (exit 2 when it is missing: an engine without identity is not loaded)."""
    side = Path(plan_path).with_suffix(".json")
    try:
        return json.loads(side.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{plan_path}: no sidecar {side.name}; engines are loaded with their identity") from None
    except ValueError as e:
        raise RecipeError(f"{side}: not valid JSON ({e})") from None


def check_compatible(sidecar: dict[str, Any], device: Device, trt_version: str, plan_path: Path) -> None:
    """Refuse (exit 4) an engine built for another GPU architecture or TensorRT version, and (exit 3) a plan
    whose bytes are not the ones the sidecar describes."""
    built_for = (
        f"sm{str(sidecar.get('compute_capability', '?')).replace('.', '')} with TensorRT {sidecar.get('tensorrt')}"
    )
    here = f"sm{device.sm} ({device.name}) with TensorRT {trt_version}"
    if sidecar.get("compute_capability") != device.compute_capability or sidecar.get("tensorrt") != trt_version:
        raise RuntimeMissingError(
            f"{Path(plan_path).name}: built for {built_for}, this machine is {here}; engines only run on the "
            "GPU architecture and TensorRT version that built them: rebuild it here"
        )
    digest = sha256_file(Path(plan_path))
    if digest != sidecar.get("plan_sha256"):
        raise StageError(f"{Path(plan_path).name}: sha256 {digest[:12]}… does not match its sidecar; rebuild it")


def unavailable_reason() -> str | None:
    """None when TensorRT imports and torch sees a CUDA device, else why not (one line)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (GPU runners: pip install 'optimize[gpu]' in NVIDIA's TensorRT container)"
    try:
        importlib.import_module("tensorrt")
    except Exception as e:  # the wheel is there but its libraries are not
        return f"TensorRT cannot be imported: {first_line(e)}"
    try:
        version = torch.__version__
    except ImportError as e:
        return f"torch cannot be imported ({e}); the TensorRT runner keeps its buffers in torch"
    if not torch.cuda.is_available():
        return f"torch {version} sees no CUDA device; TensorRT needs an NVIDIA GPU"
    return None


class TensorRTRunner(DeviceRunner):
    """One deserialized engine with one execution context on its own CUDA stream."""

    def __init__(self, plan_path: Path, target: str = "tensorrt") -> None:
        trt = tensorrt()
        self.target = target
        self.plan_path = Path(plan_path)
        sidecar = read_sidecar(self.plan_path)
        check_compatible(sidecar, current_device(), str(trt.__version__), self.plan_path)
        self._log: list[str] = []
        self._runtime = trt.Runtime(make_logger(trt, self._log))
        self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise StageError(f"{self.plan_path.name}: TensorRT cannot load the engine: {self._last_error()}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise StageError(f"{self.plan_path.name}: no execution context (GPU out of memory?): {self._last_error()}")
        self.inputs = [TensorSpec(d["name"], d["dtype"], tuple(d["shape"])) for d in sidecar["inputs"]]
        self.outputs = [TensorSpec(d["name"], d["dtype"], tuple(d["shape"])) for d in sidecar["outputs"]]
        io = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            io[name] = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        expected = {s.name: True for s in self.inputs} | {s.name: False for s in self.outputs}
        if io != expected:
            raise StageError(f"{self.plan_path.name}: the engine's I/O {io} is not its sidecar's {expected}")
        self._dtype = {name: _torch_dtype(torch, self.engine.get_tensor_dtype(name)) for name in io}
        self.stream = torch.cuda.Stream()
        self._device: dict[str, Any] = {}
        self._host_in: dict[str, Any] = {}
        self._host_out: dict[str, Any] = {}
        self._staged = torch.cuda.Event()
        self._sidecar = sidecar

    def _last_error(self) -> str:
        errors = [ln for ln in self._log if ln.startswith(("[ERROR]", "[INTERNAL_ERROR]"))]
        return (errors or self._log or ["no message from TensorRT"])[-1]

    def _buffer(self, store: dict[str, Any], name: str, shape: tuple[int, ...], **kw: Any) -> Any:
        buf = store.get(name)
        if buf is None or tuple(buf.shape) != shape:
            buf = torch.empty(shape, dtype=self._dtype[name], **kw)
            store[name] = buf
        return buf

    def prepare(self, feeds: dict[str, np.ndarray]) -> None:
        """Copy the feeds into pinned host buffers in the engine's input types (host work, not timed)."""
        self._staged.synchronize()  # the last stage's copies have read the buffers
        for spec in self.inputs:
            value = torch.from_numpy(np.ascontiguousarray(feeds[spec.name]))
            host = self._buffer(self._host_in, spec.name, tuple(value.shape), pin_memory=True)
            host.copy_(value)  # converts to the engine's type (FP32 feeds into an FP16 input, say)

    def stage(self) -> None:
        """Copy the prepared inputs to the device on the stream, set their shapes, then bind the outputs."""
        with torch.cuda.stream(self.stream):
            for spec in self.inputs:
                host = self._host_in[spec.name]
                dev = self._buffer(self._device, spec.name, tuple(host.shape), device="cuda")
                dev.copy_(host, non_blocking=True)
                if not self.context.set_input_shape(spec.name, tuple(host.shape)):
                    raise StageError(
                        f"{self.plan_path.name}: input {spec.name!r} shape {list(host.shape)} is outside the "
                        f"engine's profile {self._sidecar.get('profiles', {}).get(spec.name)}"
                    )
                self.context.set_tensor_address(spec.name, dev.data_ptr())
            self._staged.record(self.stream)
            for spec in self.outputs:
                shape = tuple(int(d) for d in self.context.get_tensor_shape(spec.name))
                dev = self._buffer(self._device, spec.name, shape, device="cuda")
                self._buffer(self._host_out, spec.name, shape, pin_memory=True)
                self.context.set_tensor_address(spec.name, dev.data_ptr())

    def compute(self) -> None:
        """Enqueue the engine on the stream."""
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise StageError(f"{self.plan_path.name}: execute_async_v3 failed: {self._last_error()}")

    def fetch(self) -> None:
        """Enqueue the device → pinned host copies of the outputs."""
        with torch.cuda.stream(self.stream):
            for spec in self.outputs:
                self._host_out[spec.name].copy_(self._device[spec.name], non_blocking=True)

    def outputs_host(self) -> dict[str, np.ndarray]:
        """The outputs as numpy arrays (bfloat16 and FP8, which numpy lacks, as float32)."""
        out = {}
        for spec in self.outputs:
            t = self._host_out[spec.name]
            if t.dtype in (torch.bfloat16,) or "float8" in str(t.dtype):
                t = t.float()
            out[spec.name] = t.numpy().copy()
        return out

    def device_memory(self) -> dict[str, float]:
        """The engine's activation memory and plan size (MB), as TensorRT reports them."""
        out = {"engine_plan_mb": self.plan_path.stat().st_size / 2**20}
        size = device_memory_bytes(self.engine)
        if size is not None:
            out["engine_device_memory_mb"] = size / 2**20
        return out

    def close(self) -> None:
        """Free the context, the engine and the buffers (in that order)."""
        self.stream.synchronize()
        self.context = None
        self.engine = None
        self._device.clear()
        self._host_in.clear()
        self._host_out.clear()


def _torch_dtype(torch: Any, trt_dtype: Any) -> Any:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    attr = _TORCH_DTYPES.get(name)
    if attr is None or not hasattr(torch, attr):
        raise StageError(f"TensorRT tensor type {name} has no torch buffer type here")
    return getattr(torch, attr)
