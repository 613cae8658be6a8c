"""A whole run with a GPU target (marker `gpu`): the tiny recipe on ONNX Runtime's CPU provider and on
torch-cuda, so the pipeline's GPU path (CUDA-event timing, NVML and torch memory, golden outputs, report)
runs for real wherever torch sees a CUDA device, TensorRT or not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optimize.runtimes import unavailable_reason

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(unavailable_reason("torch-cuda") is not None, reason=f"{unavailable_reason('torch-cuda')}"),
]


def test_run_measures_the_torch_cuda_target_with_cuda_events(write_recipe, tmp_path: Path) -> None:
    from optimize.pipeline import RunOptions, run

    recipe = write_recipe(
        {
            "benchmark": {"targets": ["onnxruntime-cpu", "torch-cuda"], "warmup": 5, "iterations": 30},
            "gates": ["accuracy.cosine_min >= 0.99"],
        }
    )
    result = run(recipe, RunOptions(runs_dir=tmp_path / "runs", register=False, quiet=True))
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    gpu = metrics["results"]["fp16"]["torch-cuda"]
    shape = gpu["shapes"]["batch=8"]
    assert shape["timing"] == "cuda-events"
    assert 0 < shape["gpu_compute"]["p50_ms"] <= shape["p50_ms"]
    assert gpu["accuracy"]["cosine_min"] > 0.99  # FP16 autocast on the GPU vs the FP32 ONNX reference
    assert metrics["results"]["fp32"]["torch-cuda"]["accuracy"]["cosine_min"] > 0.9999
    assert gpu["memory"]["torch_peak_allocated_mb"] > 0
    assert (result.run_dir / "golden" / "torch-cuda" / "fp16.npz").exists()
    report = (result.run_dir / "report.md").read_text()
    assert "GPU compute time (CUDA events" in report
    assert result.exit_code == 0, report
    print(report[report.index("## Latency") :][:3000])
