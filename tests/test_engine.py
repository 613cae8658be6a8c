"""Engine stage orchestration on the CPU, driven through tests/runtimes/tensorrt_double.py — a TEST DOUBLE of the
`tensorrt` module, not TensorRT. These tests prove our own logic (profiles from the recipe, engine names,
sidecars, timing-cache keys and merging, the precision check's decision, error mapping); that TensorRT
builds and runs these engines is proven only by the `gpu` tests (tests/test_engine_gpu.py) on GPU runners.
"""

from __future__ import annotations

import json
import multiprocessing
import re
from pathlib import Path

import pytest
import torch
from conftest import mlp
from runtimes import tensorrt_double

from optimize import engine
from optimize.engine import BuildRequest, Device, check_compatible, check_precision
from optimize.errors import RecipeError, RuntimeMissingError, StageError
from optimize.export import export_onnx
from optimize.models import LoadedModel
from optimize.precision import fp16
from optimize.recipe import ExportSection, Fp16Variant
from optimize.runtimes import TensorSpec

H100 = Device("NVIDIA H100 80GB HBM3", "9.0", "580.159.04", "13.0")
A100 = Device("NVIDIA A100-SXM4-80GB", "8.0", "580.159.04", "13.0")


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real FP32 export and its real FP16 conversion (ONNX Runtime's converter)."""
    folder = tmp_path_factory.mktemp("engine-models")
    loaded = LoadedModel(mlp(32, 64, 8), {"x": torch.randn(2, 32)})
    spec = ExportSection(output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    export_onnx(loaded, spec, folder / "fp32.onnx")
    fp16.convert_fp16(
        folder / "fp32.onnx", folder / "fp16.onnx", Fp16Variant(name="fp16", kind="fp16", backend="onnxruntime")
    )
    return {"fp32": folder / "fp32.onnx", "fp16": folder / "fp16.onnx"}


def request(tmp_path: Path, onnx_path: Path, precision: str, **kw) -> BuildRequest:
    args = {
        "onnx_path": str(onnx_path),
        "out_dir": str(tmp_path / "engines"),
        "model": "mlp",
        "variant": precision,
        "precision": precision,
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 32]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 8]}],
        "profile": {"min": {"batch": 1}, "opt": {"batch": 16}, "max": {"batch": 32}},
        "workspace_gb": 1.0,
        "optimization_level": 3,
        "timing_cache_dir": str(tmp_path / "cache"),
        "log_path": str(tmp_path / "logs" / f"engine-{precision}.log"),
    }
    return BuildRequest(**{**args, **kw})


# --- profiles and names ---------------------------------------------------------------------------


def test_default_profile_spans_the_benchmark_shapes_and_tunes_for_the_largest() -> None:
    shapes = [{"batch": 1, "sequence": 32}, {"batch": 16, "sequence": 64}, {"batch": 4, "sequence": 128}]
    assert engine.default_profile(shapes) == {
        "min": {"batch": 1, "sequence": 32},
        "opt": {"batch": 16, "sequence": 64},  # 1024 elements, the largest shape
        "max": {"batch": 16, "sequence": 128},
    }


def test_input_profiles_bind_axis_names_and_keep_fixed_dims() -> None:
    inputs = [TensorSpec("ids", "int64", ("batch", "sequence")), TensorSpec("img", "float32", (1, 3, 8, 8))]
    profile = {
        "min": {"batch": 1, "sequence": 8},
        "opt": {"batch": 8, "sequence": 64},
        "max": {"batch": 16, "sequence": 128},
    }
    assert engine.input_profiles(inputs, profile) == {
        "ids": {"min": [1, 8], "opt": [8, 64], "max": [16, 128]}
    }  # the static input needs no profile entry
    with pytest.raises(RecipeError, match=r"engine.profile: no size for axis 1 \('sequence'\) of input 'ids'"):
        engine.input_profiles(inputs[:1], {k: {"batch": 1} for k in ("min", "opt", "max")})


def test_engine_name_carries_model_precision_architecture_version_and_profile_hash() -> None:
    profiles = {"x": {"min": [1, 32], "opt": [16, 32], "max": [32, 32]}}
    h = engine.profile_hash(profiles, "ab" * 32, {"workspace_gb": 1.0})
    assert re.fullmatch(r"[0-9a-f]{12}", h)
    assert engine.engine_name("minilm", "fp16", H100, "10.16.0.72", h) == f"minilm-fp16-sm90-trt10.16.0.72-{h}.plan"
    wider = {"x": {"min": [1, 32], "opt": [16, 32], "max": [64, 32]}}
    assert engine.profile_hash(wider, "ab" * 32, {"workspace_gb": 1.0}) != h
    assert engine.profile_hash(profiles, "cd" * 32, {"workspace_gb": 1.0}) != h
    assert engine.profile_hash(profiles, "ab" * 32, {"workspace_gb": 2.0}) != h


def test_timing_cache_is_keyed_by_architecture_and_version(tmp_path: Path, monkeypatch) -> None:
    assert engine.timing_cache_path(tmp_path, H100, "10.16.0.72").name == "timing-sm90-trt10.16.0.72.cache"
    assert engine.timing_cache_path(tmp_path, A100, "10.16.0.72") != engine.timing_cache_path(
        tmp_path, H100, "10.16.0.72"
    )
    monkeypatch.setenv("OPTIMIZE_CACHE_DIR", str(tmp_path / "shared"))
    assert engine.cache_dir(None) == tmp_path / "shared" / "tensorrt"
    assert engine.cache_dir("~/x") == Path.home() / "x"


# --- building through the double -------------------------------------------------------------------


def test_fp16_build_writes_plan_sidecar_and_log_and_carries_fp16(tmp_path: Path, onnx_models, monkeypatch) -> None:
    trt = tensorrt_double.install(monkeypatch, "10.16.0.72")
    side = engine.build_engine(request(tmp_path, onnx_models["fp16"], "fp16"), device=H100)
    plan = Path(side["plan_path"])
    assert re.fullmatch(r"mlp-fp16-sm90-trt10\.16\.0\.72-[0-9a-f]{12}\.plan", plan.name)
    assert json.loads(plan.with_suffix(".json").read_text()) == side
    for key in (
        "gpu",
        "compute_capability",
        "driver",
        "cuda",
        "tensorrt",
        "profiles",
        "onnx_sha256",
        "built",
        "build_s",
    ):
        assert side[key] not in (None, ""), key
    assert side["profiles"] == {"x": {"min": [1, 32], "opt": [16, 32], "max": [32, 32]}}
    assert side["strongly_typed_flag"] is True
    assert side["precisions"]["compute"] == {"fp16": 2}
    assert check_precision("fp16", side["precisions"], None, 0.5)["status"] == "passed"
    assert side["plan_bytes"] > 0 and side["plan_sha256"] == engine.sha256_file(plan)
    assert (tmp_path / "logs" / "engine-fp16.log").exists()
    # what went to the builder: workspace limit, level, detailed verbosity, the profile
    assert "IBuilderConfig.set_memory_pool_limit" in trt.double_used
    assert "ProfilingVerbosity.DETAILED" in trt.double_used
    assert "NetworkDefinitionCreationFlag.STRONGLY_TYPED" in trt.double_used
    assert not any(n.startswith("BuilderFlag.") for n in trt.double_used)


def test_weakly_typed_build_comes_out_fp32_and_the_check_fails_it(tmp_path: Path, onnx_models, monkeypatch) -> None:
    """The field failure: an FP16 ONNX built without strong typing (and no FP16 flag) is an FP32 engine."""
    tensorrt_double.install(monkeypatch)
    monkeypatch.setattr(engine, "network_flags", lambda trt: (0, False))
    side = engine.build_engine(request(tmp_path, onnx_models["fp16"], "fp16"), device=H100)
    assert side["precisions"]["compute"] == {"fp32": 2}
    verdict = check_precision("fp16", side["precisions"], None, 0.5)
    assert verdict["status"] == "failed"
    assert "0% of the layers run in fp16 (< 50%; layers: 2 fp32)" in verdict["reason"]


def test_tensorrt_11_path_builds_strongly_typed_and_touches_no_removed_name(
    tmp_path: Path, onnx_models, monkeypatch
) -> None:
    trt = tensorrt_double.install(monkeypatch, "11.4.0.10")
    side = engine.build_engine(request(tmp_path, onnx_models["fp16"], "fp16"), device=H100)
    assert side["precisions"]["compute"] == {"fp16": 2}
    assert "-trt11.4.0.10-" in Path(side["plan_path"]).name
    assert not any(n.startswith("BuilderFlag.") for n in trt.double_used)


def test_network_flags_are_found_by_trying() -> None:
    """STRONGLY_TYPED where the enum has it (10.x; 11.x keeps it, ignored); no bit where it is gone."""
    assert engine.network_flags(tensorrt_double.make("10.16.0.72")) == (1 << 1, True)
    assert engine.network_flags(tensorrt_double.make("11.4.0.10")) == (1 << 1, True)

    class NoFlag:
        NetworkDefinitionCreationFlag = object()

    assert engine.network_flags(NoFlag) == (0, False)


def test_parser_errors_are_listed_one_per_line(tmp_path: Path, onnx_models, monkeypatch) -> None:
    trt = tensorrt_double.install(monkeypatch)
    trt.double_parse_errors = [("/fc1/MatMul", "MatMul", "unsupported data type"), ("/Relu", "Relu", "bad input")]
    with pytest.raises(StageError) as err:
        engine.build_engine(request(tmp_path, onnx_models["fp16"], "fp16"), device=H100)
    assert str(err.value).splitlines()[1:] == [
        "node /fc1/MatMul (MatMul): unsupported data type",
        "node /Relu (Relu): bad input",
    ]
    assert "[PARSER] node /Relu (Relu): bad input" in (tmp_path / "logs" / "engine-fp16.log").read_text()


def test_no_implementation_error_is_explained_as_memory(tmp_path: Path, onnx_models, monkeypatch) -> None:
    trt = tensorrt_double.install(monkeypatch)
    trt.double_build_errors = [
        "[optimizer.cpp::computeCosts] Error Code 10: Could not find any implementation for node /fc1/MatMul."
    ]
    with pytest.raises(StageError, match="out of memory or engine.workspace_gb is too small"):
        engine.build_engine(request(tmp_path, onnx_models["fp16"], "fp16"), device=H100)
    assert "Could not find any implementation" in (tmp_path / "logs" / "engine-fp16.log").read_text()


def test_dynamic_input_without_profile_fails_with_tensorrt_s_reason(tmp_path: Path, onnx_models, monkeypatch) -> None:
    tensorrt_double.install(monkeypatch)
    req = request(tmp_path, onnx_models["fp16"], "fp16", inputs=[{"name": "x", "dtype": "float32", "shape": [4, 32]}])
    with pytest.raises(StageError, match="no optimization profile"):
        engine.build_engine(req, device=H100)


# --- timing cache ------------------------------------------------------------------------------------


def test_timing_cache_is_created_reused_and_another_architecture_s_is_never_loaded(
    tmp_path: Path, onnx_models, monkeypatch
) -> None:
    tensorrt_double.install(monkeypatch)
    first = engine.build_engine(request(tmp_path, onnx_models["fp16"], "fp16"), device=H100)
    cache = Path(first["timing_cache"]["path"])
    assert first["timing_cache"]["loaded"] is False and cache.exists()
    assert json.loads(cache.with_suffix(".json").read_text())["compute_capability"] == "9.0"
    second = engine.build_engine(request(tmp_path, onnx_models["fp32"], "fp32"), device=H100)
    assert second["timing_cache"] == {"path": str(cache), "loaded": True}
    entries = json.loads(cache.read_bytes())["entries"]
    assert len(entries) >= 2  # both builds' layers merged

    # A file under this key whose metadata says sm80 (copied by hand, say) is moved aside, not loaded.
    meta = json.loads(cache.with_suffix(".json").read_text())
    cache.with_suffix(".json").write_text(json.dumps({**meta, "compute_capability": "8.0"}))
    third = engine.build_engine(request(tmp_path, onnx_models["fp16"], "fp16"), device=H100)
    assert third["timing_cache"]["loaded"] is False
    assert cache.with_suffix(".rejected").exists()
    assert "moved aside, not loaded" in (tmp_path / "logs" / "engine-fp16.log").read_text()


def _merge_many(cache_dir: str, tag: str, n: int) -> None:
    trt = tensorrt_double.make()
    config = trt.Builder(None).create_builder_config()
    path = engine.timing_cache_path(Path(cache_dir), H100, trt.__version__)
    for i in range(n):
        cache = config.create_timing_cache(b"")
        cache.entries = {f"{tag}-{i}"}
        config.set_timing_cache(cache, False)
        engine.merge_timing_cache(config, path, {"compute_capability": "9.0", "tensorrt": trt.__version__})


def test_parallel_jobs_merge_into_one_timing_cache_without_losing_entries(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_merge_many, args=(str(tmp_path), tag, 20)) for tag in ("a", "b", "c")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    path = engine.timing_cache_path(tmp_path, H100, tensorrt_double.make().__version__)
    entries = set(json.loads(path.read_bytes())["entries"])
    assert entries == {f"{t}-{i}" for t in "abc" for i in range(20)}


# --- the precision check's decision ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "histogram", "kept", "status"),
    [
        ("fp16", {"compute": {"fp16": 9, "fp32": 1}}, 0.97, "passed"),
        ("fp16", {"compute": {"fp16": 2, "fp32": 8}}, 0.97, "failed"),  # most layers FP32
        ("fp16", {"compute": {"fp16": 9}}, 0.03, "failed"),  # weights went back to FP32
        ("fp16", {"all": {"opaque": 1}, "compute": {}}, 0.98, "passed"),  # one Myelin node: the size decides
        ("fp16", {"all": {"opaque": 1}, "compute": {}}, 0.1, "failed"),
        ("fp16", {"all": {"opaque": 1}, "compute": {}}, None, "undetermined"),  # tiny weights, opaque layers
        ("int8", {"compute": {"int8": 6, "fp16": 2}}, 0.9, "passed"),
        ("int8", {"compute": {"fp16": 8}}, 0.9, "failed"),
        ("fp32", {"compute": {"fp32": 4}}, None, "passed"),
        ("fp32", {"all": {"opaque": 1}, "compute": {}}, None, "passed"),  # nothing to prove for FP32
    ],
)
def test_precision_check_decides_on_layer_share_and_weight_saving(asked, histogram, kept, status) -> None:
    assert check_precision(asked, histogram, kept, 0.5)["status"] == status


def test_weight_saving_is_the_share_of_the_onnx_saving_the_plan_kept() -> None:
    mb = 1 << 20
    assert engine.weight_saving(60 * mb, 100 * mb, 45 * mb, 90 * mb) == pytest.approx(40 / 45)
    assert engine.weight_saving(99 * mb, 100 * mb, 45 * mb, 90 * mb) == pytest.approx(1 / 45)
    assert engine.weight_saving(900_000, 910_000, 5_000, 10_000) is None  # kernels outweigh 5 KB of weights


def test_layer_precision_reads_inspector_formats() -> None:
    gemm_int8 = {
        "LayerType": "CaskGemmMatrixMultiply",
        "Inputs": [{"Format/Datatype": "Int8"}],
        "Outputs": [{"Format/Datatype": "Float"}],
    }
    conv_half = {
        "LayerType": "CaskConvolution",
        "Inputs": [{"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
    }
    myelin = {"LayerType": "Myelin", "Inputs": [{"Format/Datatype": "Row major linear FP32"}]}
    gather = {"LayerType": "Gather", "Inputs": [{"Format/Datatype": "Int32"}], "Outputs": [{"Format/Datatype": "Half"}]}
    assert [engine.layer_precision(x) for x in (gemm_int8, conv_half, myelin, gather)] == [
        "int8",
        "fp16",
        "opaque",
        "fp16",
    ]
    hist = engine.precision_histogram([gemm_int8, conv_half, myelin, gather])
    assert hist == {"all": {"fp16": 2, "int8": 1, "opaque": 1}, "compute": {"fp16": 1, "int8": 1}}


# --- identity on load ----------------------------------------------------------------------------------


def test_an_engine_from_another_architecture_or_version_is_refused(tmp_path: Path) -> None:
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"plan")
    side = {"compute_capability": "8.0", "tensorrt": "10.16.0.72", "plan_sha256": engine.sha256_file(plan)}
    with pytest.raises(
        RuntimeMissingError, match=r"built for sm80 with TensorRT 10.16.0.72, this machine is sm90"
    ) as e:
        check_compatible(side, H100, "10.16.0.72", plan)
    assert e.value.exit_code == 4
    with pytest.raises(RuntimeMissingError, match="TensorRT 11.4.0.10"):
        check_compatible({**side, "compute_capability": "9.0"}, H100, "11.4.0.10", plan)
    check_compatible({**side, "compute_capability": "9.0"}, H100, "10.16.0.72", plan)
    plan.write_bytes(b"tampered")
    with pytest.raises(StageError, match="does not match its sidecar"):
        check_compatible({**side, "compute_capability": "9.0"}, H100, "10.16.0.72", plan)


def test_a_plan_without_sidecar_is_not_loaded(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no sidecar m.json"):
        engine.read_sidecar(tmp_path / "m.plan")


def test_the_double_s_runtime_refuses_a_plan_from_another_version(tmp_path: Path, onnx_models, monkeypatch) -> None:
    """What our runner maps to a clear error: TensorRT returns None (and logs why) for a foreign plan."""
    tensorrt_double.install(monkeypatch, "10.16.0.72")
    side = engine.build_engine(request(tmp_path, onnx_models["fp16"], "fp16"), device=H100)
    other = tensorrt_double.make("10.3.0.26")
    lines: list[str] = []
    assert (
        other.Runtime(engine.make_logger(other, lines)).deserialize_cuda_engine(Path(side["plan_path"]).read_bytes())
        is None
    )
    assert "please rebuild" in lines[-1]


# --- the child process -------------------------------------------------------------------------------


def test_build_in_child_without_tensorrt_is_exit_4_with_the_reason(tmp_path: Path, onnx_models) -> None:
    """Real subprocess, real import failure: no TensorRT on this machine."""
    (tmp_path / "engines").mkdir()
    with pytest.raises(RuntimeMissingError, match=r"TensorRT is not installed .*pip install 'optimize\[gpu\]'"):
        engine.build_in_child(request(tmp_path, onnx_models["fp16"], "fp16"), timeout_s=120)
    assert list((tmp_path / "engines").iterdir()) == []  # nothing half-written left behind


def test_build_in_child_that_dies_or_hangs_is_a_stage_error(tmp_path: Path, onnx_models, monkeypatch) -> None:
    (tmp_path / "engines").mkdir()
    dies = tmp_path / "dies.sh"
    dies.write_text("#!/bin/sh\necho 'Segmentation fault' >&2\nexit 139\n")
    hangs = tmp_path / "hangs.sh"
    hangs.write_text("#!/bin/sh\nsleep 30\n")
    for script in (dies, hangs):
        script.chmod(0o755)
    monkeypatch.setattr(engine.sys, "executable", str(dies))
    with pytest.raises(StageError, match=r"the build process died \(exit 139\): Segmentation fault"):
        engine.build_in_child(request(tmp_path, onnx_models["fp16"], "fp16"), timeout_s=30)
    monkeypatch.setattr(engine.sys, "executable", str(hangs))
    with pytest.raises(StageError, match=r"took over 0.5 s \(engine.build_timeout_s\)"):
        engine.build_in_child(request(tmp_path, onnx_models["fp16"], "fp16"), timeout_s=0.5)
