"""The pipeline end to end on the tiny model: run directory, verdicts, registration, and every bad input
that can only be found while running (data files, run directory, registry, targets)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from optimize.errors import OptimizeError
from optimize.files import sha256_file
from optimize.pipeline import RunOptions, run


def _options(tmp_path: Path, **kw) -> RunOptions:
    return RunOptions(runs_dir=tmp_path / "runs", quiet=True, **kw)


def _client(tmp_path: Path) -> MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _raises(recipe: Path, options: RunOptions, code: int) -> str:
    with pytest.raises(OptimizeError) as info:
        run(recipe, options)
    assert info.value.exit_code == code, str(info.value)
    return str(info.value)


def test_passing_run_writes_the_run_directory_and_registers_a_candidate(write_recipe, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    result = run(write_recipe(), _options(tmp_path))
    wall_s = time.perf_counter() - t0
    assert result.exit_code == 0 and result.status == "passed"
    d = result.run_dir
    assert d.parent == (tmp_path / "runs" / "tiny").resolve()
    for name in (
        "recipe.yaml",
        "recipe.json",
        "manifest.json",
        "metrics.json",
        "verdict.json",
        "report.md",
        "report.html",
        "distributions.npz",
        "artifacts/fp32.onnx",
        "artifacts/fp16.onnx",
        "registry/fp16/model.onnx",
        "registry/fp16/sample_inputs.npz",
        "registry/fp16/golden_outputs.npz",
    ):
        assert (d / name).is_file(), name
    assert not list(d.rglob("*.tmp")), "no temporary files may be left behind"

    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["status"] == "done"
    assert {"torch", "onnx", "onnxruntime", "mlflow", "numpy"} <= set(manifest["versions"])
    assert manifest["hardware"]["cores"] >= 1 and manifest["os"]
    assert manifest["datasets"]["eval"]["samples"] == 64
    assert manifest["datasets"]["eval"]["file_sha256"] == sha256_file(tmp_path / "tiny.npz")
    assert [s["stage"] for s in manifest["stages"]] == [
        "load",
        "export",
        "precision",
        "evaluate",
        "benchmark",
        "gate",
        "register",
    ]
    assert all(s["status"] == "done" for s in manifest["stages"])
    seconds = {s["stage"]: s["seconds"] for s in manifest["stages"]}
    # the stages that build, run or time a model take measurable time; gate and register may round to 0.000
    assert all(seconds[stage] > 0 for stage in ("load", "export", "precision", "evaluate", "benchmark")), seconds
    assert min(seconds.values()) >= 0 and sum(seconds.values()) <= wall_s + 0.001 * len(seconds), (seconds, wall_s)

    metrics = json.loads((d / "metrics.json").read_text())
    fp16 = metrics["results"]["fp16"]["onnxruntime-cpu"]
    assert set(fp16["shapes"]) == {"batch=1", "batch=8"}
    assert fp16["shapes"]["batch=8"]["iterations"] == 10
    assert fp16["accuracy"]["cosine_min"] > 0.999
    assert fp16["accuracy"]["top1_agreement"] == 1.0
    assert fp16["memory"]["rss_peak_mb"] > 0
    assert metrics["variants"]["fp16"]["sha256"] == sha256_file(d / "artifacts/fp16.onnx")
    sizes = {v: (d / f"artifacts/{v}.onnx").stat().st_size for v in ("fp16", "fp32")}
    assert fp16["size"]["ratio"] == pytest.approx(sizes["fp16"] / sizes["fp32"])

    report = (d / "report.md").read_text()
    assert report.startswith("# tiny — PASSED")
    assert "accuracy.top1_agreement >= 0.9" in report

    # The registered version is visible through the MLflow client, with its evidence.
    client = _client(tmp_path)
    mv = client.get_model_version_by_alias("tiny", "candidate")
    assert int(mv.version) == 1
    assert mv.tags["precision"] == "fp16"
    assert mv.tags["verdict"] == "passed"
    assert mv.tags["target"] == "onnxruntime-cpu"
    assert mv.tags["sha256"] == metrics["variants"]["fp16"]["sha256"]
    assert mv.tags["recipe_sha256"] == manifest["recipe_sha256"]
    assert "accuracy.cosine_min >= 0.99" in mv.description
    assert client.get_model_version_by_alias("tiny", "candidate-fp16").version == mv.version
    # The artifact location is pinned beside the sqlite store, not wherever the process runs.
    assert (tmp_path / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()
    # What was registered is byte-for-byte what was gated.
    from mlflow.artifacts import download_artifacts

    local = download_artifacts(
        artifact_uri="models:/tiny@candidate",
        dst_path=str(tmp_path / "dl"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert sha256_file(Path(local) / "model.onnx") == mv.tags["sha256"]
    mlflow_run = client.get_run(mv.run_id)
    assert mlflow_run.data.params["name"] == "tiny"
    assert any(k.startswith("fp16.onnxruntime-cpu.accuracy.cosine_min") for k in mlflow_run.data.metrics)
    assert {a.path for a in client.list_artifacts(mv.run_id)} >= {
        "report.md",
        "metrics.json",
        "manifest.json",
    }


def test_failed_gate_exits_1_and_registers_nothing(write_recipe, tmp_path: Path) -> None:
    recipe = write_recipe({"gates": ["accuracy.cosine_min >= 0.99", "size.ratio <= 0.1"]})
    result = run(recipe, _options(tmp_path))
    assert result.exit_code == 1 and result.status == "failed"
    verdict = json.loads((result.run_dir / "verdict.json").read_text())
    failed = [g for g in verdict["gates"] if g["status"] == "failed"]
    assert [g["check"] for g in failed] == ["size.ratio <= 0.1"]
    assert "size.ratio" in failed[0]["reason"] and failed[0]["value"] > 0.1
    assert result.registered.versions == {}
    assert not (result.run_dir / "registry").exists()
    client = _client(tmp_path)
    assert client.search_registered_models() == []
    # The evidence of the failed run is still logged.
    runs = client.search_runs([result.registered.experiment_id])
    assert runs and runs[0].data.tags["optimize.verdict"] == "failed"


def test_variant_with_only_skipped_gates_is_not_registered(write_recipe, tmp_path: Path) -> None:
    recipe = write_recipe(
        {
            "benchmark": {"optional_targets": ["tensorrt"]},
            "gates": [{"check": "latency.p50_speedup >= 1.5", "target": "tensorrt"}],
        }
    )
    result = run(recipe, _options(tmp_path))
    assert result.exit_code == 1
    verdict = json.loads((result.run_dir / "verdict.json").read_text())
    assert verdict["gates"][0]["status"] == "skipped"
    assert "TensorRT" in verdict["gates"][0]["reason"]
    assert verdict["variants"]["fp16"]["status"] == "skipped"
    assert verdict["variants"]["fp16"]["reason"] == "every gate is on a target that did not run here (tensorrt)"


def test_onnx_model_source_skips_export(write_recipe, tmp_path: Path) -> None:
    first = run(write_recipe(), _options(tmp_path, register=False))
    onnx_file = tmp_path / "given.onnx"
    onnx_file.write_bytes((first.run_dir / "artifacts" / "fp32.onnx").read_bytes())
    recipe = write_recipe(
        {"model": {"source": "onnx", "path": "given.onnx", "entry_point": None, "python_path": None}},
        name="onnx.yaml",
    )
    result = run(recipe, _options(tmp_path, register=False))
    assert result.exit_code == 0
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    export = next(s for s in manifest["stages"] if s["stage"] == "export")
    assert "export skipped" in export["detail"]
    assert sha256_file(result.run_dir / "artifacts" / "fp32.onnx") == sha256_file(onnx_file)


def test_missing_dataset_file_is_exit_2_before_a_run_directory(write_recipe, tmp_path: Path) -> None:
    """A data file the recipe names and that is not there is a recipe error, found before any stage runs (as
    `optimize validate` finds it): no run directory is made and nothing registered."""
    recipe = write_recipe({"data": {"eval": {"path": "nope.npz"}}})
    msg = _raises(recipe, _options(tmp_path), 2)
    assert msg == "recipe.yaml: data.eval.path: nope.npz: file not found"
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "mlflow.db").exists(), "nothing may be registered"


def test_fewer_samples_than_asked_is_exit_2(write_recipe, tmp_path: Path) -> None:
    msg = _raises(write_recipe({"data": {"eval": {"samples": 500}}}), _options(tmp_path), 2)
    assert "data.eval.samples: asked for 500" in msg and "has 64" in msg


def test_dataset_of_the_wrong_dtype_is_exit_2(write_recipe, tiny_dir: Path, tmp_path: Path) -> None:
    np.savez(tiny_dir / "ints.npz", x=np.ones((16, 8), np.int32), label=np.zeros(16, np.int64))
    msg = _raises(write_recipe({"data": {"eval": {"path": "ints.npz"}}}), _options(tmp_path), 2)
    assert "'x'" in msg and "int32" in msg and "float32" in msg


def test_dataset_of_the_wrong_shape_is_exit_2(write_recipe, tiny_dir: Path, tmp_path: Path) -> None:
    np.savez(tiny_dir / "wide.npz", x=np.ones((16, 5), np.float32), label=np.zeros(16, np.int64))
    msg = _raises(write_recipe({"data": {"eval": {"path": "wide.npz"}}}), _options(tmp_path), 2)
    assert "'x'" in msg and "[16, 5]" in msg


def test_entry_point_that_does_not_import_is_exit_2(write_recipe, tmp_path: Path) -> None:
    msg = _raises(write_recipe({"model": {"entry_point": "nosuchmodule:build"}}), _options(tmp_path), 2)
    assert "model.entry_point" in msg and "nosuchmodule" in msg


def test_entry_point_returning_the_wrong_thing_is_exit_2(write_recipe, tmp_path: Path) -> None:
    msg = _raises(write_recipe({"model": {"entry_point": "tinynet:not_a_tuple"}}), _options(tmp_path), 2)
    assert "model.entry_point" in msg and "must return" in msg


def test_unwritable_run_directory_is_exit_2_before_any_work(write_recipe, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    msg = _raises(write_recipe(), RunOptions(runs_dir=blocker / "runs", quiet=True), 2)
    assert "--runs-dir" in msg and "a-file" in msg


def test_required_target_missing_is_exit_4_and_writes_nothing(write_recipe, tmp_path: Path) -> None:
    msg = _raises(write_recipe(), _options(tmp_path, require_targets=("tensorrt",)), 4)
    assert "tensorrt" in msg
    assert not (tmp_path / "runs").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_registry_is_exit_5_within_30_s_and_keeps_the_run(write_recipe, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    msg = _raises(write_recipe(), _options(tmp_path, tracking_uri=uri), 5)
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    assert uri in msg and str(run_dir.name) in msg
    assert time.monotonic() - t0 < 30 + 20  # the registry part is bounded; the rest is the tiny run
    for name in ("metrics.json", "verdict.json", "report.md", "registry/fp16/model.onnx"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "failed"


def test_registry_env_var_is_used(write_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "elsewhere"
    store.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'm.db'}")
    result = run(write_recipe(), _options(tmp_path))
    assert result.registered.tracking_uri == f"sqlite:///{store / 'm.db'}"
    assert (store / "m.db").is_file() and not (tmp_path / "mlflow.db").exists()


def test_fp16_overflow_fails_the_precision_stage_naming_the_op(write_recipe, tmp_path: Path) -> None:
    # exp(12 x) is finite in FP32 and overflows FP16 (max 65504): the stage must fail, not warn.
    recipe = write_recipe({"model": {"entry_point": "tinynet:overflow"}})
    msg = _raises(recipe, _options(tmp_path), 3)
    assert "precision.fp16" in msg and "NaN/Inf" in msg and "Exp" in msg and "op_block_list" in msg
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert [s["status"] for s in manifest["stages"]][-1] == "failed"
    assert not (tmp_path / "mlflow.db").exists()


def test_fp16_overflow_after_a_blocked_op_names_the_op_before_the_cast(write_recipe, tmp_path: Path) -> None:
    # Exp is kept in FP32, but its output is cast to FP16 for the (FP16) Add that consumes it.
    recipe = write_recipe(
        {
            "model": {"entry_point": "tinynet:overflow"},
            "precision": {
                "variants": [{"name": "fp16", "kind": "fp16", "backend": "onnxruntime", "op_block_list": ["Exp"]}]
            },
        }
    )
    msg = _raises(recipe, _options(tmp_path), 3)
    assert "first produced by Exp → Cast" in msg and "block the ops that consume it too" in msg


def test_fp16_overflow_is_fixed_by_the_op_block_list(write_recipe, tmp_path: Path) -> None:
    # ModelOpt keeps blocked ops and the tensors between them in FP32. (ONNX Runtime's converter casts a
    # blocked op's output back to FP16, so there the same block list still overflows.)
    recipe = write_recipe(
        {
            "model": {"entry_point": "tinynet:overflow"},
            "precision": {
                "variants": [{"name": "fp16", "kind": "fp16", "backend": "modelopt", "op_block_list": ["Exp", "Add"]}]
            },
            "gates": ["accuracy.top1_agreement >= 0.9"],
        }
    )
    result = run(recipe, _options(tmp_path, register=False))
    assert result.exit_code == 0


def test_autocast_with_real_reference_data_keeps_the_overflowing_op_in_fp32(write_recipe, tmp_path: Path) -> None:
    # The same overflow as above, with no block list: AutoCast run on the recipe's data (not its default
    # random inputs in [-1, 1]) sees exp(12 x) leave FP16's range and keeps that part in FP32 by itself.
    recipe = write_recipe({
        "model": {"entry_point": "tinynet:overflow"},
        "precision": {"variants": [{"name": "fp16", "kind": "fp16", "backend": "modelopt", "reference_data": "calib"}]},
        "data": {"calib": {"kind": "npz", "path": "tiny-calib.npz", "batch_size": 16}},
        "gates": ["accuracy.top1_agreement >= 0.9"],
    })  # fmt: skip
    result = run(recipe, _options(tmp_path, register=False))
    assert result.exit_code == 0
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    precision = next(s for s in manifest["stages"] if s["stage"] == "precision")
    assert precision["variants"]["fp16"]["reference_data"] == "calib"
    assert len(list((result.run_dir / "artifacts" / "fp16-reference").glob("*.npz"))) == 4  # 64 samples / 16


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop this test makes
def test_a_ctrl_c_that_python_drops_in_a_finaliser_still_stops_the_run() -> None:
    """A KeyboardInterrupt raised while a `__del__` runs is printed as "Exception ignored" and dropped: the run
    would go on and exit 0. While a run is watched the signal is recorded too, and the next stage or cached
    unit raises it; the default handler is back afterwards."""
    import gc
    import signal

    from optimize import pipeline

    class InterruptedWhileFinalised:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)

    # Python's own handler, as in `optimize run`, and SIGINT delivered: a test worker may have inherited another
    # disposition or a mask that blocks it
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        with pipeline._interrupts.watching():
            obj = InterruptedWhileFinalised()
            del obj  # the KeyboardInterrupt goes to sys.unraisablehook, not here
            gc.collect()
            with pytest.raises(KeyboardInterrupt):
                pipeline._interrupts.check()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pipeline._interrupts.watching():
            pipeline._interrupts.check()  # a new run starts with no interrupt recorded
    finally:
        signal.signal(signal.SIGINT, inherited)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
