"""Issue 17's serving bars, measured on this machine: MiniLM FP32 and INT8 on ONNX Runtime (CPU), served by
`optimize serve` on 127.0.0.1 and driven by `optimize`'s open-loop load generator. Ratios are taken within
one run of this script.

Cores: with 2 or more cores, the server (and the bare ONNX Runtime loop it is compared with) runs on all
cores but the last, the load generator on the last, each with intra-op threads = its cores.

  1. generator honesty: the test-double server (tests/serving/double_server.py) sleeping a fixed 10 ms, at
     100 RPS: p50 within 1 ms of 10 ms; with one 1-s stall, the recorded p99 shows it (>= 900 ms).
  2. ready: `optimize serve` on the FP32 model, process start to ready file (the model loaded once before).
  3. per model (FP32, INT8):
     a. max_rps_at_slo with dynamic batching (batch-1 requests of real sentences, p99 <= 500 ms);
     b. a bare `session.run` loop at the batch size the batcher chose (the mean batch of that step, rounded),
        on the same sentences padded per batch as the batcher pads them: rows per second; and, for reference,
        what batching can give at most here: bare rows/s at batch 16 of length-sorted sentences / at batch 1;
     c. max_rps_at_slo without batching (max_batch_size 1, max_queue_delay_ms 0);
     d. overload at 3 x max_rps_at_slo (a) for --overload-s, 10 % high priority: p99 of the accepted, the
        slowest shed answer, connection errors and timeouts, the server's RSS before and after, p99 of high.
  4. SIGTERM drain: --drain-requests concurrent requests in flight, SIGTERM, every one answered 200.

Bars: (a) >= 0.85 x (b); (a) >= 2 x (c); overload: accepted p99 <= SLO, shed answered <= 50 ms, no connection
errors or timeouts, RSS growth <= 10 %, high p99 <= SLO; generator p50 in [10, 11] ms and stall p99 >= 900 ms;
ready <= 3 s; drain loses 0. Exit 0 when all hold, 1 otherwise.

    python benchmarks/serving.py                 # ~10 min on 2 cores
    python benchmarks/serving.py --quick         # shorter steps and overload, FP32 only (~3 min)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DOUBLE = REPO / "tests" / "serving" / "double_server.py"
SLO_P99_MS = 500.0
SHED_MS = 50.0


@contextmanager
def on_cores(cores: set[int]):
    """Run the block (and the processes it starts) on `cores`."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def prepare(tmp: Path, recipe_path: Path, want_int8: bool) -> tuple[dict[str, Path], Any]:
    """MiniLM exported as the recipe exports it, and its INT8 (ONNX Runtime dynamic, per-channel, 7-bit weights
    as recipes/int8.yaml's `int8` variant quantises it, without its fusion and fallback)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from optimize import export
    from optimize.models import load_model
    from optimize.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    loaded = load_model(recipe.model)
    models = {"fp32": tmp / "fp32.onnx"}
    export.export_onnx(loaded, recipe.export, models["fp32"])
    if want_int8:
        models["int8"] = tmp / "int8.onnx"
        quantize_dynamic(
            models["fp32"], models["int8"], weight_type=QuantType.QInt8, per_channel=True, reduce_range=True
        )
    return models, recipe


def serve_settings(tmp: Path, recipe_path: Path, name: str, threads: int, **serving: Any) -> Path:
    """A recipe extending `recipe_path` whose serving section sets `threads` and `serving`."""
    path = tmp / f"{name}.yaml"
    section = {"threads": threads, **serving}
    path.write_text(json.dumps({"extends": str(recipe_path), "serving": section}))
    return path


def search(server: Any, requests: list, load: Any, slo: Any) -> dict[str, Any]:
    from optimize.serving.loadtest import run_loadtest

    return run_loadtest(server.url, server.model, requests, load, slo, server_pid=server.pid)


def step_at(doc: dict[str, Any], rps: float) -> dict[str, Any]:
    return next(s for s in doc["steps"] if s["rps"] == rps)


def padded_batches(requests: list[dict[str, np.ndarray]], size: int) -> list[dict[str, np.ndarray]]:
    """Requests merged `size` at a time, right-padded with 0 to the longest of each batch (as the batcher pads)."""
    out = []
    for i in range(0, len(requests) - size + 1, size):
        group = requests[i : i + size]
        merged = {}
        for name in group[0]:
            width = max(r[name].shape[1] for r in group)
            merged[name] = np.concatenate([np.pad(r[name], ((0, 0), (0, width - r[name].shape[1]))) for r in group])
        out.append(merged)
    return out


def bare_rows_per_s(model: Path, requests: list, batch: int, threads: int, seconds: float) -> float:
    """A plain ONNX Runtime `session.run` loop over the requests merged `batch` at a time: rows per second."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])
    batches = padded_batches(requests, batch)
    for b in batches[:5]:
        session.run(None, b)
    rows, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in batches:
            session.run(None, b)
            rows += batch
    return rows / (time.perf_counter() - t0)


def ready_seconds(model: Path, recipe: Path, repeat: int) -> list[float]:
    """Process start to ready file of `optimize serve` (the model file read once before: the page cache is warm)."""
    times = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            ready = Path(tmp) / "ready.json"
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "optimize",
                    "serve",
                    str(model),
                    "--recipe",
                    str(recipe),
                    "--port",
                    "0",
                    "--ready-file",
                    str(ready),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            while not ready.exists() and proc.poll() is None and time.perf_counter() - t0 < 60:
                time.sleep(0.005)
            times.append(time.perf_counter() - t0)
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return times


def blocking_client_p50(port: int, body: bytes, headers: dict[str, str], n: int = 200, rps: float = 50) -> float:
    """The floor: a minimal blocking HTTP client (one keep-alive socket, send, read the answer), its p50 from send
    to answer at `rps`. What it measures beyond the server's sleep is loopback and the VM's wake-ups, which any
    client pays; the generator's p50 minus this is what the generator itself adds."""
    import socket

    head = f"POST /v2/models/double/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    raw = (head + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode() + body
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lat, t0 = [], time.perf_counter() + 0.01
    for i in range(n):
        wait = t0 + i / rps - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        sent = time.perf_counter()
        s.sendall(raw)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(65536)
        top, _, rest = buf.partition(b"\r\n\r\n")
        size = int(next(x for x in top.split(b"\r\n") if x.lower().startswith(b"content-length")).split(b":")[1])
        while len(rest) < size:
            rest += s.recv(65536)
        lat.append((time.perf_counter() - sent) * 1e3)
    s.close()
    return float(np.percentile(lat, 50))


def generator_honesty(tmp: Path) -> dict[str, float]:
    from optimize.recipe import LoadSection, SloSection
    from optimize.serving import loadtest

    rng = np.random.default_rng(0)
    requests = [{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(16)]
    out = {}
    for name, flags in (("plain", []), ("stall", ["--stall-at", str(200 + loadtest.WARMUP_REQUESTS)])):
        ready = tmp / f"double-{name}"
        proc = subprocess.Popen([sys.executable, str(DOUBLE), "--ready-file", str(ready), "--service-ms", "10", *flags])
        try:
            while not ready.exists():
                time.sleep(0.02)
            url = f"http://127.0.0.1:{ready.read_text()}"
            doc = loadtest.run_loadtest(url, "double", requests, LoadSection(rps=[100], step_s=4), SloSection())
            out[name] = doc["steps"][0]["latency_ms"]
            if name == "plain":
                from optimize.serving.requests import encode_request

                out["floor"] = blocking_client_p50(int(ready.read_text()), *encode_request(requests[0]))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    return {"p50_ms": out["plain"]["p50"], "stall_p99_ms": out["stall"]["p99"], "floor_p50_ms": out["floor"]}


def drain_lost(model: Path, recipe: Path, requests: list, n: int) -> tuple[int, int]:
    """`n` requests in flight at once, then SIGTERM: (answered 200, lost or refused)."""
    from optimize.serving.requests import encode_request
    from optimize.serving.server import start_local

    with start_local(model, recipe=recipe) as server:
        parts = urllib.parse.urlsplit(server.url)
        path = f"/v2/models/{urllib.parse.quote(server.model)}/infer"

        def one(i: int) -> int:
            body, headers = encode_request(requests[i % len(requests)], binary=True)
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            try:
                conn.request("POST", path, body=body, headers=headers)
                return conn.getresponse().status
            except OSError:
                return -1
            finally:
                conn.close()

        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(one, i) for i in range(n)]
            time.sleep(0.2)  # the requests are sent and queued
            os.kill(server.pid, signal.SIGTERM)
            codes = [f.result() for f in futures]
        code = server.proc.wait(60)
    ok = sum(c == 200 for c in codes)
    return ok, n - ok + (code != 0)


def measure_model(name: str, path: Path, args: Any, tmp: Path, cores: dict[str, set[int]], requests: list) -> dict:
    from optimize.recipe import LoadSection, SloSection
    from optimize.serving.server import start_local

    slo = SloSection(p99_ms=SLO_P99_MS)
    threads = len(cores["server"])
    search_load = LoadSection(start_rps=args.start_rps, growth=2, refine=args.refine, step_s=args.step_s)
    row: dict[str, Any] = {"model": name}
    for mode, extra in (("batched", {}), ("unbatched", {"max_batch_size": 1, "max_queue_delay_ms": 0})):
        recipe = serve_settings(tmp, args.recipe, f"{name}-{mode}", threads, **extra)
        with on_cores(cores["server"]), start_local(path, recipe=recipe) as server, on_cores(cores["generator"]):
            doc = search(server, requests, search_load, slo)
            row[mode] = doc
            if mode == "batched" and doc["max_rps_at_slo"]:
                over = 3 * doc["max_rps_at_slo"]
                rss_before = step_at(doc, doc["max_rps_at_slo"])["server"]["rss_peak_mb"]
                load = LoadSection(rps=[over], step_s=args.overload_s, high_priority=0.1)
                row["overload"] = {
                    "rps": over,
                    "rss_before_mb": rss_before,
                    **search(server, requests, load, slo)["steps"][0],
                }
    best = step_at(row["batched"], row["batched"]["max_rps_at_slo"]) if row["batched"]["max_rps_at_slo"] else None
    batch = max(1, round(best["server"]["batch_size_mean"])) if best else 1
    with on_cores(cores["server"]):
        row["bare_rows_per_s"] = bare_rows_per_s(path, requests, batch, threads, args.bare_s)
        # what batching can give at most on these cores: batches of 16 equal-ish lengths against batch 1
        by_length = sorted(requests, key=lambda r: next(iter(r.values())).shape[-1])
        row["bare_16_sorted"] = bare_rows_per_s(path, by_length, 16, threads, args.bare_s)
        row["bare_1"] = bare_rows_per_s(path, requests, 1, threads, args.bare_s)
    row["bare_batch"] = batch
    return row


def verdicts(
    rows: list[dict], honesty: dict, ready: list[float], drain: tuple[int, int]
) -> list[tuple[str, str, bool]]:
    checks = [
        ("generator p50 at 100 RPS vs a 10-ms server", f"{honesty['p50_ms']:.2f} ms", 10 <= honesty["p50_ms"] <= 11),
        ("  reference: a blocking client's p50, send to answer, 50 RPS", f"{honesty['floor_p50_ms']:.2f} ms", None),
        ("generator p99 with a 1-s stall", f"{honesty['stall_p99_ms']:.0f} ms", honesty["stall_p99_ms"] >= 900),
        (
            "serve ready (median of runs)",
            f"{sorted(ready)[len(ready) // 2]:.2f} s",
            sorted(ready)[len(ready) // 2] <= 3,
        ),
        ("SIGTERM drain: answered / lost", f"{drain[0]} / {drain[1]}", drain[1] == 0),
    ]
    for r in rows:
        a, c = r["batched"]["max_rps_at_slo"], r["unbatched"]["max_rps_at_slo"]
        m = r["model"]
        checks.append(
            (
                f"{m}: served rps at SLO / bare rows/s at batch {r['bare_batch']}",
                f"{a:.0f} / {r['bare_rows_per_s']:.0f} = {a / r['bare_rows_per_s']:.2f}",
                a >= 0.85 * r["bare_rows_per_s"],
            )
        )
        checks.append(
            (f"{m}: batched / unbatched rps at SLO", f"{a:.0f} / {c:.0f} = {a / max(c, 1e-9):.2f}", a >= 2 * c)
        )
        ceiling = r["bare_16_sorted"] / r["bare_1"]
        checks.append((f"  {m}: bare rows/s, batch 16 (lengths sorted) / batch 1", f"{ceiling:.2f}", None))
        o = r.get("overload")
        if o is None:
            checks.append((f"{m}: overload", "no passing step to overload", False))
            continue
        lost = {k: v for k, v in o["errors"].items() if k not in ("503",)}
        shed = (o.get("shed_latency_ms") or {}).get("max", 0.0)
        high = ((o.get("by_priority") or {}).get("high") or {}).get("latency_ms", {}).get("p99", float("nan"))
        growth = o["server"]["rss_peak_mb"] / o["rss_before_mb"] - 1
        checks += [
            (
                f"{m}: overload {o['rps']:.0f} rps: accepted p99",
                f"{o['latency_ms']['p99']:.0f} ms",
                o["latency_ms"]["p99"] <= SLO_P99_MS,
            ),
            (f"{m}: overload: slowest shed answer", f"{shed:.1f} ms", shed <= SHED_MS),
            (f"{m}: overload: errors other than 503", json.dumps(lost) if lost else "none", not lost),
            (f"{m}: overload: RSS growth", f"{100 * growth:+.1f} %", growth <= 0.10),
            (f"{m}: overload: high-priority p99", f"{high:.0f} ms", high <= SLO_P99_MS),
        ]
    return checks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "fp16.yaml")
    ap.add_argument("--quick", action="store_true", help="FP32 only, 2-s steps, 10-s overload")
    ap.add_argument("--step-s", type=float, default=5.0)
    ap.add_argument("--start-rps", type=float, default=20.0)
    ap.add_argument("--refine", type=int, default=4)
    ap.add_argument("--overload-s", type=float, default=30.0)
    ap.add_argument("--bare-s", type=float, default=5.0)
    ap.add_argument("--drain-requests", type=int, default=32)
    ap.add_argument("--out", type=Path, help="also write every load-test document and number here (JSON)")
    args = ap.parse_args()
    if args.quick:
        args.step_s, args.overload_s, args.refine = 2.0, 10.0, 3
    args.recipe = args.recipe.resolve()

    from optimize.runtimes import open_runner
    from optimize.serving.requests import requests_from_recipe

    all_cores = sorted(os.sched_getaffinity(0))
    if len(all_cores) >= 2:
        cores = {"server": set(all_cores[:-1]), "generator": {all_cores[-1]}}
    else:
        cores = {"server": set(all_cores), "generator": set(all_cores)}
    print(
        f"cores: server {sorted(cores['server'])}, generator {sorted(cores['generator'])}; "
        f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as t:
        tmp = Path(t)
        honesty = generator_honesty(tmp)
        print(f"generator: {honesty}", flush=True)
        models, recipe = prepare(tmp, args.recipe, want_int8=not args.quick)
        with open_runner("onnxruntime-cpu", models["fp32"]) as runner:
            requests = requests_from_recipe(recipe, runner.inputs)
        plain = serve_settings(tmp, args.recipe, "plain", len(cores["server"]))
        ready = ready_seconds(models["fp32"], plain, 3)
        print(f"ready: {[round(x, 2) for x in ready]} s", flush=True)
        drain = drain_lost(models["fp32"], plain, requests, args.drain_requests)
        rows = []
        for name, path in models.items():
            rows.append(measure_model(name, path, args, tmp, cores, requests))
            r = rows[-1]
            print(
                f"{name}: batched {r['batched']['max_rps_at_slo']:.0f} rps, unbatched "
                f"{r['unbatched']['max_rps_at_slo']:.0f} rps, bare {r['bare_rows_per_s']:.0f} rows/s",
                flush=True,
            )
    checks = verdicts(rows, honesty, ready, drain)
    if args.out:
        args.out.write_text(
            json.dumps({"honesty": honesty, "ready_s": ready, "drain": drain, "models": rows}, indent=1)
        )
    width = max(len(c[0]) for c in checks)
    print(f"\n{'check':<{width}}  {'measured':<28}  bar")
    for what, value, ok in checks:
        print(f"{what:<{width}}  {value:<28}  {'-' if ok is None else 'met' if ok else 'NOT MET'}")
    print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if all(ok is not False for *_, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
