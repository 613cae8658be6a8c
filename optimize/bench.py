"""Benchmark protocol: per shape, warm up every runner, then time them interleaved (rotating the order
each iteration, and rotating real input sets) so that the baseline/variant ratio survives a noisy machine.
Host runners are timed with the host clock; GPU runners with CUDA events around the host-to-device copy,
the compute and the device-to-host copy, as trtexec reports them. Peak memory is measured in a fresh
process per artifact, so one model's allocations never count against another's."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from optimize.child import run_python
from optimize.errors import RecipeError, StageError
from optimize.files import read_npz, write_npz
from optimize.gpu import ProcessGpuMemory, gpus
from optimize.lazy import lazy
from optimize.progress import NO_PROGRESS, Progress
from optimize.recipe import GPU_TARGETS, shape_key
from optimize.runtimes import open_runner, runtime_libraries
from optimize.runtimes.base import DeviceRunner, TensorSpec
from optimize.runtimes.torch import TorchArtifact, TorchCudaRunner
from optimize.stage import Context, Done, Stage, Unit

torch = lazy("torch")
np = lazy("numpy")

# Input sets a shape is timed with (one per sample batch, rotated per iteration): enough that caches
# do not see the same bytes every iteration, few enough to stay small in memory.
MAX_FEED_SETS = 4
# GPU compute time whose coefficient of variation exceeds 2.5 % is flagged unstable. trtexec's own
# threshold is 1 % (kUNSTABLE_PERF_REPORTING_THRESHOLD in samples/common/sampleReporting.cpp); on shared
# runners without locked clocks that flags nearly every run, so the bar here is the one our CI asks for.
GPU_CV_WARN = 0.025
# trtexec calls a run enqueue-bound when the median enqueue time exceeds 80 % of the median GPU compute time.
TRTEXEC_ENQUEUE_BOUND = 0.8
_MB = 1024 * 1024


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


def _distribution(ms: np.ndarray) -> dict[str, Any]:
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
    }


def latency_stats(samples_ns: list[int], batch: int) -> dict[str, Any]:
    """Latency distribution (ms), coefficient of variation and throughput (items/s) of runs timed with the
    host clock (`timing: host-clock`)."""
    stats = _distribution(np.asarray(samples_ns, dtype=np.float64) / 1e6)
    mean = stats["mean_ms"]
    return {**stats, "items_per_s": batch / (mean / 1e3) if mean > 0 else 0.0, "timing": "host-clock"}


def device_latency_stats(samples: dict[str, list[float]], batch: int, cv_warn: float = GPU_CV_WARN) -> dict[str, Any]:
    """Statistics of one GPU runner's `time_device` samples (ms), in trtexec's terms.

    The top-level keys are `latency_stats`'s, computed on `latency` (H2D + GPU compute + D2H, trtexec's
    "Latency"), so gates read the same fields on every target. `items_per_s` is, as trtexec's throughput,
    items over host wall time: per iteration, from before the input copy to the stream's end. Also:
    `gpu_compute` (trtexec's "GPU Compute Time" distribution), the means `h2d_ms`, `d2h_ms`, `enqueue_ms`,
    `wall_ms`, and `warnings`: trtexec's four — GPU compute CV above `cv_warn`, median enqueue time above
    80 % of median GPU compute (enqueue-bound), median H2D or D2H at or above median GPU compute
    (transfer-bound).
    """
    latency = np.asarray(samples["latency"], dtype=np.float64)
    compute = np.asarray(samples["gpu_compute"], dtype=np.float64)
    h2d, d2h, enqueue, wall = (np.asarray(samples[k], dtype=np.float64) for k in ("h2d", "d2h", "enqueue", "wall"))
    stats = _distribution(latency)
    wall_ms = float(wall.mean())
    gpu = _distribution(compute)
    warnings = []
    if gpu["cv"] > cv_warn:
        warnings.append(
            f"GPU compute time is unstable, with coefficient of variation = {gpu['cv']:.2%} (> {cv_warn:.1%}); "
            "locking the GPU clock frequency may improve the stability"
        )
    median = {"enqueue": float(np.median(enqueue)), "H2D": float(np.median(h2d)), "D2H": float(np.median(d2h))}
    if median["enqueue"] > TRTEXEC_ENQUEUE_BOUND * gpu["p50_ms"]:
        warnings.append(
            "throughput may be bound by enqueue time rather than GPU compute and the GPU may be under-utilized "
            f"(median enqueue {median['enqueue']:.3g} ms > {TRTEXEC_ENQUEUE_BOUND:.0%} of median GPU compute "
            f"{gpu['p50_ms']:.3g} ms); CUDA graphs may increase the throughput"
        )
    for way, what in (
        ("H2D", "host-to-device transfers for the inputs"),
        ("D2H", "device-to-host transfers for the outputs"),
    ):
        if median[way] >= gpu["p50_ms"]:
            warnings.append(
                f"throughput may be bound by {what} rather than GPU compute and the GPU may be under-utilized "
                f"(median {way} {median[way]:.3g} ms >= median GPU compute {gpu['p50_ms']:.3g} ms)"
            )
    return {
        **stats,
        "items_per_s": batch / (wall_ms / 1e3) if wall_ms > 0 else 0.0,
        "timing": "cuda-events",
        "gpu_compute": {k: gpu[k] for k in ("mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "cv")},
        "h2d_ms": float(h2d.mean()),
        "d2h_ms": float(d2h.mean()),
        "enqueue_ms": float(enqueue.mean()),
        "wall_ms": wall_ms,
        "warnings": warnings,
    }


def _feed_sets(feeds: dict[str, np.ndarray] | list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    sets = [feeds] if isinstance(feeds, dict) else list(feeds)
    if not sets:
        raise StageError("benchmark: no input set to time with")
    return sets


def time_interleaved(
    runners: dict[str, Any],
    feeds: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
    warmup: int,
    iterations: int,
    progress: Progress = NO_PROGRESS,
) -> dict[str, list[int]]:
    """Warm up each runner, then run them round-robin `iterations` times; per runner, ns per run.

    `feeds` is one input set or several: iteration i (and warm-up run i) uses set i mod their number,
    the same set for every runner in that iteration. `progress` advances by one per run (warm-up included),
    between the timed runs.
    """
    sets = _feed_sets(feeds)
    for runner in runners.values():
        for j in range(warmup):
            runner.run(sets[j % len(sets)])
        progress.advance(warmup)
    keys = list(runners)
    timings: dict[str, list[int]] = {k: [] for k in keys}
    clock = time.perf_counter_ns
    for i in range(iterations):
        shift = i % len(keys)
        batch = sets[i % len(sets)]
        for k in keys[shift:] + keys[:shift]:
            run = runners[k].run
            t0 = clock()
            run(batch)
            timings[k].append(clock() - t0)
        progress.advance(len(keys))
    return timings


def _timing_event() -> Any:
    return torch.cuda.Event(enable_timing=True)


DEVICE_SERIES = ("latency", "gpu_compute", "h2d", "d2h", "enqueue", "wall")


def time_device(
    runners: dict[str, DeviceRunner],
    feed_sets: list[dict[str, np.ndarray]],
    warmup: int,
    iterations: int,
    progress: Progress = NO_PROGRESS,
) -> dict[str, dict[str, list[float]]]:
    """GPU runners timed as trtexec does, interleaved and rotating the order and the input set as
    `time_interleaved` does.

    Each timed iteration records four CUDA events on the runner's stream — before `stage`, after `stage`,
    after `compute`, after `fetch` — and reads two host clocks: around `compute()` (the enqueue time) and
    around the whole iteration up to `stream.synchronize()` (the host wall time). Iterations do not overlap:
    each one waits for its stream, so one runner's work never runs under another's events (so throughput
    is that of one query at a time, not of queries pipelined as trtexec's default run does).

    Events time the GPU's timeline, and the stream idles while the host prepares a phase: host work in
    `stage` (numpy feeds into pinned buffers) shows in `h2d`, and launch gaps of an eager model that the
    GPU outruns show in `gpu_compute` — as in trtexec, where the enqueue-bound warning points at them.

    Returns per runner lists in ms: `latency` (H2D + compute + D2H), `gpu_compute`, `h2d`, `d2h`, `enqueue`,
    `wall`. `progress` advances by one per run (warm-up included), outside the timed spans.
    """
    sets = _feed_sets(feed_sets)
    for runner in runners.values():
        for j in range(warmup):
            runner.run(sets[j % len(sets)])
        progress.advance(warmup)
    keys = list(runners)
    events = {k: [_timing_event() for _ in range(4)] for k in keys}
    out: dict[str, dict[str, list[float]]] = {k: {s: [] for s in DEVICE_SERIES} for k in keys}
    clock = time.perf_counter_ns
    for i in range(iterations):
        shift = i % len(keys)
        batch = sets[i % len(sets)]
        for k in keys[shift:] + keys[:shift]:
            runner, (e0, e1, e2, e3) = runners[k], events[k]
            stream = runner.stream
            runner.prepare(batch)  # host → pinned copy: before the clocks, as trtexec's H2D starts from pinned
            t0 = clock()
            e0.record(stream)
            runner.stage()
            e1.record(stream)
            c0 = clock()
            runner.compute()
            c1 = clock()
            e2.record(stream)
            runner.fetch()
            e3.record(stream)
            stream.synchronize()
            t1 = clock()
            series = out[k]
            series["latency"].append(e0.elapsed_time(e3))
            series["gpu_compute"].append(e1.elapsed_time(e2))
            series["h2d"].append(e0.elapsed_time(e1))
            series["d2h"].append(e2.elapsed_time(e3))
            series["enqueue"].append((c1 - c0) / 1e6)
            series["wall"].append((t1 - t0) / 1e6)
        progress.advance(len(keys))
    return out


def add_speedups(stats: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """Speed-up ratios of a variant against the baseline on the same target and shape (>1 is faster)."""
    return {
        **stats,
        "p50_speedup": baseline["p50_ms"] / stats["p50_ms"],
        "p99_speedup": baseline["p99_ms"] / stats["p99_ms"],
        "mean_speedup": baseline["mean_ms"] / stats["mean_ms"],
        "throughput_speedup": stats["items_per_s"] / baseline["items_per_s"],
        **(
            {"gpu_compute_p50_speedup": baseline["gpu_compute"]["p50_ms"] / stats["gpu_compute"]["p50_ms"]}
            if "gpu_compute" in stats and "gpu_compute" in baseline
            else {}
        ),
    }


def run_shapes(
    runners: dict[str, Any],
    spec: Any,
    samples: list[dict[str, np.ndarray]] | dict[str, np.ndarray],
    baseline: str,
    series: dict[str, dict[str, np.ndarray]] | None = None,
    progress: Progress = NO_PROGRESS,
) -> dict[str, dict[str, dict[str, Any]]]:
    """The benchmark protocol on one target: for each of `spec.shapes`, one input set per sample batch (the
    first MAX_FEED_SETS of `samples`; a single batch may be given as it is), all runners timed interleaved,
    latency statistics per runner and speed-ups against `baseline`.

    Runners are all host runners (host clock, `latency_stats`) or all GPU runners (CUDA events,
    `device_latency_stats`); a mix is a StageError, since each target is timed on its own.
    Returns {runner name: {shape key: stats}}; `cv_warning` marks stats whose latency CV exceeds
    `spec.cv_warn`. `series`, when given, receives every timed iteration's latency (ms, in the order timed)
    as {runner name: {shape key: array}}, for the report's distribution plots.
    On GPU runners, `warnings` also flags a GPU compute CV above the smaller of
    GPU_CV_WARN (2.5 %) and `spec.cv_warn`. `progress` counts the runs of each shape (one bar per shape:
    warm-up and timed runs of every runner).
    """
    on_device = {name: isinstance(r, DeviceRunner) for name, r in runners.items()}
    if len(set(on_device.values())) > 1:
        gpu = ", ".join(n for n, d in on_device.items() if d)
        host = ", ".join(n for n, d in on_device.items() if not d)
        raise StageError(
            f"benchmark: {gpu} run on a GPU and {host} on the host; each target is timed on its own, so the "
            "runners timed together must all be GPU runners or all host runners"
        )
    device = all(on_device.values())
    if isinstance(samples, dict):  # one sample batch
        samples = [samples]
    if not samples:
        raise StageError("benchmark: no sample batch to build the inputs from")
    inputs = runners[baseline].inputs
    out: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in runners}
    for i, shape in enumerate(spec.shapes):
        where = f"benchmark.shapes[{i}]"
        feed_sets = [make_feeds(inputs, shape, sample, where) for sample in samples[:MAX_FEED_SETS]]
        batch = len(next(iter(feed_sets[0].values())))
        progress.start(len(runners) * (spec.warmup + spec.iterations), f"{shape_key(shape)}: {', '.join(runners)}")
        if device:
            timed = time_device(runners, feed_sets, spec.warmup, spec.iterations, progress)
            cv_warn = min(GPU_CV_WARN, spec.cv_warn)
            per_runner = {name: device_latency_stats(timed[name], batch, cv_warn) for name in runners}
            latencies = {name: np.asarray(timed[name]["latency"], dtype=np.float64) for name in runners}
        else:
            timings = time_interleaved(runners, feed_sets, spec.warmup, spec.iterations, progress)
            per_runner = {name: latency_stats(timings[name], batch) for name in runners}
            latencies = {name: np.asarray(timings[name], dtype=np.float64) / 1e6 for name in runners}
        if series is not None:
            for name, ms in latencies.items():
                series.setdefault(name, {})[shape_key(shape)] = ms
        base = per_runner[baseline]
        for name, stats in per_runner.items():
            if name != baseline:
                stats = add_speedups(stats, base)
            out[name][shape_key(shape)] = {**stats, "cv_warning": stats["cv"] > spec.cv_warn}
    return out


_PROBE = r"""
import json, sys
from contextlib import nullcontext
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
gpu = sys.argv[5] == "gpu"
feeds = dict(np.load(feeds_path))
unavailable_reason(target)  # imports the runtime, so its import is not counted as the session's
record = {}
if gpu:
    try:
        import torch
        from optimize.bench import nvml_index
        from optimize.gpu import ProcessGpuMemory
        # The CUDA context exists before the session, so it counts as the context's, not the session's.
        torch.cuda.init()
        torch.ones(1, device="cuda").sum().item()
        torch.cuda.empty_cache()
        monitor = ProcessGpuMemory(index=nvml_index(torch.cuda.current_device()))
    except Exception as e:
        gpu = False
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        record = {"gpu_peak_mb": None, "gpu_context_mb": None, "gpu_session_mb": None,
                  "gpu_memory_note": "not measured: torch cannot initialise CUDA in the probe (" + why + ")"}
before = status_mb("VmRSS")
with monitor if gpu else nullcontext():
    context = monitor.sample() if gpu else None
    with open_runner(target, model, threads) as r:
        for _ in range(3):
            r.run(feeds)
        peak = status_mb("VmHWM")
        if gpu:
            monitor.sample()
            device_memory = r.device_memory() if hasattr(r, "device_memory") else {}
if gpu:
    gpu_peak = monitor.peak_mb
    record = {
        "gpu_peak_mb": gpu_peak,
        "gpu_context_mb": context,
        "gpu_session_mb": None if gpu_peak is None or context is None else gpu_peak - context,
        "gpu_memory_note": monitor.note,
        **device_memory,
    }
print(json.dumps({"rss_peak_mb": peak, "rss_session_mb": peak - before, **record}))
"""


PROBE_TIMEOUT_S = 600


def nvml_index(cuda_device: int) -> int:
    """The NVML index (nvidia-smi's order) of CUDA device `cuda_device`, matched by UUID; where the UUIDs
    cannot be read, the CUDA index itself (the same when CUDA_VISIBLE_DEVICES is unset and the order is
    the PCI bus order). A wrong guess reads no number: the process is then not listed on that GPU."""
    try:
        uuid = str(torch.cuda.get_device_properties(cuda_device).uuid).lower().removeprefix("gpu-")
    except Exception:  # an older torch without `uuid`
        return cuda_device
    for info in gpus():
        if info.uuid.lower().removeprefix("gpu-") == uuid:
            return info.index
    return cuda_device


def measure_memory(
    target: str, artifact: Path | Any, feeds: dict[str, np.ndarray], threads: int | None
) -> dict[str, Any]:
    """Peak memory (MB) of a fresh process that loads `artifact` on `target` and runs `feeds` three times.

    `rss_peak_mb` is that process's peak RSS, `rss_session_mb` the peak minus its RSS before the session
    was created. On GPU targets (`GPU_TARGETS`) also, read through NVML for that process: `gpu_context_mb`
    (after CUDA is initialised, before the session), `gpu_peak_mb`, `gpu_session_mb` (= peak − context),
    `gpu_memory_note` (why a reading is None, if one is), and the runner's own `device_memory()`.

    The torch targets run the source module (a TorchArtifact), which a fresh process cannot load from a
    path: torch-cuda is measured in this process (`measure_torch_cuda_memory`), torch-cpu is not measured.
    """
    if target.startswith("torch-"):
        return _measure_torch_memory(target, artifact, feeds)
    model_path = Path(artifact)
    gpu = target in GPU_TARGETS
    with tempfile.TemporaryDirectory(prefix="optimize-mem-") as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        write_npz(feeds_path, feeds)
        args = [target, str(model_path), str(feeds_path), str(threads or 0), "gpu" if gpu else "host"]
        proc = run_python(
            ["-c", _PROBE, *args],
            timeout_s=PROBE_TIMEOUT_S,
            on_timeout=f"benchmark: memory probe for {model_path.name} on {target} took over {PROBE_TIMEOUT_S} s",
        )
    if proc.returncode != 0:
        raise StageError(f"benchmark: memory probe for {model_path.name} on {target} failed: {proc.tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


TORCH_CPU_MEMORY_NOTE = "not measured: torch-cpu runs in the pipeline's own process"


def _measure_torch_memory(target: str, artifact: Any, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    if not isinstance(artifact, TorchArtifact):
        raise StageError(f"benchmark: target {target} measures a TorchArtifact, not {type(artifact).__name__}")
    if target == "torch-cpu":
        return {"note": TORCH_CPU_MEMORY_NOTE}
    with TorchCudaRunner(artifact.module, artifact.inputs, artifact.outputs, artifact.precision) as runner:
        return measure_torch_cuda_memory(runner, feeds)


def measure_torch_cuda_memory(runner: Any, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """GPU memory of a TorchCudaRunner that runs `feeds` three times, measured in this process.

    `torch_peak_allocated_mb` and `torch_peak_reserved_mb` are torch's allocator peaks over the three runs
    (every live tensor of this process counts, not only this model's: close other GPU runners first);
    `torch_allocated_before_mb` is what was allocated before them (the weights, staged inputs, anything
    else alive). `gpu_process_peak_mb` is NVML's reading for the whole process (CUDA context included),
    None with `gpu_memory_note` saying why where NVML has none. Plus the runner's `device_memory()`.
    """
    device = runner.device
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with ProcessGpuMemory(index=nvml_index(device.index)) as monitor:
        for _ in range(3):
            runner.run(feeds)
        torch.cuda.synchronize(device)
        monitor.sample()
    notes = ["torch-cuda is measured in the pipeline's own process"]
    if monitor.note:
        notes.append(monitor.note)
    return {
        "torch_peak_allocated_mb": torch.cuda.max_memory_allocated(device) / _MB,
        "torch_peak_reserved_mb": torch.cuda.max_memory_reserved(device) / _MB,
        "torch_allocated_before_mb": before / _MB,
        "gpu_process_peak_mb": monitor.peak_mb,
        "gpu_memory_note": "; ".join(notes),
        **runner.device_memory(),
    }


# --- the benchmark stage ---------------------------------------------------------------------------------


def _units(ctx: Context) -> list[Unit]:
    return [_unit(ctx, target) for target in ctx.ran]


def _unit(ctx: Context, target: str) -> Unit:
    """Latency and throughput of every variant a target runs, interleaved, then their peak memory; rerun with
    `optimize run --rebench` (the entry is made anew)."""
    b = ctx.recipe.benchmark

    def run(folder: Path) -> dict[str, Any]:
        eval_ds = ctx.datasets[ctx.eval_name]
        timed: dict[str, dict[str, np.ndarray]] = {}
        # input sets rotated, so no single one is cached into flattering numbers
        measured = benchmark_target(
            target, ctx.artifacts[target], b, eval_ds.batches[:4], eval_ds.batches[0], timed, ctx.progress.bar()
        )
        write_npz(
            folder / "latency.npz",
            {f"{n}/{shape}": ms for n, by_shape in timed.items() for shape, ms in by_shape.items()},
        )
        return measured

    def use(done: Done) -> None:
        series = read_npz(done.path("latency.npz"))
        ctx.distributions.update({f"latency_ms/{target}/{k}": ms for k, ms in series.items()})
        for name in ctx.artifacts[target]:
            ctx.results[name][target]["shapes"] = done.record["shapes"][name]
            ctx.results[name][target]["memory"] = done.record["memory"][name]

    names = ctx.runs_on(target)
    return Unit(
        "benchmark",
        target,
        inputs=ctx.inputs(*(ctx.artifact_source(target, n) for n in names), f"data.{ctx.eval_name}"),
        config={
            "benchmark": b.model_dump(mode="json"),
            "target": target,
            "variants": {n: ctx.precision_of(n) for n in names},
        },
        libraries=runtime_libraries(target),
        code=("bench",),
        run=run,
        use=use,
        device=ctx.machine_identity(target),
        refresh=ctx.rebench,
    )


def benchmark_target(
    target: str,
    artifacts: dict[str, Any],
    b: Any,
    samples: list[Any],
    first_batch: Any,
    series: dict[str, Any],
    progress: Progress = NO_PROGRESS,
) -> dict[str, Any]:
    """Latency and throughput per shape (every variant interleaved on one target), then peak memory; every
    timed iteration's latency goes into `series` ({variant: {shape key: ms}}). `progress` (a bar) counts the
    runs of each shape, then the memory probes."""
    runners = {name: open_runner(target, a, b.threads) for name, a in artifacts.items()}
    try:
        inputs = runners["fp32"].inputs
        per_shape = run_shapes(runners, b, samples, baseline="fp32", series=series, progress=progress)
        largest = max(b.shapes, key=lambda s: int(np.prod(list(s.values()))))
        feeds = make_feeds(inputs, largest, first_batch, "benchmark.shapes")
        if target == "torch-cuda":
            cuda_memory = {n: measure_torch_cuda_memory(r, feeds) for n, r in runners.items()}
    finally:
        for r in runners.values():
            r.close()
    memory = {}
    progress.start(len(artifacts), f"peak memory on {target}")
    for name, artifact in artifacts.items():
        if target == "torch-cuda":
            mem = cuda_memory[name]
        elif target == "torch-cpu":
            mem = {"note": "not measured: torch-cpu runs in the pipeline's own process"}
        else:
            mem = measure_memory(target, artifact, feeds, b.threads)
        memory[name] = {**mem, "shape": shape_key(largest)}
        progress.advance()
    return {"shapes": per_shape, "memory": memory}


def _finish(ctx: Context, done: list[tuple[Unit, Done]], rec: dict[str, Any]) -> None:
    """Warn of noisy timings and of what a measurement found amiss; the stage's line: speed-ups."""
    results, b = ctx.results, ctx.recipe.benchmark
    shapes = [(n, t, k, s) for n in results for t in ctx.ran for k, s in results[n][t].get("shapes", {}).items()]
    noisy = [f"{n}@{t}:{k}" for n, t, k, s in shapes if s["cv_warning"]]
    if noisy:
        ctx.say.warn(f"latency CV above {b.cv_warn:.0%} for {', '.join(noisy)}; the machine is noisy")
    for n, t, k, s in shapes:
        for w in s.get("warnings", []):
            ctx.say.warn(f"{n}@{t}:{k}: {w}")
    rec["detail"] = "; ".join(
        f"{n} p50 speed-up {min(s['p50_speedup'] for s in results[n][t]['shapes'].values()):.2f}× on {t}"
        for n in ctx.paths
        if n != "fp32"
        for t in ctx.ran
        if "shapes" in results[n][t]
    )


def _title(ctx: Context) -> str:
    b = ctx.recipe.benchmark
    return f"{len(b.shapes)} shape(s) × {len(ctx.variant_names())} models, {b.iterations} iterations"


STAGE = Stage("benchmark", _title, _finish, units=_units)
