"""ONNX Runtime's CUDA provider as a GPU runner (marker `gpu`): IOBinding on our own stream, timed with CUDA
events. Skipped, with the reason, where onnxruntime has no CUDA provider or torch sees no CUDA device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mlp

from optimize import bench
from optimize.export import export_onnx
from optimize.models import LoadedModel
from optimize.recipe import ExportSection
from optimize.runtimes import open_runner, unavailable_reason
from optimize.runtimes.base import DeviceRunner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        unavailable_reason("onnxruntime-cuda") is not None or unavailable_reason("torch-cuda") is not None,
        reason=f"{unavailable_reason('onnxruntime-cuda') or unavailable_reason('torch-cuda')}",
    ),
]


@pytest.fixture()
def exported_mlp(tmp_path: Path) -> Path:
    spec = ExportSection(output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    export_onnx(LoadedModel(mlp(64, 512, 16), {"x": torch.randn(2, 64)}), spec, tmp_path / "mlp.onnx")
    return tmp_path / "mlp.onnx"


def test_ort_cuda_runner_matches_the_cpu_provider_across_shapes(exported_mlp: Path) -> None:
    rng = np.random.default_rng(0)
    with open_runner("onnxruntime-cuda", exported_mlp) as gpu, open_runner("onnxruntime-cpu", exported_mlp) as cpu:
        assert isinstance(gpu, DeviceRunner)
        for rows in (1, 32, 7):
            x = {"x": rng.standard_normal((rows, 64)).astype(np.float32)}
            np.testing.assert_allclose(gpu.run(x)["y"], cpu.run(x)["y"], rtol=1e-3, atol=1e-3)


def test_ort_cuda_runner_is_timed_with_cuda_events(exported_mlp: Path) -> None:
    rng = np.random.default_rng(1)
    sets = [{"x": rng.standard_normal((64, 64)).astype(np.float32)} for _ in range(3)]
    with open_runner("onnxruntime-cuda", exported_mlp) as r:
        stats = bench.device_latency_stats(bench.time_device({"m": r}, sets, 5, 30)["m"], 64)
    assert stats["timing"] == "cuda-events"
    assert 0 < stats["gpu_compute"]["p50_ms"] <= stats["p50_ms"]
