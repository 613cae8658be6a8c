"""torch runners: the source model itself, eager, on the CPU (`torch-cpu`) or a CUDA GPU (`torch-cuda`), so a
baseline exists on every machine, with or without TensorRT. FP32, or FP16 under `torch.autocast`.

torch is imported when a runner is made or a function here is called, never at import time, so
`TorchArtifact` can be named by code that must not load torch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from optimize.errors import RuntimeMissingError, StageError, first_line
from optimize.lazy import lazy
from optimize.runtimes.base import DeviceRunner, Runner, TensorSpec

np = lazy("numpy")

torch = lazy("torch")

TARGETS = ("torch-cpu", "torch-cuda")
PRECISIONS = ("fp32", "fp16")
_MB = 1024 * 1024


@dataclass(frozen=True)
class TorchArtifact:
    """What a torch target runs instead of a file: the source module, its I/O in ONNX order, the precision.

    `inputs` and `outputs` are the exported model's (the module is called with the inputs positionally
    in this order, and its outputs, a tensor or a tuple, are named in this order).
    """

    module: Any  # torch.nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: str = "fp32"


def supports(precision: str) -> str | None:
    """None when the torch targets can run a variant of `precision`, else why not (the pipeline skips it)."""
    if precision in PRECISIONS:
        return None
    return (
        f"the torch targets run the source model in FP32 or FP16 autocast; {precision.upper()} variants are "
        "ONNX artifacts"
    )


def unavailable_reason(target: str) -> str | None:
    """None when `target` (torch-cpu, torch-cuda) can run here, else why not (one line)."""
    if target not in TARGETS:
        return f"unknown torch target {target!r}"
    try:
        version = torch.__version__
    except ImportError as e:
        return f"torch cannot be imported ({first_line(e)})"
    if target == "torch-cpu":
        return None
    if torch.version.cuda is None:
        return f"torch {version} has no CUDA (a CPU-only build); install a CUDA build of torch"
    if not torch.cuda.is_available():
        return f"no CUDA device visible to torch {version} (CUDA {torch.version.cuda})"
    return None


def sees_cuda() -> bool:
    """Whether torch imports here and sees a CUDA device."""
    try:
        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _check_precision(target: str, precision: str) -> None:
    reason = supports(precision)
    if reason:
        raise StageError(f"{target}: {reason}")


def _float_feed(feeds: dict[str, np.ndarray], spec: TensorSpec, target: str) -> np.ndarray:
    """The feed for `spec`; float feeds take the input's float type (as ONNX Runtime's runner does), other
    types pass as they are, so a wrong integer feed fails in the model rather than being converted."""
    try:
        value = np.asarray(feeds[spec.name])
    except KeyError:
        raise StageError(f"{target}: no feed for input {spec.name!r} (feeds: {', '.join(feeds) or 'none'})") from None
    want = np.dtype(spec.dtype)
    if value.dtype.kind == "f" and want.kind == "f" and value.dtype != want:
        value = value.astype(want)
    return np.ascontiguousarray(value)


def _output_list(result: Any, outputs: list[TensorSpec], target: str) -> list[Any]:
    values = list(result) if isinstance(result, (tuple, list)) else [result]
    if len(values) != len(outputs):
        raise StageError(
            f"{target}: the module returned {len(values)} output(s), the model has {len(outputs)} "
            f"({', '.join(o.name for o in outputs)})"
        )
    return values


def _autocast(device_type: str, precision: str) -> Any:
    return torch.autocast(device_type, dtype=torch.float16, enabled=precision == "fp16")


def _check_cpu_fp16_autocast() -> None:
    """Try, don't compare versions: a torch whose CPU autocast lacks FP16 disables itself with a warning and
    runs FP32, which would be a silent fallback."""
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
            got = torch.nn.functional.linear(torch.ones(1, 2), torch.ones(3, 2)).dtype
    except Exception as e:
        raise RuntimeMissingError(
            f"torch-cpu: torch {torch.__version__} cannot run FP16 autocast on the CPU: {first_line(e)}"
        ) from None
    if got != torch.float16:
        raise RuntimeMissingError(
            f"torch-cpu: torch {torch.__version__}'s CPU autocast runs a Linear in {got} when FP16 is asked; "
            "FP16 needs a newer torch on the CPU (or run the torch-cuda target)"
        )


class TorchRunner(Runner):
    """The module eager on the CPU under `torch.inference_mode()`, FP32 or FP16 autocast.

    FP16 is `torch.autocast("cpu", dtype=torch.float16)`: FP16 as asked, not BF16. torch 2.13 runs Linear,
    conv, bmm and attention in float16 under it; whether this torch does is checked by trying when the runner
    is made, RuntimeMissingError otherwise (an older torch disables CPU FP16 autocast with a warning and would
    silently run FP32). Expect no speed-up on CPUs without native FP16 arithmetic. Float outputs come back
    as float32 whatever autocast computed them in, like the FP32 baseline they are compared with.

    `threads` sets torch's intra-op thread count with `torch.set_num_threads`, which is process-wide (torch
    has one pool per process): it stays set after the runner is closed, for every torch user in the process.
    """

    def __init__(
        self,
        module: Any,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        target: str = "torch-cpu",
        precision: str = "fp32",
        threads: int | None = None,
    ) -> None:
        if target != "torch-cpu":
            raise StageError(f"TorchRunner runs the torch-cpu target, not {target!r} (use TorchCudaRunner)")
        _check_precision(target, precision)
        if precision == "fp16":
            _check_cpu_fp16_autocast()
        if threads:
            torch.set_num_threads(threads)
        self.target = target
        self.precision = precision
        self.module = module
        self.inputs = list(inputs)
        self.outputs = list(outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Call the module on `feeds` (positionally, in input order); outputs by name as numpy arrays."""
        args = [torch.from_numpy(_float_feed(feeds, spec, self.target)) for spec in self.inputs]
        with torch.inference_mode(), _autocast("cpu", self.precision):
            result = self.module(*args)
        values = _output_list(result, self.outputs, self.target)
        out = {}
        for spec, value in zip(self.outputs, values, strict=True):
            value = value.detach()
            if value.is_floating_point() and value.dtype != torch.float32:
                value = value.float()
            out[spec.name] = value.numpy()
        return out

    def close(self) -> None:
        """Drop the reference to the module (the caller's module is left as it is)."""
        self.module = None


class TorchCudaRunner(DeviceRunner):
    """A copy of the module on a CUDA GPU, run eager on its own `torch.cuda.Stream`, FP32 or FP16 autocast.

    The caller's module is not touched (`copy.deepcopy`, then `.to(device)`). Inputs go through pinned host
    buffers into device tensors (both reallocated when a shape or type changes); outputs come back through
    pinned host buffers. Float outputs are cast to float32 on the device as the
    last step of `compute`, as an FP16 ONNX model with FP32 I/O casts inside its graph.

    Under FP16, autocast casts the weights again on every `compute` (its weight cache lives only inside one
    autocast block): that is part of what FP16 autocast costs in eager torch, and it is timed as such.
    TF32 is whatever the process has set (`torch.backends.cuda.matmul`); the runner does not change it.
    """

    def __init__(
        self,
        module: Any,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        precision: str = "fp32",
        device: int | None = None,
    ) -> None:
        self.target = "torch-cuda"
        _check_precision(self.target, precision)
        reason = unavailable_reason(self.target)
        if reason:
            raise RuntimeMissingError(f"{self.target}: {reason}")
        self.precision = precision
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        self.stream = torch.cuda.Stream(self.device)
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                self.module = copy.deepcopy(module).to(self.device)
            self.stream.synchronize()
        except Exception as e:  # a module that cannot be copied, or no room on the GPU
            raise StageError(f"{self.target}: cannot copy the module to {self.device}: {first_line(e)}") from None
        self._in: dict[str, Any] = {}  # input name -> device tensor
        self._host_in: dict[str, tuple[Any, np.ndarray]] = {}  # input name -> (pinned tensor, its numpy view)
        self._staged = torch.cuda.Event()  # recorded after the last host → device copies
        self._out_dev: list[Any] = []
        self._out_host: dict[str, tuple[Any, np.ndarray]] = {}

    def prepare(self, feeds: dict[str, np.ndarray]) -> None:
        """Copy the feeds into pinned host buffers (host work, not timed: as in trtexec, H2D is the copy from
        pinned memory). Waits until the last `stage` has read the buffers."""
        self._staged.synchronize()
        for spec in self.inputs:
            value = _float_feed(feeds, spec, self.target)
            buffers = self._host_in.get(spec.name)
            if buffers is None or buffers[1].shape != value.shape or buffers[1].dtype != value.dtype:
                host = torch.from_numpy(value).pin_memory()  # a new pinned tensor of the feed's type
                self._host_in[spec.name] = (host, host.numpy())
            else:
                np.copyto(buffers[1], value)

    def stage(self) -> None:
        """Enqueue the copy of the prepared inputs into the device tensors."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for spec in self.inputs:
                host = self._host_in[spec.name][0]
                dev = self._in.get(spec.name)
                if dev is None or dev.shape != host.shape or dev.dtype != host.dtype:
                    dev = torch.empty_like(host, device=self.device)
                    self._in[spec.name] = dev
                dev.copy_(host, non_blocking=True)
            self._staged.record(self.stream)

    def compute(self) -> None:
        """Enqueue the module on the staged inputs (and the cast of float outputs to float32)."""
        if len(self._in) != len(self.inputs):
            raise StageError(f"{self.target}: compute() before stage(): no inputs on the device")
        args = [self._in[spec.name] for spec in self.inputs]
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream), torch.inference_mode():
            with _autocast("cuda", self.precision):
                result = self.module(*args)
            values = _output_list(result, self.outputs, self.target)
            self._out_dev = [v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for v in values]

    def fetch(self) -> None:
        """Enqueue the copy of the outputs into pinned host buffers."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for spec, value in zip(self.outputs, self._out_dev, strict=True):
                buffers = self._out_host.get(spec.name)
                if buffers is None or tuple(buffers[0].shape) != tuple(value.shape) or buffers[0].dtype != value.dtype:
                    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                    buffers = (host, host.numpy())
                    self._out_host[spec.name] = buffers
                buffers[0].copy_(value, non_blocking=True)

    def outputs_host(self) -> dict[str, np.ndarray]:
        """The fetched outputs (copies; valid once the stream is synchronised)."""
        return {spec.name: self._out_host[spec.name][1].copy() for spec in self.outputs}

    def device_memory(self) -> dict[str, float]:
        """The size of the module's parameters and buffers on the GPU (MB); the allocator's peak is measured
        by `optimize.bench.measure_torch_cuda_memory`."""
        if self.module is None:
            return {}
        tensors = [*self.module.parameters(), *self.module.buffers()]
        return {"torch_weights_mb": sum(t.numel() * t.element_size() for t in tensors) / _MB}

    def close(self) -> None:
        """Wait for the stream, then drop the module and the buffers (torch's allocator keeps the memory
        cached for reuse; `torch.cuda.empty_cache()` returns it to the driver)."""
        if self.module is None:
            return
        self.stream.synchronize()
        self.module = None
        self._in, self._out_dev, self._out_host, self._host_in = {}, [], {}, {}
