"""The dynamic batcher: batched answers equal unbatched ones (real ONNX Runtime on tiny models built here), each
caller gets exactly its rows; overload is refused at arrival, fast, and counted; high priority is admitted over low
and never starved; deadlines, drain, worker errors and the no-batching mode."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from optimize.recipe import ServingSection
from optimize.runtimes import open_runner
from optimize.runtimes.base import Runner, TensorSpec
from optimize.serving.batcher import Batcher, Overloaded, RunFailed
from optimize.serving.metrics import ServerMetrics
from optimize.serving.protocol import BadRequest

onnx = pytest.importorskip("onnx")
helper = onnx.helper
TP = onnx.TensorProto

VOCAB, DIM = 50, 6


def _info(name: str, elem_type: int, shape: list[Any]) -> Any:
    return helper.make_tensor_value_info(name, elem_type, shape)


def _text_model(path: Path) -> Path:
    """input_ids, attention_mask [batch, sequence] → token_states [batch, sequence, DIM] (tanh of an embedding
    projection) and pooled [batch, DIM] (their mean over the tokens the mask keeps)."""
    rng = np.random.default_rng(3)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((VOCAB, DIM)).astype(np.float32), "E"),
        onnx.numpy_helper.from_array(rng.standard_normal((DIM, DIM)).astype(np.float32) / 2, "W"),
        onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), "last"),
    ]
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
        helper.make_node("MatMul", ["emb", "W"], ["proj"]),
        helper.make_node("Tanh", ["proj"], ["token_states"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TP.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
        helper.make_node("Mul", ["token_states", "mask3"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "axis1"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axis1"], ["count"], keepdims=0),
        helper.make_node("Div", ["total", "count"], ["pooled"]),
    ]
    bs = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes,
        "text",
        [_info("input_ids", TP.INT64, bs), _info("attention_mask", TP.INT64, bs)],
        [_info("pooled", TP.FLOAT, ["batch", DIM]), _info("token_states", TP.FLOAT, [*bs, DIM])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _two_input_model(path: Path) -> Path:
    """a [batch, 8], b [batch, 3] → y [batch, 4] = relu(a·A + b·B)."""
    rng = np.random.default_rng(4)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "A"),
        onnx.numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "B"),
    ]
    nodes = [
        helper.make_node("MatMul", ["a", "A"], ["aa"]),
        helper.make_node("MatMul", ["b", "B"], ["bb"]),
        helper.make_node("Add", ["aa", "bb"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "two",
        [_info("a", TP.FLOAT, ["batch", 8]), _info("b", TP.FLOAT, ["batch", 3])],
        [_info("y", TP.FLOAT, ["batch", 4])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def text_runner(tmp_path_factory: pytest.TempPathFactory) -> Any:
    runner = open_runner("onnxruntime-cpu", _text_model(tmp_path_factory.mktemp("text") / "text.onnx"))
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def two_runner(tmp_path_factory: pytest.TempPathFactory) -> Any:
    runner = open_runner("onnxruntime-cpu", _two_input_model(tmp_path_factory.mktemp("two") / "two.onnx"))
    yield runner
    runner.close()


class RecordingRunner(Runner):
    """Test double: runs the real runner it wraps and records each run's input shapes."""

    def __init__(self, inner: Runner) -> None:
        self.inner, self.inputs, self.outputs, self.target = inner, inner.inputs, inner.outputs, inner.target
        self.shapes: list[dict[str, tuple[int, ...]]] = []

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.shapes.append({k: v.shape for k, v in feeds.items()})
        return self.inner.run(feeds)


class SleepRunner(Runner):
    """Test double with a controlled service time: x [batch, 2] → y = 2x after sleeping `per_run_s`. Column 0 of
    x carries a request id: `order` records the ids of each run; an id in `fail_ids` makes its run raise."""

    target = "sleep"
    inputs = [TensorSpec("x", "float32", ("batch", 2))]
    outputs = [TensorSpec("y", "float32", ("batch", 2))]

    def __init__(self, per_run_s: float, fail_ids: tuple[int, ...] = ()) -> None:
        self.per_run_s = per_run_s
        self.fail_ids = set(fail_ids)
        self.order: list[list[int]] = []
        self.lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [int(v) for v in feeds["x"][:, 0]]
        with self.lock:
            self.order.append(ids)
        time.sleep(self.per_run_s)
        if self.fail_ids & set(ids):
            raise ValueError(f"boom on {ids}")
        return {"y": feeds["x"] * 2}


def _x(i: int, rows: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.array([[i, r] for r in range(rows)], dtype=np.float32)}


def _run(make: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(make())


async def _started(runner: SleepRunner, runs: int = 1) -> None:
    """Wait until the worker has started `runs` runs (so what is queued next is known to wait)."""
    for _ in range(1000):
        if len(runner.order) >= runs:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"the worker started {len(runner.order)} runs in 1 s, not {runs}")


def _batcher(runner: Runner, metrics: ServerMetrics | None = None, **settings: Any) -> Batcher:
    b = Batcher(runner, ServingSection(**settings), metrics or ServerMetrics(), runner.inputs, runner.outputs)
    b.start()
    return b


def _submit_all(
    batcher: Batcher, requests: list[dict[str, np.ndarray]], priorities: list[str] | None = None
) -> list[dict[str, np.ndarray]]:
    """Submit every request at once (low priority unless `priorities` says), their answers in order; then stop
    the batcher."""

    async def go() -> list[dict[str, np.ndarray]]:
        each = priorities or ["low"] * len(requests)
        return await asyncio.gather(*(batcher.submit(r, p) for r, p in zip(requests, each, strict=True)))

    try:
        return _run(go)
    finally:
        batcher.stop()


def _sample(metrics: ServerMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _shed_total(metrics: ServerMetrics) -> float:
    return sum(
        _sample(metrics, "optimize_shed_total", reason=r, priority=p)
        for r in ("queue_full", "deadline", "draining")
        for p in ("high", "low")
    )


def _text_request(i: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    rows, length = 1 + i % 3, 2 + (i * 5) % 11
    ids = rng.integers(1, VOCAB, (rows, length)).astype(np.int64)
    mask = np.ones_like(ids)
    if length > 3:  # the request's own padding: a shorter row inside it
        mask[0, -2:] = 0
        ids[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _assert_equal_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape, name
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention_mask", ["attention_mask", None], ids=["padded", "grouped-by-shape"])
def test_batched_answers_equal_unbatched_ones_for_requests_of_different_lengths(
    text_runner: Any, attention_mask: str | None
) -> None:
    rng = np.random.default_rng(11)
    requests = [_text_request(i, rng) for i in range(40)]
    alone = [text_runner.run(r) for r in requests]
    recorder = RecordingRunner(text_runner)
    metrics = ServerMetrics()
    batcher = _batcher(recorder, metrics, max_batch_size=16, max_queue_delay_ms=20, attention_mask=attention_mask)
    answers = _submit_all(batcher, requests)
    for got, want in zip(answers, alone, strict=True):
        _assert_equal_outputs(got, want)  # its own rows, its own sequence length
    rows = sum(r["input_ids"].shape[0] for r in requests)
    assert sum(s["input_ids"][0] for s in recorder.shapes) == rows  # every row ran once, padding adds no rows
    assert len(recorder.shapes) < len(requests) / 2  # they were merged
    assert max(s["input_ids"][0] for s in recorder.shapes) <= 16
    assert _sample(metrics, "optimize_batch_size_sum") == rows
    lengths = {r["input_ids"].shape[1] for r in requests}
    if attention_mask is None:  # no padding: each run holds one length
        assert {s["input_ids"][1] for s in recorder.shapes} == lengths
    else:  # padded: some run mixed lengths (it is longer than some of its requests)
        assert len(recorder.shapes) < len(lengths)


def test_a_batch_takes_the_requests_closest_to_its_length(text_runner: Any) -> None:
    """Short and long requests queued together: each batch fills with the lengths nearest its oldest request's, so
    short ones are not padded to the long ones' length (a batch runs as long as its longest)."""
    rng = np.random.default_rng(5)

    def request(length: int) -> dict[str, np.ndarray]:
        ids = rng.integers(1, VOCAB, (1, length)).astype(np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    requests = [request(4 + i // 2 % 2) if i % 2 == 0 else request(40 + i % 3) for i in range(16)]  # short, long, ...
    recorder = RecordingRunner(text_runner)
    batcher = _batcher(recorder, max_batch_size=8, max_queue_delay_ms=50)
    answers = _submit_all(batcher, requests)
    for got, req in zip(answers, requests, strict=True):
        _assert_equal_outputs(got, text_runner.run(req))
    assert sorted(s["input_ids"][1] for s in recorder.shapes) == [5, 42], recorder.shapes  # 8 short, 8 long


def _ab(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    return {
        "a": rng.standard_normal((rows, 8)).astype(np.float32),
        "b": rng.standard_normal((rows, 3)).astype(np.float32),
    }


def test_two_input_model_batched_equals_unbatched_and_each_caller_gets_its_rows(two_runner: Any) -> None:
    rng = np.random.default_rng(5)
    requests = [_ab(rng, 1 + i % 4) for i in range(30)]
    alone = [two_runner.run(r) for r in requests]
    recorder = RecordingRunner(two_runner)
    batcher = _batcher(recorder, max_batch_size=8, max_queue_delay_ms=20)
    answers = _submit_all(batcher, requests, ["high" if i % 3 else "low" for i in range(len(requests))])
    for got, want in zip(answers, alone, strict=True):
        _assert_equal_outputs(got, want)
    assert len(recorder.shapes) < len(requests) / 2
    assert all(s["a"][0] <= 8 for s in recorder.shapes)


def test_no_batching_runs_each_request_alone(two_runner: Any) -> None:
    rng = np.random.default_rng(6)
    requests = [_ab(rng, 1) for _ in range(12)]
    recorder = RecordingRunner(two_runner)
    metrics = ServerMetrics()
    batcher = _batcher(recorder, metrics, max_batch_size=1, max_queue_delay_ms=0)
    answers = _submit_all(batcher, requests)
    for got, r in zip(answers, requests, strict=True):
        _assert_equal_outputs(got, two_runner.run(r))
    assert [s["a"][0] for s in recorder.shapes] == [1] * 12
    assert _sample(metrics, "optimize_batch_size_count") == 12


def test_a_full_queue_is_refused_at_once_and_the_counters_add_up() -> None:
    runner = SleepRunner(0.1)
    metrics = ServerMetrics()
    batcher = _batcher(runner, metrics, max_batch_size=1, max_queue_delay_ms=0, max_queue=4, queue_timeout_ms=5000)
    shed_after_s: list[float] = []

    async def one(i: int) -> str:
        t0 = time.perf_counter()
        try:
            out = await batcher.submit(_x(i))
        except Overloaded as e:
            shed_after_s.append(time.perf_counter() - t0)
            assert e.reason == "queue_full" and e.retry_after_s >= 1, e
            return "shed"
        assert out["y"][0, 0] == 2 * i  # its own answer
        return "ok"

    async def go() -> list[str]:
        first = asyncio.ensure_future(one(0))
        await _started(runner)  # the worker has taken it: 4 more fill the queue, the rest are refused
        return [await first, *await asyncio.gather(*(one(i) for i in range(1, 20)))]

    try:
        outcomes = _run(go)
    finally:
        batcher.stop()
    assert outcomes.count("ok") == 5 and outcomes.count("shed") == 15
    assert max(shed_after_s) < 0.05  # answered at arrival, not after waiting for the queue
    assert _shed_total(metrics) == 15 == _sample(metrics, "optimize_shed_total", reason="queue_full", priority="low")
    assert _sample(metrics, "optimize_batch_size_count") == 5  # accepted + shed == submitted
    assert _sample(metrics, "optimize_queue_depth") == 0 and _sample(metrics, "optimize_in_flight") == 0


def test_high_priority_evicts_the_newest_low_and_runs_first() -> None:
    runner = SleepRunner(0.05)
    metrics = ServerMetrics()
    batcher = _batcher(runner, metrics, max_batch_size=1, max_queue_delay_ms=0, max_queue=3, queue_timeout_ms=5000)
    evicted_after: list[float] = []

    async def low(i: int) -> str:
        try:
            await batcher.submit(_x(i), "low")
        except Overloaded as e:
            evicted_after.append(time.perf_counter())
            assert e.reason == "queue_full"
            return f"shed {i}"
        return f"ok {i}"

    async def go() -> tuple[list[str], float]:
        lows = [asyncio.ensure_future(low(0))]
        await _started(runner)  # 0 runs; 1, 2, 3 fill the queue
        lows += [asyncio.ensure_future(low(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0.005)
        t0 = time.perf_counter()
        high = await batcher.submit(_x(100), "high")
        assert high["y"][0, 0] == 200
        return list(await asyncio.gather(*lows)), t0

    try:
        outcomes, t0 = _run(go)
    finally:
        batcher.stop()
    assert outcomes == ["ok 0", "ok 1", "ok 2", "shed 3"]  # the newest low made room
    assert evicted_after[0] - t0 < 0.05  # told at once
    assert [ids[0] for ids in runner.order] == [0, 100, 1, 2]  # high ran next
    assert _sample(metrics, "optimize_shed_total", reason="queue_full", priority="low") == 1
    assert _sample(metrics, "optimize_shed_total", reason="queue_full", priority="high") == 0


def test_high_priority_keeps_being_served_under_sustained_low_overload() -> None:
    runner = SleepRunner(0.02)  # 50 runs per second
    metrics = ServerMetrics()
    batcher = _batcher(runner, metrics, max_batch_size=1, max_queue_delay_ms=0, max_queue=8, queue_timeout_ms=200)
    latencies: dict[str, list[float]] = {"high": [], "low": []}
    shed = {"high": 0, "low": 0}

    async def one(i: int, priority: str) -> None:
        t0 = time.perf_counter()
        try:
            await batcher.submit(_x(i), priority)
            latencies[priority].append(time.perf_counter() - t0)
        except Overloaded:
            shed[priority] += 1

    async def go() -> None:
        tasks = []
        for tick in range(200):  # 1 s: low at 200/s (4x what it can run), high at 20/s
            tasks.append(asyncio.ensure_future(one(tick, "low")))
            if tick % 10 == 5:
                tasks.append(asyncio.ensure_future(one(1000 + tick, "high")))
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)

    try:
        _run(go)
    finally:
        batcher.stop()
    assert shed["high"] == 0 and len(latencies["high"]) == 20  # never shed for a low
    assert max(latencies["high"]) < 0.1  # at most the run in progress and another high ahead of it
    assert shed["low"] > 50 and latencies["low"]  # the low overload is shed, and low still gets some service
    assert _shed_total(metrics) == shed["low"]


def test_a_deadline_that_cannot_be_met_is_refused_at_arrival() -> None:
    runner = SleepRunner(0.05)
    metrics = ServerMetrics()
    batcher = _batcher(runner, metrics, max_batch_size=1, max_queue_delay_ms=0, queue_timeout_ms=5000)
    batcher.warm(_x(-1))  # a run's time is measured: 50 ms

    async def go() -> tuple[float, Overloaded, dict[str, np.ndarray], list[Any]]:
        queued = [asyncio.ensure_future(batcher.submit(_x(i))) for i in range(30)]  # ~1.5 s of work
        await _started(runner, runs=4)  # 3 warm-up runs, then the first of these
        t0 = time.perf_counter()
        with pytest.raises(Overloaded) as e:
            await batcher.submit(_x(50), timeout_s=0.1)
        refused_after = time.perf_counter() - t0
        high = await batcher.submit(_x(51), priority="high", timeout_s=0.15)  # only the running one is ahead
        batcher.stop()  # what is still queued is answered "draining"
        return refused_after, e.value, high, await asyncio.gather(*queued, return_exceptions=True)

    try:
        refused_after, error, high, rest = _run(go)
    finally:
        batcher.stop()
    assert error.reason == "deadline" and refused_after < 0.05
    assert error.retry_after_s == 2  # ceil(what is left of the running 50 ms + 29 queued runs of 50 ms)
    assert high["y"][0, 0] == 102
    assert {type(r).__name__ for r in rest} == {"dict", "Overloaded"}
    assert _sample(metrics, "optimize_shed_total", reason="deadline", priority="low") == 1


@pytest.mark.parametrize("with_high", [False, True], ids=["low-only", "high-traffic"])
def test_a_low_request_expects_the_high_ones_that_will_overtake_it(with_high: bool) -> None:
    """Runs take 50 ms (20 rows/s). Three lows queued put a fourth ~150 ms from its start: within a 250 ms
    deadline, unless high requests arrive at ~10/s, which go ahead of it: then lows are served at ~10/s and it
    would wait ~2x as long, so it is refused at once instead of being shed after its wait."""
    runner = SleepRunner(0.05)
    batcher = _batcher(runner, max_batch_size=1, max_queue_delay_ms=0, queue_timeout_ms=250)

    async def go() -> BaseException | None:
        for i in range(3):  # the run time is measured
            await batcher.submit(_x(i))
        if with_high:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 0.5:  # one high at a time: ~25 in the window, none refused
                await batcher.submit(_x(100), priority="high")
        queued = [asyncio.ensure_future(batcher.submit(_x(200 + i))) for i in range(3)]
        await asyncio.sleep(0)
        try:
            await batcher.submit(_x(300))
            error = None
        except Overloaded as e:
            error = e
        await asyncio.gather(*queued)
        return error

    try:
        error = _run(go)
    finally:
        batcher.stop()
    if with_high:
        assert isinstance(error, Overloaded) and error.reason == "deadline" and "low-priority" in str(error)
    else:
        assert error is None


def test_the_predicted_wait_counts_batches_not_rows() -> None:
    runner = SleepRunner(0.05)  # 50 ms a run, whatever its rows
    batcher = _batcher(runner, max_batch_size=8, max_queue_delay_ms=0, queue_timeout_ms=5000)
    batcher.warm(_x(-1))  # runs of 1 and of 8 rows: 50 ms each

    async def go() -> tuple[dict[str, np.ndarray], Overloaded]:
        first = asyncio.ensure_future(batcher.submit(_x(0)))
        await _started(runner, runs=7)  # 2 x 3 warm-up runs, then this one
        queued = [asyncio.ensure_future(batcher.submit(_x(i))) for i in range(1, 17)]  # two full batches
        await asyncio.sleep(0)
        # ~50 ms left of the running batch + 2 batches of 50 ms: within 250 ms (16 rows x 50 ms would not be)
        admitted = await batcher.submit(_x(17), timeout_s=0.25)
        await asyncio.gather(first, *queued)
        blockers = [asyncio.ensure_future(batcher.submit(_x(i))) for i in range(20, 37)]
        await _started(runner, runs=len(runner.order) + 1)
        with pytest.raises(Overloaded) as e:  # 16 rows still queued ahead: 2 batches, past 80 ms
            await batcher.submit(_x(40), timeout_s=0.08)
        await asyncio.gather(*blockers)
        return admitted, e.value

    try:
        admitted, refused = _run(go)
    finally:
        batcher.stop()
    assert admitted["y"][0, 0] == 34
    assert refused.reason == "deadline"


def test_a_request_still_queued_at_its_deadline_is_answered_then() -> None:
    runner = SleepRunner(0.4)
    metrics = ServerMetrics()
    batcher = _batcher(runner, metrics, max_batch_size=1, max_queue_delay_ms=0, queue_timeout_ms=5000)

    async def go() -> tuple[float, Overloaded]:
        first = asyncio.ensure_future(batcher.submit(_x(0)))  # no rate known yet: the next one is admitted
        await _started(runner)
        t0 = time.perf_counter()
        with pytest.raises(Overloaded) as e:
            await batcher.submit(_x(1), timeout_s=0.05)
        waited = time.perf_counter() - t0
        await first
        return waited, e.value

    try:
        waited, error = _run(go)
    finally:
        batcher.stop()
    assert error.reason == "deadline"
    assert 0.04 <= waited < 0.15  # at its deadline, not when the worker got to it (0.4 s)
    assert [ids[0] for ids in runner.order] == [0]  # it never ran


def test_drain_answers_everything_queued_and_refuses_new_requests() -> None:
    runner = SleepRunner(0.02)
    metrics = ServerMetrics()
    batcher = _batcher(runner, metrics, max_batch_size=2, max_queue_delay_ms=0)

    async def go() -> tuple[list[Any], bool, Overloaded]:
        queued = [asyncio.ensure_future(batcher.submit(_x(i))) for i in range(10)]
        await asyncio.sleep(0)
        drained = await batcher.drain(5)
        with pytest.raises(Overloaded) as e:
            await batcher.submit(_x(99))
        return list(await asyncio.gather(*queued)), drained, e.value

    try:
        answers, drained, error = _run(go)
    finally:
        batcher.stop()
    assert drained
    assert [a["y"][0, 0] for a in answers] == [2 * i for i in range(10)]
    assert error.reason == "draining"
    assert _sample(metrics, "optimize_shed_total", reason="draining", priority="low") == 1


def test_a_failing_run_answers_its_batch_with_runfailed_and_the_batcher_goes_on() -> None:
    runner = SleepRunner(0.0, fail_ids=(3,))
    batcher = _batcher(runner, max_batch_size=1, max_queue_delay_ms=0)

    async def go() -> list[Any]:
        return await asyncio.gather(*(batcher.submit(_x(i)) for i in range(6)), return_exceptions=True)

    try:
        results = _run(go)
    finally:
        batcher.stop()
    assert isinstance(results[3], RunFailed) and "boom on [3]" in str(results[3])
    assert [r["y"][0, 0] for i, r in enumerate(results) if i != 3] == [0, 2, 4, 8, 10]


def test_feeds_that_disagree_on_the_batch_size_are_a_bad_request(two_runner: Any) -> None:
    batcher = _batcher(two_runner)

    async def go() -> None:
        await batcher.submit({"a": np.zeros((2, 8), np.float32), "b": np.zeros((3, 3), np.float32)})

    try:
        with pytest.raises(BadRequest, match="disagree on the batch size"):
            _run(go)
    finally:
        batcher.stop()


def test_metrics_exposition_names_what_the_load_tester_reads() -> None:
    metrics = ServerMetrics()
    metrics.set_model("tiny", "3", "ab" * 32, "int8", "onnxruntime-cpu")
    metrics.answered(200, 0.012)
    metrics.answered(503, 0.001)
    body, content_type = metrics.exposition()
    text = body.decode()
    assert content_type.startswith("text/plain")
    for line in (
        'optimize_requests_total{code="200"} 1.0',
        'optimize_requests_total{code="503"} 1.0',
        'optimize_shed_total{priority="high",reason="deadline"} 0.0',
        "optimize_request_duration_seconds_count 2.0",
        "optimize_queue_depth 0.0",
        "optimize_in_flight 0.0",
        'optimize_batch_size_bucket{le="256.0"} 0.0',
        f'optimize_model_info{{model_version="3",name="tiny",sha256="{"ab" * 32}",target="onnxruntime-cpu",'
        'variant="int8"} 1.0',
    ):
        assert line in text, line
    assert "optimize_queue_time_seconds_bucket" in text
