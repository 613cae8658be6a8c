"""The shipped recipes, run as a user runs them: `optimize run recipes/fp16.yaml` on all-MiniLM-L6-v2 in a
subprocess, ending with a registered `candidate` version visible through the MLflow client, then the same
command again (from the stage cache, registering no copy); and the small vision recipe (digits CNN) through
the pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import triton_errors
from mlflow import MlflowClient

from optimize.files import sha256_file

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_fp16_recipe_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "optimize", "run", str(REPO / "recipes" / "fp16.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "PASSED" in proc.stdout and "models:/minilm-fp16@candidate" in proc.stdout  # the outcome; progress: stderr

    (run_dir,) = (tmp_path / "runs" / "minilm-fp16").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "done"
    export = next(s for s in manifest["stages"] if s["stage"] == "export")
    # The export was checked on (16, 64) token batches while the example was (2, 16).
    assert export["check"]["within_tolerance"] is True
    assert export["check"]["shapes"][0]["input_ids"] == [16, 64]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    fp16 = metrics["results"]["fp16"]["onnxruntime-cpu"]
    assert fp16["accuracy"]["cosine_min"] >= 0.999
    assert fp16["accuracy"]["outputs"]["sentence_embedding"]["samples"] == 160
    assert set(fp16["shapes"]) == {"batch=1,sequence=32", "batch=16,sequence=64"}
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert verdict["status"] == "passed"
    trt = [g for g in verdict["gates"] if g["target"] == "tensorrt"]
    assert trt and all(g["status"] == "skipped" for g in trt)

    served_batches_equal_unbatched(run_dir)
    # each variant as a Triton model repository: its config parses with Triton's protobuf and matches the artifact
    assert triton_errors(run_dir, tmp_path / "triton") == {"fp32": [], "fp16": []}

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("minilm-fp16", "candidate")
    assert mv.tags["precision"] == "fp16"
    assert mv.tags["sha256"] == sha256_file(run_dir / "artifacts" / "fp16.onnx")
    assert (tmp_path / "mlartifacts").is_dir()

    # The same command again takes every stage from the stage cache without building the model or
    # tokenising, and registers no copy of the model: neither torch, transformers nor MLflow is imported,
    # the results are the first run's, and it says which version the model is and how to register it anyway.
    again = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "optimize", "run", str(REPO / "recipes" / "fp16.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    lines = again.stderr.splitlines()
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in lines if ln.startswith("import time:")}
    assert "onnxruntime" in imported and not imported & {"torch", "transformers", "mlflow"}
    (rerun_dir,) = set((tmp_path / "runs" / "minilm-fp16").iterdir()) - {run_dir}
    rerun = json.loads((rerun_dir / "manifest.json").read_text())
    assert [u["hit"] for u in rerun["cache"]] == [True] * 5, rerun["cache"]
    assert json.loads((rerun_dir / "metrics.json").read_text()) == metrics
    for f in ("model.onnx", "sample_inputs.npz", "golden_outputs.npz"):
        assert sha256_file(rerun_dir / "registry" / "fp16" / f) == sha256_file(run_dir / "registry" / "fp16" / f), f
    said = again.stdout.splitlines()
    assert "already registered: minilm-fp16 v1 (fp16) (the same model bytes, verified the same way)" in said
    retry = f"optimize register runs/minilm-fp16/{rerun_dir.name}"
    assert f"nothing new logged to MLflow; `{retry}` registers this run as new versions" in said
    assert rerun["status"] == "done" and rerun["registry"]["status"] == "already registered"
    assert rerun["registry"]["already"] == {"fp16": 1} and rerun["registry"]["run_id"] is None
    assert "(same model bytes, same checks); this run not logged" in (rerun_dir / "report.html").read_text()
    assert len(client.search_model_versions("name = 'minilm-fp16'")) == 1
    assert len(client.search_runs([client.get_run(mv.run_id).info.experiment_id])) == 1


def served_batches_equal_unbatched(run_dir: Path) -> None:
    """`optimize serve` on the run's FP32 MiniLM merges 160 concurrent one-sentence requests of their own lengths into
    padded batches; each caller's answer equals its sentence run alone, within the recipe's export tolerance (the
    FP32 model: FP16's own rounding moves with the batch's shape, by ~1e-4 here)."""
    import http.client
    import urllib.parse
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from optimize.recipe import load_recipe
    from optimize.runtimes import open_runner
    from optimize.serving.requests import encode_request, requests_from_recipe
    from optimize.serving.server import start_local

    recipe = load_recipe(REPO / "recipes" / "fp16.yaml")
    model = run_dir / "artifacts" / "fp32.onnx"
    with open_runner("onnxruntime-cpu", model) as runner:
        requests = requests_from_recipe(recipe, runner.inputs)
        alone = [runner.run(r)["sentence_embedding"] for r in requests]
    assert len(requests) == 160 and len({r["input_ids"].shape[1] for r in requests}) > 5  # real, varied lengths

    # No shedding here (a busy CI machine's slow runs are not what this checks): the queue waits up to a minute.
    patient = run_dir.parents[2] / "patient.yaml"  # beside runs/, not in the run folder
    patient.write_text(
        json.dumps({"extends": str(REPO / "recipes" / "fp16.yaml"), "serving": {"queue_timeout_ms": 60000}})
    )
    with start_local(model, recipe=patient) as server:
        parts = urllib.parse.urlsplit(server.url)

        def infer(feeds: dict[str, np.ndarray]) -> np.ndarray:
            body, headers = encode_request(feeds, binary=False)
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            try:
                conn.request("POST", f"/v2/models/{server.model}/infer", body=body, headers=headers)
                answer = conn.getresponse()
                assert answer.status == 200, answer.read()[:300]
                (out,) = json.loads(answer.read())["outputs"]
            finally:
                conn.close()
            return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])

        with ThreadPoolExecutor(16) as pool:
            served = list(pool.map(infer, requests))
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
    batches = float(next(ln.split()[-1] for ln in metrics.splitlines() if ln.startswith("optimize_batch_size_count")))
    assert batches < 160 - 40, f"{batches:.0f} model runs for 160 requests: the server did not batch"
    tol = recipe.export.tolerance
    for i, (got, want) in enumerate(zip(served, alone, strict=True)):
        assert got.shape == want.shape == (1, 384), i
        np.testing.assert_allclose(got, want, atol=tol.atol, rtol=tol.rtol, err_msg=f"request {i}")


def test_digits_vision_recipe(tmp_path: Path) -> None:
    from optimize.pipeline import RunOptions, run

    result = run(REPO / "recipes" / "digits-fp16.yaml", RunOptions(runs_dir=tmp_path / "runs", quiet=True))
    assert result.exit_code == 0, result
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    acc = metrics["results"]["fp16"]["onnxruntime-cpu"]["accuracy"]
    assert acc["top1_agreement"] >= 0.99
    assert acc["task_metric_baseline"] >= 0.95  # the CNN really recognises digits (0.98 when trained)
    assert abs(acc["task_metric_drop"]) <= 0.01
    assert acc["outputs"]["logits"]["samples"] == 300
    assert result.registered.versions == {"fp16": 1}
    assert triton_errors(result.run_dir, tmp_path / "triton") == {"fp32": [], "fp16": []}


def test_digits_int8_recipe_calibrated_on_real_images(tmp_path: Path) -> None:
    from optimize.pipeline import RunOptions, run

    result = run(REPO / "recipes" / "digits-int8.yaml", RunOptions(runs_dir=tmp_path / "runs", quiet=True))
    assert result.exit_code == 0, (result.run_dir / "report.md").read_text()
    verdict = json.loads((result.run_dir / "verdict.json").read_text())
    assert verdict["variants"]["int8"]["status"] == "passed"
    assert verdict["variants"]["int8-trt"]["status"] == "skipped"  # TensorRT gates only; built, not registered
    assert result.registered.versions == {"int8": 1}
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    acc = metrics["results"]["int8"]["onnxruntime-cpu"]["accuracy"]
    assert acc["task_metric_baseline"] >= 0.95 and acc["top1_agreement"] >= 0.98
    assert metrics["results"]["int8"]["onnxruntime-cpu"]["size"]["ratio"] <= 0.5
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["datasets"]["digits-images-calib"]["samples"] == 300
    precision = next(s for s in manifest["stages"] if s["stage"] == "precision")["variants"]
    assert precision["int8"]["calibration"]["samples"] == 300 and precision["int8"]["calibration"]["num_bins"] == 2048
    assert precision["int8-trt"]["quant_ops"]["QuantizeLinear"] > 0  # ModelOpt's Q/DQ for TensorRT, built on CPU
    assert triton_errors(result.run_dir, tmp_path / "triton") == {"fp32": [], "int8": [], "int8-trt": []}


@pytest.mark.slow
def test_minilm_dynamic_int8_keeps_the_embedding(tmp_path: Path) -> None:
    """The real model through the INT8 path of recipes/int8.yaml (dynamic variant only, no fallback search)."""
    import yaml

    from optimize.pipeline import RunOptions, run

    recipe = tmp_path / "int8-quick.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "extends": str(REPO / "recipes" / "int8.yaml"),
                "name": "minilm-int8-quick",
                "precision": {
                    "variants": [
                        {
                            "name": "int8",
                            "kind": "int8",
                            "backend": "onnxruntime-dynamic",
                            "fusion": "bert",
                            "per_channel": True,
                            "reduce_range": True,
                            "fallback": {"enabled": False},
                        }
                    ]
                },
                "benchmark": {"warmup": 2, "iterations": 5},
                "gates": ["accuracy.cosine_mean >= 0.99", "accuracy.cosine_min >= 0.95", "size.ratio <= 0.3"],
            }
        )
    )
    result = run(recipe, RunOptions(runs_dir=tmp_path / "runs", quiet=True, register=False))
    assert result.exit_code == 0, (result.run_dir / "report.md").read_text()
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    acc = metrics["results"]["int8"]["onnxruntime-cpu"]["accuracy"]
    assert acc["outputs"]["sentence_embedding"]["samples"] == 160
    assert 0.5 < acc["neighbour_agreement"] <= 1.0
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    record = next(s for s in manifest["stages"] if s["stage"] == "precision")["variants"]["int8"]
    assert record["fusion"]["SkipLayerNormalization"] == 12 and record["quant_ops"]["MatMulInteger"] > 30
    assert triton_errors(result.run_dir, tmp_path / "triton") == {"fp32": [], "int8": []}
