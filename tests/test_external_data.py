"""Large models: an ONNX artifact over the external-data threshold is `<name>.onnx` + `<name>.onnx.data` through
export, FP16, INT8, copies and hashes (optimize.onnx_files). The threshold is forced down to 1 KiB with
OPTIMIZE_EXTERNAL_DATA_BYTES, so small models built here take the path a 2 GB model takes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from conftest import REPO, conv_proto, merge, mlp, tiny_recipe
from onnx import TensorProto, helper, numpy_helper

from optimize import onnx_files
from optimize.errors import RecipeError
from optimize.export import check_export, export_onnx
from optimize.files import sha256_file
from optimize.models import LoadedModel
from optimize.onnx_files import (
    copy_onnx,
    external_data_names,
    external_data_threshold,
    onnx_sha256,
    onnx_size_bytes,
    save_onnx,
    write_onnx_with,
)
from optimize.onnx_files import onnx_files as files_of
from optimize.precision import fp16, fusion, int8
from optimize.recipe import ExportSection, Fp16Variant, Int8Variant
from optimize.runtimes import open_runner

FORCED = "1024"
WHERE = "precision.variants[0]"


def loaded_mlp(seed: int = 0) -> LoadedModel:
    """x (N, 32) → Linear 32×128 (16 KiB of FP32 weights) → ReLU → Linear 128×8 → logits (N, 8)."""
    return LoadedModel(
        mlp(32, 128, 8, seed=seed), {"x": torch.randn(2, 32, generator=torch.Generator().manual_seed(1))}
    )


SPEC = ExportSection(
    input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}
)


def batches(n: int = 64, size: int = 16, seed: int = 3) -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(seed).standard_normal((n, 32)).astype(np.float32)
    return [{"x": x[i : i + size]} for i in range(0, n, size)]


def run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


# These tests are about where INT8 weights live, not INT8 accuracy: weights read wrongly from the data file give
# a cosine near 0, so a bound far below what any CPU's INT8 kernels give is enough (tests/precision/test_int8.py and
# test_pipeline_int8 judge the accuracy).
INT8_RUNS = 0.9


def cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def tensor_bytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def assert_external_artifact(path: Path, every_large_tensor: bool = False) -> None:
    """`path` + `<path>.data` and nothing else of it: every external tensor points at `<name>.data`, and the
    largest tensor is in there (`every_large_tensor`: every tensor of 1 KiB and more, as save_onnx writes them;
    a tool's own saver may keep a typed-field tensor of that size in the .onnx)."""
    data = path.with_name(path.name + ".data")
    assert files_of(path) == [path, data]
    assert external_data_names(path) == [data.name]
    tensors = onnx.load(str(path), load_external_data=False).graph.initializer
    largest = max(tensors, key=tensor_bytes)
    assert largest.data_location == TensorProto.EXTERNAL, largest.name
    assert data.stat().st_size >= tensor_bytes(largest) >= onnx_files.TENSOR_MIN_BYTES
    if every_large_tensor:
        inline = [t.name for t in tensors if t.data_location != TensorProto.EXTERNAL]
        assert all(tensor_bytes(t) < onnx_files.TENSOR_MIN_BYTES for t in tensors if t.name in inline), inline


def mlp_proto(seed: int = 0, width: int = 128) -> onnx.ModelProto:
    """The MLP as a hand-built ONNX graph (weights from `seed`), for the mechanism's own tests."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((32, width)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(width, np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((width, 8)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
        helper.make_node("Relu", ["hb"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "w2"], ["logits"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.fixture()
def forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(onnx_files.EXTERNAL_DATA_ENV, FORCED)


@pytest.fixture()
def exported(forced, tmp_path: Path) -> tuple[LoadedModel, Path]:
    loaded = loaded_mlp()
    dest = tmp_path / "art" / "fp32.onnx"
    export_onnx(loaded, SPEC, dest)
    return loaded, dest


# --- the threshold ---------------------------------------------------------------------------------


def test_the_threshold_defaults_under_2_gib_and_the_environment_can_only_lower_it(monkeypatch) -> None:
    monkeypatch.delenv(onnx_files.EXTERNAL_DATA_ENV, raising=False)
    default = external_data_threshold()
    assert 2**30 < default < 2**31 - 1
    monkeypatch.setenv(onnx_files.EXTERNAL_DATA_ENV, "64KiB")
    assert external_data_threshold() == 65536
    monkeypatch.setenv(onnx_files.EXTERNAL_DATA_ENV, "5GB")
    assert external_data_threshold() == default
    for bad in ("lots", "0"):
        monkeypatch.setenv(onnx_files.EXTERNAL_DATA_ENV, bad)
        with pytest.raises(RecipeError, match=onnx_files.EXTERNAL_DATA_ENV) as e:
            external_data_threshold()
        assert e.value.exit_code == 2


# --- export ----------------------------------------------------------------------------------------


def test_export_over_the_threshold_writes_onnx_and_data_that_run_like_torch(exported) -> None:
    loaded, dest = exported
    assert listing(dest.parent) == ["fp32.onnx", "fp32.onnx.data"]  # no temp folder left either
    assert_external_artifact(dest)
    model = onnx.load(str(dest), load_external_data=False)
    assert [o.name for o in model.graph.output] == ["logits"]
    with open_runner("onnxruntime-cpu", dest) as r:
        check = check_export(loaded, r, batches(), SPEC)
    assert check.worst_excess <= 0 and check.max_abs_error["logits"] < 1e-4


def test_export_within_the_threshold_stays_one_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(onnx_files.EXTERNAL_DATA_ENV, raising=False)
    dest = tmp_path / "fp32.onnx"
    export_onnx(loaded_mlp(), SPEC, dest)
    assert listing(tmp_path) == ["fp32.onnx"]
    assert files_of(dest) == [dest] and onnx_sha256(dest) == sha256_file(dest)


# --- precision -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["onnxruntime", "modelopt"])
def test_fp16_of_an_external_data_model_is_onnx_and_data_and_runs(exported, tmp_path: Path, backend: str) -> None:
    if backend == "modelopt" and not fp16.modelopt_available():
        pytest.skip("ModelOpt AutoCast does not import here")
    _, src = exported
    dest = tmp_path / "out" / "fp16.onnx"
    result = fp16.convert_fp16(src, dest, Fp16Variant(name="fp16", kind="fp16", backend=backend))
    assert result.backend == backend and result.fp16_initializers >= 2
    assert listing(dest.parent) == ["fp16.onnx", "fp16.onnx.data"]
    assert_external_artifact(dest, every_large_tensor=True)
    feeds = batches(16, 16, seed=7)[0]
    got = run(dest, feeds)
    assert cosine_min(run(src, feeds), got) > 0.999
    fp16.check_finite(dest, {"logits": got}, feeds, "precision.fp16")  # every node run, weights from .data
    values, culprits = fp16.run_every_node(dest, feeds)
    assert culprits == [] and len(values) > 2


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-dynamic"])
def test_int8_of_an_external_data_model_is_onnx_and_data_and_runs(exported, tmp_path: Path, backend: str) -> None:
    _, src = exported
    dest = tmp_path / "out" / "int8.onnx"
    work = tmp_path / "work"
    options = {"calibration": "calib"} if backend == "onnxruntime" else {}
    # 7-bit weights: the same numbers on every x86 CPU (an AVX2 CPU without VNNI saturates 8-bit products)
    variant = Int8Variant(name="int8", kind="int8", backend=backend, reduce_range=True, **options)
    calib = batches() if backend == "onnxruntime" else []
    result = int8.quantize(src, dest, variant, calib, work, WHERE)
    assert result.quant_ops
    assert listing(dest.parent) == ["int8.onnx", "int8.onnx.data"]
    assert_external_artifact(dest)
    if backend == "onnxruntime":  # QDQ: Q/DQ nodes around the MatMuls, INT8 weights in the data file
        assert result.quant_ops.get("DequantizeLinear", 0) >= 2
        leftovers = [p.name for p in work.iterdir() if not p.name.startswith("calibration-")]
        assert leftovers == [], leftovers  # the augmented model and its data file are gone
    feeds = batches(16, 16, seed=7)[0]
    assert cosine_min(run(src, feeds), run(dest, feeds)) > INT8_RUNS


def test_fusion_and_int8_weights_keep_external_data(forced, tmp_path: Path) -> None:
    """The writers that go through ONNX Runtime's own savers: fusion, then MatMulNBits for excluded nodes."""
    src = tmp_path / "art" / "fp32.onnx"
    save_onnx(mlp_proto(), src)
    fused = tmp_path / "work" / "fused.onnx"
    fusion.fuse(src, fused, "bert", WHERE)
    assert_external_artifact(fused)
    dest = tmp_path / "out" / "int8.onnx"
    variant = Int8Variant(
        name="int8",
        kind="int8",
        backend="onnxruntime-dynamic",
        nodes_to_exclude=["fc2"],
        exclude_as="int8-weights",
        reduce_range=True,
    )
    result = int8.quantize(fused, dest, variant, [], tmp_path / "work", WHERE)
    assert result.quant_ops.get("MatMulNBits") == 1
    assert_external_artifact(dest)
    feeds = batches(16, 16, seed=7)[0]
    assert cosine_min(run(src, feeds), run(dest, feeds)) > INT8_RUNS


def test_modelopt_int8_of_an_external_data_model_is_onnx_and_data_and_runs(forced, tmp_path: Path) -> None:
    if int8.modelopt_quantization_available():
        pytest.skip("ModelOpt's ONNX quantisation does not import here")
    src = tmp_path / "art" / "fp32.onnx"
    save_onnx(conv_proto(channels=4, width=16, scales=(0.3, 0.1)), src)
    assert_external_artifact(src, every_large_tensor=True)
    dest = tmp_path / "out" / "int8.onnx"
    variant = Int8Variant(name="int8", kind="int8", backend="modelopt", calibration="calib", method="max")
    x = np.random.default_rng(1).random((32, 4, 8, 8)).astype(np.float32)
    result = int8.quantize(src, dest, variant, [{"image": x[:16]}, {"image": x[16:]}], tmp_path / "work", WHERE)
    assert result.quant_ops.get("QuantizeLinear", 0) >= 1
    assert listing(dest.parent) == ["int8.onnx", "int8.onnx.data"]  # ModelOpt's own file names are gone
    assert_external_artifact(dest)
    feeds = {"image": np.random.default_rng(7).random((8, 4, 8, 8)).astype(np.float32)}
    assert cosine_min(run(src, feeds), run(dest, feeds)) > INT8_RUNS


# --- the mechanism: save, crash, copy, list, hash -----------------------------------------------------


def test_save_over_the_threshold_writes_both_and_leaves_the_model_as_it_was(forced, tmp_path: Path) -> None:
    model = mlp_proto()
    before = model.SerializeToString()
    dest = tmp_path / "m.onnx"
    save_onnx(model, dest)
    assert model.SerializeToString() == before
    assert listing(tmp_path) == ["m.onnx", "m.onnx.data"]
    assert_external_artifact(dest, every_large_tensor=True)
    assert onnx_size_bytes(dest) == dest.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    (tmp_path / "plain").write_text("")  # ONNX creates data files 0600; artifacts get the usual permissions
    assert (tmp_path / "m.onnx.data").stat().st_mode == (tmp_path / "plain").stat().st_mode
    (tmp_path / "plain").unlink()
    onnx.checker.check_model(str(dest), full_check=True)
    feeds = batches(8, 8)[0]
    expected = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(run(dest, feeds), expected)


def test_save_within_the_threshold_is_one_file_and_removes_an_older_data_file(forced, tmp_path: Path) -> None:
    dest = tmp_path / "m.onnx"
    save_onnx(mlp_proto(), dest)
    assert listing(tmp_path) == ["m.onnx", "m.onnx.data"]
    small = mlp_proto(width=2)  # 32×2 + 2×8 floats: under 1 KiB
    save_onnx(small, dest)
    assert listing(tmp_path) == ["m.onnx"]  # the older artifact's data file went with it
    assert dest.read_bytes() == small.SerializeToString()


def test_a_tool_output_is_renamed_into_the_convention(forced, tmp_path: Path) -> None:
    """A tool that writes one file over the threshold, or data under a name of its own, or several data
    files: the artifact comes out as `<name>.onnx` + `<name>.onnx.data` all the same."""
    feeds = batches(8, 8)[0]
    expected = ort.InferenceSession(mlp_proto().SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )[0]
    writers = {
        "one file": lambda tmp: onnx.save(mlp_proto(), str(tmp)),
        "own name": lambda tmp: onnx.save(mlp_proto(), str(tmp), save_as_external_data=True, location="w.bin"),
        "per tensor": lambda tmp: onnx.save(
            mlp_proto(), str(tmp), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0
        ),
    }
    for i, (what, writer) in enumerate(writers.items()):
        dest = tmp_path / str(i) / "m.onnx"
        write_onnx_with(dest, writer)
        assert listing(dest.parent) == ["m.onnx", "m.onnx.data"], what
        assert_external_artifact(dest, every_large_tensor=True)
        np.testing.assert_array_equal(run(dest, feeds), expected, err_msg=what)


def test_a_small_model_a_tool_wrote_with_external_data_becomes_one_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(onnx_files.EXTERNAL_DATA_ENV, raising=False)
    dest = tmp_path / "m.onnx"
    write_onnx_with(dest, lambda tmp: onnx.save(mlp_proto(), str(tmp), save_as_external_data=True))
    assert listing(tmp_path) == ["m.onnx"]
    assert not external_data_names(dest)


def test_a_writer_that_fails_after_the_data_file_leaves_no_onnx(forced, tmp_path: Path) -> None:
    def dies_half_way(tmp: Path) -> None:
        onnx.save(mlp_proto(seed=1), str(tmp), save_as_external_data=True, location=tmp.name + ".data")
        raise OSError("disk full")

    fresh = tmp_path / "fresh" / "m.onnx"
    with pytest.raises(OSError, match="disk full"):
        write_onnx_with(fresh, dies_half_way)
    assert listing(fresh.parent) == []  # neither file, nor the temp folder

    dest = tmp_path / "old" / "m.onnx"
    save_onnx(mlp_proto(seed=0), dest)
    before = {p.name: p.read_bytes() for p in files_of(dest)}
    with pytest.raises(OSError, match="disk full"):
        write_onnx_with(dest, dies_half_way)
    assert {p.name: p.read_bytes() for p in dest.parent.iterdir()} == before  # the earlier artifact, whole


def test_a_failure_between_the_renames_leaves_no_onnx_with_the_wrong_data(forced, tmp_path: Path, monkeypatch) -> None:
    dest = tmp_path / "m.onnx"
    save_onnx(mlp_proto(seed=0), dest)
    real = os.replace

    def fails_on_the_onnx(src, dst):
        if Path(dst) == dest:
            raise OSError("killed here")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fails_on_the_onnx)
    with pytest.raises(OSError, match="killed here"):
        save_onnx(mlp_proto(seed=1), dest)
    monkeypatch.setattr(os, "replace", real)
    # The new data file is in place and the old .onnx is gone: nothing reads the new data with the old graph.
    assert listing(tmp_path) == ["m.onnx.data"]
    save_onnx(mlp_proto(seed=1), dest)  # the next save finishes the job
    feeds = batches(8, 8)[0]
    expected = ort.InferenceSession(mlp_proto(seed=1).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(run(dest, feeds), expected.run(None, feeds)[0])


SIGKILL_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    import onnx

    from optimize.onnx_files import save_onnx

    real = os.replace

    def replace_then_die(src, dst):
        real(src, dst)
        if str(dst).endswith(".data"):  # the new data file is in place, the .onnx not yet
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace_then_die
    save_onnx(onnx.load(sys.argv[1]), Path(sys.argv[2]))
    """
)


def test_sigkill_mid_save_leaves_no_onnx_and_a_rerun_recovers(forced, tmp_path: Path) -> None:
    dest = tmp_path / "art" / "m.onnx"
    save_onnx(mlp_proto(seed=0), dest)  # an earlier artifact: its .onnx must not survive with the new data
    new = tmp_path / "new.onnx"
    onnx.save(mlp_proto(seed=1), str(new))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SIGKILL_CHILD, str(new), str(dest)], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not dest.exists()
    assert [n for n in listing(dest.parent) if not n.startswith(".")] == ["m.onnx.data"]
    save_onnx(onnx.load(str(new)), dest)
    assert_external_artifact(dest, every_large_tensor=True)
    feeds = batches(8, 8)[0]
    np.testing.assert_array_equal(run(dest, feeds), run(new, feeds))


def test_copy_takes_both_files_and_the_copy_runs_from_another_folder(forced, tmp_path: Path) -> None:
    src = tmp_path / "a" / "int8.onnx"
    save_onnx(mlp_proto(), src)
    feeds = batches(8, 8)[0]
    expected = run(src, feeds)
    same = tmp_path / "cache" / "int8.onnx"  # same name: both files byte for byte
    copy_onnx(src, same)
    assert [p.read_bytes() for p in files_of(same)] == [p.read_bytes() for p in files_of(src)]
    other = tmp_path / "registry" / "model.onnx"  # another name: the .onnx points at model.onnx.data
    copy_onnx(src, other, link=True)
    assert listing(other.parent) == ["model.onnx", "model.onnx.data"]
    assert_external_artifact(other)
    assert (tmp_path / "registry" / "model.onnx.data").stat().st_ino == (
        tmp_path / "a" / "int8.onnx.data"
    ).stat().st_ino
    assert onnx_sha256(other) == onnx_sha256(same) == onnx_sha256(src)
    for p in files_of(src):
        p.unlink()  # the copies depend on nothing in the source folder
    np.testing.assert_array_equal(run(other, feeds), expected)
    np.testing.assert_array_equal(run(same, feeds), expected)


def test_copy_keeps_a_self_contained_model_one_file(forced, tmp_path: Path) -> None:
    src = tmp_path / "given.onnx"
    onnx.save(mlp_proto(), str(src))  # over the threshold, but the user's file: a copy keeps its layout
    dest = tmp_path / "out" / "fp32.onnx"
    copy_onnx(src, dest)
    assert listing(dest.parent) == ["fp32.onnx"] and dest.read_bytes() == src.read_bytes()


def test_copy_merges_several_data_files_into_one(forced, tmp_path: Path) -> None:
    src = tmp_path / "given" / "model.onnx"
    src.parent.mkdir()
    onnx.save(mlp_proto(), str(src), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(files_of(src)) == 4
    dest = tmp_path / "art" / "fp32.onnx"
    copy_onnx(src, dest)
    assert_external_artifact(dest, every_large_tensor=True)
    feeds = batches(8, 8)[0]
    np.testing.assert_array_equal(run(dest, feeds), run(src, feeds))


def test_identity_covers_the_data_file_and_not_its_name(forced, tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx"
    save_onnx(mlp_proto(seed=0), a)
    save_onnx(mlp_proto(seed=1), b)  # same graph, other weights
    assert sha256_file(a) == sha256_file(b), "the .onnx alone cannot tell these models apart"
    assert onnx_sha256(a) != onnx_sha256(b)
    renamed = tmp_path / "c" / "other.onnx"
    copy_onnx(a, renamed)
    assert sha256_file(renamed) != sha256_file(a) and onnx_sha256(renamed) == onnx_sha256(a)
    data = tmp_path / "a" / "m.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[-1] ^= 1
    data.write_bytes(bytes(blob))
    assert onnx_sha256(a) != onnx_sha256(renamed)
    single = tmp_path / "single.onnx"
    onnx.save(mlp_proto(), str(single))
    assert onnx_sha256(single) == sha256_file(single)  # what existing tags and cache keys hold


def test_a_self_contained_model_is_hashed_without_parsing_it(forced, tmp_path: Path, monkeypatch) -> None:
    """A file without the bytes `location` cannot name external data: onnx_sha256 is its bytes' sha256, read once,
    the model never parsed (optimize serve's start imports no onnx for it); a file that has them is parsed."""
    import optimize.onnx_files as onnx_files_mod

    single, external = tmp_path / "single.onnx", tmp_path / "ext" / "m.onnx"
    onnx.save(mlp_proto(), str(single))
    save_onnx(mlp_proto(), external)  # `forced`: its weights go to m.onnx.data
    with_data = onnx_sha256(external)
    parsed = []
    real_proto = onnx_files_mod._proto
    monkeypatch.setattr(onnx_files_mod, "_proto", lambda path: parsed.append(path) or real_proto(path))
    onnx_files_mod._file_external_data_names.cache_clear()
    assert onnx_sha256(single) == sha256_file(single) and parsed == []
    assert onnx_sha256(external) == with_data and parsed, "a model with external data is parsed"


def test_a_data_location_outside_the_model_folder_is_refused(forced, tmp_path: Path) -> None:
    dest = tmp_path / "m.onnx"
    save_onnx(mlp_proto(), dest)
    model = onnx.load(str(dest), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secrets.bin"
    evil = tmp_path / "evil.onnx"
    evil.write_bytes(model.SerializeToString())
    with pytest.raises(ValueError, match="outside the model's folder"):
        copy_onnx(evil, tmp_path / "out" / "m.onnx")
    assert not (tmp_path / "out" / "m.onnx").exists()


# --- pipeline level (needs the pipeline.py change described in the issue-7 external-data note) --------

WIDE_MODULE = textwrap.dedent(
    '''
    """An MLP with one input `x` (N, 8) and output `logits` (N, 4), wide enough for 1 KiB of external data
    in every precision (fc1: 8×256 weights)."""
    import torch


    class WideNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(8, 256)
            self.fc2 = torch.nn.Linear(256, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))


    def build():
        torch.manual_seed(0)
        return WideNet().eval(), {"x": torch.randn(2, 8, generator=torch.Generator().manual_seed(1))}
    '''
)


def test_pipeline_external_data_end_to_end_and_from_the_cache(forced, tiny_dir: Path) -> None:
    from optimize import pipeline

    (tiny_dir / "widenet.py").write_text(WIDE_MODULE)
    variants = [
        {"name": "fp16", "kind": "fp16", "backend": "onnxruntime"},
        {"name": "int8", "kind": "int8", "backend": "onnxruntime", "calibration": "calib"},
    ]
    recipe = merge(
        tiny_recipe(),
        {
            "model": {"entry_point": "widenet:build"},
            "precision": {"variants": variants},
            "data": {"calib": {"kind": "npz", "path": "tiny-calib.npz", "batch_size": 16}},
            "gates": ["accuracy.cosine_min >= 0.9", "size.ratio <= 2.0"],
        },
    )
    path = tiny_dir / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def one_run() -> tuple[Path, dict, dict, dict]:
        result = pipeline.run(path, pipeline.RunOptions(runs_dir=tiny_dir / "runs", quiet=True, register=False))
        docs = [json.loads((result.run_dir / f).read_text()) for f in ("manifest.json", "metrics.json", "verdict.json")]
        return result.run_dir, *docs

    run1, manifest1, metrics1, verdict1 = one_run()
    assert verdict1["status"] == "passed"
    assert [v for v, s in verdict1["variants"].items() if s["status"] == "passed"] == ["fp16", "int8"]
    feeds = {"x": np.random.default_rng(5).standard_normal((4, 8)).astype(np.float32)}
    outputs = {}
    for name, meta in metrics1["variants"].items():
        artifact = run1 / meta["path"]
        assert_external_artifact(artifact)
        assert meta["sha256"] == onnx_sha256(artifact), name  # the identity covers the weights
        assert meta["size_bytes"] == onnx_size_bytes(artifact), name  # size gates count the data file
        if name == "fp32":  # the baseline is not registered
            continue
        registered = run1 / "registry" / name / "model.onnx"
        assert_external_artifact(registered)
        assert json.loads((registered.parent / "optimize.json").read_text())["sha256"] == onnx_sha256(registered)
        outputs[name] = run(registered, feeds)
        np.testing.assert_array_equal(outputs[name], run(artifact, feeds))

    run2, manifest2, metrics2, verdict2 = one_run()
    assert run2 != run1
    assert all(e["hit"] for e in manifest2["cache"]), manifest2["cache"]
    assert metrics2 == metrics1 and verdict2 == verdict1
    for name, meta in metrics2["variants"].items():
        artifact = run2 / meta["path"]
        assert_external_artifact(artifact)  # restored from the cache with its data file
        assert onnx_sha256(artifact) == meta["sha256"]
        if name == "fp32":
            continue
        registered = run2 / "registry" / name / "model.onnx"
        assert_external_artifact(registered)
        np.testing.assert_array_equal(run(registered, feeds), outputs[name])

    # The registry carries model.onnx.data; smoke and promote verify the identity that covers it.
    from optimize import registry
    from optimize.registry import promotion
    from optimize.registry.smoke import smoke

    uri = f"sqlite:///{tiny_dir / 'mlflow.db'}"
    assert registry.publish(run2, uri).versions == {"fp16": 1, "int8": 2}
    checked = smoke("models:/tiny@candidate", tracking_uri=uri)
    assert checked["sha256"] == metrics2["variants"]["fp16"]["sha256"]
    moved = promotion.promote("tiny", "canary", version=2, tracking_uri=uri)
    assert moved["sha256"] == metrics2["variants"]["int8"]["sha256"]
