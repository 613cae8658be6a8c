"""The Triton model repository: config.pbtxt rendered from `serving:` and the artifact's I/O, parsed with
Triton's own ModelConfig protobuf (tritonclient's model_config_pb2) and checked against tiny ONNX models built
here; one test per breakage the check catches."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from optimize.deploy import triton
from optimize.deploy.inputs import DeployInputs, Measured
from optimize.errors import RuntimeMissingError, StageError
from optimize.lazy import available, lazy
from optimize.runtimes.base import TensorSpec

onnx = lazy("onnx")
helper = lazy("onnx.helper")
numpy_helper = lazy("onnx.numpy_helper")


@pytest.fixture(autouse=True)
def _needs_tritonclient() -> None:
    if not available("tritonclient"):
        pytest.fail("tritonclient is not installed: `pip install --no-deps tritonclient` (CI: `bash ci/setup.sh cpu`)")


# --- tiny models -------------------------------------------------------------------------------------------


def _save(path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any] = ()) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def text_model(path: Path) -> Path:
    """int64 input_ids, attention_mask [batch, sequence] -> float hidden [batch, sequence, 8] (a text encoder's I/O)."""
    i64, f32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=f32),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=f32),
        helper.make_node("Mul", ["ids_f", "mask_f"], ["masked"]),
        helper.make_node("Unsqueeze", ["masked", "axis"], ["column"]),
        helper.make_node("Mul", ["column", "weights"], ["hidden"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis"),
        numpy_helper.from_array(np.arange(8, dtype=np.float32), "weights"),
    ]
    ins = [helper.make_tensor_value_info(n, i64, ["batch", "sequence"]) for n in ("input_ids", "attention_mask")]
    outs = [helper.make_tensor_value_info("hidden", f32, ["batch", "sequence", 8])]
    return _save(path, nodes, ins, outs, inits)


def fixed_model(path: Path) -> Path:
    """float x [1, 3] -> y [1, 3]: no dynamic axis, so Triton may not batch it."""
    f32 = onnx.TensorProto.FLOAT
    x, y = (helper.make_tensor_value_info(n, f32, [1, 3]) for n in ("x", "y"))
    return _save(path, [helper.make_node("Relu", ["x"], ["y"])], [x], [y])


def fp16_model(path: Path) -> Path:
    """float16 x [batch, 4] -> y [batch, 4]."""
    f16 = onnx.TensorProto.FLOAT16
    x, y = (helper.make_tensor_value_info(n, f16, ["batch", 4]) for n in ("x", "y"))
    return _save(path, [helper.make_node("Relu", ["x"], ["y"])], [x], [y])


def specs(model: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The model's I/O as TensorSpecs (numpy dtype names, axis names for dynamic axes), as a render gets them."""
    graph = onnx.load(str(model)).graph

    def spec(v: Any) -> TensorSpec:
        t = v.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name
        return TensorSpec(
            v.name, dtype, tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
        )

    return tuple(map(spec, graph.input)), tuple(map(spec, graph.output))


def with_model(inputs: DeployInputs, model: Path, **fields: Any) -> DeployInputs:
    ins, outs = specs(model)
    return dataclasses.replace(inputs, model_file=model, inputs=ins, outputs=outs, **fields)


def parsed(model_dir: Path) -> Any:
    config, errors = triton.parse_config((model_dir / "config.pbtxt").read_text())
    assert errors == []
    return config


def edit(model_dir: Path, old: str, new: str) -> None:
    path = model_dir / "config.pbtxt"
    text = path.read_text()
    assert old in text, text
    path.write_text(text.replace(old, new, 1))


@pytest.fixture
def text_repo(tmp_path: Path, deploy_inputs: DeployInputs) -> Path:
    """The text model's repository as rendered; returns the model's folder."""
    inputs = with_model(deploy_inputs, text_model(tmp_path / "text.onnx"))
    return triton.write_repository(inputs, tmp_path / "repo")


# --- rendering ---------------------------------------------------------------------------------------------


def test_text_model_config_parses_and_matches(text_repo: Path, deploy_inputs: DeployInputs) -> None:
    serving = deploy_inputs.serving
    assert text_repo.name == deploy_inputs.app
    assert (text_repo / "1" / "model.onnx").is_file()
    config = parsed(text_repo)
    assert config.name == deploy_inputs.app and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == serving.max_batch_size
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input_ids", triton.model_config_pb2().TYPE_INT64, [-1]),
        ("attention_mask", triton.model_config_pb2().TYPE_INT64, [-1]),
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [("hidden", [-1, 8])]
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == [serving.max_batch_size]
    assert batching.max_queue_delay_microseconds == round(serving.max_queue_delay_ms * 1000)
    assert (batching.priority_levels, batching.default_priority_level) == (2, 2)
    policy = batching.default_queue_policy
    assert policy.timeout_action == triton.model_config_pb2().ModelQueuePolicy.REJECT
    assert policy.default_timeout_microseconds == round(serving.queue_timeout_ms * 1000)
    assert policy.allow_timeout_override and policy.max_queue_size == serving.max_queue
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, triton.model_config_pb2().ModelInstanceGroup.KIND_CPU)
    ]
    assert triton.check_repository(text_repo) == []
    assert triton.check_repository(text_repo.parent) == []  # the repository root: every model in it


def test_minilm_io_config_matches(tmp_path: Path, deploy_inputs: DeployInputs) -> None:
    """The MiniLM variants' exported I/O (three int64 [batch, sequence] inputs, [batch, 384] output)."""
    i64, f32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    names = [s.name for s in deploy_inputs.inputs]
    nodes = [
        helper.make_node("Cast", [names[0]], ["f"], to=f32),
        helper.make_node("ReduceMean", ["f"], ["m"], keepdims=1),
    ]
    nodes += [helper.make_node("Mul", ["m", "w"], ["sentence_embedding"])]
    model = _save(
        tmp_path / "minilm.onnx",
        nodes + [helper.make_node("Identity", [n], [f"{n}_out"]) for n in names[1:]],
        [helper.make_tensor_value_info(n, i64, ["batch", "sequence"]) for n in names],
        [helper.make_tensor_value_info("sentence_embedding", f32, ["batch", 384])]
        + [helper.make_tensor_value_info(f"{n}_out", i64, ["batch", "sequence"]) for n in names[1:]],
        [numpy_helper.from_array(np.ones(384, dtype=np.float32), "w")],
    )
    # the render's outputs are the registered version's (deploy_inputs: sentence_embedding only)
    repo = triton.write_repository(dataclasses.replace(deploy_inputs, model_file=model), tmp_path / "repo")
    config = parsed(repo)
    assert [o.name for o in config.output] == ["sentence_embedding"] and list(config.output[0].dims) == [384]
    assert triton.check_repository(repo) == []


def test_fixed_shape_model_is_not_batched(tmp_path: Path, deploy_inputs: DeployInputs) -> None:
    inputs = with_model(deploy_inputs, fixed_model(tmp_path / "fixed.onnx"))
    repo = triton.write_repository(inputs, tmp_path / "repo")
    config = parsed(repo)
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [1, 3] and list(config.output[0].dims) == [1, 3]
    assert list(config.dynamic_batching.preferred_batch_size) == []  # Triton refuses sizes over max_batch_size 0
    assert triton.check_repository(repo) == []


def test_fp16_model_on_a_gpu_target(tmp_path: Path, deploy_inputs: DeployInputs) -> None:
    measured = Measured(max_rps_at_slo=500.0, cpu_cores=0.5, rss_peak_mb=900.0, target="onnxruntime-cuda")
    canary = dataclasses.replace(deploy_inputs.canary, measured=measured)
    inputs = with_model(deploy_inputs, fp16_model(tmp_path / "fp16.onnx"), canary=canary)
    repo = triton.write_repository(inputs, tmp_path / "repo")
    config = parsed(repo)
    pb2 = triton.model_config_pb2()
    assert [(i.data_type, list(i.dims)) for i in config.input] == [(pb2.TYPE_FP16, [4])]
    assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
    assert triton.check_repository(repo) == []
    assert "KIND_CPU" in triton.config_text(inputs, gpu=False)


def test_external_data_is_copied_and_checked(tmp_path: Path, deploy_inputs: DeployInputs) -> None:
    source = text_model(tmp_path / "text.onnx")
    model = onnx.load(str(source))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    repo = triton.write_repository(with_model(deploy_inputs, tmp_path / "ext.onnx"), tmp_path / "repo")
    assert (repo / "1" / "model.onnx.data").is_file()
    assert triton.check_repository(repo) == []
    (repo / "1" / "model.onnx.data").unlink()
    assert any("model.onnx.data: external data of model.onnx missing" in e for e in triton.check_repository(repo))


def test_tensorrt_plan_repository(tmp_path: Path, deploy_inputs: DeployInputs) -> None:
    source = fp16_model(tmp_path / "fp16.onnx")
    engine = tmp_path / "fp16.plan"
    engine.write_bytes(b"a serialized TensorRT engine")
    repo = triton.write_repository(with_model(deploy_inputs, source, engine_file=engine), tmp_path / "repo")
    assert (repo / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert not (repo / "1" / "model.onnx").exists()
    config = parsed(repo)
    assert config.platform == "tensorrt_plan"
    assert config.instance_group[0].kind == triton.model_config_pb2().ModelInstanceGroup.KIND_GPU
    assert "parameters" not in (repo / "config.pbtxt").read_text()
    assert triton.check_repository(repo) == [] and triton.check_repository(repo, onnx_file=source) == []
    assert triton.check_repository(repo, onnx_file=text_model(tmp_path / "other.onnx")) != []


def test_threads_become_an_onnxruntime_parameter(
    text_repo: Path, deploy_inputs: DeployInputs, with_sections: Any
) -> None:
    inputs = with_sections(with_model(deploy_inputs, text_repo / "1" / "model.onnx"), serving={"threads": 4})
    config, errors = triton.parse_config(triton.config_text(inputs))
    assert errors == [] and config.parameters["intra_op_thread_count"].string_value == "4"


def test_a_dtype_triton_lacks_is_refused(deploy_inputs: DeployInputs) -> None:
    inputs = dataclasses.replace(deploy_inputs, inputs=(TensorSpec("x", "complex64", ("batch", 2)),))
    with pytest.raises(StageError, match=r"input 'x': dtype 'complex64' has no Triton data type"):
        triton.config_text(inputs)


# --- what the check catches (one test each) -------------------------------------------------------------


def test_wrong_dtype(text_repo: Path) -> None:
    edit(text_repo, "data_type: TYPE_INT64", "data_type: TYPE_INT32")
    assert triton.check_repository(text_repo) == [
        f"{text_repo / 'config.pbtxt'}: input 'input_ids': data_type TYPE_INT32, the model's is TYPE_INT64; use it"
    ]


def test_wrong_dims(text_repo: Path) -> None:
    edit(text_repo, "dims: [ -1, 8 ]", "dims: [ -1, 16 ]")
    (error,) = triton.check_repository(text_repo)
    assert "output 'hidden': dims give the shape [-1 (batch), -1, 16], the model's is [-1, -1, 8]" in error


def test_wrong_rank(text_repo: Path) -> None:
    edit(text_repo, "dims: [ -1 ]", "dims: [ -1, 4 ]")
    (error,) = triton.check_repository(text_repo)
    assert "input 'input_ids': dims give the shape [-1 (batch), -1, 4], the model's is [-1, -1]" in error


def test_batching_a_fixed_batch_axis(tmp_path: Path, deploy_inputs: DeployInputs) -> None:
    repo = triton.write_repository(with_model(deploy_inputs, fixed_model(tmp_path / "fixed.onnx")), tmp_path / "r")
    edit(repo, "max_batch_size: 0", "max_batch_size: 4")
    errors = triton.check_repository(repo)
    assert len(errors) == 2 and all("max_batch_size 4 needs a dynamic first axis" in e for e in errors)


def test_unknown_field(text_repo: Path) -> None:
    edit(text_repo, "max_batch_size:", "max_batch: 3\nmax_batch_size:")
    (error,) = triton.check_repository(text_repo)
    assert 'has no field named "max_batch"' in error and str(text_repo / "config.pbtxt") in error


def test_bad_enum(text_repo: Path) -> None:
    edit(text_repo, "kind: KIND_CPU", "kind: KIND_TPU")
    (error,) = triton.check_repository(text_repo)
    assert "KIND_TPU" in error


def test_missing_version_file(text_repo: Path) -> None:
    (text_repo / "1" / "model.onnx").unlink()
    assert triton.check_repository(text_repo) == [
        f"{text_repo / '1' / 'model.onnx'}: missing; "
        "platform onnxruntime_onnx loads model.onnx from each version folder"
    ]


def test_no_version_folder(text_repo: Path) -> None:
    (text_repo / "1" / "model.onnx").rename(text_repo / "model.onnx")
    (text_repo / "1").rmdir()
    (error,) = triton.check_repository(text_repo)
    assert "no version folder" in error


def test_unknown_and_missing_input(text_repo: Path) -> None:
    edit(text_repo, 'name: "attention_mask"', 'name: "token_type_ids"')
    assert [e.split(": ", 1)[1] for e in triton.check_repository(text_repo)] == [
        "input 'token_type_ids': model.onnx has no such input (it has attention_mask, input_ids); use its names"
    ]
    edit(text_repo, "input [", 'input [\n  { name: "extra" data_type: TYPE_FP32 dims: [ 1 ] },')
    assert any("3 inputs, model.onnx has 2" in e for e in triton.check_repository(text_repo))


def test_name_differs_from_folder(text_repo: Path) -> None:
    edit(text_repo, f'name: "{text_repo.name}"', 'name: "other"')
    (error,) = triton.check_repository(text_repo)
    assert "name 'other' differs from the model's folder" in error


def test_preferred_size_over_max_batch_size(text_repo: Path) -> None:
    edit(text_repo, "preferred_batch_size: [ ", "preferred_batch_size: [ 4096, ")
    (error,) = triton.check_repository(text_repo)
    assert "preferred_batch_size 4096 is outside 1..max_batch_size" in error


def test_default_priority_out_of_range(text_repo: Path) -> None:
    edit(text_repo, "default_priority_level: 2", "default_priority_level: 3")
    (error,) = triton.check_repository(text_repo)
    assert "default_priority_level 3 is outside 1..priority_levels (2)" in error


def test_empty_repository(tmp_path: Path) -> None:
    (error,) = triton.check_repository(tmp_path)
    assert "no model folder with a config.pbtxt" in error


def test_tritonclient_missing_is_exit_4(text_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    triton.model_config_pb2.cache_clear()
    monkeypatch.setattr(triton.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(RuntimeMissingError, match="pip install --no-deps tritonclient") as caught:
            triton.check_repository(text_repo)
        assert caught.value.exit_code == 4
    finally:
        monkeypatch.undo()
        triton.model_config_pb2.cache_clear()


def test_one_value_per_row_is_reshaped(tmp_path: Path, deploy_inputs: DeployInputs) -> None:
    """An output of shape [batch] has no dims left without the batch axis: Triton wants dims [1] reshaped to []."""
    f32 = onnx.TensorProto.FLOAT
    model = _save(
        tmp_path / "rows.onnx",
        [helper.make_node("ReduceMax", ["x"], ["y"], keepdims=0, axes=None)],
        [helper.make_tensor_value_info("x", f32, ["batch", 4])],
        [helper.make_tensor_value_info("y", f32, ["batch"])],
    )
    repo = triton.write_repository(with_model(deploy_inputs, model), tmp_path / "repo")
    output = parsed(repo).output[0]
    assert list(output.dims) == [1] and output.HasField("reshape") and list(output.reshape.shape) == []
    assert triton.check_repository(repo) == []


def test_tensor_names_are_quoted(deploy_inputs: DeployInputs) -> None:
    name = 'input:0 "quoted" \\ back'
    inputs = dataclasses.replace(deploy_inputs, inputs=(TensorSpec(name, "float32", ("batch", 2)),))
    config, errors = triton.parse_config(triton.config_text(inputs))
    assert errors == [] and config.input[0].name == name
