"""Export stage: torch → one self-contained ONNX file with the recipe's names and dynamic axes, and the
check of ONNX Runtime against torch on batches of another shape than the example."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import mlp
from onnx.external_data_helper import uses_external_data

from optimize.errors import RecipeError, StageError
from optimize.export import STACK_TRACE, check_export, export_onnx
from optimize.models import LoadedModel
from optimize.recipe import ExportSection
from optimize.runtimes import open_runner


def tiny_loaded() -> LoadedModel:
    return LoadedModel(mlp(8, 16, 4), {"x": torch.randn(2, 8, generator=torch.Generator().manual_seed(1))})


def tiny_spec(**over) -> ExportSection:
    fields = {
        "input_names": ["x"],
        "output_names": ["logits"],
        "dynamic_axes": {"x": {0: "batch"}, "logits": {0: "batch"}},
    }
    return ExportSection(**{**fields, **over})


def batch(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, Path, float]:
    """The tiny MLP exported once for the tests that only read the result."""
    folder = tmp_path_factory.mktemp("export")
    loaded = tiny_loaded()
    seconds = export_onnx(loaded, tiny_spec(), folder / "model.onnx")
    return loaded, folder / "model.onnx", seconds


def dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_export_writes_one_self_contained_checked_file(exported) -> None:
    _, path, seconds = exported
    assert seconds > 0
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no .data file, no temp file
    model = onnx.load(str(path), load_external_data=False)
    assert model.graph.initializer and not any(uses_external_data(t) for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]


def test_export_keeps_no_stack_trace_so_its_bytes_do_not_depend_on_where_the_code_lies(exported, tmp_path) -> None:
    """The exporter writes each node's Python stack (file paths, line numbers) as metadata: the same model
    exported from another checkout or venv had another sha256. That one key goes; the rest of the metadata stays."""
    loaded = exported[0]
    torch.onnx.export(loaded.module, (loaded.example_inputs["x"],), str(tmp_path / "raw.onnx"), input_names=["x"])
    raw = onnx.load(str(tmp_path / "raw.onnx"), load_external_data=False)
    assert STACK_TRACE in {p.key for node in raw.graph.node for p in node.metadata_props}  # what torch writes
    model = onnx.load(str(exported[1]), load_external_data=False)
    keys = {p.key for node in model.graph.node for p in node.metadata_props}
    assert STACK_TRACE not in keys
    assert "pkg.torch.onnx.name_scopes" in keys  # the exporter's other metadata is kept


def test_export_uses_the_recipe_names_and_dynamic_axes(exported) -> None:
    _, path, _ = exported
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert dims(model.graph.input[0]) == ["batch", 8]
    assert dims(model.graph.output[0]) == ["batch", 4]


def test_check_export_passes_on_other_shapes_and_reports_the_error(exported) -> None:
    loaded, path, _ = exported
    batches = [batch(5, 0), batch(3, 1), batch(7, 2)]
    with open_runner("onnxruntime-cpu", path) as runner:
        check = check_export(loaded, runner, batches, tiny_spec(validation_batches=2))
    assert check.batches == 2  # validation_batches of them
    assert check.shapes == [{"x": [5, 8]}, {"x": [3, 8]}]
    assert set(check.max_abs_error) == {"logits"}
    assert 0 <= check.max_abs_error["logits"] < 1e-5
    assert check.worst_excess <= 0
    assert check.record() == {
        "batches": 2,
        "shapes": [{"x": [5, 8]}, {"x": [3, 8]}],
        "max_abs_error": check.max_abs_error,
        "within_tolerance": True,
    }


def test_check_export_passes_when_one_batch_differs_from_the_example(exported) -> None:
    loaded, path, _ = exported
    with open_runner("onnxruntime-cpu", path) as runner:
        check = check_export(loaded, runner, [batch(2, 0), batch(6, 1)], tiny_spec())
    assert check.shapes == [{"x": [2, 8]}, {"x": [6, 8]}]


def test_check_export_refuses_batches_of_the_example_shape(exported) -> None:
    loaded, path, _ = exported
    with open_runner("onnxruntime-cpu", path) as runner:
        with pytest.raises(RecipeError) as e:
            check_export(loaded, runner, [batch(2, 0), batch(2, 1)], tiny_spec())
        assert e.value.exit_code == 2
        assert "dynamic axes are not exercised" in str(e.value)
        assert "use another batch_size / max_length" in str(e.value)
        # only the batches it validates count: the odd one out is past validation_batches
        with pytest.raises(RecipeError, match="dynamic axes are not exercised"):
            check_export(loaded, runner, [batch(2, 0), batch(9, 1)], tiny_spec(validation_batches=1))


class PerturbingRunnerDouble:
    """A TEST DOUBLE: the real ONNX Runtime runner whose outputs get `delta` added, standing in for an
    export that computes something else than torch."""

    def __init__(self, runner, delta: float) -> None:
        self.runner, self.delta = runner, delta
        self.inputs, self.outputs = runner.inputs, runner.outputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v + np.float32(self.delta) for k, v in self.runner.run(feeds).items()}


def test_check_export_fails_the_stage_beyond_tolerance(exported) -> None:
    loaded, path, _ = exported
    spec = tiny_spec(tolerance={"atol": 1e-3, "rtol": 0.0})
    with open_runner("onnxruntime-cpu", path) as runner:
        # within atol passes, and reports the difference
        check = check_export(loaded, PerturbingRunnerDouble(runner, 5e-4), [batch(5)], spec)
        assert check.max_abs_error["logits"] == pytest.approx(5e-4, rel=1e-2)
        with pytest.raises(StageError) as e:
            check_export(loaded, PerturbingRunnerDouble(runner, 0.1), [batch(5)], spec)
        assert e.value.exit_code == 3
        assert "differs from torch beyond export.tolerance (atol=0.001, rtol=0.0)" in str(e.value)
        assert "output 'logits' max |diff| = 0.1" in str(e.value)
        with pytest.raises(StageError, match="output 'logits' of the ONNX model has NaN/Inf"):
            check_export(loaded, PerturbingRunnerDouble(runner, np.nan), [batch(5)], spec)


def test_check_export_catches_a_torch_model_that_no_longer_matches_the_file(tmp_path: Path) -> None:
    loaded = tiny_loaded()
    export_onnx(loaded, tiny_spec(), tmp_path / "model.onnx")
    with torch.no_grad():
        loaded.module.fc2.bias += 0.5  # the module changed after the export
    with open_runner("onnxruntime-cpu", tmp_path / "model.onnx") as runner:
        with pytest.raises(StageError, match=r"max \|diff\| = 0\.5"):
            check_export(loaded, runner, [batch(4)], tiny_spec())


class TwoInputs(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 2 * a - b


def test_inputs_reach_the_forward_parameter_of_their_name(tmp_path: Path) -> None:
    # the example inputs list `b` first: the ONNX input `b` must still feed forward's `b`
    loaded = LoadedModel(TwoInputs().eval(), {"b": torch.ones(2, 3), "a": torch.zeros(2, 3)})
    spec = ExportSection(output_names=["y"], dynamic_axes={"a": {0: "batch"}, "b": {0: "batch"}})
    export_onnx(loaded, spec, tmp_path / "two.onnx")
    feeds = {"a": np.full((3, 3), 5, np.float32), "b": np.ones((3, 3), np.float32)}
    with open_runner("onnxruntime-cpu", tmp_path / "two.onnx") as runner:
        assert {i.name for i in runner.inputs} == {"a", "b"}
        np.testing.assert_allclose(runner.run(feeds)["y"], np.full((3, 3), 9, np.float32))
        check_export(loaded, runner, [feeds], spec)


def test_inputs_that_skip_a_forward_parameter_are_refused(tmp_path: Path) -> None:
    class Skips(torch.nn.Module):
        def forward(self, a, mask=None, b=None):
            return a - b

    loaded = LoadedModel(Skips().eval(), {"a": torch.ones(2, 3), "b": torch.ones(2, 3)})
    with pytest.raises(RecipeError, match=r"export.input_names: .* skip its parameter\(s\) mask"):
        export_onnx(loaded, ExportSection(output_names=["y"]), tmp_path / "skips.onnx")
    assert not (tmp_path / "skips.onnx").exists()


def test_output_names_that_do_not_match_the_model_fail_the_stage(tmp_path: Path) -> None:
    class TwoOutputs(torch.nn.Module):
        def forward(self, x):
            return x + 1, x * 2

    loaded = LoadedModel(TwoOutputs().eval(), {"x": torch.ones(2, 3)})
    with pytest.raises(StageError) as e:
        export_onnx(loaded, ExportSection(output_names=["y"]), tmp_path / "m.onnx")
    assert e.value.exit_code == 3
    assert "export.output_names: the model returned 2 output(s)" in str(e.value)
    assert "the recipe names ['y']" in str(e.value)
    assert not list(tmp_path.iterdir()), "a rejected export leaves no file behind"


def test_dynamic_axes_for_an_unknown_tensor_is_a_recipe_error(tmp_path: Path) -> None:
    spec = tiny_spec(dynamic_axes={"x": {0: "batch"}, "logit": {0: "batch"}})
    with pytest.raises(RecipeError) as e:
        export_onnx(tiny_loaded(), spec, tmp_path / "m.onnx")
    assert e.value.exit_code == 2
    assert str(e.value) == ("export.dynamic_axes: logit is neither an input nor an output (inputs: x; outputs: logits)")
    assert list(tmp_path.iterdir()) == []


def test_input_names_must_be_among_the_example_inputs(tmp_path: Path) -> None:
    spec = tiny_spec(input_names=["image"])
    with pytest.raises(RecipeError, match=r"export.input_names: image not among the model's example inputs \(x\)"):
        tiny_loaded().input_names(spec)
    with pytest.raises(RecipeError, match="export.input_names: image"):
        export_onnx(tiny_loaded(), spec, tmp_path / "m.onnx")
    assert tiny_loaded().input_names(ExportSection()) == ["x"]  # default: the example inputs' keys


class ForwardRaises(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("forward is broken")


class DataDependentBranch(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x + 1
        return x - 1


@pytest.mark.parametrize(
    ("module", "cause"),
    [(ForwardRaises(), "RuntimeError: forward is broken"), (DataDependentBranch(), "data-dependent")],
)
def test_a_model_that_does_not_export_fails_the_stage_naming_the_exporter(
    tmp_path: Path, module: torch.nn.Module, cause: str
) -> None:
    loaded = LoadedModel(module.eval(), {"x": torch.ones(2, 3)})
    with pytest.raises(StageError) as e:
        export_onnx(loaded, ExportSection(dynamic_axes={"x": {0: "batch"}}), tmp_path / "m.onnx")
    msg = str(e.value)
    assert e.value.exit_code == 3
    assert msg.startswith("export: torch.onnx.export failed: ")
    assert cause in msg  # the model's own error, not only torch's wrapper
    assert "\x1b[" not in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
