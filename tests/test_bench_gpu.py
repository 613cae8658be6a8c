"""GPU timing and memory: trtexec-style statistics and warnings on synthetic samples, the CUDA-event protocol
on fake events (CPU), and, marked `gpu`, the torch-cuda runner, real CUDA events and the memory readings
on a CUDA machine (`pytest -m gpu`; skipped where torch sees no CUDA device).

Imports only torch, numpy, pydantic and our modules at import time (no onnx, no MLflow), so the GPU
tests run on a bare CUDA image.
"""

from __future__ import annotations

import gc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import mlp

from optimize import bench
from optimize.errors import StageError
from optimize.recipe import BenchmarkSection
from optimize.runtimes import DeviceRunner, TensorSpec, TorchArtifact, open_runner
from optimize.runtimes.torch import TorchCudaRunner, TorchRunner

HAS_CUDA = torch.cuda.is_available()


def cuda_test(f: Any) -> Any:
    """Mark a test `gpu` (deselected by default) and skip it where torch sees no CUDA device, even when
    selected with `-m gpu`."""
    f = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")(f)
    return pytest.mark.gpu(f)


def series(n: int = 10, **over: Any) -> dict[str, list[float]]:
    """Synthetic time_device samples (ms) of a healthy GPU run: compute-bound, steady."""
    base = {"latency": 1.2, "gpu_compute": 1.0, "h2d": 0.1, "d2h": 0.1, "enqueue": 0.05, "wall": 1.25}
    return {k: list(over.get(k, [base[k]] * n)) for k in base}


# --- device_latency_stats ----------------------------------------------------------------------------


def test_device_stats_have_the_host_stats_keys_on_latency() -> None:
    latency = [1.0, 2.0, 3.0, 4.0]
    s = bench.device_latency_stats(series(4, latency=latency), batch=8)
    host = bench.latency_stats([int(x * 1e6) for x in latency], batch=8)
    assert set(host) - {"timing"} <= set(s)
    for k in ("iterations", "mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "min_ms", "max_ms", "std_ms", "cv"):
        assert s[k] == pytest.approx(host[k], rel=1e-12), k
    assert s["timing"] == "cuda-events"


def test_device_stats_throughput_is_over_host_wall_time() -> None:
    s = bench.device_latency_stats(series(4, wall=[2.0, 2.0, 4.0, 4.0]), batch=6)
    assert s["wall_ms"] == 3.0
    assert s["items_per_s"] == pytest.approx(6 / 0.003)  # not over the 1.2 ms latency
    assert s["mean_ms"] == pytest.approx(1.2)


def test_device_stats_gpu_compute_and_phase_means() -> None:
    compute = [1.0, 1.0, 1.0, 1.4]
    s = bench.device_latency_stats(
        series(4, gpu_compute=compute, h2d=[0.1, 0.3, 0.1, 0.3], d2h=[0.05] * 4, enqueue=[0.01, 0.03, 0.01, 0.03]),
        batch=1,
    )
    gpu = s["gpu_compute"]
    assert set(gpu) == {"mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "cv"}
    assert gpu["mean_ms"] == pytest.approx(1.1) and gpu["p50_ms"] == pytest.approx(1.0)
    assert gpu["p99_ms"] == pytest.approx(np.percentile(compute, 99))
    assert gpu["cv"] == pytest.approx(np.std(compute, ddof=1) / 1.1)
    assert s["h2d_ms"] == pytest.approx(0.2) and s["d2h_ms"] == pytest.approx(0.05)
    assert s["enqueue_ms"] == pytest.approx(0.02)


def test_a_healthy_run_has_no_warning() -> None:
    assert bench.device_latency_stats(series(), batch=1)["warnings"] == []


def test_unstable_gpu_compute_warns_above_two_and_a_half_percent() -> None:
    steady = [1.0, 1.02, 0.98, 1.0]  # CV 1.6 %: trtexec (1 %) would warn, our 2.5 % does not
    noisy = [1.0, 1.05, 0.95, 1.0]  # CV 4.1 %
    assert bench.device_latency_stats(series(4, gpu_compute=steady), batch=1)["warnings"] == []
    warnings = bench.device_latency_stats(series(4, gpu_compute=noisy), batch=1)["warnings"]
    assert warnings == [
        "GPU compute time is unstable, with coefficient of variation = 4.08% (> 2.5%); "
        "locking the GPU clock frequency may improve the stability"
    ]
    # a looser threshold (the caller's) silences it
    assert bench.device_latency_stats(series(4, gpu_compute=noisy), batch=1, cv_warn=0.05)["warnings"] == []


def test_enqueue_bound_warns_above_80_percent_of_gpu_compute() -> None:
    assert bench.device_latency_stats(series(enqueue=[0.8] * 10), batch=1)["warnings"] == []  # 80 %: not above
    (warning,) = bench.device_latency_stats(series(enqueue=[0.9] * 10), batch=1)["warnings"]
    assert warning == (
        "throughput may be bound by enqueue time rather than GPU compute and the GPU may be under-utilized "
        "(median enqueue 0.9 ms > 80% of median GPU compute 1 ms); CUDA graphs may increase the throughput"
    )


def test_transfer_bound_warns_per_direction_at_or_above_gpu_compute() -> None:
    assert bench.device_latency_stats(series(h2d=[0.99] * 10, d2h=[0.99] * 10), batch=1)["warnings"] == []
    warnings = bench.device_latency_stats(series(h2d=[1.0] * 10, d2h=[3.0] * 10), batch=1)["warnings"]
    assert warnings == [
        "throughput may be bound by host-to-device transfers for the inputs rather than GPU compute and the GPU "
        "may be under-utilized (median H2D 1 ms >= median GPU compute 1 ms)",
        "throughput may be bound by device-to-host transfers for the outputs rather than GPU compute and the GPU "
        "may be under-utilized (median D2H 3 ms >= median GPU compute 1 ms)",
    ]


def test_the_warnings_use_medians_as_trtexec_does() -> None:
    # one slow copy among ten moves the mean above the compute time, not the median
    h2d = [0.1] * 9 + [20.0]
    assert bench.device_latency_stats(series(h2d=h2d), batch=1)["warnings"] == []


def test_add_speedups_adds_the_gpu_compute_ratio_on_device_stats() -> None:
    base = bench.device_latency_stats(series(gpu_compute=[2.0] * 10), batch=1)
    fast = bench.device_latency_stats(series(gpu_compute=[0.5] * 10), batch=1)
    assert bench.add_speedups(fast, base)["gpu_compute_p50_speedup"] == pytest.approx(4.0)
    host = bench.latency_stats([1_000_000], batch=1)
    assert "gpu_compute_p50_speedup" not in bench.add_speedups(host, host)


# --- time_device on fake CUDA events -----------------------------------------------------------------


class FakeStream:
    """A stream whose GPU clock (ms) advances by what the fake runner enqueues; synchronising costs host time."""

    def __init__(self, clock: list[int], wait_ns: int) -> None:
        self.t_ms = 0.0
        self.clock, self.wait_ns = clock, wait_ns
        self.syncs = 0

    def synchronize(self) -> None:
        self.syncs += 1
        self.clock[0] += self.wait_ns


class FakeEvent:
    def __init__(self) -> None:
        self.t_ms: float | None = None

    def record(self, stream: FakeStream) -> None:
        self.t_ms = stream.t_ms

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.t_ms is not None and end.t_ms is not None
        return end.t_ms - self.t_ms


class FakeDeviceRunner(DeviceRunner):
    def __init__(self, name: str, log: list[str], clock: list[int], h2d: float, compute: float, d2h: float) -> None:
        self.name, self.log, self.clock = name, log, clock
        self.h2d, self.compute_ms, self.d2h = h2d, compute, d2h
        self.stream = FakeStream(clock, wait_ns=5_000)
        self.inputs = [TensorSpec("x", "float32", ("batch", 2))]
        self.outputs: list[TensorSpec] = []
        self.feeds_seen: list[dict[str, np.ndarray]] = []

    def prepare(self, feeds: dict[str, np.ndarray]) -> None:
        self.log.append(self.name)
        self.feeds_seen.append(feeds)

    def stage(self) -> None:
        self.stream.t_ms += self.h2d

    def compute(self) -> None:
        self.clock[0] += 700  # enqueueing costs host time
        self.stream.t_ms += self.compute_ms

    def fetch(self) -> None:
        self.stream.t_ms += self.d2h

    def outputs_host(self) -> dict[str, np.ndarray]:
        return {}


@pytest.fixture()
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A fake host clock (each read costs 1 ns) and fake CUDA events."""
    clock = [0]

    def perf_counter_ns() -> int:
        clock[0] += 1
        return clock[0]

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter_ns=perf_counter_ns))
    monkeypatch.setattr(bench, "_timing_event", FakeEvent)
    return clock


def test_time_device_brackets_each_phase_with_events_and_the_host_clocks(fake_cuda: list[int]) -> None:
    log: list[str] = []
    runner = FakeDeviceRunner("fp32", log, fake_cuda, h2d=0.25, compute=2.0, d2h=0.5)
    out = bench.time_device({"fp32": runner}, [{"x": np.zeros((1, 2))}], warmup=2, iterations=3)
    s = out["fp32"]
    assert list(s) == ["latency", "gpu_compute", "h2d", "d2h", "enqueue", "wall"]
    assert s["latency"] == [2.75] * 3 and s["gpu_compute"] == [2.0] * 3
    assert s["h2d"] == [0.25] * 3 and s["d2h"] == [0.5] * 3
    assert s["enqueue"] == [701 / 1e6] * 3  # compute()'s host cost and one clock read
    # the iteration: enqueue, the stream wait, and the clock reads after t0 — nothing outside it
    assert s["wall"] == [(700 + 5_000 + 3) / 1e6] * 3
    assert runner.stream.syncs == 2 + 3  # warm-up runs synchronise too (DeviceRunner.run)


def test_time_device_rotates_order_and_input_sets(fake_cuda: list[int]) -> None:
    log: list[str] = []
    runners = {n: FakeDeviceRunner(n, log, fake_cuda, 0.1, 1.0, 0.1) for n in ("a", "b", "c")}
    sets = [{"x": np.full((1, 2), k)} for k in range(2)]
    bench.time_device(runners, sets, warmup=1, iterations=3)
    assert log == ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    for r in runners.values():
        assert [int(f["x"][0, 0]) for f in r.feeds_seen] == [0] + [0, 1, 0]


def test_run_shapes_times_gpu_runners_with_cuda_events(fake_cuda: list[int]) -> None:
    log: list[str] = []
    runners = {
        "fp32": FakeDeviceRunner("fp32", log, fake_cuda, h2d=0.1, compute=4.0, d2h=0.1),
        "fp16": FakeDeviceRunner("fp16", log, fake_cuda, h2d=0.1, compute=1.0, d2h=0.1),
    }
    spec = BenchmarkSection(shapes=[{"batch": 4}], warmup=1, iterations=5, cv_warn=0.05)
    samples = [{"x": np.ones((2, 2), np.float32)}, {"x": np.zeros((2, 2), np.float32)}]
    out = bench.run_shapes(runners, spec, samples, baseline="fp32")
    fp16 = out["fp16"]["batch=4"]
    assert fp16["timing"] == "cuda-events" and fp16["warnings"] == []
    assert fp16["mean_ms"] == pytest.approx(1.2) and fp16["gpu_compute"]["p50_ms"] == pytest.approx(1.0)
    assert fp16["p50_speedup"] == pytest.approx(4.2 / 1.2)
    assert fp16["gpu_compute_p50_speedup"] == pytest.approx(4.0)
    assert fp16["cv_warning"] is False
    assert [f["x"][0, 0] for f in runners["fp16"].feeds_seen] == [1, 1, 0, 1, 0, 1]


def test_run_shapes_warns_on_gpu_compute_cv_at_the_smaller_threshold(
    fake_cuda: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = FakeDeviceRunner("fp32", [], fake_cuda, 0.1, 1.0, 0.1)
    calls: list[float] = []
    real = bench.device_latency_stats

    def spy(samples: dict[str, list[float]], batch: int, cv_warn: float = bench.GPU_CV_WARN) -> dict[str, Any]:
        calls.append(cv_warn)
        return real(samples, batch, cv_warn)

    monkeypatch.setattr(bench, "device_latency_stats", spy)
    sample = [{"x": np.ones((1, 2), np.float32)}]
    for cv_warn in (0.05, 0.004):
        spec = BenchmarkSection(shapes=[{"batch": 1}], warmup=0, iterations=2, cv_warn=cv_warn)
        bench.run_shapes({"fp32": runner}, spec, sample, baseline="fp32")
    assert calls == [0.025, 0.004]  # GPU_CV_WARN (2.5 %), or the recipe's cv_warn where it is stricter


def test_run_shapes_refuses_gpu_and_host_runners_together(fake_cuda: list[int]) -> None:
    class HostRunner:
        inputs = [TensorSpec("x", "float32", ("batch", 2))]

        def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {}

    runners: dict[str, Any] = {"fp32": HostRunner(), "fp16": FakeDeviceRunner("fp16", [], fake_cuda, 0.1, 1.0, 0.1)}
    spec = BenchmarkSection(shapes=[{"batch": 1}], warmup=0, iterations=1)
    with pytest.raises(StageError) as info:
        bench.run_shapes(runners, spec, [{"x": np.ones((1, 2), np.float32)}], baseline="fp32")
    assert info.value.exit_code == 3
    assert str(info.value).startswith("benchmark: fp16 run on a GPU and fp32 on the host; ")


# --- memory of the torch targets ---------------------------------------------------------------------


def test_torch_cpu_memory_is_not_measured_and_says_so() -> None:
    artifact = TorchArtifact(torch.nn.Identity(), [], [])
    assert bench.measure_memory("torch-cpu", artifact, {}, None) == {
        "note": "not measured: torch-cpu runs in the pipeline's own process"
    }


def test_torch_target_memory_needs_a_torch_artifact(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="measures a TorchArtifact, not PosixPath"):
        bench.measure_memory("torch-cuda", tmp_path / "m.onnx", {}, None)


@pytest.mark.skipif(HAS_CUDA, reason="torch sees a CUDA device here")
def test_gpu_probe_without_cuda_reports_no_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnx")
    from test_bench import tiny_onnx

    path = tiny_onnx(tmp_path / "m.onnx", width=8)
    # time the probe's GPU path on a CPU runtime: torch cannot initialise CUDA here
    monkeypatch.setattr(bench, "GPU_TARGETS", ("onnxruntime-cpu",))
    mem = bench.measure_memory("onnxruntime-cpu", path, {"x": np.ones((2, 8), np.float32)}, None)
    assert mem["rss_peak_mb"] > 0
    assert mem["gpu_peak_mb"] is None and mem["gpu_context_mb"] is None and mem["gpu_session_mb"] is None
    assert mem["gpu_memory_note"].startswith("not measured: torch cannot initialise CUDA in the probe (")


# --- on a CUDA machine ---------------------------------------------------------------------------------


def square_mlp(width: int, depth: int) -> torch.nn.Module:
    """`depth` square Linear layers with ReLU between, weights from N(0, 1/width); a second output: the argmax
    (int64)."""
    return mlp(*[width] * (depth + 1), init_std=width**-0.5, argmax=True)


def mlp_io(width: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    return [TensorSpec("x", "float32", ("batch", width))], [
        TensorSpec("y", "float32", ("batch", width)),
        TensorSpec("idx", "int64", ("batch",)),
    ]


def gaussian(rows: int, width: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)}


@pytest.fixture()
def no_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    """FP32 matrix products in full FP32 (TF32 rounds to 10 mantissa bits)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@cuda_test
def test_cuda_fp32_matches_the_cpu_runner(no_tf32: None) -> None:
    module = square_mlp(256, 3)
    inputs, outputs = mlp_io(256)
    cpu = TorchRunner(module, inputs, outputs)
    with open_runner("torch-cuda", TorchArtifact(module, inputs, outputs)) as gpu:
        assert isinstance(gpu, TorchCudaRunner) and isinstance(gpu, DeviceRunner)
        for rows, seed in ((3, 0), (17, 1), (3, 2)):  # the buffers are reallocated, then reused
            feeds = gaussian(rows, 256, seed)
            want, got = cpu.run(feeds), gpu.run(feeds)
            assert got["y"].dtype == np.float32 and got["idx"].dtype == np.int64
            np.testing.assert_allclose(got["y"], want["y"], rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(got["idx"], got["y"].argmax(-1))  # near-ties may flip against the CPU
        got["y"][:] = 0  # outputs are copies, not views of the pinned buffers
        assert np.abs(gpu.run(feeds)["y"]).max() > 0
    # the caller's module was copied, not moved
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in module.parameters())


@cuda_test
def test_cuda_fp16_autocast_is_close_to_fp32_and_returns_float32() -> None:
    module = square_mlp(256, 3)
    inputs, outputs = mlp_io(256)
    feeds = gaussian(32, 256, 3)
    want = TorchRunner(module, inputs, outputs).run(feeds)
    with TorchCudaRunner(module, inputs, outputs, precision="fp16") as gpu:
        got = gpu.run(feeds)
    assert got["y"].dtype == np.float32
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-2, atol=1e-2)
    assert not np.array_equal(got["y"], want["y"])


@cuda_test
def test_cuda_phases_are_the_same_as_run() -> None:
    module = square_mlp(64, 2)
    inputs, outputs = mlp_io(64)
    feeds = gaussian(4, 64, 0)
    with TorchCudaRunner(module, inputs, outputs) as gpu:
        whole = gpu.run(feeds)
        gpu.prepare(feeds)
        gpu.stage()
        gpu.compute()
        gpu.fetch()
        gpu.stream.synchronize()
        phased = gpu.outputs_host()
    np.testing.assert_array_equal(whole["y"], phased["y"])


BIG = 4096  # 3 × 4096² FP32 weights = 192 MiB: long enough on the GPU for events to measure


@cuda_test
def test_time_device_gives_positive_ordered_numbers_with_real_cuda_events() -> None:
    module = square_mlp(BIG, 3)
    inputs, outputs = mlp_io(BIG)
    sets = [gaussian(256, BIG, seed) for seed in range(2)]
    with TorchCudaRunner(module, inputs, outputs) as gpu:
        s = bench.time_device({"fp32": gpu}, sets, warmup=3, iterations=10)["fp32"]
    assert all(len(v) == 10 and all(x > 0 for x in v) for v in s.values())
    for i in range(10):
        assert s["gpu_compute"][i] <= s["latency"][i]
        assert s["latency"][i] == pytest.approx(s["h2d"][i] + s["gpu_compute"][i] + s["d2h"][i], rel=1e-3, abs=5e-3)
        assert s["latency"][i] <= s["wall"][i] + 0.05  # the host waited for the whole of it
    stats = bench.device_latency_stats(s, batch=256)
    assert stats["gpu_compute"]["mean_ms"] > 0.05  # a 26 GFLOP forward is not free
    assert stats["timing"] == "cuda-events"


@cuda_test
def test_run_shapes_fp16_autocast_is_faster_than_fp32_on_a_big_mlp(no_tf32: None) -> None:
    module = square_mlp(BIG, 3)
    inputs, outputs = mlp_io(BIG)
    spec = BenchmarkSection(shapes=[{"batch": 256}], warmup=5, iterations=30)
    samples = [gaussian(256, BIG, seed) for seed in range(2)]
    runners = {
        "fp32": TorchCudaRunner(module, inputs, outputs, "fp32"),
        "fp16": TorchCudaRunner(module, inputs, outputs, "fp16"),
    }
    try:
        out = bench.run_shapes(runners, spec, samples, baseline="fp32")
    finally:
        for r in runners.values():
            r.close()
    fp16 = out["fp16"]["batch=256"]
    assert fp16["timing"] == "cuda-events"
    assert fp16["gpu_compute_p50_speedup"] > 1
    assert fp16["p50_speedup"] > 1 and fp16["throughput_speedup"] > 1


@cuda_test
def test_torch_cuda_memory_peak_is_about_the_weights() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    module = square_mlp(BIG, 3)
    inputs, outputs = mlp_io(BIG)
    with TorchCudaRunner(module, inputs, outputs) as gpu:
        weights_mb = gpu.device_memory()["torch_weights_mb"]
        mem = bench.measure_torch_cuda_memory(gpu, gaussian(8, BIG, 0))
    assert weights_mb == pytest.approx(3 * (BIG * BIG + BIG) * 4 / 2**20)
    assert mem["torch_weights_mb"] == weights_mb
    assert weights_mb <= mem["torch_allocated_before_mb"] <= mem["torch_peak_allocated_mb"]
    # Activations of 8 rows are tiny; the first GEMM also takes cuBLAS's workspace from torch's allocator
    # (32 MiB on Hopper: measured +33.5 MB on an H200). What the process held before (earlier tests' tensors
    # in a shared pytest process) is in `torch_allocated_before_mb`, not in this difference.
    assert mem["torch_peak_allocated_mb"] - mem["torch_allocated_before_mb"] < 48
    assert mem["torch_peak_reserved_mb"] >= mem["torch_peak_allocated_mb"]
    if mem["gpu_process_peak_mb"] is None:
        assert "torch-cuda is measured in the pipeline's own process; " in mem["gpu_memory_note"]
    else:  # NVML counts the context and the allocator's reserve too
        assert mem["gpu_process_peak_mb"] >= mem["torch_peak_reserved_mb"]


@cuda_test
def test_nvml_index_matches_the_cuda_device_by_uuid() -> None:
    from optimize.gpu import gpus

    found = gpus()
    if not found:
        pytest.skip("NVML sees no GPU here")
    index = bench.nvml_index(torch.cuda.current_device())
    uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid).lower().removeprefix("gpu-")
    assert found[index].uuid.lower().removeprefix("gpu-") == uuid


@cuda_test
def test_gpu_memory_probe_reads_the_context_and_the_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnx")
    from test_bench import tiny_onnx

    path = tiny_onnx(tmp_path / "m.onnx", width=256)
    # the probe's GPU path around a CPU session: the CUDA context is read, the session adds ~nothing on the GPU
    monkeypatch.setattr(bench, "GPU_TARGETS", ("onnxruntime-cpu",))
    mem = bench.measure_memory("onnxruntime-cpu", path, {"x": np.ones((4, 256), np.float32)}, None)
    assert {"rss_peak_mb", "rss_session_mb", "gpu_peak_mb", "gpu_context_mb", "gpu_session_mb"} <= set(mem)
    if mem["gpu_peak_mb"] is None:
        assert mem["gpu_memory_note"]
    else:
        assert mem["gpu_context_mb"] > 0 and mem["gpu_peak_mb"] >= mem["gpu_context_mb"]
        assert mem["gpu_session_mb"] == pytest.approx(mem["gpu_peak_mb"] - mem["gpu_context_mb"])
        assert mem["gpu_session_mb"] < 64
