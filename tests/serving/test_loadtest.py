"""The load generator against test-double servers it does not share code with (a small Starlette app in a child
process on 127.0.0.1): its honesty (open loop, latency from the due time), the step search, errors by code, the
server's /metrics and process numbers, the loopback rule, and `optimize loadtest`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from optimize.errors import RecipeError, StageError
from optimize.recipe import LoadSection, SloSection
from optimize.serving import loadtest
from optimize.serving.loadtest import check_url, judge, run_loadtest

REPO = Path(__file__).resolve().parents[2]

# The test double of the server (its docstring says what it does); benchmarks/serving.py runs it too.
DOUBLE = Path(__file__).with_name("double_server.py")


@dataclass
class Double:
    url: str
    pid: int


@pytest.fixture()
def double(tmp_path: Path) -> Iterator[Callable[..., Double]]:
    """double(*flags) starts a test-double server (127.0.0.1, a port the OS picks); all are stopped after the test."""
    procs: list[subprocess.Popen] = []

    def start(*flags: str) -> Double:
        ready = tmp_path / f"ready-{len(procs)}"
        proc = subprocess.Popen([sys.executable, str(DOUBLE), "--ready-file", str(ready), *flags])
        procs.append(proc)
        deadline = time.monotonic() + 20
        while not ready.exists():
            assert proc.poll() is None, "the test double exited"
            assert time.monotonic() < deadline, "the test double did not start"
            time.sleep(0.02)
        return Double(f"http://127.0.0.1:{ready.read_text()}", proc.pid)

    try:
        yield start
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def requests(n: int = 16) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)  # the generator's tests; real data is test_requests.py's
    return [{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(n)]


def test_generator_is_honest_at_100_rps(double: Callable[..., Double]) -> None:
    server = double("--service-ms", "10")
    load = LoadSection(rps=[100], step_s=2)
    doc = run_loadtest(server.url, "double", requests(), load, SloSection(p99_ms=50), server_pid=server.pid)
    (step,) = doc["steps"]
    assert step["scheduled"] == step["sent"] == step["ok"] == 200 and step["errors"] == {}
    # The server sleeps 10 ms: what the client adds (late sends, HTTP both ways, the double's thread) is small.
    # Measured here: p50 10.96-11.07 ms on the idle machine (a minimal blocking socket client gets 10.7-10.8 against
    # this double at 50 rps, the generator 10.9: the rest is loopback and the VM's wake-ups), 11.3-11.8 ms with
    # both cores busy with other tests (load average 2.3-3).
    assert 10.0 <= step["latency_ms"]["p50"] <= 12.5, step["latency_ms"]
    assert step["send_lag_ms"]["p50"] < 0.75, step["send_lag_ms"]
    assert 1.95 < step["wall_s"] < 2.3 and 85 < step["achieved_rps"] <= 101
    server_side = step["server"]
    assert server_side["requests_by_code"] == {"200": 200}  # the warm-up's requests fell before the first scrape
    assert server_side["batch_size_mean"] == 1.0 and server_side["queue_time_ms_mean"] < 2
    # the double's process: some CPU (HTTP, JSON, 200 requests) and the RSS of a Python with Starlette
    assert 0 < server_side["cpu_utilisation"] < 0.5
    rss_now = psutil.Process(server.pid).memory_info().rss / 2**20
    assert 15 < server_side["rss_peak_mb"] <= rss_now * 1.2
    limit = loadtest.memory_limit_bytes(server.pid)
    assert server_side["memory_utilisation"] == pytest.approx(server_side["rss_peak_mb"] * 2**20 / limit, rel=0.01)
    assert doc["max_rps_at_slo"] == 100 and doc["judged"]["rps"] == 100 and judge(doc, SloSection(p99_ms=50)) == []


def test_a_stall_shows_in_the_percentiles(double: Callable[..., Double]) -> None:
    """Request 100 of 200 stalls the server 1 s: every request due during the stall waits for its end. Open loop,
    the ~100 requests due then record 1000..0 ms; a closed-loop client would have sent one and recorded one."""
    server = double("--service-ms", "10", "--stall-at", str(100 + loadtest.WARMUP_REQUESTS))
    doc = run_loadtest(server.url, "double", requests(), LoadSection(rps=[100], step_s=2), SloSection())
    latency = doc["steps"][0]["latency_ms"]
    assert latency["p99"] >= 900 and latency["max"] >= 980, latency
    assert latency["p90"] >= 600, latency  # ~half of the stalled requests waited over 500 ms
    assert doc["steps"][0]["within_slo"] is False and doc["max_rps_at_slo"] == 0
    assert judge(doc, SloSection()) == [f"at 100 rps p99 {latency['p99']:.1f} ms > 500 ms"]


def test_search_finds_the_capacity_of_a_server(double: Callable[..., Double]) -> None:
    """A server that serves one request at a time, 10 ms each, carries 100 rps; past that its queue grows (at 120
    rps by 10 requests, 100 ms of waiting, in a step of 0.5 s)."""
    server = double("--service-ms", "10", "--serial")
    load = LoadSection(start_rps=30, growth=2, refine=2, step_s=0.5, max_rps=1000)
    seen: list[float] = []
    doc = run_loadtest(
        server.url, "double", requests(), load, SloSection(p99_ms=50), on_step=lambda s: seen.append(s["rps"])
    )
    rates = [s["rps"] for s in doc["steps"]]
    assert rates == seen and rates[:3] == [30, 60, 120] and rates[3] == 90 and len(rates) == 5
    verdicts = {s["rps"]: s["within_slo"] for s in doc["steps"]}
    assert verdicts[30] and verdicts[60] and not verdicts[120]
    assert 60 <= doc["max_rps_at_slo"] <= 105, verdicts
    assert doc["judged"]["rps"] == doc["max_rps_at_slo"] and doc["judged"]["why"] == "max_rps_at_slo"
    over = next(s for s in doc["steps"] if s["rps"] == 120)
    assert over["latency_ms"]["p99"] > 50 and over["achieved_rps"] < 110  # it queued what it could not serve
    assert all(s["server"]["cpu_utilisation"] is None for s in doc["steps"])  # no pid given: not measured
    assert doc["notes"] == ["no server pid: the server's CPU and memory were not measured"]


def test_errors_by_code_priorities_and_the_server_counters(double: Callable[..., Double]) -> None:
    """Every 10th request shed (503), every 25th (not a 50th) answered after the client's timeout."""
    server = double("--service-ms", "5", "--shed-every", "10", "--hang-every", "25")
    load = LoadSection(rps=[100], step_s=1, timeout_s=0.4, high_priority=0.5)
    doc = run_loadtest(server.url, "double", requests(), load, SloSection(), server_pid=server.pid, binary=True)
    (step,) = doc["steps"]
    assert step["errors"] == {"503": 10, "timeout": 2} and step["ok"] == 88 and step["answered"] == 98
    assert step["error_rate"] == pytest.approx(0.12) and step["within_slo"] is False
    assert step["shed_latency_ms"]["max"] < 50  # a 503 is fast
    assert step["by_priority"]["high"]["sent"] == step["by_priority"]["low"]["sent"] == 50
    by_code = step["server"]["requests_by_code"]
    assert by_code["503"] == 10 and 88 <= by_code["200"] <= 90  # the two late 200s may come after the scrape
    assert judge(doc, SloSection()) == ["at 100 rps error rate 12.0000% > 0.1000%"]


def test_past_max_in_flight_requests_are_errors_not_delays(double: Callable[..., Double]) -> None:
    server = double("--service-ms", "300")
    load = LoadSection(rps=[40], step_s=1)
    doc = run_loadtest(server.url, "double", requests(), load, SloSection(), max_in_flight=4)
    (step,) = doc["steps"]
    overload = step["errors"]["client_overload"]
    assert step["scheduled"] == 40 and step["sent"] == 40 - overload and step["ok"] == step["sent"]
    assert overload >= 25  # 4 at a time, 300 ms each: ~16 can go in 1.3 s
    assert step["wall_s"] < 1.6  # the schedule was kept: nothing waited for a free slot
    assert step["latency_ms"]["max"] < 450


def test_load_goes_to_loopback_only() -> None:
    for url in ("http://10.0.0.1:8000", "http://example.com", "https://8.8.8.8/"):
        with pytest.raises(RecipeError, match="not a loopback address.*--allow-remote"):
            run_loadtest(url, "m", requests(), LoadSection(rps=[1], step_s=1), SloSection())
    for url in ("http://127.0.0.1:1", "http://127.3.2.1:80/", "http://[::1]:8000", "http://localhost:9"):
        assert check_url(url) == url.rstrip("/")
    assert check_url("http://10.0.0.1:8000", allow_remote=True) == "http://10.0.0.1:8000"
    with pytest.raises(RecipeError, match="not an http:// URL"):
        check_url("127.0.0.1:8000")


def test_a_server_that_does_not_answer_is_a_stage_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    with pytest.raises(StageError, match=f"127.0.0.1:{port}/v2/models/m/infer did not answer"):
        run_loadtest(f"http://127.0.0.1:{port}", "m", requests(), LoadSection(rps=[5], step_s=1), SloSection())


def test_bounds_and_the_plot(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="over the load test's bound"):
        run_loadtest("http://127.0.0.1:1", "m", requests(), LoadSection(rps=[5000], step_s=60), SloSection())
    step = {
        "rps": 10,
        "within_slo": True,
        "latency_ms": {"p50": 5.0, "p99": 9.0},
        "error_rate": 0.0,
        "server": {"cpu_utilisation": 0.2, "rss_peak_mb": 100, "memory_utilisation": 0.01},
    }
    doc = {"model": "m", "slo": {"p99_ms": 20}, "steps": [step, {**step, "rps": 20, "within_slo": False}]}
    doc["max_rps_at_slo"] = 10
    png = loadtest.plot_latency_vs_load(doc, tmp_path / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_cli_loadtest_exit_codes(
    double: Callable[..., Double], write_recipe: Callable[..., Path], tmp_path: Path
) -> None:
    """`optimize loadtest URL --recipe R`: requests from the recipe's evaluation data, the model's name from the
    server's metrics, loadtest.json and the plot written; exit 1 when the judged step breaks the SLO."""
    server = double("--service-ms", "10")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def loadtest_cli(p99_ms: float, cpu: float) -> subprocess.CompletedProcess:
        serving = {"load": {"rps": [20], "step_s": 0.5}, "slo": {"p99_ms": p99_ms, "cpu_utilisation": cpu}}
        recipe = write_recipe({"serving": serving}, name=f"r{p99_ms}.yaml")
        out = tmp_path / f"lt-{p99_ms}.json"
        args = ["--recipe", str(recipe), "--out", str(out), "--plot", str(out.with_suffix(".png")), "--json"]
        cmd = [sys.executable, "-m", "optimize", "loadtest", server.url, *args, "--server-pid", str(server.pid)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)

    ok = loadtest_cli(200, 0.7)
    assert ok.returncode == 0, ok.stderr
    shown = json.loads(ok.stdout)
    assert shown["status"] == "passed" and shown["model"] == "double" and shown["max_rps_at_slo"] == 20
    written = json.loads((tmp_path / "lt-200.json").read_text())
    assert written["steps"][0]["ok"] == 10 and written["judged"]["cpu_utilisation"] is not None
    assert (tmp_path / "lt-200.png").read_bytes().startswith(b"\x89PNG")

    failed = loadtest_cli(2, 0.7)
    assert failed.returncode == 1, failed.stderr
    p99 = json.loads((tmp_path / "lt-2.json").read_text())["judged"]["p99_ms"]
    assert f"error: loadtest {server.url}: at 20 rps p99 {p99:.1f} ms > 2 ms" in failed.stderr
    assert json.loads(failed.stdout)["status"] == "failed"
