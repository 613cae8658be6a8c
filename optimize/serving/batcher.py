"""The dynamic batcher: a bounded two-level priority queue in front of one worker thread that merges requests into
model runs and splits the outputs back, so that each caller gets exactly its own rows.

Admission is decided at arrival, so an overloaded server answers 503 in milliseconds instead of after a wait:
a full queue, or a predicted wait past the request's deadline, is `Overloaded` at once. The wait is predicted from
the rows queued ahead and the measured time of a model run by its batch size (what is left of the running batch,
then one full batch per `max_batch_size` rows ahead). A queued request whose deadline passes before its batch
starts is answered when it passes (a timer on the event loop), not when the worker gets to it.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optimize.errors import first_line
from optimize.lazy import lazy
from optimize.runtimes.base import Runner, TensorSpec
from optimize.serving.metrics import ServerMetrics
from optimize.serving.protocol import BadRequest

if TYPE_CHECKING:
    from optimize.recipe import ServingSection

np = lazy("numpy")

PRIORITIES = ("high", "low")
# Weight of the newest run in a batch size's run time (EWMA): a few runs follow a change of load or lengths.
RUN_TIME_ALPHA = 0.2
_QUEUED, _RUNNING, _DONE = "queued", "running", "done"
# The window over which the high-priority arrival rate is measured (it stretches a low request's predicted wait).
HIGH_RATE_WINDOW_S = 1.0


class Overloaded(Exception):
    """The server is too busy to take the request (HTTP 503): `.reason` is "queue_full", "deadline" or
    "draining", `.retry_after_s` (>= 1) the whole seconds after which the queue should have drained."""

    def __init__(self, reason: str, retry_after_s: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = max(1, int(retry_after_s))
        self.message = message


class RunFailed(Exception):
    """The model run of a batch raised: each of that batch's callers gets this (HTTP 500); the server goes on."""


@dataclass(eq=False)
class _Pending:
    feeds: dict[str, Any]
    rows: int
    key: Any  # requests with equal keys may merge
    lengths: dict[str, int]  # the request's own length along each padded axis (by axis name)
    priority: str
    enqueued: float  # time.monotonic()
    deadline: float  # its batch must start before this (time.monotonic())
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[dict[str, Any]]
    state: str = field(default=_QUEUED)


def _deliver(
    future: asyncio.Future[dict[str, Any]], result: dict[str, Any] | None, error: BaseException | None
) -> None:
    if future.done():  # the caller went away (cancelled)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


class Batcher:
    """Merges concurrent requests for one runner. Use: `start()`, `await submit(feeds, priority, timeout_s)` from
    the event loop, `await drain(timeout_s)` then `stop()` on shutdown.

    Requests merge up to `settings.max_batch_size` rows, waiting at most `settings.max_queue_delay_ms` after the
    first. High priority goes first into batches and may evict the newest queued low request when the queue is
    full; low only fills what high leaves. Requests of different lengths along a named dynamic axis merge (padded
    with 0) only when the model has the `settings.attention_mask` input; otherwise only equal shapes merge.
    """

    def __init__(
        self,
        runner: Runner,
        settings: ServingSection,
        metrics: ServerMetrics,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
    ) -> None:
        self.runner = runner
        self.metrics = metrics
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.max_rows = settings.max_batch_size
        self.delay_s = settings.max_queue_delay_ms / 1000
        self.max_queue = settings.max_queue
        self.queue_timeout_s = settings.queue_timeout_ms / 1000
        batch_axes = {s.shape[0] if s.shape and isinstance(s.shape[0], str) else None for s in self.inputs}
        # Batchable: every input's first axis is dynamic, and they share its name (or none has a name).
        self.batchable = bool(self.inputs) and None not in batch_axes and len(batch_axes - {"?"}) <= 1
        names = {s.name for s in self.inputs}
        pad = settings.attention_mask is not None and settings.attention_mask in names and self.batchable
        self.padded_axes: set[str] = (
            {d for s in self.inputs for d in s.shape[1:] if isinstance(d, str) and d != "?"} - batch_axes
            if pad
            else set()
        )
        self._queues: dict[str, collections.deque[_Pending]] = {p: collections.deque() for p in PRIORITIES}
        self._rows = dict.fromkeys(PRIORITIES, 0)
        self._cond = threading.Condition()
        self._running_rows = 0
        self._busy = False
        self._draining = False
        self._stopping = False
        self._run_s: dict[int, float] = {}  # seconds per model run (EWMA), by rows in the run
        self._run_started = 0.0  # time.monotonic() when the running batch started
        self._high_arrivals: collections.deque[tuple[float, int]] = collections.deque()  # (time, rows), last window
        self._thread: threading.Thread | None = None

    # ---- the event loop's side

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="optimize-batcher", daemon=True)
            self._thread.start()

    async def submit(
        self, feeds: dict[str, np.ndarray], priority: str = "low", timeout_s: float | None = None
    ) -> dict[str, np.ndarray]:
        """Queue `feeds` (one request, any rows) and return its own outputs: its rows, and along a padded axis its
        own length. Raises Overloaded at once when it cannot be taken, or when it is still queued at its deadline
        (min of `queue_timeout_ms` and `timeout_s`); BadRequest when the feeds disagree on their batch size or on
        a shared axis; RunFailed when the model run raised."""
        loop = asyncio.get_running_loop()
        pending = self._admit(feeds, priority, timeout_s, loop)
        self.metrics.in_flight.inc()
        timer = loop.call_later(max(0.0, pending.deadline - time.monotonic()), self._expire, pending)
        try:
            return await pending.future
        finally:
            timer.cancel()
            self.metrics.in_flight.dec()
            if pending.state == _QUEUED:  # cancelled while queued: it must not run for nobody
                with self._cond:
                    if pending.state == _QUEUED:
                        self._remove_locked(pending)

    def _admit(
        self, feeds: dict[str, Any], priority: str, timeout_s: float | None, loop: asyncio.AbstractEventLoop
    ) -> _Pending:
        if priority not in PRIORITIES:
            raise BadRequest(f"priority must be 'high' or 'low', not {priority!r}")
        rows, key, lengths = self._describe(feeds)
        deadline_s = self.queue_timeout_s if timeout_s is None else min(self.queue_timeout_s, timeout_s)
        now = time.monotonic()
        with self._cond:
            if self._draining or self._stopping:
                raise self._shed_locked("draining", priority, "the server is draining (shutting down)")
            full = len(self._queues["high"]) + len(self._queues["low"]) >= self.max_queue
            if full and (priority == "low" or not self._queues["low"]):
                raise self._shed_locked("queue_full", priority, f"the queue is full ({self.max_queue} waiting)")
            ahead = self._rows["high"] + (self._rows["low"] if priority == "low" else 0)
            wait_s = self._predicted_wait_locked(ahead, now)
            if priority == "low" and wait_s is not None:
                wait_s *= self._overtaking_locked(now)
            if wait_s is not None and wait_s > deadline_s:
                raise self._shed_locked(
                    "deadline",
                    priority,
                    f"a {priority}-priority request would wait ~{1000 * wait_s:.0f} ms ({ahead} rows queued ahead), "
                    f"past its {1000 * deadline_s:.0f} ms deadline",
                )
            if full:  # a high request takes the place of the newest low one
                victim = self._queues["low"][-1]
                self._remove_locked(victim)
                self._fail_locked(victim, self._shed_locked("queue_full", "low", "evicted by a high-priority request"))
            future: asyncio.Future[dict[str, Any]] = loop.create_future()
            pending = _Pending(feeds, rows, key, lengths, priority, now, now + deadline_s, loop, future)
            self._queues[priority].append(pending)
            self._rows[priority] += rows
            if priority == "high":
                self._high_arrivals.append((now, rows))
            self.metrics.queue_depth.set(len(self._queues["high"]) + len(self._queues["low"]))
            self._cond.notify_all()
        return pending

    def _expire(self, pending: _Pending) -> None:
        """At `pending`'s deadline (a timer on the loop): still queued, it is answered Overloaded("deadline") now."""
        with self._cond:
            if pending.state == _QUEUED:
                self._remove_locked(pending)
                self._fail_locked(pending, self._deadline_locked(pending, time.monotonic()))

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting (new submits: Overloaded("draining")) and wait until everything queued or running has
        been answered; False when `timeout_s` passed first."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()
        end = time.monotonic() + timeout_s
        while True:
            with self._cond:
                idle = not self._busy and not self._queues["high"] and not self._queues["low"]
            if idle:
                await asyncio.sleep(0)  # the last results are delivered by callbacks already on the loop
                return True
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(0.005)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the worker: what is still queued is answered Overloaded("draining"); a running batch finishes."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def warm(self, feeds: dict[str, np.ndarray], runs: int = 3) -> None:
        """Before serving: run `feeds`, and the same rows repeated to `max_batch_size` rows, `runs` times each, so
        that admission knows run times from the first request (real runs then update them)."""
        rows = self._describe(feeds)[0]
        sizes = [rows]
        if self.batchable and 0 < rows < self.max_rows:
            sizes.append(self.max_rows)
        for size in sizes:
            batch = feeds if size == rows else {k: np.resize(v, (size, *v.shape[1:])) for k, v in feeds.items()}
            for _ in range(runs):
                t0 = time.perf_counter()
                self.runner.run(batch)
                with self._cond:
                    self._record_run_locked(size, time.perf_counter() - t0)

    @property
    def service_rate(self) -> float | None:
        """Rows per second at full batches, from the measured run times (None before any run)."""
        with self._cond:
            seconds = self._run_time_locked(self.max_rows)
        return None if not seconds else self.max_rows / seconds

    def retry_after_s(self) -> int:
        """Whole seconds until the queue as it is now should have drained (at least 1)."""
        with self._cond:
            return self._retry_after_locked()

    # ---- shared state (callers hold self._cond)

    def _retry_after_locked(self) -> int:
        rows = self._rows["high"] + self._rows["low"]
        wait_s = self._predicted_wait_locked(rows, time.monotonic(), own_batch=False)
        return 1 if wait_s is None else max(1, math.ceil(wait_s))

    def _run_time_locked(self, rows: int) -> float | None:
        """Seconds a run of `rows` takes: measured, else the next larger size measured (a run of fewer rows takes
        no longer), else the largest measured scaled by rows (no gain from batching assumed); None before any."""
        if not self._run_s:
            return None
        if rows in self._run_s:
            return self._run_s[rows]
        larger = [r for r in self._run_s if r > rows]
        if larger:
            return self._run_s[min(larger)]
        largest = max(self._run_s)
        return self._run_s[largest] * rows / largest

    def _predicted_wait_locked(self, rows_ahead: int, now: float, own_batch: bool = True) -> float | None:
        """Seconds until a request with `rows_ahead` queued rows ahead of it starts (`own_batch`: it joins the batch
        after them; else: until they have all run), or None before any run was measured."""
        per_run = self.max_rows if self.batchable else 1
        wait_s = 0.0
        if self._busy:
            running = self._run_time_locked(max(1, self._running_rows))
            if running is None:
                return None
            wait_s += max(0.0, running - (now - self._run_started))
        full, rest = divmod(rows_ahead, per_run)
        if own_batch:
            rest = 0  # whatever is left over shares our batch
        for size, count in ((per_run, full), (rest, 1)):
            if size and count:
                seconds = self._run_time_locked(size)
                if seconds is None:
                    return None
                wait_s += count * seconds
        return wait_s

    def _overtaking_locked(self, now: float) -> float:
        """How much longer than its rows ahead predict a low request waits: high requests arriving meanwhile go
        ahead of it, so the model serves low rows at (service rate − high arrival rate) rows per second, not at the
        service rate. 1 without high traffic; capped at 10 (high traffic near the service rate)."""
        while self._high_arrivals and self._high_arrivals[0][0] < now - HIGH_RATE_WINDOW_S:
            self._high_arrivals.popleft()
        if not self._high_arrivals:
            return 1.0
        seconds = self._run_time_locked(self.max_rows if self.batchable else 1)
        if not seconds:
            return 1.0
        service = (self.max_rows if self.batchable else 1) / seconds  # rows per second, at full batches
        high = sum(rows for _, rows in self._high_arrivals) / HIGH_RATE_WINDOW_S
        return min(10.0, service / max(service - high, service / 10))

    def _shed_locked(self, reason: str, priority: str, why: str) -> Overloaded:
        self.metrics.shed.labels(reason=reason, priority=priority).inc()
        retry = self._retry_after_locked()
        return Overloaded(reason, retry, f"server busy: {why}; retry after {retry} s")

    def _remove_locked(self, pending: _Pending) -> None:
        self._queues[pending.priority].remove(pending)
        self._rows[pending.priority] -= pending.rows
        pending.state = _DONE
        self.metrics.queue_depth.set(len(self._queues["high"]) + len(self._queues["low"]))

    def _fail_locked(self, pending: _Pending, error: BaseException) -> None:
        pending.state = _DONE
        try:
            pending.loop.call_soon_threadsafe(_deliver, pending.future, None, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _expire_locked(self, now: float) -> None:
        for queue in self._queues.values():
            for pending in [p for p in queue if p.deadline <= now]:
                self._remove_locked(pending)
                self._fail_locked(pending, self._deadline_locked(pending, now))

    def _deadline_locked(self, pending: _Pending, now: float) -> Overloaded:
        waited_ms = 1000 * (now - pending.enqueued)
        why = f"queued {waited_ms:.0f} ms, its batch could not start within its deadline"
        return self._shed_locked("deadline", pending.priority, why)

    def _record_run_locked(self, rows: int, seconds: float) -> None:
        if rows <= 0 or seconds <= 0:
            return
        old = self._run_s.get(rows)
        self._run_s[rows] = seconds if old is None else RUN_TIME_ALPHA * seconds + (1 - RUN_TIME_ALPHA) * old

    # ---- request shapes

    def _describe(self, feeds: dict[str, Any]) -> tuple[int, Any, dict[str, int]]:
        """Rows, merge key and padded-axis lengths of one request (BadRequest when its feeds disagree)."""
        missing = [s.name for s in self.inputs if s.name not in feeds]
        if missing:
            raise BadRequest(f"missing input(s) {', '.join(map(repr, missing))}")
        if not self.batchable:
            return 1, object(), {}  # a key equal to nothing else: it runs alone
        rows_by_input = {s.name: int(feeds[s.name].shape[0]) for s in self.inputs}
        rows = next(iter(rows_by_input.values()))
        if any(r != rows for r in rows_by_input.values()):
            raise BadRequest(f"inputs disagree on the batch size: {rows_by_input}")
        lengths: dict[str, int] = {}
        key = []
        for spec in self.inputs:
            shape = feeds[spec.name].shape
            dims: list[int | None] = []
            for axis, (size, name) in enumerate(zip(shape[1:], spec.shape[1:], strict=False), start=1):
                if name in self.padded_axes:
                    if lengths.setdefault(name, size) != size:  # type: ignore[arg-type]
                        raise BadRequest(
                            f"input {spec.name!r}: axis {axis} ({name}) is {size}, another input's is {lengths[name]}"
                        )
                    dims.append(None)
                else:
                    dims.append(size)
            key.append((spec.name, str(feeds[spec.name].dtype), tuple(dims)))
        return rows, tuple(key), lengths

    # ---- the worker thread

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _seed_locked(self) -> _Pending | None:
        for priority in PRIORITIES:
            if self._queues[priority]:
                return self._queues[priority][0]
        return None

    def _mergeable_locked(self, seed: _Pending) -> list[_Pending]:
        """The requests that go with `seed` (itself first): same key, high before low, up to max_batch_size rows;
        within a priority, those closest to the seed's length along the padded axes first, so a batch pads little
        (a batch runs as long as its longest request). The seed is the oldest request of the highest priority, so
        a request of an unusual length waits its turn to seed a batch, never longer."""
        batch, rows = [seed], seed.rows
        for priority in PRIORITIES:
            candidates = [p for p in self._queues[priority] if p is not seed and p.key == seed.key]
            if seed.lengths:
                candidates.sort(key=lambda p: sum(abs(p.lengths[a] - n) for a, n in seed.lengths.items()))
            for pending in candidates:
                if rows + pending.rows <= self.max_rows:
                    batch.append(pending)
                    rows += pending.rows
        return batch

    def _next_batch(self) -> list[_Pending] | None:
        with self._cond:
            while True:
                if self._stopping:
                    for queue in self._queues.values():
                        for pending in list(queue):
                            self._remove_locked(pending)
                            self._fail_locked(pending, self._shed_locked("draining", pending.priority, "stopped"))
                    return None
                now = time.monotonic()
                self._expire_locked(now)
                seed = self._seed_locked()
                if seed is None:
                    self._cond.wait(0.05)
                    continue
                batch = self._mergeable_locked(seed)
                fill_by = seed.enqueued + self.delay_s
                if not self._draining and now < fill_by and sum(p.rows for p in batch) < self.max_rows:
                    self._cond.wait(fill_by - now)  # wakes on every arrival, then looks again
                    continue
                for pending in batch:
                    self._remove_locked(pending)
                    pending.state = _RUNNING
                self._running_rows = sum(p.rows for p in batch)
                self._run_started = now
                self._busy = True
                return batch

    def _run(self, batch: list[_Pending]) -> None:
        start = time.monotonic()
        for pending in batch:
            self.metrics.queue_time.observe(start - pending.enqueued)
        rows = sum(p.rows for p in batch)
        self.metrics.batch_size.observe(rows)
        results: list[dict[str, Any]] | None = None
        error: BaseException | None = None
        run_s = 0.0
        try:
            feeds = self._merge(batch)
            t0 = time.perf_counter()
            outputs = self.runner.run(feeds)
            run_s = time.perf_counter() - t0
            results = self._split(batch, outputs)
        except Exception as e:  # the model run failed: answer this batch, keep serving
            error = RunFailed(f"model run failed for a batch of {len(batch)} request(s): {first_line(e)}")
        with self._cond:
            for i, pending in enumerate(batch):
                pending.state = _DONE
                try:
                    pending.loop.call_soon_threadsafe(
                        _deliver, pending.future, None if results is None else results[i], error
                    )
                except RuntimeError:
                    pass
            self._record_run_locked(rows if error is None else 0, run_s)
            self._running_rows = 0
            self._busy = False

    def _merge(self, batch: list[_Pending]) -> dict[str, Any]:
        if len(batch) == 1 and not batch[0].lengths:
            return batch[0].feeds
        longest = {axis: max(p.lengths[axis] for p in batch) for axis in batch[0].lengths}
        merged = {}
        for spec in self.inputs:
            parts = [p.feeds[spec.name] for p in batch]
            shape = list(parts[0].shape)
            for axis, name in enumerate(spec.shape):
                if axis and name in longest:
                    shape[axis] = longest[name]  # type: ignore[index]
            if all(tuple(shape[1:]) == part.shape[1:] for part in parts):
                merged[spec.name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
                continue
            shape[0] = sum(part.shape[0] for part in parts)
            out = np.zeros(shape, dtype=parts[0].dtype)  # padding is 0: the attention mask's "not a token"
            row = 0
            for part in parts:
                out[(slice(row, row + part.shape[0]), *(slice(0, d) for d in part.shape[1:]))] = part
                row += part.shape[0]
            merged[spec.name] = out
        return merged

    def _split(self, batch: list[_Pending], outputs: dict[str, Any]) -> list[dict[str, Any]]:
        rows = sum(p.rows for p in batch)
        specs = {s.name: s for s in self.outputs}
        results: list[dict[str, Any]] = [{} for _ in batch]
        for name, value in outputs.items():
            array = np.asarray(value)
            spec_shape = specs[name].shape if name in specs else ()
            if len(batch) > 1 and (array.ndim == 0 or array.shape[0] != rows):
                raise RunFailed(f"output {name!r} has shape {list(array.shape)}, not {rows} rows: it cannot be split")
            row = 0
            for i, pending in enumerate(batch):
                part = array if len(batch) == 1 else array[row : row + pending.rows]
                row += pending.rows
                cut = [
                    slice(0, pending.lengths[d])
                    if axis and isinstance(d, str) and d in pending.lengths
                    else slice(None)
                    for axis, d in enumerate(spec_shape[: part.ndim])
                ]
                if any(s.stop is not None for s in cut):
                    part = part[tuple(cut)]
                results[i][name] = np.ascontiguousarray(part) if len(batch) > 1 or cut else part
        return results
