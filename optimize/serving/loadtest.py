"""The load test: an open-loop, constant-arrival-rate client of the Open Inference Protocol, the server's /metrics
scraped around each step, its process's CPU and peak RSS, and the step search for `max_rps_at_slo`;
`loadtest.json` and the latency-vs-load plot.

Open loop (wrk2's method): request i of a step is due at t0 + i / rps and is sent then, whether or not earlier
ones were answered; its latency runs from that due time, not from when it went out, so a server that stalls
cannot hide the queue it builds behind a client that waits (coordinated omission). Everything is bounded: the
step's length, requests in flight (past it a request counts as a `client_overload` error, it is not delayed),
each request's timeout, the requests of a step. Load goes to loopback unless the caller allows otherwise.

The client is a small HTTP/1.1 client on asyncio streams (keep-alive connections, one request per connection at
a time), not aiohttp: on this 2-core machine aiohttp spent ~800 µs of CPU per request against ~180 µs for
these streams, CPU the server under test would otherwise have.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import json
import math
import os
import resource
import selectors
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimize import progress as progress_api
from optimize.errors import RecipeError, StageError, first_line
from optimize.files import write_bytes, write_text
from optimize.lazy import lazy
from optimize.recipe import LoadSection, Recipe, SloSection
from optimize.serving.requests import encode_request, requests_from_recipe, specs_from_metadata

np = lazy("numpy")
psutil = lazy("psutil")
prom_parser = lazy("prometheus_client.parser")
mpl_agg = lazy("matplotlib.backends.backend_agg")
mpl_figure = lazy("matplotlib.figure")

MAX_REQUESTS_PER_STEP = 200_000  # a step's bound whatever its rate and length
MAX_IN_FLIGHT = 768  # requests outstanding at once, at most (half the open-file limit where that is lower)
SPIN_S = 0.0005  # the scheduler polls the loop for the last 0.5 ms before a due time (see _spin_s) ...
SPIN_SHARE = 0.1  # ... costing at most a tenth of a core (less time before each due time at higher rates)
SPIN_EPOLL_S = 0.001  # an epoll loop's timers wake up to 1 ms late (epoll_wait counts ms): the last ms is polled
FD_SETSIZE = 1024  # select() watches descriptors below this only
DRAIN_WAIT_S = 2.0  # between steps: wait for the server's queue to empty, this long at most
SCRAPE_TIMEOUT_S = 5.0
RSS_INTERVAL_S = 0.05
WARMUP_REQUESTS = 2
IDLE_S = 2.0  # a kept-alive connection idle longer is not reused (servers close theirs: uvicorn after 5 s)
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


# --- where the load may go --------------------------------------------------------------------------------


def check_url(url: str, allow_remote: bool = False) -> str:
    """`url` without a trailing slash, once it is an http(s) URL of a loopback host (127.0.0.0/8, ::1,
    localhost); another host only with `allow_remote` (RecipeError otherwise)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RecipeError(f"loadtest: {url!r} is not an http:// URL of a server (e.g. http://127.0.0.1:8000)")
    if not allow_remote and not _is_loopback(parts.hostname):
        raise RecipeError(
            f"loadtest: {parts.hostname} is not a loopback address; the load test sends load to this machine only "
            "(127.0.0.0/8, ::1, localhost), for tests and CI stages; pass --allow-remote to load another host"
        )
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _max_in_flight() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_IN_FLIGHT if soft == resource.RLIM_INFINITY else max(16, min(MAX_IN_FLIGHT, soft // 2))


def _lowest_free_fd() -> int:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


@contextlib.contextmanager
def _event_loop(max_in_flight: int) -> Iterator[tuple[asyncio.AbstractEventLoop, bool]]:
    """An event loop for the load, and whether it is epoll. asyncio's default (epoll) wakes timers up to 1 ms
    late, which would be counted in every latency; select() takes µs, so a select loop is used wherever every
    connection's descriptor stays below FD_SETSIZE, else epoll."""
    precise = _lowest_free_fd() + max_in_flight + 64 < FD_SETSIZE
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector()) if precise else asyncio.new_event_loop()
    try:
        yield loop, not precise
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# --- the server process: CPU and memory -------------------------------------------------------------------


def memory_limit_bytes(pid: int) -> int:
    """The memory process `pid` may use: its cgroup's limit (v2 `memory.max`, v1 `memory.limit_in_bytes`,
    the tightest on its path) where one is set and below the machine's RAM, else the machine's RAM."""
    total = int(psutil.virtual_memory().total)
    limits = [total]
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            limits += _cgroup_limits(Path("/sys/fs/cgroup"), path, "memory.max")
        elif "memory" in controllers.split(","):
            limits += _cgroup_limits(Path("/sys/fs/cgroup/memory"), path, "memory.limit_in_bytes")
    return min(limits)


def _cgroup_limits(root: Path, path: str, name: str) -> list[int]:
    """The limits in file `name` of the cgroup at `path` and its parents, as far as this mount shows them."""
    out = []
    folder = root / path.lstrip("/")
    for candidate in [folder, *folder.parents]:
        if not str(candidate).startswith(str(root)):
            break
        try:
            text = (candidate / name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < UNLIMITED:
            out.append(int(text))
    return out


class ProcessMonitor:
    """CPU utilisation (its CPU time / (wall time × the cores it may run on)) and peak RSS (sampled every
    50 ms in a thread) of one process over a block."""

    def __init__(self, pid: int) -> None:
        try:
            self.proc = psutil.Process(pid)
            self.cores = len(self.proc.cpu_affinity()) if hasattr(self.proc, "cpu_affinity") else os.cpu_count()
        except psutil.Error as e:
            raise RecipeError(f"loadtest: --server-pid {pid}: no such process to measure ({first_line(e)})") from None
        self.limit = memory_limit_bytes(pid)
        self.pid = pid
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rss_peak = 0
        self._cpu0 = self._t0 = 0.0
        self.result: dict[str, float | None] = {}

    def _cpu(self) -> float:
        times = self.proc.cpu_times()
        return float(times.user + times.system)

    def _sample(self) -> None:
        while True:
            try:
                self.rss_peak = max(self.rss_peak, int(self.proc.memory_info().rss))
            except psutil.Error:
                return
            if self._stop.wait(RSS_INTERVAL_S):
                return

    def __enter__(self) -> ProcessMonitor:
        self.rss_peak = 0
        self._cpu0, self._t0 = self._cpu_or_fail(), time.perf_counter()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        wall = time.perf_counter() - self._t0
        cpu = self._cpu_or_fail() - self._cpu0
        self.result = {
            "cpu_utilisation": round(cpu / (wall * self.cores), 4) if wall > 0 else None,
            "cpu_cores": round(cpu / wall, 4) if wall > 0 else None,  # what a Kubernetes CPU request counts
            "rss_peak_mb": round(self.rss_peak / 2**20, 1),
            "memory_utilisation": round(self.rss_peak / self.limit, 4),
        }

    def _cpu_or_fail(self) -> float:
        try:
            return self._cpu()
        except psutil.Error:
            raise StageError(f"loadtest: the server process {self.pid} exited during the load test") from None


# --- the HTTP client ---------------------------------------------------------------------------------------


class NoAnswer(Exception):
    """A request that got no HTTP answer: `kind` is "timeout" or "connection"."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class Client:
    """HTTP/1.1 to one server over asyncio streams: keep-alive connections, each carrying one request at a time
    (a new one opens when every open one is busy), answers framed by Content-Length or chunked."""

    def __init__(self, base: str) -> None:
        parts = urllib.parse.urlsplit(base)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.netloc = parts.netloc
        self.prefix = parts.path.rstrip("/")
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    def prepare(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
        """The bytes of one request (built once, sent as often as wanted)."""
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self.netloc}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def send(self, raw: bytes, timeout_s: float) -> tuple[int, bytes]:
        """Send a prepared request; its status and body. NoAnswer when none came within `timeout_s`."""
        conn = None
        try:
            async with _deadline(timeout_s):
                conn = await self._connection()
                conn[1].write(raw)
                status, body, close = await _read_response(conn[0])
        except (TimeoutError, asyncio.TimeoutError):
            self._drop(conn)
            raise NoAnswer("timeout", f"no answer within {timeout_s:g} s") from None
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            self._drop(conn)
            raise NoAnswer("connection", first_line(e) or type(e).__name__) from None
        if close:
            self._drop(conn)
        else:
            self._idle.append((conn[0], conn[1], time.perf_counter()))
        return status, body

    async def get(self, path: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> tuple[int, bytes]:
        """GET `path`."""
        return await self.send(self.prepare("GET", path), timeout_s)

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        now = time.perf_counter()
        while self._idle:
            reader, writer, since = self._idle.pop()
            if now - since < IDLE_S and not reader.at_eof():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port, ssl=self.tls or None)

    def _drop(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
        if conn is not None:
            conn[1].close()

    def close(self) -> None:
        """Close the kept-alive connections."""
        for _, writer, _ in self._idle:
            writer.close()
        self._idle.clear()


def _deadline(timeout_s: float) -> Any:
    """asyncio.timeout (Python 3.11+) as a context manager; on 3.10 a cancel of the task at the deadline."""
    if hasattr(asyncio, "timeout"):
        return asyncio.timeout(timeout_s)
    return _CancelAfter(timeout_s)


class _CancelAfter:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._fired = False

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        assert task is not None

        def fire() -> None:
            self._fired = True
            task.cancel()

        self._handle = asyncio.get_running_loop().call_later(self.timeout_s, fire)

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self._handle.cancel()
        if self._fired and exc_type is asyncio.CancelledError:
            raise asyncio.TimeoutError


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body and whether the server closes the connection, of one HTTP/1.x answer."""
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("the server closed the connection")
    version, status, *_ = line.split(None, 2)
    length, chunked, close = None, False, version == b"HTTP/1.0"
    while True:
        header = await reader.readline()
        if header in (b"\r\n", b"\n"):
            break
        if not header:
            raise ConnectionResetError("the server closed the connection in the headers")
        name, _, value = header.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
        elif name == b"connection":
            close = value == b"close" or (close and value != b"keep-alive")
    if chunked:
        parts = []
        while size := int((await reader.readline()).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return int(status), b"".join(parts), close
    if length is None:
        return int(status), await reader.read(), True
    return int(status), await reader.readexactly(length), close


# --- the server's /metrics --------------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: Client) -> Samples | None:
    """The server's Prometheus samples by (name, labels); None when it has no /metrics to read."""
    try:
        status, body = await client.get("/metrics")
    except NoAnswer:
        return None
    if status != 200:
        return None
    text = body.decode("utf-8", "replace")
    samples: Samples = {}
    try:
        for family in prom_parser.text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    except ValueError:
        return None
    return samples


def server_numbers(before: Samples | None, after: Samples | None) -> dict[str, Any]:
    """What the server counted between two scrapes: requests by status code, mean queue time (ms) and mean
    batch size (rows per model run) of the requests in between; None where it exposes no such metric."""
    if before is None or after is None:
        return {"queue_time_ms_mean": None, "batch_size_mean": None, "requests_by_code": None}

    def delta(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    by_code = {
        dict(labels).get("code", "?"): int(delta(name, labels))
        for name, labels in after
        if name == "optimize_requests_total"
    }
    queued = delta("optimize_queue_time_seconds_count")
    runs = delta("optimize_batch_size_count")
    has = {name for name, _ in after}
    return {
        "queue_time_ms_mean": round(1000 * delta("optimize_queue_time_seconds_sum") / queued, 3) if queued else None,
        "batch_size_mean": round(delta("optimize_batch_size_sum") / runs, 3) if runs else None,
        "requests_by_code": {k: v for k, v in sorted(by_code.items()) if v}
        if "optimize_requests_total" in has
        else None,
    }


def model_from_metrics(samples: Samples | None) -> str | None:
    """The served model's name from `optimize_model_info{name=...}`, when the server exposes it."""
    for name, labels in samples or {}:
        if name == "optimize_model_info" and dict(labels).get("name"):
            return dict(labels)["name"]
    return None


async def _wait_for_empty_queue(client: Client) -> None:
    deadline = time.perf_counter() + DRAIN_WAIT_S
    while time.perf_counter() < deadline:
        samples = await scrape(client)
        if samples is None or samples.get(("optimize_queue_depth", ()), 0.0) <= 0:
            return
        await asyncio.sleep(0.05)


# --- one step ----------------------------------------------------------------------------------------------


@dataclass
class _Step:
    """What the client saw of one step: per request its due time, completion time, outcome and priority."""

    due: Any
    sent: Any
    done: Any
    status: list[str]
    high: Any
    t0: float = 0.0
    t_end: float = 0.0
    in_flight: set[asyncio.Task] = field(default_factory=set)


def _spin_s(rps: float, epoll: bool) -> float:
    """How long before each due time the scheduler stops sleeping and polls the loop instead. A sleeping process
    wakes 0.15-0.4 ms late on this machine's VM even with select's µs timers (1 ms with epoll's), lateness every
    latency would carry; polling costs CPU the server may need, so at most SPIN_SHARE of a core."""
    return SPIN_EPOLL_S if epoll else min(SPIN_S, SPIN_SHARE / rps)


async def _sleep_until(due: float, spin_s: float) -> None:
    """Sleep until `spin_s` before `due` (perf_counter seconds), then poll the loop (it keeps serving answers)
    until `due`."""
    delay = due - time.perf_counter()
    if delay > spin_s:
        await asyncio.sleep(delay - spin_s)
    while time.perf_counter() < due:
        await asyncio.sleep(0)


async def _request(client: Client, raw: bytes, timeout_s: float, i: int, rec: _Step, progress: Any) -> None:
    try:
        status = str((await client.send(raw, timeout_s))[0])
    except NoAnswer as e:
        status = e.kind
    rec.done[i] = time.perf_counter()
    rec.status[i] = status
    progress.advance()


async def _send_step(
    client: Client, bodies: list[tuple[bytes, bool]], rps: float, count: int, timeout_s: float, max_in_flight: int,
    epoll: bool, progress: Any,
) -> _Step:  # fmt: skip
    """Send `count` requests at `rps`, each at its due time (open loop), then wait for every answer."""
    nan = np.full(count, np.nan)
    rec = _Step(np.zeros(count), nan.copy(), nan, ["client_overload"] * count, np.zeros(count, bool))
    progress.start(count, f"{rps:g} rps")
    spin_s = _spin_s(rps, epoll)
    rec.t0 = time.perf_counter() + 0.005
    for i in range(count):
        due = rec.t0 + i / rps
        rec.due[i] = due
        raw, high = bodies[i % len(bodies)]
        rec.high[i] = high
        await _sleep_until(due, spin_s)
        if len(rec.in_flight) >= max_in_flight:
            rec.done[i] = time.perf_counter()  # counted as an error, never delayed behind the others
            progress.advance()
            continue
        rec.sent[i] = time.perf_counter()
        task = asyncio.create_task(_request(client, raw, timeout_s, i, rec, progress))
        rec.in_flight.add(task)
        task.add_done_callback(rec.in_flight.discard)
    await asyncio.gather(*list(rec.in_flight))
    rec.t_end = max(float(np.nanmax(rec.done)), rec.t0)
    return rec


def _percentiles(values_ms: Any, which: tuple[str, ...]) -> dict[str, float] | None:
    if len(values_ms) == 0:
        return None
    qs = {"p50": 50, "p90": 90, "p99": 99, "p999": 99.9}
    out = {k: round(float(np.percentile(values_ms, qs[k])), 3) for k in which if k in qs}
    if "max" in which:
        out["max"] = round(float(np.max(values_ms)), 3)
    if "mean" in which:
        out["mean"] = round(float(np.mean(values_ms)), 3)
    return out


_LATENCY = ("p50", "p90", "p99", "p999", "max", "mean")


def _client_numbers(rec: _Step, rps: float, step_s: float, slo: SloSection) -> dict[str, Any]:
    """A step's numbers as the client measured them (latency from each request's due time)."""
    status = np.asarray(rec.status)
    latency_ms = (rec.done - rec.due) * 1000.0
    ok = status == "200"
    count = len(status)
    errors = Counter(str(s) for s in status[~ok])
    answered = int(sum(1 for s in status if s.isdigit()))
    lat = _percentiles(latency_ms[ok], _LATENCY)
    error_rate = round(float((count - ok.sum()) / count), 6) if count else 1.0
    wall = max(rec.t_end - rec.t0, count / rps)  # the schedule's length at least: the last is due at (n-1)/rps
    step = {
        "rps": rps,
        "duration_s": step_s,
        "wall_s": round(wall, 3),
        "scheduled": count,
        "sent": count - errors.get("client_overload", 0),
        "answered": answered,
        "ok": int(ok.sum()),
        "achieved_rps": round(float(ok.sum()) / wall, 3) if wall > 0 else 0.0,
        "errors": dict(sorted(errors.items())),
        "error_rate": error_rate,
        "latency_ms": lat,
        "shed_latency_ms": _percentiles(latency_ms[status == "503"], ("p50", "p99", "max")),
    }
    if rec.high.any() and not rec.high.all():
        step["by_priority"] = {
            name: {
                "sent": int(mask.sum()),
                "ok": int((ok & mask).sum()),
                "error_rate": round(float(1 - (ok & mask).sum() / mask.sum()), 6),
                "latency_ms": _percentiles(latency_ms[ok & mask], _LATENCY),
            }
            for name, mask in (("high", rec.high), ("low", ~rec.high))
        }
    step["within_slo"] = bool(lat is not None and lat["p99"] <= slo.p99_ms and error_rate <= slo.error_rate)
    return step


# --- the search ----------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One load test in progress: where it sends, what, and what it measured so far."""

    client: Client
    bodies: list[tuple[bytes, bool]]
    load: LoadSection
    slo: SloSection
    monitor: ProcessMonitor | None
    max_in_flight: int
    epoll: bool
    progress: Any
    on_step: Callable[[dict[str, Any]], None] | None
    steps: list[dict[str, Any]] = field(default_factory=list)

    async def measure(self, rps: float) -> dict[str, Any]:
        """One step at `rps`: scrape, send, wait for every answer, scrape; then let the server's queue empty."""
        count = max(1, min(MAX_REQUESTS_PER_STEP, round(rps * self.load.step_s)))
        before = await scrape(self.client)
        if self.monitor is not None:
            with self.monitor:
                rec = await self._send(rps, count)
            process = self.monitor.result
        else:
            rec = await self._send(rps, count)
            process = {"cpu_utilisation": None, "cpu_cores": None, "rss_peak_mb": None, "memory_utilisation": None}
        after = await scrape(self.client)
        step = _client_numbers(rec, rps, self.load.step_s, self.slo)
        within = step.pop("within_slo")
        step["send_lag_ms"] = _percentiles((rec.sent - rec.due)[~np.isnan(rec.sent)] * 1000.0, ("p50", "p99", "max"))
        step["server"] = {**server_numbers(before, after), **process}
        step["within_slo"] = within
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)
        await _wait_for_empty_queue(self.client)
        return step

    async def _send(self, rps: float, count: int) -> _Step:
        return await _send_step(
            self.client, self.bodies, rps, count, self.load.timeout_s, self.max_in_flight, self.epoll, self.progress
        )

    async def search(self) -> None:
        """The load's steps: the explicit `rps` list, or from `start_rps` × `growth` until a step breaks the SLO
        or `max_rps`, then `refine` bisections between the last passing and the first failing rate; then
        `target_rps` where that was not measured yet."""
        load = self.load
        if load.rps:
            for rps in load.rps:
                await self.measure(rps)
        else:
            passing, failing = 0.0, None
            rps = min(load.start_rps, load.max_rps)
            while True:
                step = await self.measure(rps)
                if not step["within_slo"]:
                    failing = rps
                    break
                passing = rps
                if rps >= load.max_rps:
                    break
                rps = min(rps * load.growth, load.max_rps)
            for _ in range(load.refine if failing is not None else 0):
                mid = round((passing + failing) / 2, 3)
                if mid <= 0 or mid in (passing, failing):
                    break
                step = await self.measure(mid)
                passing, failing = (mid, failing) if step["within_slo"] else (passing, mid)
        if load.target_rps is not None and all(s["rps"] != load.target_rps for s in self.steps):
            await self.measure(load.target_rps)


# --- the load test ---------------------------------------------------------------------------------------------


def run_loadtest(
    url: str,
    model: str,
    requests: list[dict[str, Any]],
    load: LoadSection,
    slo: SloSection,
    server_pid: int | None = None,
    progress: progress_api.Progress | None = None,
    *,
    allow_remote: bool = False,
    binary: bool = True,
    max_in_flight: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Load-test model `model` of the KServe v2 server at `url` with `requests` (feeds, sent in turn) in
    open-loop steps (`load`), judged against `slo`; returns the loadtest.json document. `server_pid`: the
    server's process, for its CPU utilisation and peak RSS (None: not measured). `on_step(step)` is called as
    each step ends. `max_in_flight`: requests outstanding at once (default: 768, or half the open-file
    limit); past it a due request is a `client_overload` error. Refuses a non-loopback `url` unless
    `allow_remote` (RecipeError)."""
    base = check_url(url, allow_remote)
    if not requests:
        raise RecipeError("loadtest: no requests to send (the evaluation dataset gave none)")
    top = max([*(load.rps or [load.max_rps]), load.target_rps or 0])
    if top * load.step_s > MAX_REQUESTS_PER_STEP:
        raise RecipeError(
            f"serving.load: {top:g} rps for {load.step_s:g} s is {top * load.step_s:.0f} requests in one step, over "
            f"the load test's bound of {MAX_REQUESTS_PER_STEP}; shorten `step_s` or lower the rates"
        )
    monitor = ProcessMonitor(server_pid) if server_pid is not None else None
    doc: dict[str, Any] = {
        "url": base,
        "model": model,
        "slo": slo.model_dump(mode="json"),
        "load": load.model_dump(mode="json"),
        "client": {"kind": "open-loop, asyncio streams", "binary": binary, "requests": len(requests)},
        "server_pid": server_pid,
        "notes": [] if monitor else ["no server pid: the server's CPU and memory were not measured"],
    }
    limit = max_in_flight or _max_in_flight()
    shown = progress or progress_api.NO_PROGRESS
    with _event_loop(limit) as (loop, epoll):
        run = loop.run_until_complete(
            _main(base, model, requests, load, slo, monitor, (limit, epoll), shown, on_step, binary)
        )
    doc["client"]["event_loop"] = "epoll" if epoll else "select"
    doc["client"]["max_in_flight"] = run.max_in_flight
    doc["steps"] = run.steps
    passing = [s for s in run.steps if s["within_slo"]]
    doc["max_rps_at_slo"] = max((s["rps"] for s in passing), default=0)
    doc["judged"] = judged_step(run.steps, load, doc["max_rps_at_slo"])
    doc["capacity"] = capacity(run.steps, doc["max_rps_at_slo"])
    return doc


def capacity(steps: list[dict[str, Any]], max_rps_at_slo: float) -> dict[str, Any] | None:
    """What the server used at its highest load within the SLO (the last step at `max_rps_at_slo`): CPU (cores)
    and peak RSS, the numbers a deployment's resources are sized from; None when no step was within the SLO."""
    at = [s for s in steps if s["rps"] == max_rps_at_slo and s["within_slo"]] if max_rps_at_slo else []
    if not at:
        return None
    server = at[-1]["server"]
    return {"rps": max_rps_at_slo, "cpu_cores": server.get("cpu_cores"), "rss_peak_mb": server.get("rss_peak_mb")}


def loadtest_server(
    url: str,
    recipe: Recipe,
    *,
    model: str | None = None,
    server_pid: int | None = None,
    allow_remote: bool = False,
    progress: progress_api.Progress | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """`optimize loadtest URL`: the served model (`model`, else the name in the server's `optimize_model_info`),
    its inputs from its KServe v2 metadata, requests from the recipe's evaluation dataset, `run_loadtest` with the
    recipe's `serving.load` and `serving.slo`."""
    base = check_url(url, allow_remote)
    name = model or asyncio.run(_served_name(base))
    if not name:
        raise RecipeError(f"loadtest: {base}/metrics names no model (optimize_model_info); give --model NAME")
    status, body = asyncio.run(_get(base, f"/v2/models/{urllib.parse.quote(name, safe='')}"))
    if status != 200:
        raise StageError(
            f"loadtest: {base}/v2/models/{name} answered HTTP {status}: {body[:200].decode(errors='replace')}"
        )
    try:
        metadata = json.loads(body)
    except ValueError:
        raise StageError(f"loadtest: {base}/v2/models/{name} did not answer JSON model metadata") from None
    requests = requests_from_recipe(recipe, specs_from_metadata(metadata))
    load, slo = recipe.serving.load, recipe.serving.slo
    return run_loadtest(
        base, name, requests, load, slo, server_pid, progress, allow_remote=allow_remote, on_step=on_step
    )


async def _get(base: str, path: str) -> tuple[int, bytes]:
    client = Client(base)
    try:
        return await client.get(path)
    except NoAnswer as e:
        raise StageError(f"loadtest: {base}{path} did not answer ({e}); is the server running there?") from None
    finally:
        client.close()


async def _served_name(base: str) -> str | None:
    client = Client(base)
    try:
        return model_from_metrics(await scrape(client))
    finally:
        client.close()


def _bodies(
    client: Client, path: str, requests: list[dict[str, Any]], high_share: float, binary: bool
) -> list[tuple[bytes, bool]]:
    """The requests as sent, in sending order, each with whether it has high priority: `high_share` of them,
    evenly spread (the list is repeated until the priorities and the requests line up over 100 requests)."""
    n = len(requests)
    if 0 < high_share < 1 and n < 100:
        n *= math.ceil(100 / n)
    out = []
    for i in range(n):
        high = math.floor((i + 1) * high_share) > math.floor(i * high_share)
        body, headers = encode_request(requests[i % len(requests)], binary, "high" if high else "low")
        out.append((client.prepare("POST", path, body, headers), high))
    return out


async def _main(
    base: str, model: str, requests: list[dict[str, Any]], load: LoadSection, slo: SloSection,
    monitor: ProcessMonitor | None, limits: tuple[int, bool], progress: Any,
    on_step: Callable[[dict[str, Any]], None] | None,
    binary: bool,
) -> _Run:  # fmt: skip
    client = Client(base)
    path = f"/v2/models/{urllib.parse.quote(model, safe='')}/infer"
    bodies = _bodies(client, path, requests, load.high_priority, binary)
    try:
        await _warm_up(client, f"{base}{path}", bodies, load.timeout_s)
        run = _Run(client, bodies, load, slo, monitor, *limits, progress, on_step)
        await run.search()
    finally:
        client.close()
    return run


async def _warm_up(client: Client, url: str, bodies: list[tuple[bytes, bool]], timeout_s: float) -> None:
    """A few requests one after another before the first step (a connection open, the server's first calls
    done); a server that cannot be reached, or refuses the requests themselves (4xx), ends the test here."""
    for raw, _ in bodies[:WARMUP_REQUESTS]:
        try:
            status, body = await client.send(raw, max(timeout_s, 10.0))
        except NoAnswer as e:
            raise StageError(f"loadtest: {url} did not answer ({e}); is the server running there?") from None
        if 400 <= status < 500:
            said = body[:300].decode("utf-8", "replace")
            raise StageError(f"loadtest: {url} refused the dataset's first request: HTTP {status} {said}")


def judged_step(steps: list[dict[str, Any]], load: LoadSection, max_rps_at_slo: float) -> dict[str, Any] | None:
    """The step the gates judge: at `target_rps` where set, else at `max_rps_at_slo`, else the first."""
    if not steps:
        return None
    if load.target_rps is not None:
        chosen, why = [s for s in steps if s["rps"] == load.target_rps][-1], "target_rps"
    elif max_rps_at_slo:
        chosen, why = [s for s in steps if s["rps"] == max_rps_at_slo and s["within_slo"]][-1], "max_rps_at_slo"
    else:
        chosen, why = steps[0], "first step (no step within the SLO)"
    server = chosen["server"]
    return {
        "rps": chosen["rps"],
        "why": why,
        "p99_ms": (chosen["latency_ms"] or {}).get("p99"),
        "error_rate": chosen["error_rate"],
        "cpu_utilisation": server["cpu_utilisation"],
        "cpu_cores": server.get("cpu_cores"),
        "rss_peak_mb": server["rss_peak_mb"],
        "memory_utilisation": server["memory_utilisation"],
        "within_slo": chosen["within_slo"],
    }


def judge(doc: dict[str, Any], slo: SloSection) -> list[str]:
    """What the judged step breaks of the SLO, each with its numbers (empty: it holds). CPU and memory are
    judged where they were measured."""
    j = doc.get("judged")
    if j is None:
        return ["no step was measured"]
    at = f"at {j['rps']:g} rps"
    out = []
    if j["p99_ms"] is None:
        out.append(f"{at} no request succeeded")
    elif j["p99_ms"] > slo.p99_ms:
        out.append(f"{at} p99 {j['p99_ms']:.1f} ms > {slo.p99_ms:g} ms")
    if j["error_rate"] > slo.error_rate:
        out.append(f"{at} error rate {j['error_rate']:.4%} > {slo.error_rate:.4%}")
    if j["cpu_utilisation"] is not None and j["cpu_utilisation"] > slo.cpu_utilisation:
        out.append(f"{at} CPU utilisation {j['cpu_utilisation']:.0%} > {slo.cpu_utilisation:.0%}")
    if j["memory_utilisation"] is not None and j["memory_utilisation"] > slo.memory_utilisation:
        out.append(f"{at} memory utilisation {j['memory_utilisation']:.0%} > {slo.memory_utilisation:.0%}")
    return out


def step_line(step: dict[str, Any]) -> str:
    """One step in one line, as the progress display shows it."""
    lat = step["latency_ms"] or {}
    p50, p99 = (f"{lat[k]:.1f} ms" if k in lat else "-" for k in ("p50", "p99"))
    errors = ", ".join(f"{k}: {v}" for k, v in step["errors"].items()) or "none"
    cpu = step["server"]["cpu_utilisation"]
    cpu_text = f", server CPU {cpu:.0%}" if cpu is not None else ""
    verdict = "within the SLO" if step["within_slo"] else "outside the SLO"
    return (
        f"{step['rps']:g} rps: achieved {step['achieved_rps']:.1f}/s, p50 {p50}, p99 {p99}, errors {errors} "
        f"({step['error_rate']:.2%}){cpu_text}: {verdict}"
    )


def summary_text(doc: dict[str, Any]) -> str:
    """The load test as a table (a row per step) and its outcome, for the terminal."""
    rows = [f"{'rps':>8} {'achieved':>9} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'errors':>7} "
            f"{'CPU':>5} {'RSS MB':>7}  SLO"]  # fmt: skip
    for s in doc["steps"]:
        lat, server = s["latency_ms"] or {}, s["server"]
        cells = [f"{s['rps']:>8g}", f"{s['achieved_rps']:>9.1f}"]
        cells += [f"{lat[k]:>{w}.1f}" if k in lat else f"{'-':>{w}}" for k, w in (("p50", 8), ("p99", 8), ("p999", 9))]
        cells.append(f"{s['error_rate']:>7.2%}")
        cpu, rss = server["cpu_utilisation"], server["rss_peak_mb"]
        cells += [
            f"{cpu:>5.0%}" if cpu is not None else f"{'-':>5}",
            f"{rss:>7.0f}" if rss is not None else f"{'-':>7}",
        ]
        rows.append(" ".join(cells) + ("  ok" if s["within_slo"] else "  over"))
    judged = doc["judged"]
    rows.append(
        f"{doc['model']} at {doc['url']}: max_rps_at_slo {doc['max_rps_at_slo']:g}; judged at {judged['rps']:g} rps "
        f"({judged['why']}): within the SLO"
    )
    return "\n".join(rows)


def write_loadtest(doc: dict[str, Any], path: Path) -> Path:
    """Write the load test's document as JSON, atomically."""
    write_text(Path(path), json.dumps(doc, indent=2) + "\n")
    return Path(path)


# --- the plot ----------------------------------------------------------------------------------------------------


def latency_plot_png(doc: dict[str, Any]) -> bytes:
    """p50 and p99 against the offered rate, the SLO's p99 as a line, `max_rps_at_slo` marked: PNG bytes."""
    fig = mpl_figure.Figure(figsize=(6.4, 3.6), dpi=100)
    mpl_agg.FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = sorted((s for s in doc["steps"] if s["latency_ms"]), key=lambda s: s["rps"])
    rps = [s["rps"] for s in steps]
    for key, style in (("p50", "o-"), ("p99", "s-")):
        ax.plot(rps, [s["latency_ms"][key] for s in steps], style, markersize=4, linewidth=1.2, label=key)
    failed = [s for s in steps if not s["within_slo"]]
    if failed:
        ax.plot([s["rps"] for s in failed], [s["latency_ms"]["p99"] for s in failed], "x", color="#c0392b",
                markersize=8, label="outside the SLO")  # fmt: skip
    ax.axhline(doc["slo"]["p99_ms"], color="#888888", linestyle="--", linewidth=1, label="p99 budget")
    if doc.get("max_rps_at_slo"):
        ax.axvline(doc["max_rps_at_slo"], color="#2e7d32", linestyle=":", linewidth=1.2)
        ax.annotate(f"max_rps_at_slo {doc['max_rps_at_slo']:g}", (doc["max_rps_at_slo"], doc["slo"]["p99_ms"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=8, color="#2e7d32")  # fmt: skip
    if rps and max(rps) / min(rps) > 8:
        ax.set_xscale("log")
    lat = [s["latency_ms"][k] for s in steps for k in ("p50", "p99")] + [doc["slo"]["p99_ms"]]
    if lat and max(lat) / max(min(lat), 1e-3) > 50:
        ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s)", fontsize=9)
    ax.set_ylabel("latency from due time (ms)", fontsize=9)
    ax.set_title(f"{doc['model']}: latency vs load", fontsize=10)
    ax.grid(True, color="#e6e6e6", linewidth=0.6)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def plot_latency_vs_load(doc: dict[str, Any], path: Path) -> Path:
    """Write `latency_plot_png(doc)` to `path`, atomically."""
    write_bytes(Path(path), latency_plot_png(doc))
    return Path(path)
