"""The load test's requests: real inputs from the recipe's evaluation dataset, `serving.load.rows` rows each, text
cut back to each request's real length (by its attention mask), and their KServe v2 encoding."""

from __future__ import annotations

import json
from typing import Any

from optimize import data
from optimize.errors import RecipeError
from optimize.lazy import lazy
from optimize.models import huggingface_dir
from optimize.recipe import HuggingFaceModel, Recipe
from optimize.runtimes.base import TensorSpec
from optimize.serving import protocol

np = lazy("numpy")

# The numeric KServe v2 datatypes (the protocol's table): requests are built from datasets of numbers, never BYTES.
NUMPY_DTYPES = {kind: dtype for kind, dtype in protocol.DATATYPES.items() if kind != "BYTES"}


def requests_from_recipe(recipe: Recipe, input_specs: list[TensorSpec]) -> list[dict[str, np.ndarray]]:
    """The evaluation dataset's samples (`recipe.evaluate.dataset`, read as the pipeline reads it), in order, as
    requests of `recipe.serving.load.rows` rows each; a last, incomplete group is left out. Inputs that share the
    attention mask's dynamic sequence axis are cut to the longest real length in the request (trailing columns
    that are padding in every row go), so requests have the lengths real callers send. Never random data."""
    name = recipe.evaluate.dataset
    rows = recipe.serving.load.rows
    tokenizer_dir = huggingface_dir(recipe.model) if isinstance(recipe.model, HuggingFaceModel) else None
    ds = data.load_dataset(name, recipe.data[name], [s.name for s in input_specs], tokenizer_dir)
    batches = [_cast_floats(batch, input_specs) for batch in ds.batches]
    data.check_feeds(name, batches, input_specs)
    if ds.sample_count < rows:
        raise RecipeError(
            f"serving.load.rows: {rows} rows per request, data.{name} has {ds.sample_count} samples; "
            "lower `rows` or use a larger evaluation dataset"
        )
    mask, trimmed = _sequence_inputs(input_specs, recipe.serving.attention_mask)
    samples = [{k: v[i] for k, v in batch.items()} for batch in batches for i in range(len(next(iter(batch.values()))))]
    out = []
    for start in range(0, len(samples) - rows + 1, rows):
        group = samples[start : start + rows]
        out.append({s.name: _stack([g[s.name] for g in group], s.name in trimmed, group, mask) for s in input_specs})
    return out


def _cast_floats(batch: dict[str, np.ndarray], specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Float data in the float type the model takes (FP32 data for an FP16-I/O variant), as the runners cast
    it in evaluation and benchmark: a client of that model sends that type."""
    wanted = {s.name: s.dtype for s in specs}
    out = {}
    for name, array in batch.items():
        want = wanted.get(name)
        floats = array.dtype.kind == "f" and want in ("float16", "float32", "float64")
        out[name] = array.astype(want) if floats and array.dtype.name != want else array
    return out


def _sequence_inputs(specs: list[TensorSpec], mask_name: str | None) -> tuple[str | None, set[str]]:
    """The attention mask input and the inputs cut with it: those whose axis 1 is the mask's dynamic axis."""
    mask = next((s for s in specs if s.name == mask_name), None)
    if mask is None or len(mask.shape) != 2 or isinstance(mask.shape[1], int):
        return None, set()
    axis = mask.shape[1]
    return mask.name, {s.name for s in specs if len(s.shape) >= 2 and s.shape[1] == axis}


def _stack(rows: list[np.ndarray], trim: bool, group: list[dict[str, np.ndarray]], mask: str | None) -> np.ndarray:
    """One input's rows as one request array; cut to the group's real length when `trim`, padded with 0 (what
    the server's batcher pads with, made inert by the mask) where rows came from batches of other widths."""
    if not trim or mask is None:
        return np.ascontiguousarray(np.stack(rows))
    length = max(int(np.flatnonzero(s[mask]).max(initial=-1)) + 1 for s in group)
    length = max(length, 1)
    out = np.zeros((len(rows), length), dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        n = min(length, row.shape[0])
        out[i, :n] = row[:n]
    return out


def encode_request(feeds: dict[str, np.ndarray], binary: bool = True, priority: str = "low") -> tuple[bytes, dict]:
    """An Open Inference Protocol (KServe v2) infer request body and its headers: JSON tensors, or the binary
    tensor extension (a JSON header of `Inference-Header-Content-Length` bytes, then the raw tensors, as
    tritonclient sends), outputs asked for in binary. `priority`: "high" or "low", as `parameters.priority`."""
    inputs = []
    raw = []
    for name, array in feeds.items():
        array = np.ascontiguousarray(array)
        datatype = protocol.datatype(array.dtype.name)
        if datatype not in NUMPY_DTYPES:
            raise RecipeError(f"load test request: input {name!r} has dtype {array.dtype}, not a KServe v2 datatype")
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
        if binary:
            data_bytes = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(data_bytes)}
            raw.append(data_bytes)
        else:
            entry["data"] = array.reshape(-1).tolist()
        inputs.append(entry)
    parameters: dict[str, Any] = {"priority": priority}
    if binary:
        parameters["binary_data_output"] = True
    header = json.dumps({"inputs": inputs, "parameters": parameters}, separators=(",", ":")).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    return header + b"".join(raw), headers


def specs_from_metadata(metadata: dict[str, Any]) -> list[TensorSpec]:
    """A served model's inputs from its KServe v2 metadata (`GET /v2/models/{name}`): a dynamic size (-1) becomes
    the axis name `d<axis>`, so inputs dynamic on the same axis share it."""
    specs = []
    for entry in metadata.get("inputs", []):
        dtype = NUMPY_DTYPES.get(entry.get("datatype", ""))
        if dtype is None:
            raise RecipeError(f"model metadata: input {entry.get('name')!r} has datatype {entry.get('datatype')!r}")
        shape = tuple(int(d) if int(d) >= 0 else f"d{i}" for i, d in enumerate(entry.get("shape", [])))
        specs.append(TensorSpec(entry["name"], dtype, shape))
    return specs
