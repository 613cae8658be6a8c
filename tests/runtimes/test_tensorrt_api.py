"""API conformance on the CPU: every TensorRT name our code uses exists in the real TensorRT 10.16 and 11.4
Python bindings, and no name TensorRT 11 removed is reached on its path.

The real names come from the bindings wheels (tests/data/tensorrt/, read by tools/tensorrt_api_names.py).
Two independent checks:
- static: every attribute read on a TensorRT object in optimize/engine.py and optimize/runtimes/tensorrt.py,
  by the kind of object it is read on (all paths, including the runner, which needs a GPU to execute);
- dynamic: the names the engine stage really reached when driven through tests/runtimes/tensorrt_double.py (a TEST
  DOUBLE of the module, not TensorRT), once as 10.16 and once as 11.4, against that version's names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO, mlp
from runtimes import tensorrt_double
from runtimes.tensorrt_api import tensorrt_api

from optimize import engine

SOURCES = [REPO / "optimize" / "engine.py", REPO / "optimize" / "runtimes" / "tensorrt.py"]

# The variables (as written in our code) that hold TensorRT objects, and the class each one is.
RECEIVERS = {
    "builder": "Builder",
    "network": "INetworkDefinition",
    "parser": "OnnxParser",
    "config": "IBuilderConfig",
    "profile": "IOptimizationProfile",
    "err": "ParserError",
    "engine": "ICudaEngine",
    "self.engine": "ICudaEngine",
    "inspector": "EngineInspector",
    "self.context": "IExecutionContext",
    "self._runtime": "Runtime",
    "trt.Runtime(logger)": "Runtime",
    "ours": "ITimingCache",
    "trt.ILogger": "ILogger",
}
# Read only after trying the name that both versions have (`device_memory_size_v2` first).
GUARDED = {"ICudaEngine.device_memory_size"}


def used_names() -> set[str]:
    """`Class.member` (or a bare module attribute, or `Enum.MEMBER`) for every TensorRT attribute read."""
    names: set[str] = set()
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            receiver = ast.unparse(node.value)
            if receiver == "trt":
                names.add(node.attr)
            elif isinstance(node.value, ast.Attribute) and ast.unparse(node.value.value) == "trt":
                names.add(f"{node.value.attr}.{node.attr}")  # enum members: trt.DataType.HALF
            elif receiver in RECEIVERS:
                names.add(f"{RECEIVERS[receiver]}.{node.attr}")
    return names


def test_the_scan_sees_the_calls_that_matter() -> None:
    """Guard against a vacuous check: the scan must find the build, the inspector and the runner's calls."""
    names = used_names()
    for expected in (
        "Builder.build_serialized_network",
        "IBuilderConfig.set_memory_pool_limit",
        "IOptimizationProfile.set_shape",
        "OnnxParser.parse_from_file",
        "ITimingCache.combine",
        "EngineInspector.get_engine_information",
        "IExecutionContext.execute_async_v3",
        "IExecutionContext.set_tensor_address",
        "IExecutionContext.set_input_shape",
        "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
        "LayerInformationFormat.JSON",
        "TensorIOMode.INPUT",
        "IProgressMonitor",  # the build child's progress monitor, and where the builder takes it
        "IBuilderConfig.progress_monitor",
    ):
        assert expected in names, expected
    assert len(names) >= 35


@pytest.mark.parametrize("major", [10, 11])
def test_every_name_the_code_uses_exists_in_the_real_bindings(major: int) -> None:
    real = tensorrt_api(major)
    missing = sorted(n for n in used_names() - GUARDED if n not in real)
    assert missing == [], f"not in TensorRT {major}'s Python API: {missing}"


def test_no_name_removed_in_tensorrt_11_is_used_unguarded() -> None:
    removed = tensorrt_api(10) - tensorrt_api(11)
    assert {"BuilderFlag.FP16", "BuilderFlag.INT8", "IInt8EntropyCalibrator2"} <= removed  # the data is real
    assert sorted((used_names() & removed) - GUARDED) == []
    assert all(n in tensorrt_api(10) for n in GUARDED)  # the guarded fallbacks are real 10.x names
    # read by name (getattr) first, so the scan cannot see it: it must exist in both
    assert "ICudaEngine.device_memory_size_v2" in tensorrt_api(10) & tensorrt_api(11)


@pytest.mark.parametrize(("version", "major"), [("10.16.1.11", 10), ("11.4.0.106", 11)])
def test_names_reached_on_each_version_s_path_exist_in_that_version(
    version: str, major: int, tmp_path: Path, monkeypatch
) -> None:
    import torch
    from test_engine import H100, request

    from optimize.export import export_onnx
    from optimize.models import LoadedModel
    from optimize.precision import fp16
    from optimize.recipe import ExportSection, Fp16Variant

    loaded = LoadedModel(mlp(32, 64, 8), {"x": torch.randn(2, 32)})
    export_onnx(
        loaded,
        ExportSection(output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}),
        tmp_path / "fp32.onnx",
    )
    fp16.convert_fp16(
        tmp_path / "fp32.onnx", tmp_path / "fp16.onnx", Fp16Variant(name="fp16", kind="fp16", backend="onnxruntime")
    )
    trt = tensorrt_double.install(monkeypatch, version)
    engine.build_engine(request(tmp_path, tmp_path / "fp16.onnx", "fp16"), device=H100)  # build, cache, inspect
    engine.build_engine(request(tmp_path, tmp_path / "fp32.onnx", "fp32"), device=H100)  # cache reused, merged
    reached = trt.double_used
    assert "Builder.build_serialized_network" in reached and "ITimingCache.combine" in reached
    real = tensorrt_api(major)
    assert sorted(n for n in reached if n not in real) == []
