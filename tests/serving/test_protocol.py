"""The KServe v2 codec against tritonclient's own request builder and response reader: what tritonclient.http sends
(binary by default, JSON on request) decodes to the same arrays, and what we answer it reads back; every malformed
request is a BadRequest naming the input or field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from optimize.runtimes.base import TensorSpec
from optimize.serving.protocol import (
    DATATYPES,
    BadRequest,
    RequestedOutput,
    decode_infer,
    encode_infer,
    model_metadata,
)

httpclient = pytest.importorskip("tritonclient.http")

INPUTS = [
    TensorSpec("x", "float32", ("batch", 8)),
    TensorSpec("ids", "int64", ("batch", "sequence")),
]
OUTPUTS = [TensorSpec("logits", "float32", ("batch", 4)), TensorSpec("label", "int64", ("batch",))]


def _triton_body(inputs, outputs=None, **kw) -> tuple[bytes, int | None]:
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kw)
    return (body.encode() if isinstance(body, str) else body), json_size


def _input(name: str, array: np.ndarray, binary: bool) -> object:
    dtype = "BYTES" if array.dtype == object else next(k for k, v in DATATYPES.items() if v == array.dtype.name)
    tensor = httpclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def _feeds(rows: int = 3, seq: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "x": rng.standard_normal((rows, 8)).astype(np.float32),
        "ids": rng.integers(0, 30000, (rows, seq)).astype(np.int64),
    }


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_what_tritonclient_sends_decodes_to_the_same_arrays(binary: bool) -> None:
    feeds = _feeds()
    body, json_size = _triton_body(
        [_input(n, a, binary) for n, a in feeds.items()], request_id="r-1", priority=1, timeout=250_000
    )
    assert (json_size is not None) == binary  # binary data rides after the JSON header
    request = decode_infer(body, json_size, INPUTS, OUTPUTS)
    assert request.id == "r-1"
    assert request.priority == "high"
    assert request.timeout_s == pytest.approx(0.25)
    assert request.outputs == []
    assert request.binary_output  # tritonclient asks for binary outputs when it names none
    for name, array in feeds.items():
        got = request.inputs[name]
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
        assert got.flags.aligned


def test_binary_inputs_at_odd_offsets_decode_aligned() -> None:
    flags = np.array([[1, 0, 1]], dtype=np.uint8)  # 3 bytes: the int64 input after it starts at an odd offset
    ids = np.arange(10, dtype=np.int64).reshape(2, 5) * 1_000_003
    specs = [TensorSpec("flags", "uint8", (1, 3)), TensorSpec("ids", "int64", ("batch", "sequence"))]
    header = {
        "inputs": [
            {"name": "flags", "shape": [1, 3], "datatype": "UINT8", "parameters": {"binary_data_size": 3}},
            {"name": "ids", "shape": [2, 5], "datatype": "INT64", "parameters": {"binary_data_size": ids.nbytes}},
        ]
    }
    text = json.dumps(header).encode()
    text += b" " * ((3 - len(text)) % 8)  # the header itself ends at an odd offset too
    request = decode_infer(text + flags.tobytes() + ids.tobytes(), len(text), specs)
    for name, array in (("flags", flags), ("ids", ids)):
        np.testing.assert_array_equal(request.inputs[name], array)
        assert request.inputs[name].flags.aligned and request.inputs[name].dtype.isnative


def test_nested_json_data_is_read_in_row_major_order() -> None:
    rows = [[float(8 * r + c) for c in range(8)] for r in range(3)]
    body = json.dumps({"inputs": [{"name": "x", "shape": [3, 8], "datatype": "FP32", "data": rows}]}).encode()
    x = decode_infer(body, None, INPUTS[:1]).inputs["x"]
    np.testing.assert_array_equal(x, np.arange(24, dtype=np.float32).reshape(3, 8))


@pytest.mark.parametrize(
    ("value", "priority"), [(None, "low"), (1, "high"), (2, "low"), (0, "low"), ("high", "high"), ("LOW", "low")]
)
def test_priority_parameter(value: object, priority: str) -> None:
    params = {} if value is None else {"priority": value}
    body = json.dumps(
        {"parameters": params, "inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0.0] * 8}]}
    ).encode()
    assert decode_infer(body, None, INPUTS[:1]).priority == priority


def test_requested_outputs_follow_their_binary_flag_and_tritonclient_reads_the_answer() -> None:
    feeds = _feeds(rows=2)
    wanted = [
        httpclient.InferRequestedOutput("logits", binary_data=True),
        httpclient.InferRequestedOutput("label", binary_data=False),
    ]
    body, json_size = _triton_body([_input(n, a, False) for n, a in feeds.items()], outputs=wanted)
    request = decode_infer(body, json_size, INPUTS, OUTPUTS)
    assert request.outputs == [RequestedOutput("logits", True), RequestedOutput("label", False)]
    outputs = {"logits": np.arange(8, dtype=np.float32).reshape(2, 4) / 3, "label": np.array([3, 1], dtype=np.int64)}
    answer, headers = encode_infer("tiny", "2", "abc", outputs, request.outputs, request.binary_output)
    assert headers["Content-Type"] == "application/octet-stream"
    header_length = int(headers["Inference-Header-Content-Length"])
    result = httpclient.InferResult.from_response_body(answer, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("logits"), outputs["logits"])
    np.testing.assert_array_equal(result.as_numpy("label"), outputs["label"])
    doc = result.get_response()
    assert (doc["model_name"], doc["model_version"], doc["id"]) == ("tiny", "2", "abc")
    assert "data" in result.get_output("label") and "data" not in result.get_output("logits")


def test_all_outputs_as_json_when_nothing_asks_for_binary() -> None:
    outputs = {"logits": np.full((1, 4), 0.5, dtype=np.float16), "label": np.array([2], dtype=np.int64)}
    answer, headers = encode_infer("tiny", "1", None, outputs, [], binary_default=False)
    assert headers == {"Content-Type": "application/json"}
    doc = json.loads(answer)
    assert "id" not in doc
    assert [o["datatype"] for o in doc["outputs"]] == ["FP16", "INT64"]
    result = httpclient.InferResult.from_response_body(answer)
    np.testing.assert_array_equal(result.as_numpy("logits"), outputs["logits"])
    assert result.as_numpy("label").tolist() == [2]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_tensors_both_ways(binary: bool) -> None:
    # JSON carries strings (UTF-8 text only); binary elements are any bytes
    text = np.array([["héllo".encode(), b""], [b"a\x00b" if binary else b"ab", b"xyz"]], dtype=object)
    spec = [TensorSpec("text", "tensor(string)", ("batch", 2))]
    body, json_size = _triton_body([_input("text", text, binary)])
    got = decode_infer(body, json_size, spec).inputs["text"]
    assert got.shape == (2, 2) and got.tolist() == text.tolist()
    answer, headers = encode_infer("m", "1", None, {"echo": got}, [], binary_default=binary)
    header_length = headers.get("Inference-Header-Content-Length")
    result = httpclient.InferResult.from_response_body(answer, header_length=header_length and int(header_length))
    back = result.as_numpy("echo")
    assert back.shape == (2, 2)
    assert [x if isinstance(x, bytes) else x.encode() for x in back.ravel()] == list(text.ravel())


def _binary_body(shape: list[int], blob: bytes, size: int | None = None, name: str = "x") -> tuple[bytes, int]:
    header = json.dumps(
        {"inputs": [{"name": name, "shape": shape, "datatype": "FP32",
                     "parameters": {"binary_data_size": len(blob) if size is None else size}}]}
    ).encode()  # fmt: skip
    return header + blob, len(header)


def _json_body(tensor: dict) -> bytes:
    return json.dumps({"inputs": [tensor]}).encode()


ROW = [0.5] * 8
BAD = {
    "wrong input name": (_json_body({"name": "y", "shape": [1, 8], "datatype": "FP32", "data": ROW}), None,
                         "unknown input 'y'; the model's inputs: x"),
    "wrong datatype": (_json_body({"name": "x", "shape": [1, 8], "datatype": "FP64", "data": ROW}), None,
                       "input 'x': datatype 'FP64', the model's is FP32"),
    "fixed dim": (_json_body({"name": "x", "shape": [1, 7], "datatype": "FP32", "data": ROW[:7]}), None,
                  "input 'x': shape [1, 7] has 7 at dim 1, the model's [batch, 8] needs 8"),
    "rank": (_json_body({"name": "x", "shape": [8], "datatype": "FP32", "data": ROW}), None,
             "input 'x': shape [8] has 1 dims"),
    "data vs shape": (_json_body({"name": "x", "shape": [2, 8], "datatype": "FP32", "data": ROW}), None,
                      "input 'x': 8 values in data, shape [2, 8] needs 16"),
    "strings as floats": (_json_body({"name": "x", "shape": [1, 8], "datatype": "FP32", "data": ["a"] * 8}), None,
                          "input 'x': data holds strings, not FP32"),
    "no data": (_json_body({"name": "x", "shape": [1, 8], "datatype": "FP32"}), None, "input 'x': no data"),
    "malformed JSON": (b'{"inputs": [', None, "malformed JSON in the request"),
    "nested too deeply": (b'{"inputs": ' + b"[" * 100_000, None, "malformed JSON in the request: nested too deeply"),
    "not an object": (b"[1, 2]", None, "the request must be a JSON object"),
    "no inputs": (b'{"inputs": []}', None, "inputs: a request needs a non-empty list"),
    "missing input": (_json_body({"name": "x", "shape": [1, 8], "datatype": "FP32", "data": ROW}), None,
                      "missing input(s) 'mask'"),
    "truncated binary body": (*_binary_body([1, 8], b"\0" * 20, size=32), "truncated binary body: input 'x' needs 32"),
    "binary size vs shape": (*_binary_body([1, 8], b"\0" * 28), "input 'x': binary_data_size 28, shape [1, 8]"),
    "header beyond the body": (b'{"inputs": []}', 400, "Inference-Header-Content-Length 400 is beyond the body (14"),
    "bytes after the inputs": (*_binary_body([1, 8], b"\0" * 40, size=32), "8 bytes of binary data after the last"),
    "binary without header": (_binary_body([1, 8], b"")[0], None, "input 'x' has binary_data_size but the request"),
    "bad priority": (json.dumps({"parameters": {"priority": "urgent"}, "inputs": []}).encode(), None,
                     "parameters.priority must be 'high', 'low' or an integer level, not 'urgent'"),
    "bad timeout": (json.dumps({"parameters": {"timeout": -5}, "inputs": []}).encode(), None,
                    "parameters.timeout must be a number of microseconds"),
    "unknown output": (json.dumps({"outputs": [{"name": "probs"}], "inputs": [
        {"name": "x", "shape": [1, 8], "datatype": "FP32", "data": ROW}]}).encode(), None,
        "unknown output 'probs'; the model's outputs: logits"),
    "int out of range": (json.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": ROW},
        {"name": "mask", "shape": [1, 2], "datatype": "INT32", "data": [1, 2**40]}]}).encode(), None,
        "input 'mask': a value is outside INT32's range"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_each_malformed_request_is_a_400_naming_what_is_wrong(case: str) -> None:
    body, header_length, message = BAD[case]
    specs = [TensorSpec("x", "float32", ("batch", 8))]
    if case in ("missing input", "int out of range"):
        specs.append(TensorSpec("mask", "int32", ("batch", "sequence")))
    with pytest.raises(BadRequest) as e:
        decode_infer(body, header_length, specs, [TensorSpec("logits", "float32", ("batch", 4))])
    assert e.value.status == 400
    assert message in e.value.message, e.value.message
    assert "\n" not in e.value.message


def test_model_metadata_reports_dynamic_dims_as_minus_one() -> None:
    doc = model_metadata("tiny", ["1", "2"], "onnxruntime_onnx", INPUTS, OUTPUTS)
    assert doc["name"] == "tiny" and doc["versions"] == ["1", "2"] and doc["platform"] == "onnxruntime_onnx"
    assert doc["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [-1, 8]},
        {"name": "ids", "datatype": "INT64", "shape": [-1, -1]},
    ]
    assert doc["outputs"][1] == {"name": "label", "datatype": "INT64", "shape": [-1]}
