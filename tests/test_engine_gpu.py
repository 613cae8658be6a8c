"""Real TensorRT on a real GPU (marker `gpu`; GPU runners run `pytest -m gpu`, see ci/gpu-check.sh).

Builds FP16 and Q/DQ INT8 engines of a small model through our engine stage, checks their layer
precisions, runs them with our TensorRT runner and compares with ONNX Runtime on the CPU. Skipped, with
the reason, where TensorRT or a CUDA device is missing — which is every machine without a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mlp

from optimize.runtimes.tensorrt import unavailable_reason

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(unavailable_reason() is not None, reason=f"TensorRT target unavailable: {unavailable_reason()}"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from optimize.export import export_onnx
    from optimize.models import LoadedModel
    from optimize.precision import fp16, int8
    from optimize.recipe import ExportSection, Fp16Variant, Int8Variant

    folder = tmp_path_factory.mktemp("trt")
    loaded = LoadedModel(mlp(64, 256, 256, 16), {"x": torch.randn(2, 64)})
    spec = ExportSection(output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    export_onnx(loaded, spec, folder / "fp32.onnx")
    fp16.convert_fp16(folder / "fp32.onnx", folder / "fp16.onnx", Fp16Variant(name="fp16", kind="fp16"))
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((16, 64)).astype(np.float32)} for _ in range(8)]
    variant = Int8Variant(name="int8", kind="int8", backend="onnxruntime", calibration="calib", quant_format="qdq")
    int8.quantize(folder / "fp32.onnx", folder / "int8.onnx", variant, calib, folder / "work", "test")
    return {"fp32": folder / "fp32.onnx", "fp16": folder / "fp16.onnx", "int8": folder / "int8.onnx"}


def build(tmp_path: Path, onnx_path: Path, precision: str) -> dict:
    from optimize import engine

    req = engine.BuildRequest(
        onnx_path=str(onnx_path),
        out_dir=str(tmp_path / "engines"),
        model="mlp",
        variant=precision,
        precision=precision,
        inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", 64]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": ["batch", 16]}],
        profile={"min": {"batch": 1}, "opt": {"batch": 32}, "max": {"batch": 64}},
        workspace_gb=2.0,
        optimization_level=3,
        timing_cache_dir=str(tmp_path / "cache"),
        log_path=str(tmp_path / f"{precision}.log"),
    )
    return engine.build_in_child(req, timeout_s=600)


def ort_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    from optimize.runtimes import open_runner

    with open_runner("onnxruntime-cpu", path) as r:
        return r.run({"x": x})["y"]


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_is_built_in_the_asked_precision_and_agrees_with_onnx_runtime(tmp_path: Path, models, precision) -> None:
    from optimize.engine import check_precision, weight_saving
    from optimize.runtimes import open_runner

    fp32 = build(tmp_path, models["fp32"], "fp32")
    side = build(tmp_path, models[precision], precision)
    kept = weight_saving(
        side["plan_bytes"], fp32["plan_bytes"], models[precision].stat().st_size, models["fp32"].stat().st_size
    )
    check = check_precision(precision, side["precisions"], kept, 0.5)
    assert check["status"] == "passed", (check, side["precisions"])
    assert Path(side["timing_cache"]["path"]).exists()
    x = np.random.default_rng(1).standard_normal((24, 64)).astype(np.float32)
    with open_runner("tensorrt", Path(side["plan_path"])) as r:
        got = r.run({"x": x})["y"]
        assert r.device_memory()["engine_plan_mb"] > 0
    assert cosine_min(got, ort_outputs(models["fp32"], x)) > (0.999 if precision == "fp16" else 0.98)


def test_an_engine_claiming_another_tensorrt_version_is_refused(tmp_path: Path, models) -> None:
    from optimize.errors import RuntimeMissingError
    from optimize.runtimes import open_runner

    side = build(tmp_path, models["fp16"], "fp16")
    sidecar = Path(side["plan_path"]).with_suffix(".json")
    sidecar.write_text(json.dumps({**side, "tensorrt": "9.0.0"}))
    with pytest.raises(RuntimeMissingError, match="rebuild it here"):
        open_runner("tensorrt", Path(side["plan_path"]))


def test_tensorrt_runner_is_timed_with_cuda_events(tmp_path: Path, models) -> None:
    from optimize import bench
    from optimize.runtimes import open_runner

    fp32 = build(tmp_path, models["fp32"], "fp32")
    fp16 = build(tmp_path, models["fp16"], "fp16")
    rng = np.random.default_rng(2)
    feed_sets = [{"x": rng.standard_normal((32, 64)).astype(np.float32)} for _ in range(3)]
    runners = {n: open_runner("tensorrt", Path(s["plan_path"])) for n, s in (("fp32", fp32), ("fp16", fp16))}
    try:
        samples = bench.time_device(runners, feed_sets, 5, 30)
    finally:
        for r in runners.values():
            r.close()
    stats = bench.device_latency_stats(samples["fp16"], 32)
    assert stats["timing"] == "cuda-events"
    assert 0 < stats["gpu_compute"]["p50_ms"] <= stats["p50_ms"]


def test_optimize_run_requiring_tensorrt_builds_and_gates_engines(tmp_path: Path, tiny_dir: Path, write_recipe) -> None:
    recipe = write_recipe({"benchmark": {"targets": ["onnxruntime-cpu", "tensorrt"]}})
    proc = subprocess.run(
        [sys.executable, "-m", "optimize", "run", str(recipe), "--require-target", "tensorrt", "--no-register"],
        capture_output=True,
        text=True,
        cwd=tiny_dir,
        timeout=900,
    )
    assert proc.returncode in (0, 1), proc.stderr
    run_dir = next((tiny_dir / "runs" / "tiny").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    engine_rec = metrics["variants"]["fp16"]["engine"]
    assert engine_rec["precision_check"]["status"] in ("passed", "undetermined")
    assert "gpu_compute" in metrics["results"]["fp16"]["tensorrt"]["shapes"]["batch=8"]
    assert "TensorRT engines" in (run_dir / "report.md").read_text()
