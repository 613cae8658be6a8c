"""The pipeline's TensorRT orchestration on the CPU: which variants go to which target, and the engine
stage's precision decision across variants. The builds go through tests/runtimes/tensorrt_double.py, a TEST
DOUBLE of the `tensorrt` module (not TensorRT): what is proven here is our own logic only."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import merge, mlp, tiny_recipe
from runtimes import tensorrt_double
from test_engine import H100

from optimize import engine, pipeline
from optimize.cache import StageCache
from optimize.console import Progress, Say
from optimize.errors import StageError
from optimize.export import export_onnx
from optimize.load import resolve_targets
from optimize.models import LoadedModel
from optimize.onnx_files import copy_onnx, onnx_sha256
from optimize.precision import fp16
from optimize.recipe import ExportSection, Fp16Variant, Recipe
from optimize.runtimes import open_runner, target_refuses
from optimize.stage import Context


def recipe_with(over: dict) -> Recipe:
    return Recipe.model_validate(merge(tiny_recipe(), over))


def test_target_refuses_int8_on_torch_and_onnxruntime_s_own_int8_operators_on_tensorrt() -> None:
    recipe = recipe_with(
        {
            "data": {"calib": {"kind": "npz", "path": "tiny-calib.npz", "batch_size": 16}},
            "precision": {
                "variants": [
                    {"name": "dyn", "kind": "int8", "backend": "onnxruntime-dynamic"},
                    {
                        "name": "qop",
                        "kind": "int8",
                        "backend": "onnxruntime",
                        "calibration": "calib",
                        "quant_format": "qoperator",
                    },
                    {"name": "qdq", "kind": "int8", "backend": "onnxruntime", "calibration": "calib"},
                ]
            },
        }
    )
    refuses = target_refuses
    assert "INT8 variants are ONNX artifacts" in refuses("torch-cuda", recipe, "qdq", "int8")
    assert refuses("torch-cpu", recipe, "fp32", "fp32") is None
    assert "TensorRT takes Q/DQ INT8" in refuses("tensorrt", recipe, "dyn", "int8")
    assert "TensorRT takes Q/DQ INT8" in refuses("tensorrt", recipe, "qop", "int8")
    assert refuses("tensorrt", recipe, "qdq", "int8") is None
    assert refuses("onnxruntime-cpu", recipe, "dyn", "int8") is None


def test_torch_targets_are_skipped_for_an_onnx_model_source(tmp_path: Path) -> None:
    recipe = recipe_with(
        {
            "model": {"source": "onnx", "path": str(tmp_path / "m.onnx"), "entry_point": None, "python_path": None},
            "benchmark": {"optional_targets": ["torch-cpu"]},
        }
    )
    targets = resolve_targets(recipe, ())
    assert targets["torch-cpu"] == {
        "status": "skipped",
        "reason": "the model is given as ONNX; torch targets run a PyTorch model source",
    }


@pytest.fixture()
def built(tmp_path: Path, monkeypatch) -> dict:
    """FP32 and FP16 ONNX of a small MLP, and the pipeline's engine builder wired to the double in-process."""
    # 4 MB of FP32 weights: enough that an engine's size tells FP16 weights from FP32 ones
    loaded = LoadedModel(mlp(32, 1024, 1024, 8), {"x": torch.randn(2, 32)})
    spec = ExportSection(output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    export_onnx(loaded, spec, tmp_path / "fp32.onnx")
    fp16.convert_fp16(
        tmp_path / "fp32.onnx", tmp_path / "fp16.onnx", Fp16Variant(name="fp16", kind="fp16", backend="onnxruntime")
    )
    tensorrt_double.install(monkeypatch)
    monkeypatch.setattr(
        engine, "build_in_child", lambda request, timeout_s, progress=None: engine.build_engine(request, device=H100)
    )
    monkeypatch.setenv("OPTIMIZE_CACHE_DIR", str(tmp_path / "cache"))
    paths = {"fp32": tmp_path / "fp32.onnx", "fp16": tmp_path / "fp16.onnx"}
    recipe = recipe_with(
        {
            "export": {"output_names": ["y"], "dynamic_axes": {"x": {0: "batch"}, "y": {0: "batch"}}},
            "evaluate": {"top1_outputs": []},
            "gates": ["accuracy.cosine_min >= 0.99"],
            "benchmark": {"shapes": [{"batch": 1}, {"batch": 8}]},
        }
    )
    state = SimpleNamespace(recipe=recipe, run_dir=tmp_path / "run", cache=StageCache(tmp_path / "cache"))
    return {"state": state, "paths": paths}


def engine_stage(state: SimpleNamespace, paths: dict[str, Path], versions: dict[str, str] | None = None) -> dict:
    """The engine stage as the pipeline runs it (its units through the stage cache, then its finish), on a
    context that holds what the precision stage would have left: the variants' ONNX and their identities."""
    ctx = Context(
        recipe=state.recipe,
        recipe_file=state.run_dir / "recipe.yaml",
        targets={"tensorrt": {"status": "ran"}},
        versions=versions or {"tensorrt": "10.9.0"},
        hardware={"gpus": [{"name": "NVIDIA H100", "compute_capability": "9.0"}]},
        task_metric_code=lambda: None,
        say=Say(quiet=True),
        run_dir=state.run_dir,
        progress=Progress(quiet=True),
        io_specs=io_specs,
    )
    for name, p in paths.items():
        copy_onnx(p, ctx.art_dir / f"{name}.onnx")
        ctx.paths[name], ctx.precisions[name] = ctx.art_dir / f"{name}.onnx", name
        ctx.ids[f"onnx.{name}"] = onnx_sha256(p)
        ctx.variants[name] = {}
    ctx.artifacts["tensorrt"] = dict(ctx.paths)
    state.manifest = ctx.manifest
    done = [(unit, pipeline.execute(unit, ctx, state.cache)) for unit in engine.STAGE.units(ctx)]
    engine.STAGE.finish(ctx, done, {})
    return ctx.engines


def io_specs(path: Path) -> tuple[list, list]:
    with open_runner("onnxruntime-cpu", path) as r:
        return r.inputs, r.outputs


def test_engine_stage_builds_every_variant_and_records_the_precision_check(built) -> None:
    sidecars = engine_stage(built["state"], built["paths"])
    assert list(sidecars) == ["fp32", "fp16"]
    assert sidecars["fp16"]["precision_check"]["status"] == "passed"
    assert sidecars["fp16"]["precision_check"]["saving_kept"] > 0.9  # the plan kept the FP16 weights
    # the default profile spans the benchmark shapes and tunes for the largest
    assert sidecars["fp16"]["profiles"] == {"x": {"min": [1, 32], "opt": [8, 32], "max": [8, 32]}}
    on_disk = yaml.safe_load(Path(sidecars["fp16"]["plan_path"]).with_suffix(".json").read_text())
    assert on_disk["precision_check"]["status"] == "passed"  # the sidecar keeps the verdict
    assert Path(sidecars["fp16"]["timing_cache"]["path"]).parent == built["state"].run_dir.parent / "cache" / "tensorrt"


def test_engines_come_from_the_stage_cache_until_the_onnx_settings_or_tensorrt_change(built, monkeypatch) -> None:
    """Engines are cached like every stage (here built by the TEST DOUBLE, so this proves our keys and
    restore, not TensorRT): a second engine stage builds nothing and restores the same plans; another ONNX
    (one variant), build setting or TensorRT version builds again."""
    state = built["state"]
    builds: list[str] = []
    build = engine.build_in_child
    monkeypatch.setattr(engine, "build_in_child", lambda req, t, progress: builds.append(req.variant) or build(req, t))

    def stage(versions: dict[str, str] | None = None) -> dict:
        return engine_stage(state, built["paths"], versions)

    first = stage()
    plans = {n: Path(s["plan_path"]).read_bytes() for n, s in first.items()}
    shutil.rmtree(state.run_dir / "artifacts")
    second = stage()
    assert builds == ["fp32", "fp16"] and [u["hit"] for u in state.manifest["cache"]] == [True, True]
    assert {n: Path(s["plan_path"]).read_bytes() for n, s in second.items()} == plans
    assert second["fp16"]["precision_check"] == first["fp16"]["precision_check"]
    on_disk = yaml.safe_load(Path(second["fp16"]["plan_path"]).with_suffix(".json").read_text())
    assert on_disk["plan_sha256"] == first["fp16"]["plan_sha256"]  # the sidecar is back beside the plan

    fp16.convert_fp16(  # another FP16 ONNX: only that variant's engine is built again
        built["paths"]["fp32"],
        built["paths"]["fp16"],
        Fp16Variant(name="fp16", kind="fp16", backend="onnxruntime", keep_io_types=False),
    )
    builds.clear()
    stage()
    assert builds == ["fp16"]
    state.recipe = state.recipe.model_copy(
        update={"engine": state.recipe.engine.model_copy(update={"workspace_gb": 2})}
    )
    builds.clear()
    stage()
    assert builds == ["fp32", "fp16"]
    builds.clear()
    stage({"tensorrt": "11.0.0.1"})
    assert builds == ["fp32", "fp16"]


def test_an_fp16_engine_that_came_out_fp32_fails_the_engine_stage(built, monkeypatch) -> None:
    monkeypatch.setattr(engine, "network_flags", lambda trt: (0, False))  # weakly typed: the field failure
    with pytest.raises(
        StageError, match=r"engine: fp16: fp16 asked, but 0% of the layers run in fp16 .*; the engine kept -?\d+% of"
    ) as err:
        engine_stage(built["state"], built["paths"])
    assert err.value.exit_code == 3


def test_torch_cpu_target_runs_the_source_model_and_skips_int8_there(write_recipe, tmp_path: Path) -> None:
    """A real run with the torch-cpu target beside ONNX Runtime: FP32 eager and FP16 autocast of the source
    module, judged against the same FP32 ONNX Runtime reference; the INT8 variant is skipped on torch, with
    the reason, and judged on ONNX Runtime."""
    import json

    from optimize.pipeline import RunOptions, run

    recipe = write_recipe(
        {
            "data": {"calib": {"kind": "npz", "path": "tiny-calib.npz", "batch_size": 16}},
            "precision": {
                "variants": [
                    {"name": "fp16", "kind": "fp16", "backend": "onnxruntime"},
                    {"name": "int8", "kind": "int8", "backend": "onnxruntime-dynamic", "reduce_range": True},
                ]
            },
            "benchmark": {"targets": ["onnxruntime-cpu", "torch-cpu"]},
            "gates": ["accuracy.cosine_min >= 0.95"],
        }
    )
    result = run(recipe, RunOptions(runs_dir=tmp_path / "runs", register=False, quiet=True))
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    res = metrics["results"]
    assert res["fp32"]["torch-cpu"]["accuracy"]["cosine_min"] > 0.99999  # eager FP32 vs the ONNX reference
    assert 0.99 < res["fp16"]["torch-cpu"]["accuracy"]["cosine_min"] < 1.0  # autocast really is FP16
    assert res["fp16"]["torch-cpu"]["shapes"]["batch=8"]["timing"] == "host-clock"
    assert res["fp16"]["torch-cpu"]["memory"]["note"].startswith("not measured")
    assert res["int8"]["torch-cpu"] == {
        "skipped": "the torch targets run the source model in FP32 or FP16 autocast; INT8 variants are ONNX artifacts"
    }
    verdict = json.loads((result.run_dir / "verdict.json").read_text())
    rows = {(r["variant"], r["target"]): r["status"] for r in verdict["gates"]}
    assert rows[("int8", "torch-cpu")] == "skipped"
    assert rows[("int8", "onnxruntime-cpu")] == "passed"
    assert verdict["variants"]["int8"]["status"] == "passed"
    assert result.exit_code == 0
    report = (result.run_dir / "report.md").read_text()
    assert "| int8 | torch-cpu | – | not run here: the torch targets run the source model" in report


class PlanOnOnnxRuntime:
    """A STAND-IN for the TensorRT runner (no GPU here): opens a plan's sidecar and runs the ONNX it was built
    from on ONNX Runtime's CPU provider. It lets the pipeline's wiring of the tensorrt target be tested;
    it says nothing about TensorRT's outputs or speed."""

    def __new__(cls, plan: Path):
        from optimize.engine import read_sidecar
        from optimize.runtimes.onnxruntime import OnnxRuntimeRunner

        side = read_sidecar(plan)
        runner = OnnxRuntimeRunner(Path(plan).parent.parent / side["onnx"], "onnxruntime-cpu")
        runner.target = "tensorrt"
        return runner


def test_tensorrt_target_wiring_through_the_pipeline(write_recipe, tmp_path: Path, monkeypatch) -> None:
    """The engine stage's place in a run: engines built (through the TEST DOUBLE) for every variant, the
    tensorrt target measured on them, sizes from the plans, gates judged on it, engines in the report."""
    import json

    import optimize.runtimes as runtimes
    from optimize import bench, evaluate, load
    from optimize.pipeline import RunOptions, run

    double = tensorrt_double.make()

    def build(request, timeout_s, progress):  # the double is importable only while engines build (torch's probes)
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "tensorrt", double)
            return engine.build_engine(request, device=H100)

    monkeypatch.setenv("OPTIMIZE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(engine, "build_in_child", build)
    monkeypatch.setattr(engine, "tensorrt_version", lambda: double.__version__)
    monkeypatch.setattr(load, "unavailable_reason", lambda target: None)
    real_open = runtimes.open_runner

    def open_runner(target, artifact, threads=None):
        return PlanOnOnnxRuntime(artifact) if target == "tensorrt" else real_open(target, artifact, threads)

    for module in (evaluate, bench):  # the stages that run the TensorRT target
        monkeypatch.setattr(module, "open_runner", open_runner)
    real_memory = bench.measure_memory
    monkeypatch.setattr(
        bench,
        "measure_memory",
        lambda target, artifact, feeds, threads: (
            {"note": "stand-in"} if target == "tensorrt" else real_memory(target, artifact, feeds, threads)
        ),
    )
    recipe = write_recipe(
        {
            "benchmark": {"targets": ["onnxruntime-cpu"], "optional_targets": ["tensorrt"]},
            "gates": ["accuracy.cosine_min >= 0.99", {"check": "size.ratio <= 0.9", "target": "tensorrt"}],
        }
    )
    result = run(recipe, RunOptions(runs_dir=tmp_path / "runs", register=False, quiet=True))
    assert result.exit_code == 0, (result.run_dir / "report.md").read_text()
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    eng = metrics["variants"]["fp16"]["engine"]
    assert eng["path"].startswith("artifacts/engines/tiny-fp16-sm90-trt10.16.0.72-") and eng["path"].endswith(".plan")
    assert eng["precision_check"]["status"] == "passed" and eng["precisions"]["compute"] == {"fp16": 2}
    plan = result.run_dir / eng["path"]
    assert eng["plan_bytes"] == plan.stat().st_size
    # `size` is the shipped ONNX's on every target; the plan's size is the engine's own record
    assert metrics["results"]["fp16"]["tensorrt"]["size"] == metrics["results"]["fp16"]["onnxruntime-cpu"]["size"]
    assert metrics["results"]["fp16"]["tensorrt"]["accuracy"]["cosine_min"] > 0.99
    assert (result.run_dir / "golden" / "tensorrt" / "fp16.npz").exists()
    verdict = json.loads((result.run_dir / "verdict.json").read_text())
    assert {r["target"] for r in verdict["gates"] if r["status"] == "passed"} == {"onnxruntime-cpu", "tensorrt"}
    report = (result.run_dir / "report.md").read_text()
    assert "## TensorRT engines" in report and "passed: fp16 carried" in report
    assert (result.run_dir / "logs" / "engine-fp16.log").exists()
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert [s["stage"] for s in manifest["stages"]][:5] == ["load", "export", "precision", "engine", "evaluate"]
