"""A TEST DOUBLE of the `tensorrt` Python module — not TensorRT, and no evidence that TensorRT works.

It lets the CPU suite drive our own orchestration (profiles, timing-cache keys and merging, engine names,
sidecars, the precision check, error mapping) through the same calls the real module takes. It builds
nothing: a "plan" is JSON describing the ONNX graph, and a layer's precision is read from the ONNX's own
tensor types, the way a strongly typed TensorRT network takes it. A network created without strong
typing comes out FP32, the way TensorRT 10 builds a weakly typed network without the FP16 flag.

Every public name our code touches on the module and its objects is recorded in `module.double_used`
(`Class.member`), so tests/runtimes/test_tensorrt_api.py can check them against the names the real 10.x and 11.x
bindings export. Class names are TensorRT's own.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto


class _Recorded:
    """Records `Class.member` for every public attribute our code reads (the double's own reads of its
    bookkeeping are not recorded)."""

    _used: set[str]

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_") and sys._getframe(1).f_globals.get("__name__") != __name__:
            object.__getattribute__(self, "_used").add(f"{type(self).__name__}.{name}")
        return object.__getattribute__(self, name)


class _Member:
    def __init__(self, enum: str, name: str, value: int) -> None:
        self.enum, self.name, self.value = enum, name, value

    def __int__(self) -> int:
        return self.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Member) and (other.enum, other.name) == (self.enum, self.name)

    def __hash__(self) -> int:
        return hash((self.enum, self.name))

    def __repr__(self) -> str:
        return f"{self.enum}.{self.name}"


class _Enum:
    """An enum whose member reads are recorded; a member the version lacks raises AttributeError, as the
    real bindings do."""

    def __init__(self, name: str, members: list[str] | dict[str, int], used: set[str]) -> None:
        self._name, self._used = name, used
        values = members if isinstance(members, dict) else {m: i for i, m in enumerate(members)}
        self._members = {m: _Member(name, m, v) for m, v in values.items()}

    def __getattr__(self, member: str) -> _Member:
        if member.startswith("_"):
            raise AttributeError(member)
        if sys._getframe(1).f_globals.get("__name__") != __name__:
            self._used.add(f"{self._name}.{member}")
        try:
            return self._members[member]
        except KeyError:
            raise AttributeError(f"type object '{self._name}' has no attribute '{member}'") from None


class IHostMemory(bytes):
    """Serialized plans and caches: the real one supports the buffer protocol; bytes() works on both."""


_ONNX_TO_TRT = {
    TensorProto.FLOAT: "FLOAT",
    TensorProto.FLOAT16: "HALF",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.BOOL: "BOOL",
}
_FORMAT = {"FLOAT": "FP32", "HALF": "FP16", "BF16": "BF16", "INT8": "Int8", "UINT8": "UInt8", "INT32": "Int32"}
_LAYER_TYPES = {"MatMul": "MatrixMultiply", "Gemm": "MatrixMultiply", "Conv": "CaskConvolution"}
_SKIPPED_OPS = {"Constant", "QuantizeLinear", "DequantizeLinear", "Cast", "Identity"}


def make(version: str = "10.16.0.72") -> types.ModuleType:
    """A fresh double of TensorRT `version` (major 10: with the STRONGLY_TYPED creation flag; 11: without
    it and without the FP16/INT8 builder flags, which TensorRT 11 removed)."""
    used: set[str] = set()
    major = int(version.split(".")[0])

    class Module(types.ModuleType):
        def __getattribute__(self, name: str) -> Any:
            if not name.startswith(("_", "double_")) and sys._getframe(1).f_globals.get("__name__") != __name__:
                used.add(name)
            return super().__getattribute__(name)

    trt = Module("tensorrt")
    trt.__version__ = version
    trt.double_used = used
    trt.double_build_errors = []  # messages a failing build logs (then returns None)
    trt.double_parse_errors = []  # (node name, op, description) the parser reports

    def rec(cls: type) -> type:
        cls._used = used
        return cls

    # TensorRT 11 keeps STRONGLY_TYPED (deprecated, ignored: always strongly typed) and drops EXPLICIT_BATCH,
    # and drops every precision builder flag (FP16, BF16, INT8, FP8, ...).
    creation_flags = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2}
    builder_flags = ["FP16", "BF16", "INT8", "FP8", "TF32", "REFIT", "STRIP_PLAN"]
    if major >= 11:
        creation_flags = {"STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2}
        builder_flags = ["TF32", "REFIT", "STRIP_PLAN"]
    trt.NetworkDefinitionCreationFlag = _Enum("NetworkDefinitionCreationFlag", creation_flags, used)
    trt.BuilderFlag = _Enum("BuilderFlag", builder_flags, used)
    trt.MemoryPoolType = _Enum("MemoryPoolType", ["WORKSPACE", "DLA_MANAGED_SRAM", "TACTIC_DRAM"], used)
    trt.ProfilingVerbosity = _Enum("ProfilingVerbosity", ["LAYER_NAMES_ONLY", "NONE", "DETAILED"], used)
    trt.LayerInformationFormat = _Enum("LayerInformationFormat", ["ONELINE", "JSON"], used)
    trt.TensorIOMode = _Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"], used)
    trt.DataType = _Enum("DataType", list(_ONNX_TO_TRT.values()), used)

    class ILogger:
        Severity = _Enum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"], used)

        def __init__(self) -> None:
            pass

        def log(self, severity: Any, msg: str) -> None:  # overridden by our logger
            pass

    trt.ILogger = ILogger

    class IProgressMonitor:
        """Subclassed by our monitor, as the real one is (phase_start, step_complete, phase_finish)."""

        def __init__(self) -> None:
            pass

    trt.IProgressMonitor = IProgressMonitor

    @rec
    class ParserError(_Recorded):
        def __init__(self, node: int, name: str, op: str, desc: str) -> None:
            self._node, self._name, self._op, self._desc = node, name, op, desc

        def desc(self) -> str:
            return self._desc

        def node(self) -> int:
            return self._node

        def node_name(self) -> str:
            return self._name

        def node_operator(self) -> str:
            return self._op

    @rec
    class INetworkDefinition(_Recorded):
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.model: onnx.ModelProto | None = None
            self.path = ""

    @rec
    class OnnxParser(_Recorded):
        def __init__(self, network: INetworkDefinition, logger: Any) -> None:
            self._network, self._logger, self._errors = network, logger, []

        def parse_from_file(self, path: str) -> bool:
            if trt.double_parse_errors:
                self._errors = [ParserError(i, *e) for i, e in enumerate(trt.double_parse_errors)]
                return False
            self._network.model = onnx.shape_inference.infer_shapes(onnx.load(path))
            self._network.path = path
            return True

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, index: int) -> ParserError:
            return self._errors[index]

    @rec
    class IOptimizationProfile(_Recorded):
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}

        def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TensorRT's names
            if not all(a <= b <= c for a, b, c in zip(min, opt, max, strict=True)):
                raise ValueError(f"profile for {name}: needs min <= opt <= max")
            self.shapes[name] = (list(min), list(opt), list(max))

    @rec
    class ITimingCache(_Recorded):
        def __init__(self, data: bytes) -> None:
            self.valid = True
            self.entries: set[str] = set()
            if data:
                try:
                    blob = json.loads(bytes(data))
                    self.entries, self.version = set(blob["entries"]), blob["version"]
                    self.valid = self.version == version
                except (ValueError, KeyError):
                    self.valid = False

        def combine(self, other: ITimingCache, ignore_mismatch: bool) -> bool:
            if not other.valid and not ignore_mismatch:
                return False
            self.entries |= other.entries
            return True

        def serialize(self) -> IHostMemory:
            return IHostMemory(json.dumps({"version": version, "entries": sorted(self.entries)}).encode())

    @rec
    class IBuilderConfig(_Recorded):
        def __init__(self) -> None:
            self.pools: dict[str, int] = {}
            self.builder_optimization_level = 3
            self.profiling_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY
            self.profiles: list[IOptimizationProfile] = []
            self.cache: ITimingCache | None = None
            self.progress_monitor: IProgressMonitor | None = None

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self.pools[pool.name] = size

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> ITimingCache:
            return ITimingCache(data)

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            if not cache.valid and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self.cache

    @rec
    class Builder(_Recorded):
        def __init__(self, logger: Any) -> None:
            self._logger = logger

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> Any:
            for msg in trt.double_build_errors:
                self._logger.log(ILogger.Severity.ERROR, msg)
            if trt.double_build_errors:
                return None
            assert network.model is not None, "build before parse"
            graph = network.model.graph
            init_names = {i.name for i in graph.initializer}
            dynamic = [
                i.name
                for i in graph.input
                if i.name not in init_names and any(not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)
            ]
            covered = set(config.profiles[0].shapes) if config.profiles else set()
            if set(dynamic) - covered:
                self._logger.log(
                    ILogger.Severity.ERROR, "Network has dynamic or shape inputs, but no optimization profile"
                )
                return None
            strongly_typed = major >= 11 or bool(network.flags & (1 << 1))  # STRONGLY_TYPED is 1
            layers = _layers(network.model, strongly_typed, config.profiling_verbosity.name == "DETAILED")
            _report_phases(config.progress_monitor, len(layers))
            if config.cache is not None:
                config.cache.entries |= {f"{layer['LayerType']}:{layer['Name']}" for layer in layers}
            io = _io(network.model)
            weights = sum(_bytes_of(t, strongly_typed) for t in graph.initializer)
            plan = {"double": "tensorrt", "version": version, "layers": layers, "io": io, "pad": "0" * weights}
            return IHostMemory(json.dumps(plan).encode())

    @rec
    class EngineInspector(_Recorded):
        def __init__(self, plan: dict[str, Any]) -> None:
            self._plan = plan

        def get_engine_information(self, fmt: Any) -> str:
            assert fmt.name == "JSON"
            return json.dumps({"Layers": self._plan["layers"], "Bindings": [t["name"] for t in self._plan["io"]]})

    @rec
    class ICudaEngine(_Recorded):
        def __init__(self, plan: dict[str, Any]) -> None:
            self._plan = plan

        @property
        def num_io_tensors(self) -> int:
            return len(self._plan["io"])

        def get_tensor_name(self, index: int) -> str:
            return self._plan["io"][index]["name"]

        def get_tensor_mode(self, name: str) -> _Member:
            t = next(t for t in self._plan["io"] if t["name"] == name)
            return trt.TensorIOMode.INPUT if t["input"] else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> _Member:
            t = next(t for t in self._plan["io"] if t["name"] == name)
            return getattr(trt.DataType, t["dtype"])

        @property
        def device_memory_size_v2(self) -> int:
            return 1 << 20

        def create_engine_inspector(self) -> EngineInspector:
            return EngineInspector(self._plan)

    @rec
    class Runtime(_Recorded):
        def __init__(self, logger: Any) -> None:
            self._logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> ICudaEngine | None:
            plan = json.loads(bytes(data))
            if plan["version"] != version:
                self._logger.log(
                    ILogger.Severity.ERROR,
                    f"The engine plan file is not compatible with this version of TensorRT, expecting library "
                    f"version {version} got {plan['version']}, please rebuild.",
                )
                return None
            return ICudaEngine(plan)

    for cls in (Builder, OnnxParser, Runtime):
        setattr(trt, cls.__name__, cls)
    return trt


# The double's own phases (names made up here; the real builder reports its own), nested as TensorRT nests
# them: a top phase of two steps, each step a child phase; the first has one step per layer.
DOUBLE_PHASES = ("Building (double)", "Layers (double)", "Writing (double)")


def _report_phases(monitor: Any, layers: int) -> None:
    """Call the monitor as TensorRT's builder does: phase_start(name, parent or None, steps), step_complete
    (name, 0-based step) for each step, phase_finish(name); a phase's steps in order."""
    if monitor is None:
        return
    top, first, second = DOUBLE_PHASES
    monitor.phase_start(top, None, 2)
    for step, (child, steps) in enumerate(((first, max(layers, 1)), (second, 1))):
        monitor.phase_start(child, top, steps)
        for k in range(steps):
            monitor.step_complete(child, k)
        monitor.phase_finish(child)
        monitor.step_complete(top, step)
    monitor.phase_finish(top)


def _dtype_map(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types_ = {i.name: i.data_type for i in g.initializer}
    for vi in [*g.input, *g.output, *g.value_info]:
        types_[vi.name] = vi.type.tensor_type.elem_type
    return types_


def _layers(model: onnx.ModelProto, strongly_typed: bool, detailed: bool) -> list[Any]:
    """One layer per compute node, with the precision of its inputs as a strongly typed build keeps them
    (Q/DQ in front of a node makes it INT8); a weakly typed build without precision flags runs FP32."""
    types_ = _dtype_map(model)
    produced_by = {o: n for n in model.graph.node for o in n.output}
    layers: list[Any] = []
    for node in model.graph.node:
        if node.op_type in _SKIPPED_OPS:
            continue
        if not detailed:
            layers.append(node.name)
            continue
        inputs = []
        for name in node.input[:2]:
            if not name:
                continue
            src = produced_by.get(name)
            trt_type = _ONNX_TO_TRT.get(types_.get(name, TensorProto.FLOAT), "FLOAT")
            if src is not None and src.op_type == "DequantizeLinear":
                trt_type = "INT8"
            if not strongly_typed and trt_type in ("HALF", "INT8", "BF16"):
                trt_type = "FLOAT"
            inputs.append(
                {"Name": name, "Format/Datatype": f"Row major linear {_FORMAT.get(trt_type, trt_type)} format"}
            )
        layers.append({"Name": node.name, "LayerType": _LAYER_TYPES.get(node.op_type, node.op_type), "Inputs": inputs})
    return layers


def _io(model: onnx.ModelProto) -> list[dict[str, Any]]:
    g = model.graph
    inits = {i.name for i in g.initializer}
    return [
        {"name": v.name, "input": inp, "dtype": _ONNX_TO_TRT.get(v.type.tensor_type.elem_type, "FLOAT")}
        for inp, values in ((True, [i for i in g.input if i.name not in inits]), (False, list(g.output)))
        for v in values
    ]


def _bytes_of(tensor: onnx.TensorProto, strongly_typed: bool) -> int:
    n = 1
    for d in tensor.dims:
        n *= d
    size = {TensorProto.FLOAT16: 2, TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.BFLOAT16: 2}.get(
        tensor.data_type, 4
    )
    return n * (size if strongly_typed else 4)


def install(monkeypatch: Any, version: str = "10.16.0.72") -> types.ModuleType:
    """Put a fresh double in sys.modules['tensorrt'] for one test; returns it."""
    trt = make(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def read_plan(path: Path) -> dict[str, Any]:
    """The double's plan (JSON), for assertions."""
    return json.loads(Path(path).read_bytes())
