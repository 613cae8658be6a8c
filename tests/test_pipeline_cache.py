"""The stage cache in the pipeline: a rerun takes every stage from the cache with the same results; a
change reruns exactly what depends on it (gate threshold: nothing cached; calibration data: that variant and
what measures it; evaluation settings: evaluate only; a library version: what used it); --rebench measures
again; --no-cache keeps nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import merge, tiny_recipe

from optimize import pipeline, plan
from optimize.cpu import isa as cpu_isa
from optimize.files import sha256_file
from optimize.pipeline import RunOptions, run
from optimize.stage import PACKAGE, code_files


def _recipe(tiny_dir: Path, overrides: dict[str, Any] | None = None, name: str = "r.yaml") -> Path:
    variants = [
        {"name": "fp16", "kind": "fp16", "backend": "onnxruntime"},
        # 7-bit weights: the same INT8 results on every x86 CPU, VNNI or not (precision/test_int8.py's kernel test)
        {"name": "int8", "kind": "int8", "backend": "onnxruntime", "calibration": "calib", "reduce_range": True},
    ]
    base = merge(
        tiny_recipe(),
        {
            "precision": {"variants": variants},
            "data": {"calib": {"kind": "npz", "path": "tiny-calib.npz", "batch_size": 16}},
            # these tests are about the cache, not INT8 accuracy: a gate far below the measured 0.948
            "gates": ["accuracy.cosine_min >= 0.8", "size.ratio <= 2.0"],
        },
    )
    path = tiny_dir / name
    path.write_text(yaml.safe_dump(merge(base, overrides or {})))
    return path


def _run(recipe: Path, **options: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    result = run(recipe, RunOptions(runs_dir=recipe.parent / "runs", quiet=True, register=False, **options))
    docs = [json.loads((result.run_dir / f).read_text()) for f in ("manifest.json", "metrics.json", "verdict.json")]
    return docs[0], docs[1], docs[2]


def _hits(manifest: dict[str, Any]) -> dict[str, bool]:
    return {f"{e['stage']}:{e['unit']}": e["hit"] for e in manifest["cache"]}


UNITS = {
    "export:fp32",
    "precision:fp16",
    "precision:int8",
    "evaluate:fp32@onnxruntime-cpu",
    "evaluate:fp16@onnxruntime-cpu",
    "evaluate:int8@onnxruntime-cpu",
    "benchmark:onnxruntime-cpu",
}


def test_a_rerun_takes_every_stage_from_the_cache_with_identical_results(tiny_dir: Path) -> None:
    recipe = _recipe(tiny_dir)
    first, metrics1, verdict1 = _run(recipe)
    assert _hits(first) == dict.fromkeys(UNITS, False)
    second, metrics2, verdict2 = _run(recipe)
    assert _hits(second) == dict.fromkeys(UNITS, True)
    assert metrics2 == metrics1 and verdict2 == verdict1
    run1, run2 = sorted((tiny_dir / "runs" / "tiny").iterdir())
    for name, meta in metrics2["variants"].items():  # the artifacts are in the new run directory, same bytes
        assert sha256_file(run2 / meta["path"]) == meta["sha256"], name
    # the report's raw distributions come back from the cache too: per-sample accuracy, per-iteration latency
    dist1, dist2 = (dict(np.load(d / "distributions.npz")) for d in (run1, run2))
    assert dist1.keys() == dist2.keys() and all(np.array_equal(dist1[k], dist2[k]) for k in dist1)
    samples = metrics1["results"]["int8"]["onnxruntime-cpu"]["accuracy"]["outputs"]["logits"]["samples"]
    cosine = dist1["cosine/onnxruntime-cpu/int8/logits"]
    assert cosine.shape == (samples,) and cosine.min() == pytest.approx(
        metrics1["results"]["int8"]["onnxruntime-cpu"]["accuracy"]["cosine_min"]
    )
    assert dist1["argmax/reference/fp32/logits"].shape == (samples,)
    assert dist1["argmax/onnxruntime-cpu/int8/logits"].dtype == np.int64
    for name in ("fp32", "fp16", "int8"):
        for shape, stats in metrics1["results"][name]["onnxruntime-cpu"]["shapes"].items():
            ms = dist1[f"latency_ms/onnxruntime-cpu/{name}/{shape}"]
            assert len(ms) == stats["iterations"] and np.percentile(ms, 50) == pytest.approx(stats["p50_ms"])


def test_a_gate_change_reruns_no_stage(tiny_dir: Path) -> None:
    _run(_recipe(tiny_dir))
    manifest, _, verdict = _run(_recipe(tiny_dir, {"gates": ["accuracy.cosine_min >= 0.8", "size.ratio <= 0.01"]}))
    assert _hits(manifest) == dict.fromkeys(UNITS, True)
    assert verdict["status"] == "failed"


def test_new_calibration_data_rebuilds_that_variant_and_what_measures_it(tiny_dir: Path) -> None:
    _run(_recipe(tiny_dir))
    rng = np.random.default_rng(7)
    np.savez(
        tiny_dir / "tiny-calib.npz", x=rng.standard_normal((64, 8)).astype(np.float32), label=rng.integers(0, 4, 64)
    )
    hits = _hits(_run(_recipe(tiny_dir))[0])
    missed = {u for u, hit in hits.items() if not hit}
    assert missed == {"precision:int8", "evaluate:int8@onnxruntime-cpu", "benchmark:onnxruntime-cpu"}


def test_evaluation_settings_rerun_evaluate_only(tiny_dir: Path) -> None:
    _run(_recipe(tiny_dir))
    hits = _hits(_run(_recipe(tiny_dir, {"evaluate": {"top1_outputs": []}}))[0])
    assert {u for u, hit in hits.items() if not hit} == {u for u in UNITS if u.startswith("evaluate:")} | {
        "precision:int8"  # the INT8 fallback tunes against the evaluation settings
    }


def test_a_library_version_change_reruns_what_used_it(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(_recipe(tiny_dir))
    real = pipeline.environment

    def newer_onnxruntime() -> dict[str, Any]:
        env = real()
        env["versions"]["onnxruntime"] = env["versions"]["onnxruntime"] + ".post1"
        return env

    monkeypatch.setattr(pipeline, "environment", newer_onnxruntime)
    hits = _hits(_run(_recipe(tiny_dir))[0])
    assert not any(hits.values()), hits  # export checks with ONNX Runtime too: everything used it


def test_another_cpu_isa_rebuilds_int8_and_measures_again(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """INT8 kernels, and so INT8 accuracy and every timing, depend on the CPU's instruction sets (VNNI or not),
    which a CPU model name does not say: a cache from another ISA is not taken for them."""
    first = _run(_recipe(tiny_dir))[0]
    assert first["hardware"]["cpu_isa"] == cpu_isa() and first["hardware"]["cpu_isa"]["features"]
    real = pipeline.environment

    def with_vnni() -> dict[str, Any]:
        env = real()
        isa = env["hardware"]["cpu_isa"]
        env["hardware"]["cpu_isa"] = {**isa, "features": [*isa["features"], "avx512_vnni"], "int8_dot": "avx512-vnni"}
        return env

    monkeypatch.setattr(pipeline, "environment", with_vnni)
    manifest = _run(_recipe(tiny_dir))[0]
    assert manifest["hardware"]["cpu_isa"]["int8_dot"] == "avx512-vnni"
    missed = {u for u, hit in _hits(manifest).items() if not hit}
    assert missed == {u for u in UNITS if u.startswith(("evaluate:", "benchmark:"))} | {"precision:int8"}


def test_rebench_measures_again_and_keeps_the_rest(tiny_dir: Path) -> None:
    recipe = _recipe(tiny_dir)
    _, metrics1, _ = _run(recipe)
    manifest, metrics2, _ = _run(recipe, rebench=True)
    hits = _hits(manifest)
    assert hits.pop("benchmark:onnxruntime-cpu") is False and all(hits.values())
    shapes = [metrics["results"]["fp16"]["onnxruntime-cpu"]["shapes"] for metrics in (metrics1, metrics2)]
    assert shapes[0] != shapes[1]  # measured again (timings never repeat to the last digit)
    assert _hits(_run(recipe)[0])["benchmark:onnxruntime-cpu"] is True  # and stored for the next run


def test_no_cache_keeps_nothing(tiny_dir: Path) -> None:
    recipe = _recipe(tiny_dir)
    manifest, _, _ = _run(recipe, cache=False)
    assert manifest["cache"] == []
    assert not (tiny_dir / ".optimize-cache" / "stages").exists()
    assert not any(p.name.startswith(".") for p in sorted((tiny_dir / "runs" / "tiny").iterdir())[-1].iterdir())


def test_a_full_disk_inside_a_wrapped_library_call_is_reported_as_a_full_disk(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime's quantiser hits ENOSPC in the run's work folder; the INT8 stage wraps every library
    failure in one line, and the run still says the disk is full, where, and that a rerun resumes."""
    import errno

    from optimize.errors import StageError
    from optimize.precision import int8

    recipe = _recipe(tiny_dir)

    def full_disk(src: Path, dest: Path, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(dest.parent / "augmented.onnx"))

    with monkeypatch.context() as patch, pytest.raises(StageError) as failed:
        patch.setattr(int8, "_ort_static", full_disk)
        _run(recipe)
    message = str(failed.value)
    assert message.startswith("no space left on device writing "), message
    assert "augmented.onnx" in message and "run directory " in message and "stage cache " in message
    assert message.endswith("the same command again resumes from the stage cache")
    (run_dir,) = (tiny_dir / "runs" / "tiny").iterdir()
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "failed"
    manifest, _, verdict = _run(recipe)
    assert _hits(manifest)["precision:fp16"] is True and _hits(manifest)["precision:int8"] is False
    assert verdict["status"] == "passed"


def test_a_unit_key_holds_the_code_that_unit_runs_and_no_other(tiny_dir: Path) -> None:
    """Each unit's key holds the source files of the code it declares and what they import: editing the report
    or the registry keeps every cached unit; editing what a unit runs misses it (the run test below)."""
    ctx, _ = plan.context(_recipe(tiny_dir))
    files = {f"{u.stage}:{u.name}": {str(p.relative_to(PACKAGE)) for p in code_files(u.code)} for u in plan.units(ctx)}
    assert {"export.py", "models.py", "encoders.py", "data.py", "recipe.py", "stage.py"} <= files["export:fp32"]
    assert {"precision/int8.py", "precision/fallback.py", "bench.py", "runtimes/onnxruntime.py"} <= files[
        "precision:int8"
    ]
    assert {"accuracy.py", "runtimes/onnxruntime.py"} <= files["evaluate:int8@onnxruntime-cpu"]
    assert {"bench.py", "runtimes/onnxruntime.py"} <= files["benchmark:onnxruntime-cpu"]
    for unit, used in files.items():
        outside = {
            f
            for f in used
            if f.startswith(("registry/", "reporting/")) or f in ("cli.py", "pipeline.py", "plan.py", "api.py")
        }
        assert not outside, (unit, outside)
    assert "precision/build.py" not in files["benchmark:onnxruntime-cpu"] | files["evaluate:int8@onnxruntime-cpu"]


def test_editing_the_registry_and_reporting_code_keeps_every_cached_unit(tiny_dir: Path) -> None:
    """A copy of optimize runs the recipe, its registry and reporting modules are edited, and the same recipe
    runs again from that copy: every unit is a hit. Then an edit of export.py misses the export only: the units
    after it are keyed on what it wrote, the same bytes."""
    copy = tiny_dir / "src"
    shutil.copytree(PACKAGE, copy / "optimize", ignore=shutil.ignore_patterns("__pycache__"))
    recipe = _recipe(tiny_dir)

    def run_copy() -> dict[str, bool]:
        out = subprocess.run(
            [sys.executable, "-m", "optimize", "run", str(recipe), "--no-register", "-q", "--runs-dir", "runs"],
            cwd=tiny_dir,
            env={**os.environ, "PYTHONPATH": str(copy)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr
        run_dir = max((tiny_dir / "runs" / "tiny").iterdir())
        return _hits(json.loads((run_dir / "manifest.json").read_text()))

    assert not any(run_copy().values())
    for edited in [*(copy / "optimize" / "registry").glob("*.py"), *(copy / "optimize" / "reporting").glob("*.py")]:
        edited.write_text(edited.read_text() + "\n# edited\n")
    assert all(run_copy().values())
    export_py = copy / "optimize" / "export.py"
    export_py.write_text(export_py.read_text() + "\n# edited\n")
    hits = run_copy()
    # the export runs again; it writes the same bytes, so what is keyed on them is still cached
    assert hits == {**{u: True for u in hits}, "export:fp32": False}, hits
