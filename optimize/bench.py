"""Benchmark protocol: per shape, warm up every runner, then time them interleaved (rotating the order
each iteration) so that the baseline/variant ratio survives a noisy machine. Peak memory is measured
in a fresh process per artifact, so one model's allocations never count against another's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from optimize.errors import RecipeError, StageError
from optimize.files import write_npz
from optimize.recipe import shape_key
from optimize.runtimes.base import TensorSpec


def make_feeds(
    inputs: list[TensorSpec], shape: dict[str, int], sample: dict[str, np.ndarray], where: str
) -> dict[str, np.ndarray]:
    """Feeds of the given shape built from real sample data: each axis cropped, or tiled when longer."""
    feeds = {}
    for spec in inputs:
        dims = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif d in shape:
                dims.append(shape[d])
            else:
                raise RecipeError(
                    f"{where}: no size for axis {axis} ({d!r}) of input {spec.name!r}; add {d!r} to the shape"
                )
        arr = sample[spec.name]
        for axis, size in enumerate(dims):
            idx = np.arange(size) % arr.shape[axis]
            arr = np.take(arr, idx, axis=axis)
        feeds[spec.name] = np.ascontiguousarray(arr.astype(spec.dtype, copy=False))
    return feeds


def latency_stats(samples_ns: list[int], batch: int) -> dict[str, float]:
    """Latency distribution (ms), coefficient of variation and throughput (items/s) of timed runs."""
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    mean = float(ms.mean())
    std = float(ms.std(ddof=1)) if len(ms) > 1 else 0.0
    return {
        "iterations": int(len(ms)),
        "mean_ms": mean,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "std_ms": std,
        "cv": std / mean if mean > 0 else 0.0,
        "items_per_s": batch / (mean / 1e3) if mean > 0 else 0.0,
    }


def time_interleaved(
    runners: dict[str, Any], feeds: dict[str, np.ndarray], warmup: int, iterations: int
) -> dict[str, list[int]]:
    """Warm up each runner, then run them round-robin `iterations` times; per runner, ns per run."""
    for runner in runners.values():
        for _ in range(warmup):
            runner.run(feeds)
    keys = list(runners)
    timings: dict[str, list[int]] = {k: [] for k in keys}
    clock = time.perf_counter_ns
    for i in range(iterations):
        shift = i % len(keys)
        for k in keys[shift:] + keys[:shift]:
            run = runners[k].run
            t0 = clock()
            run(feeds)
            timings[k].append(clock() - t0)
    return timings


def add_speedups(stats: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """Speed-up ratios of a variant against the baseline on the same target and shape (>1 is faster)."""
    return {
        **stats,
        "p50_speedup": baseline["p50_ms"] / stats["p50_ms"],
        "p99_speedup": baseline["p99_ms"] / stats["p99_ms"],
        "mean_speedup": baseline["mean_ms"] / stats["mean_ms"],
        "throughput_speedup": stats["items_per_s"] / baseline["items_per_s"],
    }


def run_shapes(
    runners: dict[str, Any], spec: Any, sample: dict[str, np.ndarray], baseline: str
) -> dict[str, dict[str, dict[str, Any]]]:
    """The benchmark protocol on one target: for each of `spec.shapes`, feeds cut from `sample`, all runners
    timed interleaved, latency statistics per runner and speed-ups against `baseline`.

    Returns {runner name: {shape key: stats}}; `cv_warning` marks stats noisier than `spec.cv_warn`.
    """
    inputs = runners[baseline].inputs
    out: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in runners}
    for i, shape in enumerate(spec.shapes):
        feeds = make_feeds(inputs, shape, sample, f"benchmark.shapes[{i}]")
        batch = len(next(iter(feeds.values())))
        timings = time_interleaved(runners, feeds, spec.warmup, spec.iterations)
        base = latency_stats(timings[baseline], batch)
        for name in runners:
            stats = base if name == baseline else add_speedups(latency_stats(timings[name], batch), base)
            out[name][shape_key(shape)] = {**stats, "cv_warning": stats["cv"] > spec.cv_warn}
    return out


_PROBE = r"""
import json, sys
import numpy as np
from optimize.runtimes import open_runner, unavailable_reason
def status_mb(key):
    # VmHWM is this process's own peak; getrusage's ru_maxrss would carry the parent's peak across exec.
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise SystemExit("no " + key + " in /proc/self/status")
target, model, feeds_path, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) or None
feeds = dict(np.load(feeds_path))
unavailable_reason(target)  # imports the runtime, so its import is not counted as the session's
before = status_mb("VmRSS")
with open_runner(target, model, threads) as r:
    for _ in range(3):
        r.run(feeds)
    peak = status_mb("VmHWM")
print(json.dumps({"rss_peak_mb": peak, "rss_session_mb": peak - before}))
"""


PROBE_TIMEOUT_S = 600


def measure_memory(
    target: str, model_path: Path, feeds: dict[str, np.ndarray], threads: int | None
) -> dict[str, float]:
    """Peak RSS (MB) of a fresh process that loads `model_path` on `target` and runs `feeds` three times.

    `rss_session_mb` is that peak minus the process's RSS before the session was created.
    """
    with tempfile.TemporaryDirectory(prefix="optimize-mem-") as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        write_npz(feeds_path, feeds)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _PROBE, target, str(model_path), str(feeds_path), str(threads or 0)],
                capture_output=True,
                text=True,
                env=env,
                timeout=PROBE_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise StageError(
                f"benchmark: memory probe for {model_path.name} on {target} took over {PROBE_TIMEOUT_S} s"
            ) from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise StageError(f"benchmark: memory probe for {model_path.name} on {target} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
