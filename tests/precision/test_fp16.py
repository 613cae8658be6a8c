"""FP16 stage: both backends (ModelOpt AutoCast and ONNX Runtime's converter) on tiny exported models,
backend choice, op/node block lists with their effect in the graph, NaN/Inf detection, atomic writes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import mlp
from onnx import TensorProto

from optimize.errors import RuntimeMissingError, StageError
from optimize.export import export_onnx
from optimize.models import LoadedModel
from optimize.precision import fp16
from optimize.precision.fp16 import check_finite, choose_backend, convert_fp16, nonfinite_op_types
from optimize.recipe import ExportSection, Fp16Variant
from optimize.runtimes import open_runner

BACKENDS = ["onnxruntime", "modelopt"]


class Overflows(torch.nn.Module):
    """(x * 300) ** 2 + 1: 90001 for x = 1, beyond FP16's largest finite value (65504)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 300) ** 2 + 1


def export(module: torch.nn.Module, width: int, dest: Path) -> Path:
    torch.manual_seed(0)
    loaded = LoadedModel(module.eval(), {"x": torch.randn(2, width)})
    spec = ExportSection(output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    export_onnx(loaded, spec, dest)
    return dest


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fp32")
    return {
        "mlp": export(mlp(32, 128, 128, 8), 32, folder / "mlp.onnx"),
        "overflows": export(Overflows(), 3, folder / "overflows.onnx"),
    }


def variant(**kw) -> Fp16Variant:
    return Fp16Variant(**{"name": "fp16", "kind": "fp16", **kw})


def feeds(rows: int = 16) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((rows, 32)).astype(np.float32)}


def run(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with open_runner("onnxruntime-cpu", path) as runner:
        return runner.run(inputs)["y"]


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


def io_types(path: Path) -> list[int]:
    g = onnx.load(str(path)).graph
    return [v.type.tensor_type.elem_type for v in [*g.input, *g.output]]


def tensor_types(path: Path) -> dict[str, int]:
    """Element type of every tensor in the graph, after (strict) ONNX shape inference."""
    g = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True).graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in [*g.input, *g.value_info, *g.output]:
        types[v.name] = v.type.tensor_type.elem_type
    return types


def op_io_types(path: Path, op_type: str) -> list[set[int]]:
    """Per node of `op_type`: the element types of its inputs and outputs."""
    types = tensor_types(path)
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == op_type]
    assert nodes, f"no {op_type} in {path.name}"
    return [{types[t] for t in [*n.input, *n.output] if t} for n in nodes]


@pytest.mark.parametrize("backend", BACKENDS)
def test_converted_model_is_fp16_inside_fp32_at_the_edges_and_close(models, tmp_path: Path, backend: str) -> None:
    dest = tmp_path / "fp16.onnx"
    result = convert_fp16(models["mlp"], dest, variant(backend=backend))

    assert result.backend == backend and result.record()["backend"] == backend
    onnx.checker.check_model(onnx.load(str(dest)), full_check=True)
    inits = [t.data_type for t in onnx.load(str(dest)).graph.initializer]
    assert result.fp16_initializers == inits.count(TensorProto.FLOAT16) == 6  # 3 weights, 3 biases
    assert result.fp32_initializers == inits.count(TensorProto.FLOAT) == 0
    assert all(s == {TensorProto.FLOAT16} for s in op_io_types(dest, "Gemm"))
    assert dest.stat().st_size < 0.6 * models["mlp"].stat().st_size
    assert io_types(dest) == [TensorProto.FLOAT, TensorProto.FLOAT]  # keep_io_types defaults to true
    with open_runner("onnxruntime-cpu", dest) as runner:
        assert [(s.name, s.dtype) for s in [*runner.inputs, *runner.outputs]] == [
            ("x", "float32"),
            ("y", "float32"),
        ]
    ref, got = run(models["mlp"], feeds()), run(dest, feeds())
    assert got.dtype == np.float32
    assert cosine_min(ref, got) > 0.999
    assert 0 < np.abs(ref - got).max() < 1e-2  # rounded to FP16, not the FP32 model unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp16.onnx"]  # written atomically: no temp left


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_io_types_false_makes_inputs_and_outputs_fp16(models, tmp_path: Path, backend: str) -> None:
    dest = tmp_path / "fp16-io.onnx"
    convert_fp16(models["mlp"], dest, variant(backend=backend, keep_io_types=False))
    assert io_types(dest) == [TensorProto.FLOAT16, TensorProto.FLOAT16]
    got = run(dest, {"x": feeds()["x"].astype(np.float16)})
    assert got.dtype == np.float16
    assert cosine_min(run(models["mlp"], feeds()), got) > 0.999


def test_auto_picks_modelopt_when_autocast_imports(models, tmp_path: Path) -> None:
    assert fp16.modelopt_available()
    assert choose_backend(variant()) == "modelopt"
    assert convert_fp16(models["mlp"], tmp_path / "a.onnx", variant(backend="auto")).backend == "modelopt"


def test_auto_falls_back_to_onnxruntime_without_modelopt(models, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(fp16, "modelopt_available", lambda: False)
    assert choose_backend(variant()) == "onnxruntime"
    assert convert_fp16(models["mlp"], tmp_path / "a.onnx", variant(backend="auto")).backend == "onnxruntime"


@pytest.mark.parametrize(
    "hidden",
    [
        "modelopt",  # nvidia-modelopt not installed
        "modelopt.onnx.autocast",  # installed without its ONNX dependencies: AutoCast does not import
    ],
)
def test_modelopt_asked_for_but_unusable_is_runtime_missing(models, tmp_path: Path, monkeypatch, hidden: str) -> None:
    monkeypatch.setitem(sys.modules, hidden, None)
    assert not fp16.modelopt_available()
    assert choose_backend(variant(backend="auto")) == "onnxruntime"
    with pytest.raises(RuntimeMissingError) as e:
        convert_fp16(models["mlp"], tmp_path / "m.onnx", variant(backend="modelopt"))
    assert e.value.exit_code == 4
    assert str(e.value) == (
        "precision.variants[fp16].backend: modelopt is not installed; "
        "pip install 'optimize[modelopt]' or use backend: onnxruntime"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_block_list_keeps_that_op_type_in_fp32(models, tmp_path: Path, backend: str) -> None:
    dest = tmp_path / "blocked.onnx"
    result = convert_fp16(models["mlp"], dest, variant(backend=backend, op_block_list=["Gemm"]))

    onnx.checker.check_model(onnx.load(str(dest)), full_check=True)
    assert all(s == {TensorProto.FLOAT} for s in op_io_types(dest, "Gemm"))  # computes in FP32
    assert all(s == {TensorProto.FLOAT16} for s in op_io_types(dest, "Relu"))  # the rest is still FP16
    assert result.fp32_initializers == 6 and result.fp16_initializers == 0  # the Gemms' weights stay FP32
    assert cosine_min(run(models["mlp"], feeds()), run(dest, feeds())) > 0.9999


@pytest.mark.parametrize("backend", BACKENDS)
def test_node_block_list_keeps_only_that_node_in_fp32(models, tmp_path: Path, backend: str) -> None:
    first_gemm = next(n.name for n in onnx.load(str(models["mlp"])).graph.node if n.op_type == "Gemm")
    dest = tmp_path / "one-node.onnx"
    convert_fp16(models["mlp"], dest, variant(backend=backend, node_block_list=[first_gemm]))
    gemms = op_io_types(dest, "Gemm")
    assert gemms[0] == {TensorProto.FLOAT}
    assert gemms[1:] == [{TensorProto.FLOAT16}, {TensorProto.FLOAT16}]


def test_fp16_overflow_fails_the_stage_naming_the_op(models, tmp_path: Path) -> None:
    dest = tmp_path / "fp16.onnx"
    convert_fp16(models["overflows"], dest, variant(backend="onnxruntime"))
    x = {"x": np.ones((2, 3), np.float32)}
    # ONNX Runtime's CPU provider has no FP16 Pow: it computes it in FP32 and drops the Casts around it,
    # so the runner's outputs here are finite although the FP16 graph overflows (as it does on a GPU).
    outputs = {"y": run(dest, x)}
    with pytest.raises(StageError) as e:
        check_finite(dest, outputs, x, "precision.fp16")
    assert e.value.exit_code == 3
    assert str(e.value).startswith("precision.fp16: output(s) y contain NaN/Inf in FP16; first produced by Pow (")
    assert str(e.value).endswith("keep those op types in FP32 with op_block_list")
    # only the first offending node: the Add after it gets a non-finite input and is not named
    assert [op for op, _ in nonfinite_op_types(dest, x)] == ["Pow"]

    # keeping the op in FP32 works; 90001 does not fit FP16 at all, so the Add that takes it stays FP32 too
    fixed = tmp_path / "fixed.onnx"
    convert_fp16(models["overflows"], fixed, variant(backend="onnxruntime", op_block_list=["Pow", "Add"]))
    check_finite(fixed, {"y": run(fixed, x)}, x, "precision.fp16")
    assert nonfinite_op_types(fixed, x) == []
    np.testing.assert_allclose(run(fixed, x), np.full((2, 3), 90001, np.float32))


def test_nonfinite_outputs_from_the_runner_fail_the_stage(models, tmp_path: Path) -> None:
    dest = tmp_path / "fp16-io.onnx"
    convert_fp16(models["overflows"], dest, variant(backend="onnxruntime", keep_io_types=False))
    x = {"x": np.ones((2, 3), np.float16)}
    outputs = {"y": run(dest, x)}
    assert np.isinf(outputs["y"]).all()  # an FP16 output cannot hold 90001
    with pytest.raises(StageError, match=r"output\(s\) y contain NaN/Inf in FP16; first produced by Pow \("):
        check_finite(dest, outputs, x, "precision.fp16")


def test_finite_outputs_pass(models, tmp_path: Path) -> None:
    dest = tmp_path / "fp16.onnx"
    convert_fp16(models["mlp"], dest, variant(backend="onnxruntime"))
    check_finite(dest, {"y": run(dest, feeds())}, feeds(), "precision.fp16")
    assert nonfinite_op_types(dest, feeds()) == []
    small = {"x": np.full((2, 3), 0.1, np.float32)}  # (0.1 * 300) ** 2 = 900 fits FP16
    over = tmp_path / "over.onnx"
    convert_fp16(models["overflows"], over, variant(backend="onnxruntime"))
    check_finite(over, {"y": run(over, small)}, small, "precision.fp16")


def test_failed_conversion_is_a_stage_error_and_leaves_no_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    out = tmp_path / "out"
    with pytest.raises(StageError) as e:
        convert_fp16(bad, out / "fp16.onnx", variant(backend="onnxruntime"))
    assert e.value.exit_code == 3
    assert str(e.value).startswith("precision.fp16: FP16 conversion with onnxruntime failed: ")
    assert not out.exists() or list(out.iterdir()) == []


def test_a_write_that_fails_half_way_keeps_the_previous_file(models, tmp_path: Path, monkeypatch) -> None:
    dest = tmp_path / "fp16.onnx"
    convert_fp16(models["mlp"], dest, variant(backend="onnxruntime"))
    before = dest.read_bytes()

    def half_write(model, path, *args, **kwargs):
        Path(path).write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        convert_fp16(models["mlp"], dest, variant(backend="onnxruntime", op_block_list=["Gemm"]))
    assert dest.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp16.onnx"]
