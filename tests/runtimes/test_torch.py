"""torch runtimes on the CPU: the source module as a runner (FP32 and FP16 autocast), against ONNX Runtime
on the same exported model, through `open_runner` with a TorchArtifact; torch-cuda reported missing here."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mlp

from optimize.errors import RuntimeMissingError, StageError
from optimize.export import export_onnx
from optimize.models import load_model
from optimize.recipe import EntryPointModel, ExportSection
from optimize.runtimes import TensorSpec, TorchArtifact, open_runner, require, unavailable_reason
from optimize.runtimes import torch as torch_runtime
from optimize.runtimes.torch import TorchCudaRunner, TorchRunner, supports

X = TensorSpec("x", "float32", ("batch", 8))
LOGITS = TensorSpec("logits", "float32", ("batch", 4))
HAS_CUDA = torch.cuda.is_available()


def two_heads() -> torch.nn.Module:
    """One Linear 8×4, two outputs in a tuple: the float one and its argmax (int64)."""
    return mlp(8, 4, argmax=True)


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


@pytest.fixture()
def tiny(tiny_dir: Path):
    """The conftest's TinyNet, loaded as the pipeline loads it."""
    return load_model(EntryPointModel(source="entry_point", entry_point="tinynet:build", python_path=[tiny_dir]))


def test_cpu_runner_matches_the_module_and_onnx_runtime(tiny, tiny_dir: Path) -> None:
    loaded, path = tiny, tiny_dir / "tiny.onnx"
    spec = ExportSection(
        input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}
    )
    export_onnx(loaded, spec, path)
    x = rows(5)
    with open_runner("onnxruntime-cpu", path) as ort_runner:
        expected = ort_runner.run({"x": x})
        inputs, outputs = ort_runner.inputs, ort_runner.outputs
    with TorchRunner(loaded.module, inputs, outputs) as runner:
        assert runner.target == "torch-cpu" and runner.precision == "fp32"
        got = runner.run({"x": x})
    assert list(got) == ["logits"]
    assert got["logits"].dtype == np.float32 and got["logits"].shape == (5, 4)
    np.testing.assert_allclose(got["logits"], expected["logits"], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        direct = loaded.module(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got["logits"], direct)


def test_tuple_outputs_are_named_in_order_and_integers_pass_through() -> None:
    module = two_heads()
    outputs = [TensorSpec("y", "float32", ("batch", 4)), TensorSpec("idx", "int64", ("batch",))]
    x = rows(3)
    with TorchRunner(module, [X], outputs) as runner:
        out = runner.run({"x": x})
    assert list(out) == ["y", "idx"]
    assert out["idx"].dtype == np.int64
    np.testing.assert_array_equal(out["idx"], out["y"].argmax(-1))


def test_float_feeds_take_the_input_type() -> None:
    module = two_heads()
    outputs = [TensorSpec("y", "float32", ("batch", 4)), TensorSpec("idx", "int64", ("batch",))]
    x = rows(2)
    with TorchRunner(module, [X], outputs) as runner:
        from64 = runner.run({"x": x.astype(np.float64)})["y"]  # float64 would fail in a float32 Linear
        from32 = runner.run({"x": x})["y"]
    np.testing.assert_array_equal(from64, from32)


def test_wrong_output_count_and_missing_feed_are_stage_errors() -> None:
    module = two_heads()
    with TorchRunner(module, [X], [LOGITS]) as runner:
        with pytest.raises(StageError, match=r"returned 2 output\(s\), the model has 1 \(logits\)"):
            runner.run({"x": rows(1)})
        with pytest.raises(StageError, match="no feed for input 'x'"):
            runner.run({"y": rows(1)})


def test_the_runner_leaves_the_module_as_it_was() -> None:
    module = two_heads()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    outputs = [TensorSpec("y", "float32", ("batch", 4)), TensorSpec("idx", "int64", ("batch",))]
    with TorchRunner(module, [X], outputs, precision="fp16") as runner:
        runner.run({"x": rows(2)})
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert not module.training


# --- FP16 autocast on the CPU ------------------------------------------------------------------------
# Decision: torch 2.13's CPU autocast runs FP16 (Linear, conv, bmm, attention in float16), so torch-cpu
# FP16 is FP16, as asked — not BF16. A torch whose CPU autocast cannot is refused (exit 4), never run
# in FP32 under an FP16 name.


def test_fp16_autocast_on_the_cpu_runs_in_float16_and_returns_float32(tiny) -> None:
    loaded = tiny
    x = rows(64, seed=3)
    with (
        TorchRunner(loaded.module, [X], [LOGITS]) as fp32,
        TorchRunner(loaded.module, [X], [LOGITS], "torch-cpu", "fp16") as fp16,
    ):
        a, b = fp32.run({"x": x})["logits"], fp16.run({"x": x})["logits"]
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-2)
    assert not np.array_equal(a, b)  # FP16 arithmetic: not the FP32 numbers
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):
        fc1 = loaded.module.fc1(torch.from_numpy(x))
    assert fc1.dtype == torch.float16


def test_fp16_is_refused_where_cpu_autocast_would_not_run_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # an older torch disables CPU autocast for float16 with a warning and computes in FP32
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())
    with pytest.raises(RuntimeMissingError) as info:
        TorchRunner(two_heads(), [X], [LOGITS], precision="fp16")
    assert info.value.exit_code == 4
    assert "FP16" in str(info.value) and "torch.float32" in str(info.value)


def test_int8_is_not_a_torch_precision() -> None:
    assert supports("fp32") is None and supports("fp16") is None
    reason = supports("int8")
    assert reason == (
        "the torch targets run the source model in FP32 or FP16 autocast; INT8 variants are ONNX artifacts"
    )
    with pytest.raises(StageError, match="INT8 variants are ONNX artifacts"):
        TorchRunner(two_heads(), [X], [LOGITS], precision="int8")


def test_torch_runner_is_the_cpu_runner_only() -> None:
    with pytest.raises(StageError, match="use TorchCudaRunner"):
        TorchRunner(two_heads(), [X], [LOGITS], target="torch-cuda")


# --- open_runner, availability -------------------------------------------------------------------------


def test_open_runner_takes_a_torch_artifact(tiny) -> None:
    loaded = tiny
    artifact = TorchArtifact(loaded.module, [X], [LOGITS], "fp32")
    with open_runner("torch-cpu", artifact) as runner:
        assert isinstance(runner, TorchRunner)
        assert runner.inputs == [X] and runner.outputs == [LOGITS]
        assert runner.run({"x": rows(2)})["logits"].shape == (2, 4)
    assert runner.module is None  # closed
    assert loaded.module is not None


def test_open_runner_threads_set_torchs_process_wide_thread_count(tiny) -> None:
    loaded = tiny
    before = torch.get_num_threads()
    try:
        with open_runner("torch-cpu", TorchArtifact(loaded.module, [X], [LOGITS]), threads=1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1  # process-wide: it outlives the runner (documented)
    finally:
        torch.set_num_threads(before)


def test_open_runner_refuses_a_file_on_a_torch_target_and_a_module_elsewhere(tiny, tmp_path: Path) -> None:
    loaded = tiny
    with pytest.raises(StageError, match="target torch-cpu runs a TorchArtifact"):
        open_runner("torch-cpu", tmp_path / "model.onnx")
    with pytest.raises(StageError, match="target onnxruntime-cpu runs a model file, not TorchArtifact"):
        open_runner("onnxruntime-cpu", TorchArtifact(loaded.module, [X], [LOGITS]))


def test_torch_cpu_is_available() -> None:
    assert unavailable_reason("torch-cpu") is None
    require("torch-cpu", "test")


def test_unknown_torch_target() -> None:
    assert "unknown torch target 'torch-rocm'" in (unavailable_reason("torch-rocm") or "")


@pytest.mark.skipif(HAS_CUDA, reason="torch sees a CUDA device here")
def test_torch_cuda_is_missing_here_with_the_reason() -> None:
    reason = unavailable_reason("torch-cuda")
    assert reason is not None and "CUDA" in reason and torch.__version__ in reason
    with pytest.raises(RuntimeMissingError) as info:
        open_runner("torch-cuda", TorchArtifact(two_heads(), [X], [LOGITS]))
    assert info.value.exit_code == 4 and "torch-cuda" in str(info.value)
    with pytest.raises(RuntimeMissingError, match="CUDA"):
        TorchCudaRunner(two_heads(), [X], [LOGITS])


def test_torch_cuda_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    assert torch_runtime.unavailable_reason("torch-cuda") == (
        f"torch {torch.__version__} has no CUDA (a CPU-only build); install a CUDA build of torch"
    )
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_runtime.unavailable_reason("torch-cuda") == (
        f"no CUDA device visible to torch {torch.__version__} (CUDA 13.0)"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_runtime.unavailable_reason("torch-cuda") is None


def test_torch_artifact_names_no_torch_at_import() -> None:
    import subprocess
    import sys

    code = "import sys, optimize.runtimes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
