"""The Triton Inference Server alternative (`--format triton`): a model repository `<app>/config.pbtxt` +
`<app>/1/model.onnx` (or `model.plan`) whose batching, queue and priorities come from the same `serving:` section
as `optimize serve`, and its check: the config parsed with Triton's own ModelConfig protobuf, then held against
the ONNX in the version folder the way Triton's ONNX Runtime backend does when it loads the model."""

from __future__ import annotations

import functools
import importlib.util
import shutil
from pathlib import Path
from typing import Any

from optimize.deploy.inputs import DeployInputs
from optimize.errors import RuntimeMissingError, StageError
from optimize.files import write_text, write_with
from optimize.lazy import lazy
from optimize.onnx_files import copy_onnx, external_data_names
from optimize.recipe import GPU_TARGETS
from optimize.runtimes.base import TensorSpec

onnx = lazy("onnx")
text_format = lazy("google.protobuf.text_format")

ONNX_PLATFORM = "onnxruntime_onnx"
TENSORRT_PLATFORM = "tensorrt_plan"
# The file each platform loads from a version folder when `default_model_filename` is not set (Triton's defaults).
MODEL_FILES = {ONNX_PLATFORM: "model.onnx", TENSORRT_PLATFORM: "model.plan"}
VERSION = "1"  # the repository holds one version: the registered version the rollout serves
# Triton's priority levels: 1 is served first. `optimize serve` takes `X-Priority: high|low` and serves low by
# default; a Triton client sends the request parameter `priority: 1` for high.
PRIORITY_LEVELS = 2
DEFAULT_PRIORITY_LEVEL = 2

# numpy dtype names (TensorSpec.dtype) -> Triton data types (model_config.proto DataType).
TRITON_TYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16",
    "object": "TYPE_STRING",
    "str": "TYPE_STRING",
    "bytes": "TYPE_STRING",
}
# ONNX TensorProto element types (by name) -> Triton data types, as the ONNX Runtime backend converts them.
ONNX_TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FLOAT16": "TYPE_FP16",
    "FLOAT": "TYPE_FP32",
    "DOUBLE": "TYPE_FP64",
    "BFLOAT16": "TYPE_BF16",
    "STRING": "TYPE_STRING",
}
INSTALL_HINT = "install it with `pip install --no-deps tritonclient` (or `bash ci/setup.sh cpu`)"


# --- rendering -------------------------------------------------------------------------------------------


def platform_for(inputs: DeployInputs) -> str:
    """`tensorrt_plan` when the render carries a TensorRT engine, else `onnxruntime_onnx`."""
    return TENSORRT_PLATFORM if inputs.engine_file is not None else ONNX_PLATFORM


def instance_kind(inputs: DeployInputs, platform: str, gpu: bool | None = None) -> str:
    """`KIND_GPU` for a TensorRT plan, for a version measured on a GPU target (onnxruntime-cuda, ...) or when
    `gpu` says so; else `KIND_CPU` (ONNX Runtime on the CPU, as `optimize serve` runs it)."""
    if gpu is None:
        measured = inputs.canary.measured
        gpu = platform == TENSORRT_PLATFORM or (measured is not None and measured.target in GPU_TARGETS)
    return "KIND_GPU" if gpu else "KIND_CPU"


def batches(inputs: DeployInputs) -> bool:
    """Whether Triton may batch the model: every input's and output's first axis is dynamic (a name, or < 0).
    Triton's ONNX Runtime backend refuses `max_batch_size > 0` for a model whose first axis is fixed."""
    tensors = (*inputs.inputs, *inputs.outputs)
    return bool(tensors) and all(t.shape and _dynamic(t.shape[0]) for t in tensors)


def config_text(inputs: DeployInputs, platform: str | None = None, gpu: bool | None = None) -> str:
    """The model's `config.pbtxt` (protobuf text format of Triton's ModelConfig).

    - `max_batch_size`: `serving.max_batch_size` when the model batches (see `batches`), dims then without the
      batch axis; else 0 and the full dims. A dynamic axis is -1.
    - `dynamic_batching`: `preferred_batch_size: [max_batch_size]` — what Triton fills in itself when none is
      given, and the behaviour `optimize serve` was load-tested with (wait up to `max_queue_delay` for a full
      batch, then run what is there); smaller preferred sizes (powers of two, say) would make Triton cut batches
      short whenever a preferred size is reached, a schedule the measured `max_rps_at_slo` never saw, and
      Triton's docs keep them for TensorRT engines with several optimisation profiles, which ours are not.
      The queue rejects what waits past `serving.queue_timeout_ms` (a request's own `timeout` parameter may
      shorten it) and holds `serving.max_queue` requests; Triton bounds each priority level's queue on its own.
    - `instance_group`: one instance, `KIND_CPU` or `KIND_GPU` (see `instance_kind`).
    - `parameters { intra_op_thread_count }` from `serving.threads`, for ONNX Runtime."""
    platform = platform or platform_for(inputs)
    if platform not in MODEL_FILES:
        raise StageError(f"triton: platform {platform!r} is not rendered; use one of {sorted(MODEL_FILES)}")
    serving = inputs.serving
    batch = serving.max_batch_size if batches(inputs) else 0
    lines = [f"name: {_quote(inputs.app)}", f"platform: {_quote(platform)}", f"max_batch_size: {batch}"]
    lines += _tensors_text("input", inputs.inputs, batch > 0)
    lines += _tensors_text("output", inputs.outputs, batch > 0)
    lines += ["dynamic_batching {"]
    if batch > 0:
        lines += [f"  preferred_batch_size: [ {batch} ]"]
    lines += [
        f"  max_queue_delay_microseconds: {_microseconds(serving.max_queue_delay_ms)}",
        f"  priority_levels: {PRIORITY_LEVELS}",
        f"  default_priority_level: {DEFAULT_PRIORITY_LEVEL}",
        "  default_queue_policy {",
        "    timeout_action: REJECT",
        f"    default_timeout_microseconds: {_microseconds(serving.queue_timeout_ms)}",
        "    allow_timeout_override: true",
        f"    max_queue_size: {serving.max_queue}",
        "  }",
        "}",
        "instance_group [",
        "  {",
        "    count: 1",
        f"    kind: {instance_kind(inputs, platform, gpu)}",
        "  }",
        "]",
    ]
    if platform == ONNX_PLATFORM and serving.threads:
        lines += [
            "parameters {",
            '  key: "intra_op_thread_count"',
            f'  value: {{ string_value: "{serving.threads}" }}',
            "}",
        ]
    return "\n".join(lines) + "\n"


def write_repository(inputs: DeployInputs, dest: Path, gpu: bool | None = None) -> Path:
    """Write the model repository under `dest`: `<dest>/<app>/config.pbtxt` and `<dest>/<app>/1/model.onnx` (a
    copy of `inputs.model_file` with its external data, `1/model.onnx.data`) or `1/model.plan` (a copy of
    `inputs.engine_file`). Returns the model's folder `<dest>/<app>`."""
    platform = platform_for(inputs)
    model_dir = Path(dest) / inputs.app
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    if platform == TENSORRT_PLATFORM:
        engine = Path(inputs.engine_file)  # type: ignore[arg-type]
        write_with(version_dir / MODEL_FILES[platform], lambda tmp: shutil.copyfile(engine, tmp))
    else:
        copy_onnx(Path(inputs.model_file), version_dir / MODEL_FILES[platform])
    write_text(model_dir / "config.pbtxt", config_text(inputs, platform, gpu))
    return model_dir


def _tensors_text(key: str, specs: tuple[TensorSpec, ...], batching: bool) -> list[str]:
    entries = []
    for spec in specs:
        dtype = TRITON_TYPES.get(spec.dtype)
        if dtype is None:
            raise StageError(
                f"triton: {key} {spec.name!r}: dtype {spec.dtype!r} has no Triton data type; "
                f"Triton takes {', '.join(sorted(set(TRITON_TYPES) - {'str', 'bytes'}))}"
            )
        dims = [-1 if _dynamic(d) else int(d) for d in (spec.shape[1:] if batching else spec.shape)]
        entry = [f"    name: {_quote(spec.name)}", f"    data_type: {dtype}"]
        if dims:
            entry.append(f"    dims: [ {', '.join(map(str, dims))} ]")
        else:  # one value per row (or a scalar): Triton wants dims [1], reshaped to the model's empty shape
            entry += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
        entries.append("  {\n" + "\n".join(entry) + "\n  }")
    return [f"{key} [", ",\n".join(entries), "]"] if entries else []


def _quote(text: str) -> str:
    """A protobuf text-format string literal (an ONNX tensor name may hold any character)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dynamic(dim: int | str | None) -> bool:
    return not isinstance(dim, int) or dim < 0


def _microseconds(ms: float) -> int:
    return int(round(ms * 1000))


# --- checking --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def model_config_pb2() -> Any:
    """Triton's `model_config_pb2` module from the tritonclient wheel, loaded by its path: importing
    `tritonclient.grpc` would want grpcio, which the check does not need."""
    spec = importlib.util.find_spec("tritonclient")
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    path = origin.parent / "grpc" / "model_config_pb2.py" if origin is not None else None
    if path is None or not path.is_file():
        raise RuntimeMissingError(
            f"triton: Triton's ModelConfig protobuf (tritonclient/grpc/model_config_pb2.py) is not installed; "
            f"{INSTALL_HINT}"
        )
    loader_spec = importlib.util.spec_from_file_location("optimize_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
    try:
        loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:  # a protobuf runtime older than the generated code refuses to load it
        raise RuntimeMissingError(f"triton: {path} does not load ({e}); it needs protobuf >= 6.33.5") from None
    return module


def parse_config(text: str, where: str = "config.pbtxt") -> tuple[Any | None, list[str]]:
    """`text` parsed into Triton's ModelConfig: (the message, []) or (None, [the parse error]) — an unknown
    field, a bad enum value or a wrong type is an error, as when Triton loads it."""
    pb2 = model_config_pb2()
    config = pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        return None, [f"{where}: {e}; fix the field (Triton's model_config.proto names every one)"]
    return config, []


def check_repository(path: Path, onnx_file: Path | None = None) -> list[str]:
    """Check a Triton model repository: `path` is a model's folder (it holds `config.pbtxt`) or a repository
    of such folders. Returns the errors, one line each (none: Triton would load it as far as can be told here).

    Each config.pbtxt is parsed with Triton's own ModelConfig protobuf, checked as Triton checks a config
    (name = folder, platform, max_batch_size, preferred sizes, priority levels, dims), and each numeric
    version folder must hold the file its platform loads (with an ONNX's external data). Then the ONNX's
    inputs and outputs are held against the config as Triton's ONNX Runtime backend does: names, data types,
    and dims (after `reshape`) with a dynamic first axis when `max_batch_size > 0`. A `tensorrt_plan` is held
    against `onnx_file` (the ONNX it was built from) when given. Raises RuntimeMissingError (exit 4) without
    tritonclient."""
    path = Path(path)
    model_config_pb2()  # tritonclient missing: exit 4 before any error is reported
    if (path / "config.pbtxt").is_file():
        return check_model(path, onnx_file)
    models = sorted(p for p in path.iterdir() if (p / "config.pbtxt").is_file()) if path.is_dir() else []
    if not models:
        return [f"{path}: no model folder with a config.pbtxt; render it with `optimize deploy render --format triton`"]
    return [error for model in models for error in check_model(model, onnx_file)]


def check_model(model_dir: Path, onnx_file: Path | None = None) -> list[str]:
    """The errors of one model folder `<repository>/<name>` (see `check_repository`)."""
    where = model_dir / "config.pbtxt"
    config, errors = parse_config(where.read_text(encoding="utf-8"), str(where))
    if config is None:
        return errors
    errors = _config_errors(config, model_dir.name, str(where))
    platform = config.platform or {"onnxruntime": ONNX_PLATFORM, "tensorrt": TENSORRT_PLATFORM}.get(config.backend)
    if platform not in MODEL_FILES:
        return errors  # already reported
    filename = config.default_model_filename or MODEL_FILES[platform]
    versions = sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        errors.append(f"{model_dir}: no version folder (such as {model_dir / VERSION}); put {filename} in one")
    for version in versions:
        model = version / filename
        if not model.is_file():
            errors.append(f"{model}: missing; platform {platform} loads {filename} from each version folder")
        elif platform == ONNX_PLATFORM:
            errors += _onnx_errors(config, model, str(where))
        elif onnx_file is not None:
            errors += _io_errors(config, Path(onnx_file), str(where))
    return errors


def _config_errors(config: Any, folder: str, where: str) -> list[str]:
    """What Triton's own config validation refuses (model_config_utils.cc), for the fields we render."""
    errors = []
    if config.name and config.name != folder:
        errors.append(f"{where}: name {config.name!r} differs from the model's folder {folder!r}; make them equal")
    platforms = {ONNX_PLATFORM: "onnxruntime", TENSORRT_PLATFORM: "tensorrt"}
    if config.platform not in platforms and config.backend not in platforms.values():
        errors.append(
            f"{where}: platform {config.platform!r} / backend {config.backend!r} is not checked here; "
            f"use platform {ONNX_PLATFORM} or {TENSORRT_PLATFORM}"
        )
    elif config.platform and config.backend and platforms.get(config.platform) != config.backend:
        errors.append(f"{where}: platform {config.platform!r} does not go with backend {config.backend!r}")
    if config.max_batch_size < 0:
        errors.append(f"{where}: max_batch_size {config.max_batch_size} is negative; use 0 (no batching) or more")
    if config.HasField("dynamic_batching"):
        errors += _batching_errors(config, where)
    for key, tensors in (("input", config.input), ("output", config.output)):
        for io in tensors:
            errors += _io_config_errors(io, key, config.max_batch_size, where)
    return errors


def _batching_errors(config: Any, where: str) -> list[str]:
    batching = config.dynamic_batching
    errors = []
    for size in batching.preferred_batch_size:
        if size <= 0 or size > config.max_batch_size:
            errors.append(
                f"{where}: dynamic_batching.preferred_batch_size {size} is outside 1..max_batch_size "
                f"({config.max_batch_size}); drop it or raise max_batch_size"
            )
    levels = batching.priority_levels
    if levels and not 1 <= batching.default_priority_level <= levels:
        errors.append(
            f"{where}: dynamic_batching.default_priority_level {batching.default_priority_level} is outside "
            f"1..priority_levels ({levels})"
        )
    for level in batching.priority_queue_policy:
        if not 1 <= level <= levels:
            errors.append(f"{where}: dynamic_batching.priority_queue_policy level {level} is outside 1..{levels}")
    if batching.preserve_ordering and levels > 1:
        errors.append(f"{where}: dynamic_batching.preserve_ordering allows only one priority level, not {levels}")
    return errors


def _io_config_errors(io: Any, key: str, max_batch_size: int, where: str) -> list[str]:
    pb2 = model_config_pb2()
    name = f"{where}: {key} {io.name!r}"
    errors = []
    if not io.name:
        errors.append(f"{where}: an {key} has no name; name it as the model does")
    if io.data_type == pb2.TYPE_INVALID:
        errors.append(f"{name}: no data_type; set the model's (TYPE_FP32, TYPE_INT64, ...)")
    if not io.dims:
        errors.append(f"{name}: no dims; give the shape (without the batch axis when max_batch_size > 0)")
    if any(d < 1 and d != -1 for d in io.dims):
        errors.append(f"{name}: dims {list(io.dims)}: each must be >= 1, or -1 for a dynamic axis")
    if io.HasField("reshape") and not io.reshape.shape and max_batch_size == 0:
        errors.append(f"{name}: an empty reshape needs max_batch_size > 0 (Triton has no scalar tensors)")
    return errors


def _onnx_errors(config: Any, model: Path, where: str) -> list[str]:
    missing = [name for name in external_data_names(model) if not (model.parent / name).is_file()]
    errors = [f"{model.parent / name}: external data of {model.name} missing; copy it beside it" for name in missing]
    return errors + _io_errors(config, model, where)


def _io_errors(config: Any, model: Path, where: str) -> list[str]:
    """The config's inputs and outputs against the ONNX's, as Triton's ONNX Runtime backend validates them when
    it loads the model (ValidateInputs/ValidateOutputs)."""
    graph = onnx.load(str(model), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    model_inputs = {v.name: v for v in graph.input if v.name not in initializers}
    model_outputs = {v.name: v for v in graph.output}
    errors = []
    if len(config.input) != len(model_inputs):
        errors.append(
            f"{where}: {len(config.input)} inputs, {model.name} has {len(model_inputs)} "
            f"({', '.join(sorted(model_inputs))}); list each of its inputs once"
        )
    for key, tensors, model_tensors in (
        ("input", config.input, model_inputs),
        ("output", config.output, model_outputs),
    ):
        for io in tensors:
            value = model_tensors.get(io.name)
            if value is None:
                errors.append(
                    f"{where}: {key} {io.name!r}: {model.name} has no such {key} "
                    f"(it has {', '.join(sorted(model_tensors)) or 'none'}); use its names"
                )
                continue
            errors += _tensor_errors(io, key, value, config, where)
    return errors


def _tensor_errors(io: Any, key: str, value: Any, config: Any, where: str) -> list[str]:
    pb2 = model_config_pb2()
    name = f"{where}: {key} {io.name!r}"
    tensor_type = value.type.tensor_type
    model_type = ONNX_TRITON_TYPES.get(onnx.TensorProto.DataType.Name(tensor_type.elem_type), "TYPE_INVALID")
    errors = []
    if pb2.DataType.Name(io.data_type) != model_type:
        errors.append(f"{name}: data_type {pb2.DataType.Name(io.data_type)}, the model's is {model_type}; use it")
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
    dims = list(io.reshape.shape) if io.HasField("reshape") else list(io.dims)
    if not shape:  # a scalar: Triton wants every configured dim to be 1
        if any(d != 1 for d in dims):
            errors.append(f"{name}: the model's tensor is a scalar; dims must be [ 1 ], not {dims}")
        return errors
    batching = config.max_batch_size > 0
    if batching and shape[0] != -1:
        return errors + [
            f"{name}: max_batch_size {config.max_batch_size} needs a dynamic first axis, the model's shape is "
            f"{shape}; set max_batch_size: 0 with the full dims, or export the model with a dynamic batch axis"
        ]
    full = [-1, *dims] if batching else dims
    # Triton's CompareDimsSupported: a dynamic model axis takes any configured size for an input; outputs and
    # fixed axes must match exactly.
    exact = key == "output"
    if len(full) != len(shape) or any(m != c for m, c in zip(shape, full, strict=True) if exact or m != -1):
        shown = f"[-1 (batch), {', '.join(map(str, dims))}]" if batching else str(dims)
        errors.append(f"{name}: dims give the shape {shown}, the model's is {shape}; use the model's")
    return errors
