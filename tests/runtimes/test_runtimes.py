"""Runtimes: the ONNX Runtime CPU runner on real tiny ONNX files, and missing runtimes reported (exit 4)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import unary_onnx
from onnx import TensorProto, helper, numpy_helper
from runtimes import tensorrt_double

from optimize.errors import RuntimeMissingError, StageError
from optimize.runtimes import Runner, TensorSpec, open_runner, require, unavailable_reason
from optimize.runtimes import onnxruntime as ort_runtime
from optimize.runtimes import tensorrt as trt_runtime
from optimize.runtimes.onnxruntime import OnnxRuntimeRunner

W = np.arange(6, dtype=np.float32).reshape(3, 2) / 4 - 0.5
B = np.array([0.25, -1.0], dtype=np.float32)
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def linear_model(path: Path, in_type: int = TensorProto.FLOAT) -> Path:
    """y = x @ W + b with x: (batch, 3); idx = argmax(y, axis=1): (batch,) int64."""
    nodes = []
    x_name = "x"
    if in_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT))
        x_name = "x32"
    nodes += [
        helper.make_node("MatMul", [x_name, "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["y"]),
        helper.make_node("ArgMax", ["y"], ["idx"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", in_type, ["batch", 3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch"]),
        ],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


@pytest.fixture()
def linear(tmp_path: Path) -> Path:
    return linear_model(tmp_path / "linear.onnx")


def test_cpu_runner_loads_and_describes_inputs_and_outputs(linear: Path) -> None:
    with open_runner("onnxruntime-cpu", linear) as r:
        assert isinstance(r, OnnxRuntimeRunner)
        assert r.target == "onnxruntime-cpu"
        assert r.inputs == [TensorSpec("x", "float32", ("batch", 3))]
        assert r.outputs == [TensorSpec("y", "float32", ("batch", 2)), TensorSpec("idx", "int64", ("batch",))]
        assert r.session.get_providers() == ["CPUExecutionProvider"]


def test_run_returns_every_output_by_name_with_the_expected_values(linear: Path) -> None:
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    with open_runner("onnxruntime-cpu", linear) as r:
        out = r.run({"x": x})
    assert list(out) == ["y", "idx"]
    expected = x @ W + B
    np.testing.assert_allclose(out["y"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["idx"], expected.argmax(axis=1))
    assert out["y"].dtype == np.float32 and out["idx"].dtype == np.int64


def test_dynamic_axis_accepts_any_batch(linear: Path) -> None:
    with open_runner("onnxruntime-cpu", linear) as r:
        for n in (1, 7):
            assert r.run({"x": np.ones((n, 3), np.float32)})["y"].shape == (n, 2)


def test_threads_sets_intra_op_threads(linear: Path) -> None:
    with open_runner("onnxruntime-cpu", linear, threads=1) as r:
        assert r.session.get_session_options().intra_op_num_threads == 1


def test_accepts_a_string_path(linear: Path) -> None:
    # the memory probe passes the model path as a string (sys.argv)
    with open_runner("onnxruntime-cpu", str(linear)) as r:  # type: ignore[arg-type]
        assert r.model_path == linear


@pytest.mark.parametrize(
    ("elem_type", "name"),
    [
        (TensorProto.FLOAT, "float32"),
        (TensorProto.FLOAT16, "float16"),
        (TensorProto.DOUBLE, "float64"),
        (TensorProto.INT64, "int64"),
        (TensorProto.INT32, "int32"),
        (TensorProto.INT8, "int8"),
        (TensorProto.UINT8, "uint8"),
        (TensorProto.BOOL, "bool"),
    ],
)
def test_tensor_spec_dtype_names_are_numpy_names(tmp_path: Path, elem_type: int, name: str) -> None:
    path = unary_onnx(tmp_path / "id.onnx", "Identity", ["n", 4], elem_type)
    with open_runner("onnxruntime-cpu", path) as r:
        assert r.inputs == [TensorSpec("x", name, ("n", 4))]
        assert r.outputs == [TensorSpec("y", name, ("n", 4))]
        a = np.ones((2, 4), dtype=np.dtype(name))
        out = r.run({"x": a})["y"]
    assert out.dtype == np.dtype(name)
    np.testing.assert_array_equal(out, a)


def test_unnamed_dynamic_dim_is_a_question_mark(tmp_path: Path) -> None:
    path = unary_onnx(tmp_path / "unnamed.onnx", "Identity", [None, 4])
    with open_runner("onnxruntime-cpu", path) as r:
        assert r.inputs[0].shape == ("?", 4)
        assert all(isinstance(d, str) for d in r.inputs[0].shape[:1])


def test_fp16_input_takes_fp32_feeds(tmp_path: Path) -> None:
    # a variant converted with keep_io_types: false is fed the baseline's FP32 arrays
    path = linear_model(tmp_path / "fp16-io.onnx", in_type=TensorProto.FLOAT16)
    x = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.25]], dtype=np.float32)
    with open_runner("onnxruntime-cpu", path) as r:
        assert r.inputs[0].dtype == "float16"
        out = r.run({"x": x})
    np.testing.assert_allclose(out["y"], x.astype(np.float16).astype(np.float32) @ W + B, rtol=1e-6)


def test_integer_feeds_are_not_cast(linear: Path) -> None:
    # only float feeds are adapted; a wrong integer feed is an error, not silently converted
    with open_runner("onnxruntime-cpu", linear) as r, pytest.raises(Exception, match="(?i)type"):
        r.run({"x": np.ones((1, 3), dtype=np.int64)})


def test_cuda_target_is_missing_on_this_build(linear: Path) -> None:
    if HAS_CUDA:
        pytest.skip("this onnxruntime build has CUDA")
    reason = unavailable_reason("onnxruntime-cuda")
    assert reason is not None and "CUDAExecutionProvider" in reason and ort.__version__ in reason
    with pytest.raises(RuntimeMissingError) as info:
        open_runner("onnxruntime-cuda", linear)
    assert info.value.exit_code == 4
    assert "CUDAExecutionProvider" in str(info.value)
    assert "onnxruntime-cuda" in str(info.value)


def test_cpu_target_is_available() -> None:
    assert unavailable_reason("onnxruntime-cpu") is None
    require("onnxruntime-cpu", "test")  # does not raise


def test_tensorrt_reports_why_it_is_unavailable(linear: Path) -> None:
    if HAS_TENSORRT:
        pytest.skip("tensorrt is installed here")
    reason = unavailable_reason("tensorrt")
    assert reason is not None and "TensorRT is not installed" in reason
    with pytest.raises(RuntimeMissingError) as info:
        open_runner("tensorrt", linear)
    assert info.value.exit_code == 4 and "tensorrt" in str(info.value)


def test_tensorrt_found_but_not_importable_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wheel without its libraries: found by find_spec, fails on import."""
    if HAS_TENSORRT:
        pytest.skip("tensorrt is installed here")
    monkeypatch.setattr(trt_runtime.importlib.util, "find_spec", lambda name: object())
    assert (unavailable_reason("tensorrt") or "").startswith("TensorRT cannot be imported: No module named 'tensorrt'")


def test_tensorrt_without_a_cuda_device_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    tensorrt_double.install(monkeypatch)  # a TEST DOUBLE of the module: importable, no GPU behind it
    monkeypatch.setattr(trt_runtime.importlib.util, "find_spec", lambda name: object())
    assert "sees no CUDA device; TensorRT needs an NVIDIA GPU" in (unavailable_reason("tensorrt") or "")


def test_require_raises_exit_4_with_the_reason() -> None:
    if HAS_TENSORRT:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(RuntimeMissingError) as info:
        require("tensorrt", "benchmark.targets")
    assert info.value.exit_code == 4
    msg = str(info.value)
    assert msg.startswith("benchmark.targets: target tensorrt is not available: ")
    assert "TensorRT is not installed" in msg


def test_unknown_targets() -> None:
    assert "unknown target 'tpu'" in (unavailable_reason("tpu") or "")
    assert "unknown ONNX Runtime target" in (unavailable_reason("onnxruntime-rocm") or "")
    with pytest.raises(RuntimeMissingError, match="tpu"):
        require("tpu", "x")


def test_onnxruntime_not_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    reason = ort_runtime.unavailable_reason("onnxruntime-cpu")
    assert reason is not None and reason.startswith("onnxruntime cannot be imported")


def test_corrupt_model_is_a_stage_error(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(StageError) as info:
        open_runner("onnxruntime-cpu", bad)
    assert info.value.exit_code == 3
    msg = str(info.value)
    assert msg.startswith("corrupt.onnx: ONNX Runtime cannot load the model: ")
    assert len(msg.splitlines()) == 1


def test_missing_model_file_is_a_stage_error(tmp_path: Path) -> None:
    for path in (tmp_path / "absent.onnx", str(tmp_path / "absent.onnx")):
        with pytest.raises(StageError, match="^absent.onnx: ONNX Runtime cannot load the model"):
            open_runner("onnxruntime-cpu", path)  # type: ignore[arg-type]


def test_context_manager_closes_the_session(linear: Path) -> None:
    with open_runner("onnxruntime-cpu", linear) as r:
        assert r.session is not None
    assert r.session is None


def test_context_manager_closes_on_error(linear: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), open_runner("onnxruntime-cpu", linear) as r:
        raise RuntimeError("boom")
    assert r.session is None


def test_runner_base_exit_calls_close() -> None:
    closed = []

    class Fake(Runner):
        def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return feeds

        def close(self) -> None:
            closed.append(True)

    with Fake() as f:
        assert f.run({"a": np.zeros(1)})["a"].shape == (1,)
    assert closed == [True]
    with pytest.raises(TypeError):
        Runner()  # type: ignore[abstract]


def test_open_runner_sends_each_target_to_its_runner(linear: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatch itself (the runners are stand-ins that record what they were given; the real TensorRT and
    ONNX Runtime CUDA runners need a GPU and are exercised by the `gpu` tests)."""
    import optimize.runtimes as runtimes
    from optimize.runtimes import onnxruntime as ort_mod
    from optimize.runtimes import tensorrt as trt_mod

    monkeypatch.setattr(runtimes, "require", lambda target, why: None)
    opened: list[tuple[str, object]] = []
    monkeypatch.setattr(trt_mod, "TensorRTRunner", lambda path, target: opened.append(("trt", path)) or "trt")
    monkeypatch.setattr(
        ort_mod, "OnnxRuntimeCudaRunner", lambda path, threads: opened.append(("ort-cuda", path)) or "x"
    )
    assert open_runner("tensorrt", linear) == "trt"
    monkeypatch.setattr(runtimes, "_torch_sees_cuda", lambda: True)
    assert open_runner("onnxruntime-cuda", linear) == "x"
    assert opened == [("trt", linear), ("ort-cuda", linear)]
