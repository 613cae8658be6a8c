"""The TensorRT API lists in tests/data/tensorrt/ load, are well formed, and say what we rely on them for."""

from __future__ import annotations

import re

import pytest
from runtimes.tensorrt_api import DATA, tensorrt_api, tensorrt_source

MAJORS = (10, 11)


@pytest.mark.parametrize("major", MAJORS)
def test_list_names_its_wheel(major: int) -> None:
    wheel = rf"tensorrt_cu\d+_bindings-{major}\.\S+\.whl"
    assert re.fullmatch(rf"tensorrt {major}\.\d+\.\d+\.\d+ from {wheel}, sha256 [0-9a-f]{{64}}", tensorrt_source(major))


@pytest.mark.parametrize("major", MAJORS)
def test_list_is_sorted_unique_and_identifier_like(major: int) -> None:
    lines = [line for line in (DATA / f"api-{major}.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(lines) > 1000
    assert lines == sorted(set(lines)), "regenerate with tools/tensorrt_api_names.py (sorted, one name a line)"
    bad = [line for line in lines if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", line)]
    assert not bad


@pytest.mark.parametrize("major", MAJORS)
def test_every_dotted_name_has_its_parts_as_bare_names(major: int) -> None:
    api = tensorrt_api(major)
    missing = {part for name in api if "." in name for part in name.split(".") if part not in api}
    assert not missing


@pytest.mark.parametrize("major", MAJORS)
def test_runtime_api_both_majors_share(major: int) -> None:
    api = tensorrt_api(major)
    for name in (
        "execute_async_v3",
        "IExecutionContext.execute_async_v3",
        "IExecutionContext.set_input_shape",
        "IExecutionContext.set_tensor_address",
        "ICudaEngine.num_io_tensors",
        "ICudaEngine.get_tensor_name",
        "ICudaEngine.create_engine_inspector",
        "EngineInspector.get_engine_information",
        "Runtime.deserialize_cuda_engine",
        "Builder.build_serialized_network",
        "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
        "IBuilderConfig.set_memory_pool_limit",
        "MemoryPoolType.WORKSPACE",
        "OnnxParser.parse_from_file",
        "ParserError.desc",
        "Logger.WARNING",
        "ILogger.Severity.WARNING",
        "DataType.HALF",
        "DataType.INT8",
        "nptype",
        "volume",
        "__version__",
    ):
        assert name in api, f"{name} missing from TensorRT {major}"


def test_weak_typing_is_gone_in_11() -> None:
    ten, eleven = tensorrt_api(10), tensorrt_api(11)
    for name in (
        "BuilderFlag.FP16",
        "BuilderFlag.INT8",
        "BuilderFlag.OBEY_PRECISION_CONSTRAINTS",
        "NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
        "IInt8EntropyCalibrator2",
        "IBuilderConfig.int8_calibrator",
        "ICudaEngine.device_memory_size",
        "Builder.platform_has_fast_fp16",
    ):
        assert name in ten, f"{name} should be in TensorRT 10"
        assert name not in eleven, f"{name} should be gone in TensorRT 11"
    # Removed long before 10; its absence shows the lists are not just every string in the module.
    assert "BuilderFlag.STRICT_TYPES" not in ten | eleven
    # The inspector class is EngineInspector in Python; IEngineInspector is only the C++ name.
    assert "IEngineInspector" not in ten | eleven


def test_unknown_major_names_the_lists_there_are() -> None:
    with pytest.raises(ValueError, match=r"major version 9 \(have 10, 11\)"):
        tensorrt_api(9)


def test_each_call_returns_a_fresh_set() -> None:
    tensorrt_api(10).clear()
    assert "BuilderFlag.FP16" in tensorrt_api(10)
