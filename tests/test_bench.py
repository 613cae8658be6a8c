"""Benchmark protocol: feeds of a shape from real samples, statistics, interleaved timing, memory probe.

No test asserts a measured duration: the clock is faked where the arithmetic matters.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimize import bench
from optimize.errors import RecipeError, StageError
from optimize.runtimes import TensorSpec, open_runner

IDS = TensorSpec("input_ids", "int64", ("batch", "sequence"))
MASK = TensorSpec("attention_mask", "int64", ("batch", "sequence"))


def tiny_onnx(path: Path, width: int = 256) -> Path:
    """y = relu(x @ W) with x: (batch, width) float32 and a width×width weight (so a session holds memory)."""
    w = np.random.default_rng(0).standard_normal((width, width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Relu", ["xw"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(w, "W")],
    )
    # IR 9: loadable by every ONNX Runtime we meet (a GPU image's 1.30 refused the newer default of onnx 1.23)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))
    return path


# --- shape_key / make_feeds ----------------------------------------------------------------------


def test_shape_key_keeps_the_recipe_order() -> None:
    assert bench.shape_key({"batch": 16, "sequence": 64}) == "batch=16,sequence=64"
    assert bench.shape_key({"batch": 1}) == "batch=1"


def test_make_feeds_crops_each_axis_from_the_sample() -> None:
    sample = {"input_ids": np.arange(40, dtype=np.int64).reshape(4, 10)}
    feeds = bench.make_feeds([IDS], {"batch": 2, "sequence": 3}, sample, "benchmark.shapes[0]")
    np.testing.assert_array_equal(feeds["input_ids"], [[0, 1, 2], [10, 11, 12]])


def test_make_feeds_tiles_each_axis_when_the_shape_is_longer() -> None:
    sample = {"input_ids": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)}
    feeds = bench.make_feeds([IDS], {"batch": 5, "sequence": 7}, sample, "w")
    expected = sample["input_ids"][np.ix_([0, 1, 0, 1, 0], [0, 1, 2, 0, 1, 2, 0])]
    np.testing.assert_array_equal(feeds["input_ids"], expected)
    assert feeds["input_ids"].shape == (5, 7)


def test_make_feeds_crops_one_axis_and_tiles_another() -> None:
    sample = {"input_ids": np.arange(12, dtype=np.int64).reshape(3, 4)}
    feeds = bench.make_feeds([IDS], {"batch": 1, "sequence": 6}, sample, "w")
    np.testing.assert_array_equal(feeds["input_ids"], [[0, 1, 2, 3, 0, 1]])


def test_make_feeds_binds_every_input_from_the_same_shape() -> None:
    rng = np.random.default_rng(0)
    sample = {
        "input_ids": rng.integers(0, 100, (16, 64)),
        "attention_mask": np.ones((16, 64), dtype=np.int64),
        "unused": np.zeros(3),
    }
    feeds = bench.make_feeds([IDS, MASK], {"batch": 1, "sequence": 32, "other": 9}, sample, "w")
    assert list(feeds) == ["input_ids", "attention_mask"]
    assert {k: v.shape for k, v in feeds.items()} == {"input_ids": (1, 32), "attention_mask": (1, 32)}
    np.testing.assert_array_equal(feeds["input_ids"], sample["input_ids"][:1, :32])


def test_make_feeds_keeps_static_dims() -> None:
    spec = TensorSpec("image", "float32", ("batch", 1, 3))
    sample = {"image": np.arange(2 * 1 * 5, dtype=np.float32).reshape(2, 1, 5)}
    # a static dim comes from the model, not the shape dict, even when the shape names the same size
    feeds = bench.make_feeds([spec], {"batch": 3}, sample, "w")
    assert feeds["image"].shape == (3, 1, 3)
    np.testing.assert_array_equal(feeds["image"][2], sample["image"][0, :, :3])


def test_make_feeds_casts_to_the_input_dtype_and_is_contiguous() -> None:
    spec = TensorSpec("x", "float16", ("batch", 4))
    sample = {"x": np.linspace(0, 1, 12, dtype=np.float64).reshape(3, 4)}
    feeds = bench.make_feeds([spec], {"batch": 2}, sample, "w")
    assert feeds["x"].dtype == np.float16
    assert feeds["x"].flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(feeds["x"], sample["x"][:2].astype(np.float16))
    ints = bench.make_feeds([TensorSpec("x", "int32", ("batch", 4))], {"batch": 1}, {"x": np.ones((1, 4))}, "w")
    assert ints["x"].dtype == np.int32


def test_make_feeds_does_not_modify_the_sample() -> None:
    sample = {"input_ids": np.arange(6, dtype=np.int64).reshape(2, 3)}
    before = sample["input_ids"].copy()
    feeds = bench.make_feeds([IDS], {"batch": 2, "sequence": 3}, sample, "w")
    feeds["input_ids"][:] = -1
    np.testing.assert_array_equal(sample["input_ids"], before)


def test_make_feeds_missing_axis_is_a_recipe_error_naming_axis_and_input() -> None:
    sample = {"attention_mask": np.ones((2, 8), dtype=np.int64)}
    with pytest.raises(RecipeError) as info:
        bench.make_feeds([MASK], {"batch": 1}, sample, "benchmark.shapes[1]")
    msg = str(info.value)
    assert info.value.exit_code == 2
    assert msg.startswith("benchmark.shapes[1]: ")
    assert "axis 1 ('sequence')" in msg and "'attention_mask'" in msg
    assert "add 'sequence' to the shape" in msg


def test_make_feeds_unnamed_dynamic_axis_is_a_recipe_error() -> None:
    spec = TensorSpec("x", "float32", ("?", 4))
    with pytest.raises(RecipeError, match=r"axis 0 \('\?'\) of input 'x'"):
        bench.make_feeds([spec], {"batch": 1}, {"x": np.ones((1, 4))}, "w")


def test_make_feeds_runs_on_a_real_runner(tmp_path: Path) -> None:
    path = tiny_onnx(tmp_path / "m.onnx", width=8)
    sample = {"x": np.random.default_rng(1).standard_normal((4, 8))}  # float64 on purpose
    with open_runner("onnxruntime-cpu", path) as r:
        feeds = bench.make_feeds(r.inputs, {"batch": 6}, sample, "w")
        assert feeds["x"].dtype == np.float32 and feeds["x"].shape == (6, 8)
        assert r.run(feeds)["y"].shape == (6, 8)


# --- statistics ------------------------------------------------------------------------------------


def test_latency_stats_match_numpy() -> None:
    samples_ns = [int(x) for x in np.random.default_rng(3).integers(1_000_000, 9_000_000, 101)]
    s = bench.latency_stats(samples_ns, batch=16)
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    assert s["iterations"] == 101
    for p in (50, 90, 95, 99):
        assert s[f"p{p}_ms"] == pytest.approx(np.percentile(ms, p), rel=1e-12)
    assert s["mean_ms"] == pytest.approx(ms.mean(), rel=1e-12)
    assert s["min_ms"] == pytest.approx(ms.min()) and s["max_ms"] == pytest.approx(ms.max())
    assert s["std_ms"] == pytest.approx(ms.std(ddof=1), rel=1e-12)
    assert s["cv"] == pytest.approx(ms.std(ddof=1) / ms.mean(), rel=1e-12)
    assert s["items_per_s"] == pytest.approx(16 / (ms.mean() / 1e3), rel=1e-12)


def test_latency_stats_exact_values() -> None:
    s = bench.latency_stats([2_000_000, 4_000_000], batch=4)  # 2 ms and 4 ms
    assert s["mean_ms"] == 3.0 and s["p50_ms"] == 3.0 and s["min_ms"] == 2.0 and s["max_ms"] == 4.0
    assert s["items_per_s"] == pytest.approx(4 / 0.003)
    one = bench.latency_stats([5_000_000], batch=1)
    assert one["std_ms"] == 0.0 and one["cv"] == 0.0 and one["items_per_s"] == pytest.approx(200.0)
    assert s["timing"] == "host-clock"  # a GPU runner's stats say "cuda-events"


def test_add_speedups_ratios() -> None:
    base = {"p50_ms": 10.0, "p99_ms": 20.0, "mean_ms": 12.0, "items_per_s": 100.0}
    var = {"p50_ms": 5.0, "p99_ms": 40.0, "mean_ms": 6.0, "items_per_s": 200.0, "cv": 0.01}
    out = bench.add_speedups(var, base)
    assert out["p50_speedup"] == 2.0  # faster
    assert out["p99_speedup"] == 0.5  # slower tail
    assert out["mean_speedup"] == 2.0
    assert out["throughput_speedup"] == 2.0
    assert out["cv"] == 0.01 and out["p50_ms"] == 5.0
    assert "p50_speedup" not in var  # the input is not modified


def test_add_speedups_of_the_baseline_against_itself_is_one() -> None:
    base = bench.latency_stats([1_000_000, 3_000_000, 2_000_000], batch=2)
    out = bench.add_speedups(base, base)
    assert [out[k] for k in ("p50_speedup", "p99_speedup", "mean_speedup", "throughput_speedup")] == [1.0] * 4


# --- interleaved timing ----------------------------------------------------------------------------


class Recorder:
    """A runner test double: records each call in a shared log and advances a fake clock by `cost_ns`."""

    def __init__(self, name: str, log: list[str], clock: list[int], cost_ns: int) -> None:
        self.name, self.log, self.clock, self.cost_ns = name, log, clock, cost_ns
        self.feeds_seen: list[dict[str, np.ndarray]] = []

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.log.append(self.name)
        self.feeds_seen.append(feeds)
        self.clock[0] += self.cost_ns
        return {}


@pytest.fixture()
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    clock = [0]

    def perf_counter_ns() -> int:
        clock[0] += 1  # reading the clock costs 1 ns, so overhead outside run() would show
        return clock[0]

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter_ns=perf_counter_ns))
    return clock


def test_time_interleaved_warms_up_then_rotates_the_order(fake_clock: list[int]) -> None:
    log: list[str] = []
    runners = {n: Recorder(n, log, fake_clock, 100) for n in ("fp32", "fp16", "int8")}
    feeds = {"x": np.zeros((1, 2))}
    timings = bench.time_interleaved(runners, feeds, warmup=2, iterations=4)
    assert log[:6] == ["fp32", "fp32", "fp16", "fp16", "int8", "int8"]
    assert log[6:] == [
        "fp32", "fp16", "int8",
        "fp16", "int8", "fp32",
        "int8", "fp32", "fp16",
        "fp32", "fp16", "int8",
    ]  # fmt: skip
    assert list(timings) == ["fp32", "fp16", "int8"]
    for r in runners.values():
        assert all(f is feeds for f in r.feeds_seen)


def test_time_interleaved_times_each_runner_iterations_times(fake_clock: list[int]) -> None:
    log: list[str] = []
    runners = {"a": Recorder("a", log, fake_clock, 1_000), "b": Recorder("b", log, fake_clock, 7_000)}
    timings = bench.time_interleaved(runners, {}, warmup=3, iterations=5)
    assert log.count("a") == 3 + 5 and log.count("b") == 3 + 5
    # each sample is the runner's own cost plus the one clock read after it: nothing else is timed
    assert timings == {"a": [1_001] * 5, "b": [7_001] * 5}
    assert all(isinstance(t, int) for t in timings["a"])


def test_time_interleaved_rotates_the_input_sets(fake_clock: list[int]) -> None:
    log: list[str] = []
    runners = {n: Recorder(n, log, fake_clock, 1) for n in ("a", "b")}
    sets = [{"x": np.zeros(1)}, {"x": np.ones(1)}, {"x": np.full(1, 2.0)}]
    timings = bench.time_interleaved(runners, sets, warmup=4, iterations=5)
    for r in runners.values():
        assert [int(f["x"][0]) for f in r.feeds_seen] == [0, 1, 2, 0] + [0, 1, 2, 0, 1]
    assert {k: len(v) for k, v in timings.items()} == {"a": 5, "b": 5}


def test_time_interleaved_with_no_input_set_is_a_stage_error(fake_clock: list[int]) -> None:
    with pytest.raises(StageError, match="no input set"):
        bench.time_interleaved({"a": Recorder("a", [], fake_clock, 1)}, [], warmup=1, iterations=1)


def test_time_interleaved_without_warmup(fake_clock: list[int]) -> None:
    log: list[str] = []
    timings = bench.time_interleaved({"only": Recorder("only", log, fake_clock, 5)}, {}, warmup=0, iterations=3)
    assert log == ["only"] * 3 and len(timings["only"]) == 3


def test_time_interleaved_real_clock_gives_positive_samples(tmp_path: Path) -> None:
    path = tiny_onnx(tmp_path / "m.onnx", width=8)
    with open_runner("onnxruntime-cpu", path) as a, open_runner("onnxruntime-cpu", path) as b:
        timings = bench.time_interleaved({"a": a, "b": b}, {"x": np.ones((1, 8), np.float32)}, 1, 3)
    assert {k: len(v) for k, v in timings.items()} == {"a": 3, "b": 3}
    assert all(t > 0 for v in timings.values() for t in v)


# --- memory ----------------------------------------------------------------------------------------


def test_measure_memory_in_a_fresh_process(tmp_path: Path) -> None:
    path = tiny_onnx(tmp_path / "mem.onnx")
    feeds = {"x": np.ones((4, 256), np.float32)}
    mem = bench.measure_memory("onnxruntime-cpu", path, feeds, threads=1)
    assert set(mem) == {"rss_peak_mb", "rss_session_mb"}
    assert mem["rss_peak_mb"] >= mem["rss_session_mb"] > 0
    assert mem["rss_peak_mb"] > 10  # a Python process with numpy and onnxruntime, not a unit mix-up


def test_measure_memory_bad_model_path_is_a_stage_error(tmp_path: Path) -> None:
    with pytest.raises(StageError) as info:
        bench.measure_memory("onnxruntime-cpu", tmp_path / "missing.onnx", {"x": np.ones((1, 4), np.float32)}, None)
    msg = str(info.value)
    assert info.value.exit_code == 3
    assert msg.startswith("benchmark: memory probe for missing.onnx on onnxruntime-cpu failed: ")
    # the probe's own error comes through, not a crash of the probe script
    assert "ONNX Runtime cannot load the model" in msg


def test_measure_memory_bad_feeds_is_a_stage_error(tmp_path: Path) -> None:
    path = tiny_onnx(tmp_path / "m.onnx", width=8)
    with pytest.raises(StageError, match="memory probe for m.onnx"):
        bench.measure_memory("onnxruntime-cpu", path, {"not_an_input": np.ones((1, 8), np.float32)}, None)


def test_run_shapes_times_every_shape_and_reports_speedups_against_the_baseline(fake_clock: list[int]) -> None:
    from optimize.recipe import BenchmarkSection
    from optimize.runtimes.base import TensorSpec

    log: list[str] = []
    runners = {"fp32": Recorder("fp32", log, fake_clock, 4_000), "fp16": Recorder("fp16", log, fake_clock, 1_000)}
    for r in runners.values():
        r.inputs = [TensorSpec("x", "float32", ("batch", 3))]
    spec = BenchmarkSection(shapes=[{"batch": 1}, {"batch": 4}], warmup=1, iterations=3, cv_warn=0.05)
    sample = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    out = bench.run_shapes(runners, spec, [sample], baseline="fp32")
    assert set(out) == {"fp32", "fp16"} and set(out["fp16"]) == {"batch=1", "batch=4"}
    assert [f["x"].shape for f in runners["fp16"].feeds_seen] == [(1, 3)] * 4 + [(4, 3)] * 4
    fp16 = out["fp16"]["batch=4"]
    assert fp16["iterations"] == 3 and fp16["p50_ms"] == pytest.approx(1_001 / 1e6)
    assert fp16["p50_speedup"] == pytest.approx(4_001 / 1_001)
    assert fp16["items_per_s"] == pytest.approx(4 / (1_001 / 1e9))
    assert "p50_speedup" not in out["fp32"]["batch=1"]  # the baseline is the reference, not a variant
    assert fp16["cv_warning"] is False  # identical samples: no spread
    assert fp16["timing"] == "host-clock"


def test_run_shapes_rotates_one_input_set_per_sample_batch_up_to_four(fake_clock: list[int]) -> None:
    from optimize.recipe import BenchmarkSection

    log: list[str] = []
    runners = {"fp32": Recorder("fp32", log, fake_clock, 10), "fp16": Recorder("fp16", log, fake_clock, 10)}
    for r in runners.values():
        r.inputs = [TensorSpec("x", "float32", ("batch", 2))]
    samples = [{"x": np.full((3, 2), k, dtype=np.float32)} for k in range(6)]
    spec = BenchmarkSection(shapes=[{"batch": 2}], warmup=2, iterations=9, cv_warn=0.05)
    bench.run_shapes(runners, spec, samples, baseline="fp32")
    for r in runners.values():
        seen = [float(f["x"][0, 0]) for f in r.feeds_seen]
        # warm-up 0, 1; then iteration i uses set i mod 4: samples 4 and 5 are not used
        assert seen == [0, 1] + [i % 4 for i in range(9)]
        assert all(f["x"].shape == (2, 2) for f in r.feeds_seen)
    # in one iteration every runner sees the same set
    pairs = zip(runners["fp32"].feeds_seen[2:], runners["fp16"].feeds_seen[2:], strict=True)
    assert [f is g for f, g in pairs] == [True] * 9


def test_run_shapes_takes_one_sample_batch_as_it_is(fake_clock: list[int]) -> None:
    from optimize.recipe import BenchmarkSection

    runner = Recorder("fp32", [], fake_clock, 10)
    runner.inputs = [TensorSpec("x", "float32", ("batch", 2))]
    spec = BenchmarkSection(shapes=[{"batch": 1}], warmup=0, iterations=2, cv_warn=0.05)
    out = bench.run_shapes({"fp32": runner}, spec, {"x": np.ones((2, 2), np.float32)}, baseline="fp32")
    assert out["fp32"]["batch=1"]["iterations"] == 2


def test_run_shapes_without_samples_is_a_stage_error(fake_clock: list[int]) -> None:
    from optimize.recipe import BenchmarkSection

    runner = Recorder("fp32", [], fake_clock, 10)
    runner.inputs = [TensorSpec("x", "float32", ("batch", 2))]
    spec = BenchmarkSection(shapes=[{"batch": 1}], warmup=0, iterations=2, cv_warn=0.05)
    with pytest.raises(StageError, match="no sample batch"):
        bench.run_shapes({"fp32": runner}, spec, [], baseline="fp32")
