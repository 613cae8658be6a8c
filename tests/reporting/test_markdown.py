"""report.md: the verdict first, and the numbers on the page are the numbers in metrics.json."""

from __future__ import annotations

from optimize.reporting.markdown import markdown


def _docs() -> tuple[dict, dict, dict]:
    shape = {
        "p50_ms": 2.5,
        "p90_ms": 3.0,
        "p99_ms": 4.25,
        "mean_ms": 2.75,
        "cv": 0.12,
        "items_per_s": 400.0,
        "cv_warning": True,
    }
    metrics = {
        "baseline": "fp32",
        "variants": {
            "fp32": {
                "precision": "fp32",
                "path": "artifacts/fp32.onnx",
                "size_bytes": 2_000_000,
                "sha256": "a" * 64,
            },
            "fp16": {
                "precision": "fp16",
                "path": "artifacts/fp16.onnx",
                "size_bytes": 1_000_000,
                "sha256": "b" * 64,
            },
        },
        "results": {
            "fp32": {
                "onnxruntime-cpu": {
                    "size": {"bytes": 2_000_000, "ratio": 1.0},
                    "accuracy": {"outputs": {}},
                    "shapes": {"batch=1": dict(shape)},
                    "memory": {"rss_peak_mb": 300.5, "rss_session_mb": 120.25},
                }
            },
            "fp16": {
                "onnxruntime-cpu": {
                    "size": {"bytes": 1_000_000, "ratio": 0.5},
                    "accuracy": {
                        "cosine_min": 0.9987654,
                        "outputs": {
                            "emb": {
                                "cosine_mean": 0.9999123,
                                "cosine_min": 0.9987654,
                                "max_abs_error": 0.0123,
                                "mean_abs_error": 0.000456,
                                "samples": 10,
                            }
                        },
                    },
                    "shapes": {"batch=1": {**shape, "p50_ms": 2.0, "p50_speedup": 1.25}},
                    "memory": {"rss_peak_mb": 250.0, "rss_session_mb": 70.0},
                }
            },
        },
    }
    verdict = {
        "status": "failed",
        "variants": {"fp16": {"status": "failed"}},
        "targets": {
            "onnxruntime-cpu": {"status": "ran"},
            "tensorrt": {"status": "skipped", "reason": "no TensorRT"},
        },
        "gates": [
            {
                "variant": "fp16",
                "target": "onnxruntime-cpu",
                "check": "accuracy.cosine_min >= 0.999",
                "metric": "accuracy.cosine_min",
                "op": ">=",
                "threshold": 0.999,
                "value": 0.9987654,
                "baseline_value": 1.0,
                "status": "failed",
                "reason": "accuracy.cosine_min = 0.998765, needs >= 0.999",
            },
            {
                "variant": "fp16",
                "target": "tensorrt",
                "check": "latency.p50_speedup >= 1.5",
                "metric": "latency.p50_speedup",
                "op": ">=",
                "threshold": 1.5,
                "status": "skipped",
                "reason": "no TensorRT",
            },
        ],
    }
    manifest = {
        "recipe": "demo",
        "run_id": "r1",
        "recipe_sha256": "c" * 64,
        "model": {"sha256": "d" * 64},
        "hardware": {"cpu": "cpu", "cores": 2, "memory_gb": 8, "gpu": None},
        "os": "Linux",
        "versions": {"onnxruntime": "1.32.0"},
        "stages": [{"stage": "export", "seconds": 1.5, "detail": "ok"}],
        "datasets": {"eval": {"description": "10 lines", "sha256": "e" * 64}},
    }
    return metrics, verdict, manifest


def test_verdict_and_gates_come_first() -> None:
    text = markdown(*_docs())
    lines = text.splitlines()
    assert lines[0] == "# demo — FAILED"
    assert lines.index("## Gates") < lines.index("## Accuracy vs FP32") < lines.index("## Latency and throughput")
    assert (
        "| fp16 | onnxruntime-cpu | `accuracy.cosine_min >= 0.999` | 0.998765 | ≥ 0.999 | 1 | "
        "❌ failed: accuracy.cosine_min = 0.998765, needs >= 0.999 |"
    ) in lines
    assert (
        "| fp16 | tensorrt | `latency.p50_speedup >= 1.5` | – | ≥ 1.5 | 1 (a ratio to it) | ⏭️ skipped: no TensorRT |"
    ) in lines
    assert "- target `tensorrt` skipped: no TensorRT" in lines


def test_numbers_on_the_page_are_the_metrics() -> None:
    text = markdown(*_docs())
    assert "| fp16 | onnxruntime-cpu | emb | 0.999912 | 0.998765 | 0.0123 | 0.000456 | – |" in text
    assert "| fp16 | onnxruntime-cpu | batch=1 | 2.000 | 3.000 | 4.250 | 2.750 | 12.0% | 400.0 | 1.25× |" in text
    assert "| fp32 | onnxruntime-cpu | batch=1 | 2.500 | 3.000 | 4.250 | 2.750 | 12.0% | 400.0 | 1 (baseline) |" in text
    assert "| fp16 | onnxruntime-cpu | 1.00 | 0.500 | 250 | 70 | – | – | – |" in text
    assert "- fp16 on onnxruntime-cpu at batch=1: CV 12.0% (noisy machine?)" in text
    assert "| export | 1.50 | ok |" in text
    assert f"- `fp16`: artifacts/fp16.onnx sha256 `{'b' * 64}`" in text


def test_int8_build_and_fallback_trials_are_reported() -> None:
    metrics, verdict, manifest = _docs()
    manifest["stages"].append(
        {
            "stage": "precision",
            "seconds": 9.0,
            "variants": {
                "fp16": {"backend": "onnxruntime", "seconds": 1.0},
                "q": {
                    "backend": "onnxruntime",
                    "calibration": {"method": "entropy", "samples": 240, "chunk_batches": 7, "peak_rss_mb": 2368.2,
                                    "memory_budget_gb": 4.0},
                    "fusion": {"SkipLayerNormalization": 12},
                    "nodes_excluded": ["a", "b"],
                },
            },
        }
    )  # fmt: skip
    trial = {"excluded_count": 0, "excluded": [], "accuracy": {"cosine_mean": 0.93}, "p50_speedup": 1.5}
    metrics["fallback"] = {
        "q": {
            "dataset": "calib",
            "chosen_trial": 1,
            "passed": True,
            "stopped": "smallest passing exclusion count found (2)",
            "trials": [
                {**trial, "trial": 0, "passed": False, "failed_gates": ["cos"], "seconds": 3.0},
                {**trial, "trial": 1, "excluded_count": 2, "excluded": ["a", "b"], "passed": True, "failed_gates": [],
                 "seconds": 4.0},
            ],
        }
    }  # fmt: skip
    md = markdown(metrics, verdict, manifest)
    assert (
        "| q | onnxruntime | entropy on 240 samples, 7 batch(es) a chunk, peak RSS 2368 MB (budget 4.0 GB) | "
        "SkipLayerNormalization 12 | 2 |" in md
    )
    assert "`q` tuned on `calib`: kept trial 1 (passed; 2 node(s) in high precision)" in md
    assert "| 0 | 0  | 0.93 |" in md and "| 1 ✓ | 2 `a`, `b` |" in md and "failed: cos" in md


def test_gpu_timing_engines_and_skipped_pairs_are_on_the_page() -> None:
    metrics, verdict, manifest = _docs()
    gpu_shape = {
        "p50_ms": 1.5,
        "p90_ms": 1.6,
        "p99_ms": 1.9,
        "mean_ms": 1.55,
        "cv": 0.02,
        "items_per_s": 640.0,
        "cv_warning": False,
        "timing": "cuda-events",
        "gpu_compute": {"mean_ms": 1.1, "p50_ms": 1.0, "p90_ms": 1.2, "p95_ms": 1.3, "p99_ms": 1.4, "cv": 0.03},
        "h2d_ms": 0.2,
        "d2h_ms": 0.3,
        "enqueue_ms": 0.05,
        "warnings": ["GPU compute time is unstable, with coefficient of variation = 3.00% (> 2.5%)"],
        "p50_speedup": 2.0,
    }
    metrics["results"]["fp16"]["tensorrt"] = {
        "size": {"bytes": 600_000, "ratio": 0.45},
        "accuracy": {"outputs": {}},
        "shapes": {"batch=1": gpu_shape},
        "memory": {"gpu_peak_mb": 812.0, "gpu_session_mb": 96.5, "engine_device_memory_mb": 12.0},
    }
    metrics["results"]["fp16"]["torch-cpu"] = {"skipped": "INT8 variants are ONNX artifacts"}
    metrics["variants"]["fp16"]["engine"] = {
        "path": "artifacts/engines/demo-fp16-sm90-trt10.16.1.11-0123456789ab.plan",
        "precisions": {"all": {"fp16": 7, "other": 2}, "compute": {"fp16": 4}},
        "precision_check": {"status": "passed", "reason": "fp16 carried by 100% of layers"},
        "build_s": 41.25,
        "plan_bytes": 1_250_000,
        "plan_ratio": 0.5625,
    }
    text = markdown(metrics, verdict, manifest)
    assert "| fp16 | tensorrt | batch=1 | 1.000 | 1.200 | 1.300 | 1.400 | 0.2 | 0.3 | 0.05 |" in text
    assert "- fp16 on tensorrt at batch=1: GPU compute time is unstable" in text
    assert "| fp16 | tensorrt | 0.60 | 0.450 | – | – | 812 | 96.5 | 12 |" in text
    assert "| fp16 | torch-cpu | – | not run here: INT8 variants are ONNX artifacts |" in text
    assert "## TensorRT engines" in text
    assert (
        "| fp16 | fp16 4 | fp16 7, other 2 | passed: fp16 carried by 100% of layers | 41.2 | 1.25 | 0.562 | "
        "`artifacts/engines/demo-fp16-sm90-trt10.16.1.11-0123456789ab.plan` |"
    ) in text
