"""TensorRT engine stage: ONNX → serialized engine (a `.plan`) with an identity sidecar, a timing cache
shared across runs, and a check that the engine really carries the asked precision.

Precision lives in the ONNX (AutoCast FP16, Q/DQ INT8): the network is strongly typed, so TensorRT
compiles what the ONNX says. TensorRT 11 removed the FP16/INT8 builder flags; TensorRT 10 needs the
STRONGLY_TYPED creation flag for the same behaviour. Features are detected by trying, not by version.

The build runs in a child process (`python -m optimize.engine build ARGS.json RESULT.json [PROGRESS_FD]`): a
build can take many minutes, and only a child can be stopped at `engine.build_timeout_s` and gives its GPU
memory back. TensorRT's IProgressMonitor in the child writes its phases as JSON lines on a pipe the parent
reads, so the parent can show the build's progress.
TensorRT is imported lazily; a machine without it gets exit 4 with the reason.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from optimize.child import run_python
from optimize.errors import OptimizeError, RecipeError, RuntimeMissingError, StageError, first_line
from optimize.files import file_lock, write_bytes, write_json, write_text
from optimize.files import sha256_file as sha256_file  # tests check plans with it
from optimize.onnx_files import onnx_sha256, onnx_size_bytes
from optimize.progress import NO_PROGRESS, Progress
from optimize.runtimes.base import TensorSpec
from optimize.runtimes.tensorrt import Device, current_device, device_memory_bytes, make_logger, tensorrt
from optimize.runtimes.tensorrt import check_compatible as check_compatible  # re-exported: part of the stage's API
from optimize.runtimes.tensorrt import read_sidecar as read_sidecar
from optimize.stage import Context, Done, Stage, Unit, restore, store

# Variant precision → the layer precisions that count as carrying it.
ASKED = {"fp32": {"fp32"}, "fp16": {"fp16", "bf16"}, "int8": {"int8", "fp8", "int4"}}
# Size evidence of an engine's precision: where the lower-precision ONNX saves at least MIN_SAVING_BYTES of
# weights over FP32, its engine must keep at least MIN_SAVING_KEPT of that saving (FP32 weights keep ~0).
MIN_SAVING_BYTES = 1 << 20
MIN_SAVING_KEPT = 0.5
TIMING_CACHE_LOCK_S = 600.0

_DTYPES = (  # substrings of the inspector's "Format/Datatype" (lower case) → precision, most specific first
    ("bf16", "bf16"),
    ("bfloat16", "bf16"),
    ("fp16", "fp16"),
    ("half", "fp16"),
    ("fp8", "fp8"),
    ("int8", "int8"),
    ("int4", "int4"),
    ("fp32", "fp32"),
    ("float", "fp32"),
    ("int32", "int32"),
    ("int64", "int64"),
    ("bool", "bool"),
)
_FLOATISH = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
_COMPUTE = ("conv", "gemm", "matrixmultiply", "matmul", "fullyconnected")
_OPAQUE = ("myelin", "foreignnode", "foreign")


def tensorrt_version() -> str:
    """The version of the TensorRT module this process imports (what built engines are tied to)."""
    return str(tensorrt().__version__)


# --- profiles, names and keys ---------------------------------------------------------------------


def default_profile(shapes: list[dict[str, int]]) -> dict[str, dict[str, int]]:
    """The profile the benchmark needs: per axis the smallest and largest size over `shapes`; opt is the
    largest shape (by element count), the one throughput is judged on."""
    axes = list(dict.fromkeys(a for s in shapes for a in s))
    largest = max(shapes, key=lambda s: _volume(s.values()))
    return {
        "min": {a: min(s[a] for s in shapes if a in s) for a in axes},
        "opt": {a: largest.get(a, max(s[a] for s in shapes if a in s)) for a in axes},
        "max": {a: max(s[a] for s in shapes if a in s) for a in axes},
    }


def input_profiles(inputs: list[TensorSpec], profile: dict[str, dict[str, int]]) -> dict[str, dict[str, list[int]]]:
    """Per input tensor, its min/opt/max shape: fixed dims as they are, named dims from `profile`."""
    out: dict[str, dict[str, list[int]]] = {}
    for spec in inputs:
        if all(isinstance(d, int) and d > 0 for d in spec.shape):
            continue
        shapes: dict[str, list[int]] = {}
        for which in ("min", "opt", "max"):
            dims = []
            for axis, d in enumerate(spec.shape):
                if isinstance(d, int) and d > 0:
                    dims.append(d)
                elif d in profile[which]:
                    dims.append(int(profile[which][d]))
                else:
                    raise RecipeError(
                        f"engine.profile: no size for axis {axis} ({d!r}) of input {spec.name!r}; "
                        f"add {d!r} to engine.profile or to benchmark.shapes"
                    )
            shapes[which] = dims
        out[spec.name] = shapes
    return out


def profile_hash(profiles: dict[str, Any], onnx_sha256: str, settings: dict[str, Any]) -> str:
    """12 hex digits over the profile shapes, the exact ONNX and the builder settings: a different
    profile, model or setting never reuses an engine's name."""
    blob = json.dumps({"profiles": profiles, "onnx": onnx_sha256, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def engine_name(model: str, precision: str, device: Device, trt_version: str, phash: str) -> str:
    """`{model}-{precision}-sm{cc}-trt{version}-{profile-hash}.plan`."""
    return f"{model}-{precision}-sm{device.sm}-trt{trt_version}-{phash}.plan"


def cache_dir(setting: str | None) -> Path:
    """The timing cache folder: the recipe's, else $OPTIMIZE_CACHE_DIR/tensorrt, else ~/.cache/optimize/tensorrt."""
    if setting:
        return Path(setting).expanduser()
    root = os.environ.get("OPTIMIZE_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "optimize") / "tensorrt"


def timing_cache_path(folder: Path, device: Device, trt_version: str) -> Path:
    """One timing cache per GPU architecture and TensorRT version: `timing-sm90-trt10.16.0.cache`."""
    return Path(folder) / f"timing-sm{device.sm}-trt{trt_version}.cache"


# --- the build (runs in the child process) ---------------------------------------------------------


@dataclass(frozen=True)
class BuildRequest:
    """Everything the child process needs to build one engine."""

    onnx_path: str
    out_dir: str
    model: str
    variant: str
    precision: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    profile: dict[str, dict[str, int]]
    workspace_gb: float
    optimization_level: int
    timing_cache_dir: str
    log_path: str


def network_flags(trt: Any) -> tuple[int, bool]:
    """Creation flags for a strongly typed network: the STRONGLY_TYPED bit where the enum has it
    (TensorRT 10); none where networks are always strongly typed (TensorRT 11 dropped the choice)."""
    try:
        flag = trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    except AttributeError:
        return 0, False
    return 1 << int(flag), True


def parser_errors(parser: Any) -> list[str]:
    """The ONNX parser's errors, one line each: `node NAME (OP): description`."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = ""
        try:
            name, op = err.node_name(), err.node_operator()
            where = f"node {name or err.node()} ({op}): " if name or op else ""
        except AttributeError:  # older parsers only give the node index
            where = f"node {err.node()}: " if err.node() >= 0 else ""
        lines.append(f"{where}{err.desc()}")
    return lines


def make_progress_monitor(trt: Any, emit: Callable[[dict[str, Any]], None]) -> Any:
    """A TensorRT IProgressMonitor that hands each phase event to `emit` as a dict: `start` (phase, parent,
    steps), `step` (phase, step: the 0-based step just completed), `finish` (phase). TensorRT calls it from its
    own threads, so events are serialised under a lock; an error in `emit` is dropped, never raised into
    TensorRT. It never asks TensorRT to cancel (the parent's timeout stops a build)."""
    lock = threading.Lock()

    def send(event: dict[str, Any]) -> None:
        try:
            with lock:
                emit(event)
        except Exception:  # a closed pipe (the parent gave up) must not break the build
            pass

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            send({"event": "start", "phase": phase_name, "parent": parent_phase, "steps": int(num_steps)})

        def step_complete(self, phase_name: str, step: int) -> bool:
            send({"event": "step", "phase": phase_name, "step": int(step)})
            return True  # go on

        def phase_finish(self, phase_name: str) -> None:
            send({"event": "finish", "phase": phase_name})

    return _Monitor()


def build_engine(
    request: BuildRequest, device: Device | None = None, phases: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Parse the ONNX, build a strongly typed engine with one optimization profile, share the timing cache,
    write the plan and its sidecar atomically, and read back the engine's per-layer precisions. `phases`, when
    given, receives TensorRT's progress events during the build (see `make_progress_monitor`).

    Returns the sidecar (what the `.json` beside the plan holds)."""
    trt = tensorrt()
    device = device or current_device()
    version = str(trt.__version__)
    lines: list[str] = []
    log_path = Path(request.log_path)
    started = time.perf_counter()
    monitor = make_progress_monitor(trt, phases) if phases is not None else None
    try:
        sidecar = _build(trt, request, device, version, lines, monitor)
    finally:
        write_text(log_path, "\n".join(lines) + ("\n" if lines else ""))
    sidecar["build_s"] = round(time.perf_counter() - started, 3)
    write_json(Path(sidecar["plan_path"]).with_suffix(".json"), sidecar)
    return sidecar


def _build(
    trt: Any, req: BuildRequest, device: Device, version: str, lines: list[str], monitor: Any = None
) -> dict[str, Any]:
    logger = make_logger(trt, lines)
    inputs = [TensorSpec(d["name"], d["dtype"], tuple(d["shape"])) for d in req.inputs]
    profiles = input_profiles(inputs, req.profile)
    onnx_sha = onnx_sha256(Path(req.onnx_path))  # the weights in model.onnx.data too
    settings = {"workspace_gb": req.workspace_gb, "optimization_level": req.optimization_level}
    phash = profile_hash(profiles, onnx_sha, settings)
    plan_path = Path(req.out_dir) / engine_name(req.model, req.precision, device, version, phash)

    builder = trt.Builder(logger)
    flags, strongly_typed_flag = network_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data beside the model (models over 2 GB).
    if not parser.parse_from_file(str(req.onnx_path)):
        errors = parser_errors(parser) or ["the parser gave no reason (see the build log)"]
        lines.extend(f"[PARSER] {e}" for e in errors)
        raise StageError(
            f"engine {req.variant}: TensorRT cannot parse {Path(req.onnx_path).name}:\n" + "\n".join(errors)
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(req.workspace_gb * (1 << 30)))
    config.builder_optimization_level = req.optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # per-layer precisions for the inspector
    if profiles:
        profile = builder.create_optimization_profile()
        for name, shape in profiles.items():
            profile.set_shape(name, shape["min"], shape["opt"], shape["max"])
        config.add_optimization_profile(profile)

    cache_path = timing_cache_path(Path(req.timing_cache_dir), device, version)
    cache_meta = {"gpu": device.name, "compute_capability": device.compute_capability, "tensorrt": version}
    cache, cache_loaded = load_timing_cache(config, cache_path, cache_meta, lines)
    if not config.set_timing_cache(cache, False):  # another device's properties under the same sm
        lines.append(f"[optimize] timing cache {cache_path} was rejected by TensorRT; starting a new one")
        cache_loaded = False
        config.set_timing_cache(config.create_timing_cache(b""), False)
    if monitor is not None:  # the caller keeps it alive past the build, as TensorRT requires
        config.progress_monitor = monitor

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise StageError(f"engine {req.variant}: TensorRT build failed: " + build_failure(lines))
    plan = bytes(serialized)
    merge_timing_cache(config, cache_path, cache_meta, lines)
    write_bytes(plan_path, plan)

    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise StageError(f"engine {req.variant}: the engine just built cannot be loaded: " + build_failure(lines))
    layers = inspect_layers(trt, engine)
    return {
        "plan_path": str(plan_path),
        "plan_sha256": hashlib.sha256(plan).hexdigest(),
        "plan_bytes": len(plan),
        "model": req.model,
        "variant": req.variant,
        "precision": req.precision,
        "gpu": device.name,
        "compute_capability": device.compute_capability,
        "driver": device.driver,
        "cuda": device.cuda,
        "tensorrt": version,
        "strongly_typed_flag": strongly_typed_flag,
        "onnx": Path(req.onnx_path).name,
        "onnx_sha256": onnx_sha,
        "profile": req.profile,
        "profiles": profiles,
        "profile_hash": phash,
        "settings": settings,
        "timing_cache": {"path": str(cache_path), "loaded": cache_loaded},
        "inputs": req.inputs,
        "outputs": req.outputs,
        "device_memory_bytes": device_memory_bytes(engine),
        "layers": len(layers),
        "precisions": precision_histogram(layers),
        "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def build_failure(lines: list[str]) -> str:
    """The reason a build failed, from TensorRT's own error messages, with the known misleading ones explained."""
    errors = [ln for ln in lines if ln.startswith(("[ERROR]", "[INTERNAL_ERROR]"))] or lines[-3:]
    reason = " | ".join(e.split("] ", 1)[-1] for e in errors[-3:]) or "no message from TensorRT"
    if any("Could not find any implementation" in ln for ln in lines):
        reason += (
            " (TensorRT says this when no kernel fits the memory it may use: often the GPU is out of memory "
            "or engine.workspace_gb is too small; raise it or free the GPU)"
        )
    return reason


# --- timing cache ----------------------------------------------------------------------------------


def load_timing_cache(config: Any, path: Path, meta: dict[str, str], lines: list[str]) -> tuple[Any, bool]:
    """The timing cache for this GPU architecture and TensorRT version, or a new empty one. A file whose
    metadata names another GPU architecture or version is never loaded (it is moved aside as `.rejected`),
    nor one TensorRT cannot read."""
    meta_path = path.with_suffix(".json")
    if path.exists():
        try:
            found = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            found = None
        if found is not None and all(found.get(k) == v for k, v in meta.items() if k != "gpu"):
            with file_lock(path.with_suffix(".lock"), TIMING_CACHE_LOCK_S, "timing cache"):
                data = path.read_bytes()
            cache = config.create_timing_cache(data)
            if cache:
                return cache, True
            lines.append(f"[optimize] timing cache {path} could not be read by TensorRT; starting a new one")
        else:
            os.replace(path, path.with_suffix(".rejected"))
            lines.append(f"[optimize] timing cache {path} is not for {meta}; moved aside, not loaded")
    return config.create_timing_cache(b""), False


def merge_timing_cache(config: Any, path: Path, meta: dict[str, str], lines: list[str] | None = None) -> None:
    """Merge what this build learned into the shared cache file, under a lock, so parallel jobs add up.
    A file TensorRT will not combine with ours (another device's properties) is replaced by ours."""
    with file_lock(path.with_suffix(".lock"), TIMING_CACHE_LOCK_S, "timing cache"):
        ours = config.get_timing_cache()
        if ours is None:
            return
        if path.exists():
            theirs = config.create_timing_cache(path.read_bytes())
            if not theirs or not ours.combine(theirs, False):
                (lines if lines is not None else []).append(f"[optimize] timing cache {path} replaced: not combinable")
        write_bytes(path, bytes(ours.serialize()))
        write_json(path.with_suffix(".json"), {**meta, "updated": dt.datetime.now(dt.timezone.utc).isoformat()})


# --- precision inspection --------------------------------------------------------------------------


def inspect_layers(trt: Any, engine: Any) -> list[dict[str, Any]]:
    """The engine inspector's per-layer records (needs ProfilingVerbosity.DETAILED at build time)."""
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = info.get("Layers", []) if isinstance(info, dict) else []
    return [layer for layer in layers if isinstance(layer, dict)]


def dtype_of(fmt: str) -> str | None:
    """The precision named in an inspector "Format/Datatype" string, e.g. "Row major linear FP16 format"."""
    low = fmt.lower()
    for key, value in _DTYPES:
        if key in low:
            return value
    return None


def layer_precision(layer: dict[str, Any]) -> str:
    """One layer's precision: the lowest float precision among its inputs (an INT8 GEMM reads INT8 and
    may write FP32); `opaque` for fused foreign (Myelin) nodes whose inside the inspector does not show."""
    kind = str(layer.get("LayerType", "")).lower()
    if any(k in kind for k in _OPAQUE):
        return "opaque"
    dtypes = [dtype_of(_format(t)) for t in layer.get("Inputs", [])]
    floats = [d for d in dtypes if d in _FLOATISH]
    if not floats:
        floats = [d for d in (dtype_of(_format(t)) for t in layer.get("Outputs", [])) if d in _FLOATISH]
    if not floats:
        return "other"
    return min(floats, key=("int4", "int8", "fp8", "fp16", "bf16", "fp32").index)


def _format(tensor: dict[str, Any]) -> str:
    # TensorRT 10 writes "Format/Datatype"; the 11.x migration notes speak of that field being split.
    return str(tensor.get("Format/Datatype") or tensor.get("DataType") or tensor.get("Format") or "")


def precision_histogram(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of layer precisions, over all layers and over compute layers (convolutions and GEMMs)."""
    all_counts: dict[str, int] = {}
    compute: dict[str, int] = {}
    for layer in layers:
        p = layer_precision(layer)
        all_counts[p] = all_counts.get(p, 0) + 1
        if any(k in str(layer.get("LayerType", "")).lower() for k in _COMPUTE):
            compute[p] = compute.get(p, 0) + 1
    return {"all": dict(sorted(all_counts.items())), "compute": dict(sorted(compute.items()))}


def weight_saving(plan_bytes: int, fp32_plan_bytes: int, onnx_bytes: int, fp32_onnx_bytes: int) -> float | None:
    """The share of the ONNX's weight saving that the engine kept: (FP32 plan − plan) / (FP32 ONNX − ONNX).

    Near 1 when the engine stores the weights in the ONNX's lower precision; near 0 (or below) when they
    went back to FP32. None when the ONNX saves less than MIN_SAVING_BYTES: a plan's kernels and metadata
    then outweigh the weights, and sizes say nothing.
    """
    onnx_saving = fp32_onnx_bytes - onnx_bytes
    if onnx_saving < MIN_SAVING_BYTES:
        return None
    return (fp32_plan_bytes - plan_bytes) / onnx_saving


def check_precision(
    asked: str, histogram: dict[str, Any], saving_kept: float | None, min_share: float
) -> dict[str, Any]:
    """Does the engine carry the asked precision? Two pieces of evidence:

    - the share of layers in that precision, over compute layers (or all layers with a float precision when
      the engine shows no compute layer), where the inspector shows them (fused Myelin nodes do not);
    - for FP16/INT8, `saving_kept` (see `weight_saving`): an engine whose weights went back to FP32 keeps
      little of the ONNX's saving.

    Returns {"status": passed|failed|undetermined, "reason", "share", "saving_kept", ...}.
    """
    wanted = ASKED[asked]
    counts = histogram.get("compute") or {p: n for p, n in histogram.get("all", {}).items() if p in _FLOATISH}
    known = {p: n for p, n in counts.items() if p in _FLOATISH}
    total = sum(known.values())
    share = sum(n for p, n in known.items() if p in wanted) / total if total else None
    out: dict[str, Any] = {"asked": asked, "share": share, "saving_kept": saving_kept, "min_share": min_share}
    problems = []
    if share is not None and share < min_share:
        shown = ", ".join(f"{n} {p}" for p, n in sorted(known.items(), key=lambda kv: -kv[1]))
        problems.append(f"{share:.0%} of the layers run in {asked} (< {min_share:.0%}; layers: {shown})")
    sized = asked != "fp32" and saving_kept is not None
    if sized and saving_kept < MIN_SAVING_KEPT:
        problems.append(
            f"the engine kept {saving_kept:.0%} of the ONNX's weight saving over FP32 (< {MIN_SAVING_KEPT:.0%}): "
            "its weights went back to FP32"
        )
    if problems:
        out.update(status="failed", reason=f"{asked} asked, but " + "; ".join(problems))
    elif share is None and not sized and asked != "fp32":
        out.update(
            status="undetermined",
            reason="the inspector shows no layer precisions (fused foreign nodes) and the weights are too small "
            "to tell by size",
        )
    else:
        evidence = [
            f"{share:.0%} of layers" if share is not None else "",
            f"{saving_kept:.0%} of the weight saving" if sized else "",
        ]
        shown = " and ".join(e for e in evidence if e)
        out.update(status="passed", reason=f"{asked} carried" + (f" ({shown})" if shown else ""))
    return out


# --- loading: identity checks ------------------------------------------------------------------------


# --- the stage, in the parent process ----------------------------------------------------------------


class BuildPhases:
    """TensorRT's progress events (from the build child) as one bar on `progress`: the innermost phase
    running, its steps done, described with the phases around it (`engine fp16: Building › Tactic selection`).
    When that phase finishes, the bar goes back to the phase around it, at the steps it had done."""

    def __init__(self, progress: Progress, variant: str) -> None:
        self.progress, self.variant = progress, variant
        self.running: list[dict[str, Any]] = []  # phases started and not finished, oldest first

    def event(self, event: dict[str, Any]) -> None:
        """One event of `make_progress_monitor`."""
        kind, name = event.get("event"), event.get("phase")
        if kind == "start":
            self.running.append({"phase": name, "steps": max(int(event.get("steps") or 0), 0), "done": 0})
            self._show()
        elif kind == "step":
            for phase in self.running:
                done = min(int(event.get("step", -1)) + 1, phase["steps"])
                if phase["phase"] == name and done > phase["done"]:
                    if phase is self.running[-1]:
                        self.progress.advance(done - phase["done"])
                    phase["done"] = done
        elif kind == "finish":
            innermost = bool(self.running) and self.running[-1]["phase"] == name
            self.running = [p for p in self.running if p["phase"] != name]
            if innermost and self.running:
                self._show()

    def _show(self) -> None:
        phase = self.running[-1]
        path = " › ".join(str(p["phase"]) for p in self.running)
        self.progress.start(phase["steps"], f"engine {self.variant}: {path}")
        if phase["done"]:
            self.progress.advance(phase["done"])


def build_in_child(request: BuildRequest, timeout_s: float, progress: Progress = NO_PROGRESS) -> dict[str, Any]:
    """Run `build_engine` in a child process; map its outcome back to our exit codes. TensorRT's build
    phases come back on a pipe and move `progress` (see `BuildPhases`)."""
    args_path = Path(request.out_dir) / f".{request.variant}-build.json"
    result_path = args_path.with_suffix(".result.json")
    write_json(args_path, request.__dict__)
    result_path.unlink(missing_ok=True)
    try:
        proc = run_python(
            ["-m", "optimize.engine", "build", str(args_path), str(result_path)],
            timeout_s=timeout_s,
            on_timeout=f"engine {request.variant}: the build took over {timeout_s:g} s (engine.build_timeout_s); "
            "narrow engine.profile or lower engine.optimization_level",
            log_path=Path(request.log_path),
            progress=BuildPhases(progress, request.variant).event,
        )
    finally:
        args_path.unlink(missing_ok=True)
    try:
        outcome = json.loads(result_path.read_text())
    except (OSError, ValueError):
        raise proc.error(f"engine {request.variant}: the build process died", Path(request.log_path)) from None
    finally:
        result_path.unlink(missing_ok=True)
    if "error" in outcome:
        cls = {c.__name__: c for c in (RecipeError, StageError, RuntimeMissingError)}.get(outcome["kind"], StageError)
        raise cls(outcome["error"])
    return outcome["sidecar"]


def _child(args_path: str, result_path: str, progress_fd: int | None = None) -> int:
    request = BuildRequest(**json.loads(Path(args_path).read_text()))
    pipe = os.fdopen(progress_fd, "w", buffering=1, encoding="utf-8") if progress_fd is not None else None

    def phases(event: dict[str, Any]) -> None:
        assert pipe is not None
        pipe.write(json.dumps(event) + "\n")

    try:
        outcome: dict[str, Any] = {"sidecar": build_engine(request, phases=phases if pipe else None)}
    except OptimizeError as e:
        outcome = {"error": str(e), "kind": type(e).__name__}
    except Exception as e:  # TensorRT raises plain exceptions; keep their message
        outcome = {"error": f"engine {request.variant}: {type(e).__name__}: {first_line(e)}", "kind": "StageError"}
    write_json(Path(result_path), outcome)
    if pipe is not None:
        with contextlib.suppress(OSError):
            pipe.close()
    return 0


def main(argv: list[str]) -> int:
    """`python -m optimize.engine build ARGS.json RESULT.json [PROGRESS_FD]`: the build child."""
    if len(argv) not in (3, 4) or argv[0] != "build":
        raise SystemExit("usage: python -m optimize.engine build ARGS.json RESULT.json [PROGRESS_FD]")
    return _child(argv[1], argv[2], int(argv[3]) if len(argv) == 4 else None)


def _volume(values: Any) -> int:
    n = 1
    for v in values:
        n *= int(v)
    return n


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))


# --- the engine stage ------------------------------------------------------------------------------------

# Build request fields that say where files lie on this machine, or follow from the ONNX (its inputs and
# outputs), not what is built: left out of the unit's key.
_NOT_IN_KEY = ("onnx_path", "out_dir", "timing_cache_dir", "log_path", "inputs", "outputs")


def _units(ctx: Context) -> list[Unit]:
    """One TensorRT engine per variant TensorRT runs (the FP32 baseline first), each built in a child process.
    The engine depends on the ONNX, the build settings, TensorRT's version and the GPU; where files lie and
    the timing cache (which speeds the build, not what is built) are not part of the key."""
    return [_unit(ctx, name) for name in ctx.runs_on("tensorrt")]


def _request(ctx: Context, name: str) -> BuildRequest:
    recipe = ctx.recipe
    profile = recipe.engine.profile.model_dump() if recipe.engine.profile else default_profile(recipe.benchmark.shapes)
    onnx_path = ctx.art_dir / f"{name}.onnx"
    inputs, outputs = ctx.io_specs(onnx_path) if ctx.io_specs and not ctx.planning else ([], [])
    return BuildRequest(
        onnx_path=str(onnx_path),
        out_dir=str(ctx.art_dir / "engines"),
        model=recipe.name,
        variant=name,
        precision=name,  # the variant's name, which names its precision (fp32, fp16, int8-trt, …)
        inputs=[asdict(s) for s in inputs],
        outputs=[asdict(s) for s in outputs],
        profile=profile,
        workspace_gb=recipe.engine.workspace_gb,
        optimization_level=recipe.engine.optimization_level,
        timing_cache_dir=str(cache_dir(recipe.engine.timing_cache)),
        log_path=str(ctx.run_dir / "logs" / f"engine-{name}.log"),
    )


def _unit(ctx: Context, name: str) -> Unit:
    def run(folder: Path) -> dict[str, Any]:
        request = _request(ctx, name)
        ctx.say.line(f"engine {name}: building (log: logs/engine-{name}.log)")
        sidecar = build_in_child(request, ctx.recipe.engine.build_timeout_s, progress=ctx.progress.bar())
        plan_path = Path(sidecar["plan_path"])
        store(folder, plan_path)
        return {
            "plan_file": plan_path.name,
            "sidecar": {k: v for k, v in sidecar.items() if k != "plan_path"},
            "sha256": sidecar["plan_sha256"],
        }

    def use(done: Done) -> None:
        plan_path = ctx.art_dir / "engines" / done.record["plan_file"]
        if done.hit:
            restore(done, plan_path.parent)
        sidecar = {**done.record["sidecar"], "plan_path": str(plan_path), **({"cache": "hit"} if done.hit else {})}
        ctx.engines[name] = sidecar

    settings = {k: v for k, v in asdict(_request(ctx, name)).items() if k not in _NOT_IN_KEY}
    return Unit(
        "engine",
        name,
        inputs=ctx.inputs(f"onnx.{name}"),
        config=settings,
        libraries=("tensorrt",),
        code=("engine",),
        run=run,
        use=use,
        device=ctx.device_identity("tensorrt"),
        produces=f"engine.{name}",
    )


def _finish(ctx: Context, done: list[tuple[Unit, Done]], rec: dict[str, Any]) -> None:
    """The precision check: a variant whose engine does not carry its precision fails the stage. Then the
    engines take the variants' place on the TensorRT target."""
    sidecars = ctx.engines
    fp32_plan, fp32_onnx = sidecars["fp32"]["plan_bytes"], onnx_size_bytes(ctx.paths["fp32"])
    failed = []
    for name, side in sidecars.items():
        kept = weight_saving(side["plan_bytes"], fp32_plan, onnx_size_bytes(ctx.paths[name]), fp32_onnx)
        check = check_precision(ctx.precisions[name], side["precisions"], kept, ctx.recipe.engine.min_precision_share)
        side["precision_check"] = check
        write_json(Path(side["plan_path"]).with_suffix(".json"), side)
        if check["status"] == "failed":
            failed.append(f"{name}: {check['reason']}")
        elif check["status"] == "undetermined":
            ctx.say.warn(f"engine {name}: {check['reason']}")
    if failed:
        raise StageError("engine: " + "; ".join(failed))
    for name, side in sidecars.items():
        ctx.artifacts["tensorrt"][name] = Path(side["plan_path"])
        ctx.variants[name]["engine"] = {
            "path": str(Path(side["plan_path"]).relative_to(ctx.run_dir)),
            "sha256": side["plan_sha256"],
            "precisions": side["precisions"],
            "precision_check": side["precision_check"],
            "build_s": side["build_s"],
            "device_memory_bytes": side["device_memory_bytes"],
            # The plan's size is not `size`: that stays the ONNX a version ships, the same on every target; a
            # small model's plan is mostly kernels, so its ratio says little about weights.
            "plan_bytes": side["plan_bytes"],
            "plan_ratio": side["plan_bytes"] / fp32_plan,
        }
    rec["engines"] = {n: ctx.variants[n]["engine"] for n in sidecars}
    rec["detail"] = ", ".join(
        f"{n} {s['precision_check']['status']} ({s['build_s']:.0f} s)" for n, s in sidecars.items()
    )


STAGE = Stage(
    "engine",
    lambda ctx: f"TensorRT engines for {', '.join(ctx.runs_on('tensorrt'))}",
    _finish,
    units=_units,
    when=lambda ctx: "tensorrt" in ctx.ran,
)
