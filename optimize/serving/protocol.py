"""The Open Inference Protocol (KServe v2 REST, as Triton speaks it): infer requests and responses as JSON tensors
or with the binary tensor extension (`Inference-Header-Content-Length`, `binary_data_size`), model metadata.

Every malformed request is a BadRequest whose one-line message names the input or field at fault.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from optimize.lazy import lazy
from optimize.runtimes.base import TensorSpec

np = lazy("numpy")

# KServe v2 datatype → numpy dtype name (BYTES: an object array of `bytes`).
DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": "object",
}
_DATATYPE_OF = {**{v: k for k, v in DATATYPES.items()}, "tensor(string)": "BYTES", "bytes": "BYTES", "str": "BYTES"}
# What a JSON array of each datatype may hold (numpy dtype kinds of `np.asarray(data)`).
_JSON_KINDS = {"b": "b", "u": "iub", "i": "iub", "f": "iubf"}
_KIND_NAMES = {"b": "booleans", "i": "integers", "u": "integers", "f": "floats", "U": "strings"}

PRIORITIES = ("high", "low")


class BadRequest(Exception):
    """A request the server refuses: `.status` (400, 404, 413, 422...) and a one-line `.message` naming the
    input or field at fault; the app answers `{"error": message}` with that status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for, and whether it wants it as binary data after the JSON header."""

    name: str
    binary: bool


@dataclass
class InferRequest:
    """A decoded infer request. `outputs` empty means every output (binary when `binary_output`);
    `timeout_s` comes from the `timeout` parameter (microseconds, as Triton sends it)."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    priority: str = "low"
    timeout_s: float | None = None

    @property
    def binary_output(self) -> bool:
        """The request's `binary_data_output` parameter: outputs not named in `outputs` go as binary data."""
        return bool(self.parameters.get("binary_data_output", False))


def datatype(dtype: str) -> str | None:
    """The KServe v2 datatype of a numpy dtype name (or ONNX type) as TensorSpec carries it; None when it has none."""
    return _DATATYPE_OF.get(dtype)


def _shape_text(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _json_body(text: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(f"malformed JSON in the {what}: {e}") from None
    except RecursionError:
        raise BadRequest(f"malformed JSON in the {what}: nested too deeply") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"the {what} must be a JSON object, not {type(doc).__name__}")
    return doc


def decode_infer(
    body: bytes, header_length: int | None, inputs: list[TensorSpec], outputs: list[TensorSpec] | None = None
) -> InferRequest:
    """Decode an infer request body. `header_length` is the `Inference-Header-Content-Length` header (None: the
    body is all JSON); `inputs` are the model's inputs, `outputs` (when given) its outputs, to check the names
    asked for. Raises BadRequest (400) naming the input or field for anything malformed."""
    if header_length is None:
        header, binary = body, b""
    else:
        if header_length < 0 or header_length > len(body):
            raise BadRequest(f"Inference-Header-Content-Length {header_length} is beyond the body ({len(body)} bytes)")
        header, binary = body[:header_length], body[header_length:]
    doc = _json_body(header, "request" if header_length is None else "request header")
    parameters = _parameters(doc.get("parameters"), "parameters")
    priority, timeout_s = _priority(parameters.get("priority")), _timeout(parameters.get("timeout"))
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"id must be a string, not {type(request_id).__name__}")
    tensors = doc.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise BadRequest("inputs: a request needs a non-empty list of input tensors")
    specs = {s.name: s for s in inputs}
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for i, tensor in enumerate(tensors):
        name, array, offset = _decode_input(i, tensor, specs, binary, offset, header_length is not None)
        if name in feeds:
            raise BadRequest(f"input {name!r} is given twice")
        feeds[name] = array
    missing = [n for n in specs if n not in feeds]
    if missing:
        raise BadRequest(f"missing input(s) {', '.join(map(repr, missing))}; the model's inputs: {', '.join(specs)}")
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data after the last binary input")
    return InferRequest(
        id=request_id,
        inputs=feeds,
        outputs=_requested(doc.get("outputs"), parameters, outputs),
        parameters=parameters,
        priority=priority,
        timeout_s=timeout_s,
    )


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON object, not {type(value).__name__}")
    return value


def _priority(value: Any) -> str:
    # Triton's integer levels: 1 is the highest; 0 (the default) and anything else are low here.
    if value is None:
        return "low"
    if isinstance(value, bool):
        raise BadRequest(f"parameters.priority must be 'high', 'low' or an integer level, not {value!r}")
    if isinstance(value, int):
        return "high" if value == 1 else "low"
    if isinstance(value, str) and value.lower() in PRIORITIES:
        return value.lower()
    raise BadRequest(f"parameters.priority must be 'high', 'low' or an integer level, not {value!r}")


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise BadRequest(f"parameters.timeout must be a number of microseconds >= 0, not {value!r}")
    return value / 1e6 if value > 0 else None


def _requested(value: Any, parameters: dict[str, Any], specs: list[TensorSpec] | None) -> list[RequestedOutput]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"outputs must be a list, not {type(value).__name__}")
    default = bool(parameters.get("binary_data_output", False))
    names = [s.name for s in specs] if specs is not None else None
    wanted = []
    for i, tensor in enumerate(value):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise BadRequest(f"outputs[{i}] must be an object with a string name")
        name = tensor["name"]
        if names is not None and name not in names:
            raise BadRequest(f"unknown output {name!r}; the model's outputs: {', '.join(names)}")
        binary = _parameters(tensor.get("parameters"), f"output {name!r}: parameters").get("binary_data", default)
        wanted.append(RequestedOutput(name, bool(binary)))
    return wanted


def _decode_input(
    i: int, tensor: Any, specs: dict[str, TensorSpec], binary: bytes, offset: int, has_header: bool
) -> tuple[str, np.ndarray, int]:
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise BadRequest(f"inputs[{i}] must be an object with a string name")
    name = tensor["name"]
    spec = specs.get(name)
    if spec is None:
        raise BadRequest(f"unknown input {name!r}; the model's inputs: {', '.join(specs)}")
    expected = datatype(spec.dtype)
    if expected is None:
        raise BadRequest(f"input {name!r}: the model's type {spec.dtype} has no KServe v2 datatype", status=422)
    given = tensor.get("datatype")
    if given != expected:
        raise BadRequest(f"input {name!r}: datatype {given!r}, the model's is {expected}")
    shape = _shape(name, tensor.get("shape"), spec)
    count = math.prod(shape)
    params = _parameters(tensor.get("parameters"), f"input {name!r}: parameters")
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise BadRequest(f"input {name!r}: no data (neither `data` nor a `binary_data_size` parameter)")
        return name, _from_json(name, expected, tensor["data"], shape, count), offset
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BadRequest(f"input {name!r}: binary_data_size must be an integer >= 0, not {size!r}")
    if not has_header:
        raise BadRequest(f"input {name!r} has binary_data_size but the request has no Inference-Header-Content-Length")
    if offset + size > len(binary):
        raise BadRequest(
            f"truncated binary body: input {name!r} needs {size} bytes at offset {offset}, "
            f"{len(binary) - offset} are left"
        )
    return name, _from_binary(name, expected, binary, offset, size, shape, count), offset + size


def _shape(name: str, shape: Any, spec: TensorSpec) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise BadRequest(f"input {name!r}: shape must be a list of integers, not {shape!r}")
    if any(d < 0 for d in shape):
        raise BadRequest(f"input {name!r}: shape {_shape_text(shape)} has a negative dimension")
    if len(shape) != len(spec.shape):
        raise BadRequest(
            f"input {name!r}: shape {_shape_text(shape)} has {len(shape)} dims, "
            f"the model's {_shape_text(spec.shape)} has {len(spec.shape)}"
        )
    for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if isinstance(want, int) and want >= 0 and got != want:
            raise BadRequest(
                f"input {name!r}: shape {_shape_text(shape)} has {got} at dim {axis}, "
                f"the model's {_shape_text(spec.shape)} needs {want}"
            )
    return tuple(shape)


def _flatten(data: Any) -> list[Any]:
    """Nested lists in row-major order (as Triton reads them), without recursion."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(x, list) for x in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            flat.append(x)
        else:
            stack.pop()
    return flat


def _from_json(name: str, dtype: str, data: Any, shape: tuple[int, ...], count: int) -> np.ndarray:
    flat = _flatten(data)
    if len(flat) != count:
        raise BadRequest(f"input {name!r}: {len(flat)} values in data, shape {_shape_text(shape)} needs {count}")
    if dtype == "BYTES":
        if not all(isinstance(x, str | bytes) for x in flat):
            raise BadRequest(f"input {name!r}: BYTES data must be strings")
        out = np.empty(count, dtype=object)
        out[:] = [x.encode() if isinstance(x, str) else x for x in flat]
        return out.reshape(shape)
    target = np.dtype(DATATYPES[dtype])
    try:
        values = np.asarray(flat) if flat else np.zeros(0, dtype=target)
    except (ValueError, TypeError) as e:
        raise BadRequest(f"input {name!r}: data cannot be read as {dtype}: {e}") from None
    if values.dtype.kind not in _JSON_KINDS[target.kind]:
        held = _KIND_NAMES.get(values.dtype.kind, "mixed or out-of-range values")
        raise BadRequest(f"input {name!r}: data holds {held}, not {dtype}")
    if target.kind in "iu" and values.size and values.dtype.kind in "iu":
        info = np.iinfo(target)
        if values.min() < info.min or values.max() > info.max:
            raise BadRequest(f"input {name!r}: a value is outside {dtype}'s range {info.min}..{info.max}")
    return values.astype(target).reshape(shape)


def _from_binary(
    name: str, dtype: str, binary: bytes, offset: int, size: int, shape: tuple[int, ...], count: int
) -> np.ndarray:
    if dtype == "BYTES":
        return _bytes_elements(name, binary[offset : offset + size], count).reshape(shape)
    target = np.dtype(DATATYPES[dtype]).newbyteorder("<")
    if size != count * target.itemsize:
        raise BadRequest(
            f"input {name!r}: binary_data_size {size}, shape {_shape_text(shape)} of {dtype} needs "
            f"{count * target.itemsize} bytes"
        )
    array = np.frombuffer(binary, dtype=target, count=count, offset=offset).reshape(shape)
    # ONNX Runtime reads aligned, native-order memory; a copy is cheap next to a model run
    return array if array.flags.aligned and target.isnative else array.astype(target.newbyteorder("="))


def _bytes_elements(name: str, blob: bytes, count: int) -> np.ndarray:
    """The 4-byte little-endian length-prefixed elements of a binary BYTES tensor."""
    elements = []
    pos = 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise BadRequest(f"input {name!r}: truncated BYTES element length at byte {pos}")
        (length,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if pos + length > len(blob):
            raise BadRequest(f"input {name!r}: BYTES element of {length} bytes at byte {pos - 4} runs past its data")
        elements.append(blob[pos : pos + length])
        pos += length
    if len(elements) != count:
        raise BadRequest(f"input {name!r}: {len(elements)} BYTES elements, the shape needs {count}")
    out = np.empty(count, dtype=object)
    out[:] = elements
    return out


def _output_bytes(array: np.ndarray, dtype: str) -> bytes:
    if dtype == "BYTES":
        parts = []
        for x in array.ravel():
            b = x if isinstance(x, bytes) else str(x).encode()
            parts.append(struct.pack("<I", len(b)) + b)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _output_json(array: np.ndarray, dtype: str) -> list[Any]:
    if dtype == "BYTES":
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in array.ravel()]
    return array.ravel().tolist()


def encode_infer(
    model: str,
    version: str,
    request_id: str | None,
    outputs: dict[str, np.ndarray],
    requested: list[RequestedOutput],
    binary_default: bool,
) -> tuple[bytes, dict[str, str]]:
    """Encode an infer response: the outputs asked for (`requested`; empty: all, binary when `binary_default`).
    Returns the body and its headers: JSON alone (`application/json`), or a JSON header followed by the binary
    outputs (`Inference-Header-Content-Length`, `application/octet-stream`)."""
    wanted = requested or [RequestedOutput(name, binary_default) for name in outputs]
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for r in wanted:
        if r.name not in outputs:
            raise BadRequest(f"unknown output {r.name!r}; the model's outputs: {', '.join(outputs)}")
        array = np.asarray(outputs[r.name])
        dtype = _DATATYPE_OF.get(array.dtype.name) or ("BYTES" if array.dtype.kind in "OSU" else None)
        if dtype is None:
            raise BadRequest(f"output {r.name!r}: numpy type {array.dtype} has no KServe v2 datatype", status=500)
        entry: dict[str, Any] = {"name": r.name, "datatype": dtype, "shape": list(array.shape)}
        if r.binary:
            blob = _output_bytes(array, dtype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _output_json(array, dtype)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = entries
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    return header + b"".join(blobs), headers


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "datatype": datatype(spec.dtype) or spec.dtype,
        "shape": [d if isinstance(d, int) and d >= 0 else -1 for d in spec.shape],
    }


def model_metadata(
    name: str, versions: list[str], platform: str, inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> dict[str, Any]:
    """The model metadata document (`GET /v2/models/{name}`): dynamic dims are -1, as Triton reports them."""
    return {
        "name": name,
        "versions": versions,
        "platform": platform,
        "inputs": [_tensor_metadata(s) for s in inputs],
        "outputs": [_tensor_metadata(s) for s in outputs],
    }
