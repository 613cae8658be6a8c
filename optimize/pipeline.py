"""Runs the stages of one recipe and owns the run directory and its manifest.

    load → export → precision → evaluate → benchmark → gate → report → register

Every file in the run directory is written atomically; the manifest says how far the run got.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from optimize import __version__, preflight, recipe_yaml
from optimize.console import Progress, capture_output, capture_python_output, console
from optimize.cpu import isa as cpu_isa
from optimize.cpu import saturating
from optimize.errors import OptimizeError, RecipeError, RunInterrupted, RuntimeMissingError, StageError, no_space
from optimize.files import display_path, sha256_file, write_json, write_npz, write_text, write_with
from optimize.onnx_files import copy_onnx, external_data_threshold, onnx_files, onnx_sha256, onnx_size_bytes
from optimize.progress import NO_PROGRESS
from optimize.progress import Progress as Bar
from optimize.recipe import Int8Variant, OnnxModel, Recipe, load_recipe, recipe_hash, to_plain
from optimize.runtimes import unavailable_reason

LIBRARIES = (
    "torch",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "mlflow",
    "numpy",
    "transformers",
    "nvidia-modelopt",
    "tensorrt",
    "nvidia-ml-py",
)


@dataclass(frozen=True)
class RunOptions:
    """What the command line adds to a recipe. `capture_fds`: while a stage runs, fds 1 and 2 go to its log, so
    native libraries' output lands there too (the CLI, which owns its process); False leaves the descriptors
    alone and sends only Python's sys.stdout and sys.stderr there (the Python API, `optimize.run`)."""

    runs_dir: Path = Path("runs")
    tracking_uri: str | None = None
    require_targets: tuple[str, ...] = ()
    register: bool = True
    quiet: bool = False
    cache: bool = True
    rebench: bool = False
    capture_fds: bool = True


@dataclass(frozen=True)
class RunResult:
    """The outcome of one run: where it is, the verdict, what was registered, the exit code."""

    run_dir: Path
    status: str
    exit_code: int
    registered: dict[str, Any] = field(default_factory=dict)


def resolve_targets(recipe: Recipe, require: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Which targets run here. A required one that is missing is exit 4; an optional one is `skipped`."""
    bench = recipe.benchmark
    required = list(dict.fromkeys([*bench.targets, *require]))
    out: dict[str, dict[str, Any]] = {}
    for target in required:
        reason = _model_refuses(recipe, target) or unavailable_reason(target)
        if reason:
            source = "--require-target" if target in require and target not in bench.targets else "benchmark.targets"
            raise RuntimeMissingError(f"{source}: {target} is required but not available: {reason}")
        out[target] = {"status": "ran"}
    for target in bench.optional_targets:
        if target not in out:
            reason = _model_refuses(recipe, target) or unavailable_reason(target)
            out[target] = {"status": "skipped", "reason": reason} if reason else {"status": "ran"}
    return out


def _model_refuses(recipe: Recipe, target: str) -> str | None:
    if target.startswith("torch-") and isinstance(recipe.model, OnnxModel):
        return "the model is given as ONNX; torch targets run a PyTorch model source"
    return None


def make_run_dir(runs_dir: Path, name: str) -> tuple[Path, str]:
    """Create `runs/<recipe>/<run-id>/` (exit 2 with the reason when it cannot be created or written)."""
    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    run_dir = Path(runs_dir) / name / run_id
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RecipeError(
            f"--runs-dir: cannot write the run directory {run_dir} ({e.strerror}); pass a writable --runs-dir"
        ) from None
    return run_dir.resolve(), run_id


def environment() -> dict[str, Any]:
    """Library versions, hardware and OS for the manifest."""
    versions = {"python": platform.python_version(), "optimize": __version__}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    mem_gb = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            gpu = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            gpu = None
    from optimize.gpu import gpus

    return {
        "versions": versions,
        "hardware": {
            "cpu": cpu,
            # which kernels run: INT8 accuracy and all timings depend on it, and a model name does not say it
            "cpu_isa": cpu_isa(),
            "cores": os.cpu_count(),
            "memory_gb": mem_gb,
            "gpu": gpu,
            "gpus": [g.record() for g in gpus()],  # NVML: name, compute capability, driver, CUDA, memory
        },
        "os": f"{platform.system()} {platform.release()} ({platform.platform()})",
    }


class _Run:
    """State of one run while its stages execute (the pipeline's own bookkeeping, not a stage)."""

    def __init__(self, recipe: Recipe, recipe_path: Path, options: RunOptions) -> None:
        self.recipe = recipe
        self.options = options
        self.targets = resolve_targets(recipe, options.require_targets)
        from optimize.registry import resolve_tracking_uri

        self.tracking_uri = resolve_tracking_uri(options.tracking_uri, recipe.registry.tracking_uri)
        self.run_dir, self.run_id = make_run_dir(options.runs_dir, recipe.name)
        self.progress = Progress(quiet=options.quiet)
        self.manifest: dict[str, Any] = {
            "run_id": self.run_id,
            "recipe": recipe.name,
            "recipe_file": str(recipe_path.resolve()),
            "recipe_sha256": recipe_hash(recipe),
            "status": "running",
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **environment(),
            "stages": self.progress.timings,
        }
        from optimize.cache import StageCache, cache_root

        self.cache = StageCache(cache_root()) if options.cache else None
        self.manifest["cache"] = []  # per cached unit: stage, unit, key, hit
        self._io_specs: dict[Path, tuple[list[Any], list[Any]]] = {}
        plain = to_plain(recipe)
        write_text(self.run_dir / "recipe.yaml", recipe_yaml.dump(plain))
        write_json(self.run_dir / "recipe.json", plain)
        self.save_manifest()

    def save_manifest(self) -> None:
        write_json(self.run_dir / "manifest.json", self.manifest)

    @cached_property
    def task_metric_code(self) -> str | None:
        """sha256 of the task metric's source, for the keys of evaluate and INT8 precision (read once, when
        a stage first needs it, so that a bad entry point fails inside that stage)."""
        return _task_metric_sha256(self.recipe)

    def io_specs(self, path: Path) -> tuple[list[Any], list[Any]]:
        """An ONNX file's inputs and outputs as ONNX Runtime sees them (read once per file in this run)."""
        if path not in self._io_specs:
            from optimize.runtimes import open_runner

            with open_runner("onnxruntime-cpu", path) as r:
                self._io_specs[path] = (r.inputs, r.outputs)
        return self._io_specs[path]

    def log(self, stage: str) -> Any:
        _interrupts.check()
        capture = capture_output if self.options.capture_fds else capture_python_output
        return capture(self.run_dir / "logs" / f"{stage}.log")

    @contextmanager
    def cached(
        self,
        stage: str,
        unit: str,
        *,
        inputs: dict[str, str],
        config: Any,
        libraries: tuple[str, ...],
        device: str | None = None,
        refresh: bool = False,
    ) -> Iterator[Any]:
        """The stage cache's slot for one unit of a stage (see optimize/cache.py): `slot.hit` is the stored
        entry, else the block produces the unit, puts its files in `slot.dir` and sets `slot.record`.
        The key holds `inputs` (content hashes), `config`, the versions of `libraries` and of optimize's own
        code, and `device`. With caching off (--no-cache) every unit is a miss and nothing is kept."""
        from optimize import cache

        _interrupts.check()
        versions = {lib: self.manifest["versions"].get(lib, "absent") for lib in libraries}
        versions["optimize-code"] = code_sha256(stage)
        desc = cache.key_description(stage, inputs=inputs, config=config, versions=versions, device=device)
        key = cache.key_of(desc)
        if self.cache is None:
            with tempfile.TemporaryDirectory(prefix=f".{stage}-", dir=self.run_dir) as tmp:
                yield cache.Slot(hit=None, dir=Path(tmp))
            return
        with self.cache.produce(stage, key, desc, refresh=refresh) as slot:
            self.manifest["cache"].append({"stage": stage, "unit": unit, "key": key, "hit": slot.hit is not None})
            yield slot


def run(recipe_path: str | Path, options: RunOptions = RunOptions()) -> RunResult:
    """Run a recipe end to end; returns the run's result (exit code 0 passed, 1 a gate failed)."""
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    preflight.check(recipe, recipe_path)  # the files, data and tokenizers it names: before any stage, no torch
    state = _Run(recipe, recipe_path, options)
    try:
        with _interrupts.watching():
            return _run_stages(state)
    except BaseException as e:
        # Where the run's files are, for `optimize run --json` and the Python API (`OptimizeError.run_dir`).
        with contextlib.suppress(AttributeError):
            e.run_dir = state.run_dir  # type: ignore[attr-defined]
        raise


class _Interrupts:
    """Ctrl-C stops a run even where Python drops its KeyboardInterrupt: raised while a finaliser (`__del__`)
    or a library callback runs, it is printed as "Exception ignored" and the run would go on to exit 0. While
    a run is watched, SIGINT is also recorded, and each stage and cached unit checks the record first."""

    def __init__(self) -> None:
        self.seen = threading.Event()

    def _handler(self, signum: int, frame: Any) -> None:
        self.seen.set()
        raise KeyboardInterrupt

    @contextmanager
    def watching(self) -> Iterator[None]:
        self.seen.clear()
        previous = signal.getsignal(signal.SIGINT)
        # only the default handler is replaced (not a caller's own), and only from the main thread
        mine = previous is signal.default_int_handler and threading.current_thread() is threading.main_thread()
        if mine:
            signal.signal(signal.SIGINT, self._handler)
        try:
            yield
        finally:
            if mine:
                signal.signal(signal.SIGINT, previous)

    def check(self) -> None:
        if self.seen.is_set():
            raise KeyboardInterrupt


_interrupts = _Interrupts()


def _run_stages(state: _Run) -> RunResult:
    """The stages; a failure is recorded in the manifest and reported in one line that names the run directory."""
    try:
        result = _execute(state)
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        state.manifest["status"] = "interrupted" if interrupted else "failed"
        state.manifest["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        with contextlib.suppress(OSError):  # on a full disk the manifest keeps its last whole version
            state.save_manifest()
        where = display_path(state.run_dir)
        if interrupted:
            raise RunInterrupted(
                f"interrupted; {where} keeps what finished, and the same command again takes every finished "
                "stage from the stage cache"
            ) from None
        full = no_space(e)
        if full is not None:
            raise StageError(_no_space_message(state, full)) from e
        # A failed registration already names the run directory and ends with the command that retries it.
        if isinstance(e, OptimizeError) and where not in str(e):
            e.args = (f"{e.args[0] if e.args else ''} (run directory: {where})",)
        raise
    return result


def _no_space_message(state: _Run, e: OSError) -> str:
    """A full disk, in one line: which file (when known), and how much room the run directory and the stage
    cache have left."""
    where = {"run directory": state.run_dir}
    if state.cache is not None:
        where["stage cache"] = state.cache.root
    room = []
    for what, path in where.items():
        try:
            free = shutil.disk_usage(path).free
        except OSError:
            continue
        from optimize.cache import format_size

        room.append(f"{what} {display_path(path)} has {format_size(free)} free")
    file = f" writing {display_path(Path(e.filename))}" if e.filename else ""
    return (
        f"no space left on device{file}; {'; '.join(room)}. Free space, or pass --runs-dir / set "
        "OPTIMIZE_CACHE_DIR on a larger disk (`optimize cache prune --max-size SIZE` shrinks the cache); "
        "the same command again resumes from the stage cache"
    )


def _execute(state: _Run) -> RunResult:
    from optimize import accuracy, data, gates, registry
    from optimize.models import import_entry_point, load_model
    from optimize.precision import fp16
    from optimize.runtimes import open_runner

    recipe, run_dir, stage = state.recipe, state.run_dir, state.progress.stage
    art_dir = run_dir / "artifacts"
    baseline_path = art_dir / "fp32.onnx"

    # What a stage reads is made when it is first used: the module is built, and text tokenised, only where
    # some unit of work is not in the stage cache. Each dataset is checked against the FP32 ONNX's inputs
    # when its batches are made.
    with stage("load", "model and data") as rec, state.log("load"):
        loaded = load_model(recipe.model)

        @functools.cache
        def input_names() -> list[str]:
            if loaded.is_onnx:
                return [i.name for i in state.io_specs(loaded.onnx_path)[0]]
            return loaded.input_names(recipe.export)

        side = sorted(preflight.side_datasets(recipe))
        datasets = {
            name: data.load_dataset(name, spec, input_names, loaded.tokenizer_dir).checked(
                lambda name, batches: data.check_feeds(name, batches, state.io_specs(baseline_path)[0])
            )
            for name, spec in recipe.data.items()
            if name in {recipe.evaluate.dataset, *side}
        }
        eval_ds = datasets[recipe.evaluate.dataset]
        for name in side:  # data a variant is built or tuned on must not be what it is judged on
            data.check_disjoint(datasets[name], eval_ds)
        state.manifest["model"] = {"description": loaded.description, "sha256": loaded.content_sha256}
        data_ids = {n: _data_identity(recipe, loaded, n, d) for n, d in datasets.items()}
        state.manifest["datasets"] = {n: d.record() for n, d in datasets.items()}
        rec["detail"] = f"{loaded.description}; {eval_ds.description}"

    with stage("export", "torch → ONNX, checked against torch") as rec, state.log("export"):
        if loaded.is_onnx:
            copy_onnx(loaded.onnx_path, baseline_path)  # with its external data, renamed fp32.onnx.data
            rec["detail"] = f"ONNX given ({loaded.onnx_path.name}); export skipped"
        else:
            with state.cached(
                "export",
                "fp32",
                inputs={"model": _model_identity(recipe, loaded), "check_data": data_ids[eval_ds.name]},
                config={**to_plain(recipe.export), "external_data_bytes": external_data_threshold()},
                libraries=("torch", "onnx", "onnxscript", "onnxruntime", "transformers"),
            ) as slot:
                if slot.hit:
                    _restore(slot.hit, art_dir)
                    rec.update(slot.hit.record, cache="hit")
                else:
                    from optimize import export

                    examples = preflight.example_inputs(loaded, recipe.export)
                    for ds in datasets.values():  # data that cannot fit the model is refused before the export
                        data.check_feeds(ds.name, ds.made, examples)
                    export.export_onnx(loaded, recipe.export, baseline_path)
                    for ds in datasets.values():  # a wrong dtype or name is the user's, before the check
                        _ = ds.batches
                    with open_runner("onnxruntime-cpu", baseline_path) as r:
                        check = export.check_export(loaded, r, eval_ds.batches, recipe.export)
                        rec["outputs"] = {o.name: list(o.shape) for o in r.outputs}
                    worst = max(check.max_abs_error.values())
                    rec["check"] = check.record()
                    rec["detail"] = f"opset {recipe.export.opset}, max |torch − ORT| {worst:.2g} on {check.shapes[0]}"
                    _store(slot, baseline_path)
                    slot.record = {"check": rec["check"], "detail": rec["detail"], "outputs": rec["outputs"]}
    # The model's outputs are known now: a gate (or evaluate list) naming one it lacks, or with a metric that
    # does not fit its shape (cosine of one number per sample), is the recipe's mistake, refused before any
    # variant is built. A cached export carries the shapes; an ONNX source's are read from its graph (as the
    # preflight did from the file given), so a rerun opens no ONNX Runtime session for them.
    gates.check_outputs(
        recipe.gates,
        recipe.evaluate,
        rec.get("outputs") or {o.name: o.shape for o in preflight.onnx_outputs(baseline_path, "model.path")},
        display_path(Path(state.manifest["recipe_file"])),
    )

    paths = {"fp32": baseline_path}
    precisions = {"fp32": "fp32"}
    with (
        stage("precision", ", ".join(v.name for v in recipe.precision.variants)) as rec,
        state.log("precision"),
    ):
        records = {}
        locked = to_plain(recipe)
        baseline_sha256 = onnx_sha256(baseline_path)
        for index, variant in enumerate(recipe.precision.variants):
            dest = art_dir / f"{variant.name}.onnx"
            with state.cached(
                "precision",
                variant.name,
                inputs={
                    "fp32": baseline_sha256,
                    "check_data": data_ids[eval_ds.name],
                    **{f"data.{n}": data_ids[n] for n in preflight.variant_datasets(variant)},
                },
                config=_precision_config(state, variant),
                libraries=("onnx", "onnxruntime", "nvidia-modelopt", "numpy"),
                # the fallback judges INT8 trials on this CPU's kernels: another ISA may keep other nodes
                device=_isa_identity(state) if isinstance(variant, Int8Variant) else None,
            ) as slot:
                if slot.hit:
                    _restore(slot.hit, art_dir)
                    records[variant.name] = {**slot.hit.record["record"], "cache": "hit"}
                    excluded = slot.hit.record["excluded"]
                else:
                    records[variant.name], excluded = _build_variant(state, index, baseline_path, dest, datasets)
                    with open_runner("onnxruntime-cpu", dest) as r:  # every model built is run: NaN/Inf fails
                        feeds = eval_ds.batches[0]
                        fp16.check_finite(dest, r.run(feeds), feeds, f"precision.{variant.name}")
                    _store(slot, dest)
                    slot.record = {"record": records[variant.name], "excluded": excluded}
            if isinstance(variant, Int8Variant):
                # The lock reproduces this build without searching: the exclusions found, fallback off.
                entry = locked["precision"]["variants"][index]
                entry["nodes_to_exclude"] = excluded
                entry["fallback"]["enabled"] = False
            paths[variant.name] = dest
            precisions[variant.name] = variant.kind
        rec["variants"] = records
        for w in _saturation_warnings(recipe, state.manifest["hardware"]["cpu_isa"]):
            console().print(f"[yellow]warning[/]: {w}", markup=True, highlight=False)
        rec["detail"] = ", ".join(
            f"{n} via {r['backend']}"
            + (f", {len(r['nodes_excluded'])} node(s) kept high-precision" if r.get("nodes_excluded") else "")
            for n, r in records.items()
        )
        write_text(run_dir / "recipe.lock.yaml", LOCK_HEADER + recipe_yaml.dump(locked))
        shutil.rmtree(run_dir / "work", ignore_errors=True)  # INT8 trials and calibration scratch

    ran = [t for t, s in state.targets.items() if s["status"] == "ran"]
    baseline_size = onnx_size_bytes(baseline_path)
    variants_meta = {
        name: {
            "precision": precisions[name],
            "path": str(p.relative_to(run_dir)),
            "size_bytes": onnx_size_bytes(p),
            "sha256": onnx_sha256(p),
        }
        for name, p in paths.items()
    }
    # What runs on each target: the ONNX on ONNX Runtime, the source module on torch, a plan on TensorRT.
    # A variant a target cannot run (INT8 on torch, QOperator INT8 on TensorRT) is skipped there, with why.
    artifacts: dict[str, dict[str, Any]] = {}
    not_run: dict[str, dict[str, str]] = {}
    for target in ran:
        artifacts[target], not_run[target] = {}, {}
        for name, p in paths.items():
            reason = target_refuses(target, recipe, name, precisions[name])
            if reason:
                not_run[target][name] = reason
            elif target.startswith("torch-"):
                from optimize.runtimes.torch import TorchArtifact

                artifacts[target][name] = TorchArtifact(loaded.module, *state.io_specs(p), precisions[name])
            else:
                artifacts[target][name] = p
    results: dict[str, dict[str, dict[str, Any]]] = {
        name: {
            t: {"skipped": not_run[t][name]}
            if name in not_run[t]
            else {"size": {"bytes": meta["size_bytes"], "ratio": meta["size_bytes"] / baseline_size}}
            for t in ran
        }
        for name, meta in variants_meta.items()
    }

    if "tensorrt" in ran:
        with stage("engine", f"TensorRT engines for {', '.join(artifacts['tensorrt'])}") as rec, state.log("engine"):
            specs = {n: state.io_specs(p) for n, p in artifacts["tensorrt"].items()}
            sidecars = _build_engines(state, artifacts["tensorrt"], precisions, specs)
            fp32_bytes = sidecars["fp32"]["plan_bytes"]
            for name, side in sidecars.items():
                artifacts["tensorrt"][name] = Path(side["plan_path"])
                variants_meta[name]["engine"] = {
                    "path": str(Path(side["plan_path"]).relative_to(run_dir)),
                    "sha256": side["plan_sha256"],
                    "precisions": side["precisions"],
                    "precision_check": side["precision_check"],
                    "build_s": side["build_s"],
                    "device_memory_bytes": side["device_memory_bytes"],
                    # The plan's size is not `size`: that stays the ONNX a version ships, the same on every
                    # target; a small model's plan is mostly kernels, so its ratio says little about weights.
                    "plan_bytes": side["plan_bytes"],
                    "plan_ratio": side["plan_bytes"] / fp32_bytes,
                }
            rec["engines"] = {n: variants_meta[n]["engine"] for n in sidecars}
            rec["detail"] = ", ".join(
                f"{n} {s['precision_check']['status']} ({s['build_s']:.0f} s)" for n, s in sidecars.items()
            )

    golden: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    sample_inputs: dict[str, np.ndarray] = {}  # the first evaluation batch: what registered versions carry
    # Per-sample accuracy and per-iteration latency for the report's plots (`distributions.npz`, see README).
    distributions: dict[str, np.ndarray] = {}

    with (
        stage("evaluate", f"accuracy on {eval_ds.name} ({eval_ds.sample_count} samples)") as rec,
        state.log("evaluate"),
    ):
        metric_fn = None
        if recipe.evaluate.task_metric:
            metric_fn = import_entry_point(
                recipe.evaluate.task_metric, recipe.evaluate.task_metric_python_path, "evaluate.task_metric"
            )
        # Every target is judged against the same reference: the FP32 ONNX on ONNX Runtime's CPU provider,
        # computed only when some (variant, target) is not in the cache.
        reference: list[Any] = []

        def reference_outputs() -> Any:
            if not reference:
                with open_runner("onnxruntime-cpu", baseline_path, recipe.benchmark.threads) as r:
                    reference.append(accuracy.run_all(r, eval_ds.batches))
            return reference[0]

        eval_config = {
            "evaluate": to_plain(recipe.evaluate),
            "task_metric_code": state.task_metric_code,
            "threads": recipe.benchmark.threads,
        }
        for target in ran:
            golden[target] = {}
            for name, artifact in artifacts[target].items():
                with state.cached(
                    "evaluate",
                    f"{name}@{target}",
                    inputs={
                        "artifact": _artifact_identity(variants_meta, recipe, loaded, target, name),
                        "reference": variants_meta["fp32"]["sha256"],
                        "eval": data_ids[eval_ds.name],
                    },
                    config={**eval_config, "target": target},
                    libraries=_RUNTIME_LIBRARIES[target.split("-")[0]],
                    device=_device_identity(state, target),
                ) as slot:
                    if slot.hit:
                        acc = slot.hit.record["accuracy"]
                        golden[target][name] = _read_npz(slot.hit.path("golden.npz"))
                        sample_inputs = sample_inputs or _read_npz(slot.hit.path("inputs.npz"))
                        per_sample = _read_npz(slot.hit.path("per_sample.npz"))
                    else:
                        if target == "onnxruntime-cpu" and name == "fp32":
                            outs = reference_outputs()
                        else:
                            with open_runner(target, artifact, recipe.benchmark.threads) as r:
                                outs = accuracy.run_all(r, eval_ds.batches)
                        ref = reference_outputs()
                        acc = accuracy.compare_outputs(
                            ref, outs, recipe.evaluate.top1_outputs, recipe.evaluate.neighbour_outputs
                        )
                        if metric_fn is not None:
                            acc.update(accuracy.task_metric(metric_fn, ref, outs, eval_ds.labels))
                        per_sample = {
                            f"{kind}/{output}": values
                            for output, by_kind in accuracy.per_sample(ref, outs, recipe.evaluate.top1_outputs).items()
                            for kind, values in by_kind.items()
                        }
                        write_npz(slot.dir / "per_sample.npz", per_sample)
                        sample_inputs = eval_ds.batches[0]
                        n_golden = len(next(iter(sample_inputs.values())))
                        golden[target][name] = {k: v[:n_golden] for k, v in outs.items()}
                        write_npz(slot.dir / "golden.npz", golden[target][name])
                        write_npz(slot.dir / "inputs.npz", sample_inputs)
                        slot.record = {"accuracy": acc}
                results[name][target]["accuracy"] = acc
                for k, values in per_sample.items():
                    kind, output = k.split("/", 1)
                    if kind == "argmax_reference":
                        distributions[f"argmax/reference/fp32/{output}"] = values
                    else:
                        distributions[f"{kind}/{target}/{name}/{output}"] = values
                if target != "onnxruntime-cpu":  # what a later smoke check on this target compares with
                    write_npz(run_dir / "golden" / target / f"{name}.npz", golden[target][name])
        rec["detail"] = "; ".join(
            f"{n} cosine min {results[n][t]['accuracy']['cosine_min']:.6f} on {t}"
            if "cosine_min" in results[n][t]["accuracy"]
            else f"{n} relative error {results[n][t]['accuracy']['relative_error']:.3g} on {t}"
            for n in paths
            if n != "fp32"
            for t in ran
            if "accuracy" in results[n][t]
        )

    b = recipe.benchmark
    with (
        stage("benchmark", f"{len(b.shapes)} shape(s) × {len(paths)} models, {b.iterations} iterations") as rec,
        state.log("benchmark"),
    ):
        for target in ran:
            with state.cached(
                "benchmark",
                target,
                inputs={
                    **{n: _artifact_identity(variants_meta, recipe, loaded, target, n) for n in artifacts[target]},
                    "samples": data_ids[eval_ds.name],
                },
                config={"benchmark": to_plain(b), "target": target},
                libraries=_RUNTIME_LIBRARIES[target.split("-")[0]],
                device=_machine_identity(state, target),
                refresh=state.options.rebench,
            ) as slot:
                if slot.hit:
                    measured = slot.hit.record
                    series = _read_npz(slot.hit.path("latency.npz"))
                else:
                    # input sets rotated, so no single one is cached into flattering numbers
                    timed: dict[str, dict[str, np.ndarray]] = {}
                    measured = _benchmark_target(
                        target,
                        artifacts[target],
                        b,
                        eval_ds.batches[:4],
                        eval_ds.batches[0],
                        timed,
                        state.progress.bar(),
                    )
                    series = {f"{n}/{shape}": ms for n, by_shape in timed.items() for shape, ms in by_shape.items()}
                    write_npz(slot.dir / "latency.npz", series)
                    slot.record = measured
                distributions.update({f"latency_ms/{target}/{k}": ms for k, ms in series.items()})
            for name in artifacts[target]:
                results[name][target]["shapes"] = measured["shapes"][name]
                results[name][target]["memory"] = measured["memory"][name]
        noisy = [
            f"{n}@{t}:{k}"
            for n in results
            for t in ran
            for k, s in results[n][t].get("shapes", {}).items()
            if s["cv_warning"]
        ]
        if noisy:
            console().print(
                f"[yellow]warning[/]: latency CV above {b.cv_warn:.0%} for {', '.join(noisy)}; the machine is noisy",
                markup=True,
                highlight=False,
            )
        for n in results:
            for t in ran:
                for k, s in results[n][t].get("shapes", {}).items():
                    for w in s.get("warnings", []):
                        console().print(f"[yellow]warning[/]: {n}@{t}:{k}: {w}", markup=True, highlight=False)
        rec["detail"] = "; ".join(
            f"{n} p50 speed-up {min(s['p50_speedup'] for s in results[n][t]['shapes'].values()):.2f}× on {t}"
            for n in paths
            if n != "fp32"
            for t in ran
            if "shapes" in results[n][t]
        )

    metrics = {"baseline": "fp32", "variants": variants_meta, "results": results}
    fallbacks = {n: r["fallback"] for n, r in records.items() if r.get("fallback", {}).get("trials")}
    if fallbacks:
        metrics["fallback"] = fallbacks
    with stage("gate", f"{len(recipe.gates)} gate(s)") as rec:
        verdict = gates.evaluate_gates(recipe.gates, results, state.targets)
        rec["detail"] = f"{verdict['status'].upper()}: " + ", ".join(
            f"{v} {s['status']}" for v, s in verdict["variants"].items()
        )

    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "verdict.json", verdict)
    write_npz(run_dir / "distributions.npz", distributions)
    # A registered version carries its ONNX: its golden outputs are ONNX Runtime's where that ran.
    order = sorted(golden, key=lambda t: (not t.startswith("onnxruntime-"), t != "onnxruntime-cpu"))
    golden_onnx = {n: next(golden[t][n] for t in order if n in golden[t]) for n in paths}
    _write_registry_folders(run_dir, paths, variants_meta, verdict, golden_onnx, sample_inputs, recipe)
    state.manifest["status"] = "measured"
    state.save_manifest()
    _write_reports(run_dir, metrics, verdict, state.manifest)

    registered: dict[str, Any] = {}
    if state.options.register and recipe.registry.enabled:
        with stage("register", f"MLflow at {state.tracking_uri}") as rec, state.log("register"):
            # The same idempotent publish as `optimize register RUN_DIR`, which retries a failure from here,
            # except that a variant the store holds already as the same model is not registered again; when
            # that is every variant of a local store (a rerun), it is known without importing MLflow.
            try:
                registered = registry.publish_new(run_dir, state.tracking_uri)
            except OptimizeError as e:
                state.manifest["registry"] = registry.failure_record(state.tracking_uri, e)
                raise
            state.manifest["registry"] = registry.success_record(registered)
            versions = {**registered["already"], **registered["versions"]}
            rec["detail"] = (
                ", ".join(f"{registered['model_name']} v{v} ({n})" for n, v in versions.items())
                + f", alias {registered['alias']}"
                + ("" if registered["run_id"] else "; registered already, nothing logged")
                if versions
                else "run logged; nothing passed, nothing registered"
            )
    state.manifest["status"] = "done"
    state.manifest["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    state.save_manifest()
    _write_reports(run_dir, metrics, verdict, state.manifest)
    return RunResult(run_dir, verdict["status"], 0 if verdict["status"] == "passed" else 1, registered)


def _write_reports(run_dir: Path, metrics: dict[str, Any], verdict: dict[str, Any], manifest: dict[str, Any]) -> None:
    """report.md and report.html (with its plots/*.png) for people; junit.xml and summary.md (the gate
    table) for CI."""
    from optimize import report, report_html, results

    write_text(run_dir / "report.md", report.markdown(metrics, verdict, manifest))
    where = display_path(report_html.write(run_dir))
    write_text(run_dir / "junit.xml", results.junit_xml(verdict, manifest, where))
    write_text(run_dir / "summary.md", results.summary_markdown(verdict, manifest, where))


LOCK_HEADER = (
    "# recipe.lock.yaml: this run's recipe, resolved, with what the INT8 fallback found written in\n"
    "# (nodes_to_exclude) and the search turned off. `optimize run` on this file rebuilds the same variants.\n"
)


def target_refuses(target: str, recipe: Recipe, name: str, precision: str) -> str | None:
    """Why `target` does not run variant `name` (None when it does): torch runs the source module in FP32
    or FP16 autocast, not INT8; TensorRT compiles Q/DQ INT8, not ONNX Runtime's own INT8 operators."""
    if target.startswith("torch-"):
        from optimize.runtimes.torch import supports

        return supports(precision)
    if target == "tensorrt" and precision == "int8":
        variant = next(v for v in recipe.precision.variants if v.name == name)
        assert isinstance(variant, Int8Variant)
        if variant.backend == "onnxruntime-dynamic" or (
            variant.backend == "onnxruntime" and variant.quant_format == "qoperator"
        ):
            return (
                f"backend {variant.backend} writes ONNX Runtime's own INT8 operators; TensorRT takes Q/DQ INT8 "
                "(backend modelopt, or onnxruntime with quant_format qdq)"
            )
    return None


def _build_engines(
    state: _Run, onnx_paths: dict[str, Path], precisions: dict[str, str], specs: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """One TensorRT engine per variant (the FP32 baseline first), each in a child process; then the
    precision check: a variant whose engine does not carry its precision fails the stage."""
    from dataclasses import asdict

    from optimize import engine

    recipe, b = state.recipe, state.recipe.benchmark
    profile = recipe.engine.profile.model_dump() if recipe.engine.profile else engine.default_profile(b.shapes)
    cache = engine.cache_dir(recipe.engine.timing_cache)
    sidecars: dict[str, dict[str, Any]] = {}
    for name, onnx_path in onnx_paths.items():
        inputs, outputs = specs[name]
        request = engine.BuildRequest(
            onnx_path=str(onnx_path),
            out_dir=str(state.run_dir / "artifacts" / "engines"),
            model=recipe.name,
            variant=name,
            precision=name,  # the variant's name, which names its precision (fp32, fp16, int8-trt, …)
            inputs=[asdict(s) for s in inputs],
            outputs=[asdict(s) for s in outputs],
            profile=profile,
            workspace_gb=recipe.engine.workspace_gb,
            optimization_level=recipe.engine.optimization_level,
            timing_cache_dir=str(cache),
            log_path=str(state.run_dir / "logs" / f"engine-{name}.log"),
        )
        # The engine depends on the ONNX, the build settings, TensorRT's version and the GPU; where files lie
        # and the timing cache (which speeds the build, not what is built) are not part of the key.
        settings = {k: v for k, v in asdict(request).items() if k not in _MACHINE_LOCAL}
        with state.cached(
            "engine",
            name,
            inputs={"onnx": onnx_sha256(onnx_path)},
            config=settings,
            libraries=("tensorrt",),
            device=json.dumps([_device_identity(state, "tensorrt"), engine.tensorrt_version()]),
        ) as slot:
            if slot.hit:
                plan_path = Path(request.out_dir) / slot.hit.record["plan_file"]
                _restore(slot.hit, plan_path.parent)
                sidecars[name] = {**slot.hit.record["sidecar"], "plan_path": str(plan_path), "cache": "hit"}
            else:
                if not state.options.quiet:
                    console().print(f"  engine {name}: building (log: logs/engine-{name}.log)", highlight=False)
                sidecars[name] = engine.build_in_child(
                    request, recipe.engine.build_timeout_s, progress=state.progress.bar()
                )
                plan_path = Path(sidecars[name]["plan_path"])
                _store(slot, plan_path)
                sidecar = {k: v for k, v in sidecars[name].items() if k != "plan_path"}
                slot.record = {"plan_file": plan_path.name, "sidecar": sidecar}
    fp32_plan, fp32_onnx = sidecars["fp32"]["plan_bytes"], onnx_size_bytes(onnx_paths["fp32"])
    failed = []
    for name, side in sidecars.items():
        kept = engine.weight_saving(side["plan_bytes"], fp32_plan, onnx_size_bytes(onnx_paths[name]), fp32_onnx)
        check = engine.check_precision(precisions[name], side["precisions"], kept, recipe.engine.min_precision_share)
        side["precision_check"] = check
        write_json(Path(side["plan_path"]).with_suffix(".json"), side)
        if check["status"] == "failed":
            failed.append(f"{name}: {check['reason']}")
        elif check["status"] == "undetermined" and not state.options.quiet:
            console().print(f"  [yellow]warning[/]: engine {name}: {check['reason']}", highlight=False)
    if failed:
        raise StageError("engine: " + "; ".join(failed))
    return sidecars


# The modules each cached stage runs (beside pipeline.py, which drives every stage); with what they import
# from optimize, their source is part of the stage's cache key (see `code_sha256`).
_STAGE_CODE = {
    "export": ("export", "models", "encoders", "data", "runtimes"),
    "precision": ("precision", "data", "accuracy", "gates", "bench", "runtimes"),
    "evaluate": ("accuracy", "data", "engine", "runtimes"),
    "benchmark": ("bench", "data", "engine", "runtimes"),
    "engine": ("engine", "gpu", "runtimes"),
}


@functools.cache
def code_sha256(stage: str) -> str:
    """sha256 of the optimize source a stage runs (`stage_code_files`). A cached result is reused only by
    the code that made it; editing the report or the registry leaves the export's entry valid."""
    package = Path(__file__).parent
    h = hashlib.sha256()
    for path in stage_code_files(stage):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def stage_code_files(stage: str) -> list[Path]:
    """pipeline.py and the stage's modules with every optimize module they import, also inside functions
    (found by reading the sources), sorted."""
    package = Path(__file__).parent
    seen: set[Path] = set()
    todo = [package / "pipeline.py", *(f for m in _STAGE_CODE[stage] for f in _module_files(m))]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path.name != "pipeline.py":  # the driver itself, not everything it imports
            todo.extend(f for name in _optimize_imports(path) for f in _module_files(name))
    return sorted(seen)


def _module_files(module: str) -> list[Path]:
    """The source files of an optimize module (`data`, `runtimes.base`) or package (`runtimes`)."""
    base = Path(__file__).parent.joinpath(*module.split("."))
    if base.is_dir():
        return sorted(base.rglob("*.py"))
    return [base.with_suffix(".py")] if base.with_suffix(".py").is_file() else []


@functools.cache
def _optimize_imports(path: Path) -> tuple[str, ...]:
    """The optimize modules a source file imports anywhere in it (`from optimize.x import y` also names
    `x.y`, which may be a module), relative to the package."""
    import ast

    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "optimize":
            # `from optimize import x` runs module x; the package's own __init__ only loads names lazily
            names += [f"optimize.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    ours = [n for n in names if n == "optimize" or n.startswith("optimize.")]
    return tuple(n.removeprefix("optimize").lstrip(".") or "__init__" for n in ours)


# Build request fields that say where files lie on this machine, not what is built.
_MACHINE_LOCAL = ("onnx_path", "out_dir", "timing_cache_dir", "log_path")


def _store(slot: Any, *paths: Path) -> None:
    """Copy a unit's files into its cache slot (an ONNX with the external-data file its tensors name, if any)."""
    for path in paths:
        for p in onnx_files(path) if path.suffix == ".onnx" else [path]:
            shutil.copyfile(p, slot.dir / p.name)


def _restore(entry: Any, dest_dir: Path) -> None:
    """Copy a cache entry's files into `dest_dir` under their own names, atomically: an ONNX together with
    its external-data file (no .onnx is ever there without its data), every other file alone."""
    models = [name for name in entry.files if name.endswith(".onnx")]
    data = {p.name for name in models for p in onnx_files(entry.path(name))[1:]}
    for name in models:
        copy_onnx(entry.path(name), dest_dir / name)
    for name in entry.files:
        if name not in models and name not in data:
            src = entry.path(name)
            write_with(dest_dir / name, lambda tmp, src=src: shutil.copyfile(src, tmp))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


_RUNTIME_LIBRARIES = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "numpy"),
    "tensorrt": ("tensorrt", "torch", "numpy"),
    "torch": ("torch", "numpy"),
}


def _artifact_identity(variants_meta: dict[str, Any], recipe: Recipe, loaded: Any, target: str, name: str) -> str:
    """The content a target runs for a variant: its ONNX, its TensorRT plan, or the source module."""
    meta = variants_meta[name]
    if target == "tensorrt":
        return meta["engine"]["sha256"]
    if target.startswith("torch-"):
        return f"{_model_identity(recipe, loaded)}:{meta['precision']}"
    return meta["sha256"]


def _identity(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _model_identity(recipe: Recipe, loaded: Any) -> str:
    """The model's content and how the recipe builds the module from it (pooling, example inputs, entry
    point arguments); where it lies on disk is not part of it."""
    section = {k: v for k, v in to_plain(recipe.model).items() if k not in ("path", "python_path")}
    return _identity(loaded.content_sha256, section)


def _data_identity(recipe: Recipe, loaded: Any, name: str, ds: Any) -> str:
    """A dataset's samples and how they become model inputs (its section: batch size, sequence length,
    padding, ...; the tokenizer, which comes with the model)."""
    section = {k: v for k, v in to_plain(recipe.data[name]).items() if k != "path"}
    return _identity(ds.sha256, section, loaded.content_sha256)


def _device_identity(state: _Run, target: str) -> str | None:
    """What a target's outputs depend on: the GPU model and architecture, or on the CPU its instruction sets
    (which INT8 and matrix kernels run)."""
    if target in ("onnxruntime-cpu", "torch-cpu"):
        return _isa_identity(state)
    return json.dumps([[g.get("name"), g.get("compute_capability")] for g in state.manifest["hardware"]["gpus"]])


def _isa_identity(state: _Run) -> str:
    """The CPU's instruction sets, as a cache key's device: what INT8 kernels (and so accuracy) depend on."""
    return json.dumps({"cpu_isa": state.manifest["hardware"]["cpu_isa"]}, sort_keys=True)


def _machine_identity(state: _Run, target: str) -> str:
    """What timings depend on: the CPU, its instruction sets, cores and memory, and on GPU targets the GPUs and
    driver."""
    hw = state.manifest["hardware"]
    machine = {"cpu": hw["cpu"], "isa": hw["cpu_isa"], "cores": hw["cores"], "memory_gb": hw["memory_gb"]}
    if target not in ("onnxruntime-cpu", "torch-cpu"):
        machine["gpus"] = hw["gpus"]
    return json.dumps(machine, sort_keys=True)


def _benchmark_target(
    target: str,
    artifacts: dict[str, Any],
    b: Any,
    samples: list[Any],
    first_batch: Any,
    series: dict[str, Any],
    progress: Bar = NO_PROGRESS,
) -> dict[str, Any]:
    """Latency and throughput per shape (every variant interleaved on one target), then peak memory; every
    timed iteration's latency goes into `series` ({variant: {shape key: ms}}). `progress` (a bar) counts the
    runs of each shape, then the memory probes."""
    from optimize import bench
    from optimize.runtimes import open_runner

    runners = {name: open_runner(target, a, b.threads) for name, a in artifacts.items()}
    try:
        inputs = runners["fp32"].inputs
        per_shape = bench.run_shapes(runners, b, samples, baseline="fp32", series=series, progress=progress)
        largest = max(b.shapes, key=lambda s: int(np.prod(list(s.values()))))
        feeds = bench.make_feeds(inputs, largest, first_batch, "benchmark.shapes")
        if target == "torch-cuda":
            cuda_memory = {n: bench.measure_torch_cuda_memory(r, feeds) for n, r in runners.items()}
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
            mem = bench.measure_memory(target, artifact, feeds, b.threads)
        memory[name] = {**mem, "shape": bench.shape_key(largest)}
        progress.advance()
    return {"shapes": per_shape, "memory": memory}


def _build_variant(
    state: _Run, index: int, baseline_path: Path, dest: Path, datasets: dict[str, Any]
) -> tuple[dict[str, Any], list[str] | None]:
    """Build one precision variant to `dest`: its record, and the nodes kept in high precision (INT8)."""
    from optimize.precision import fp16

    variant = state.recipe.precision.variants[index]
    if isinstance(variant, Int8Variant):
        return _build_int8(state, index, baseline_path, dest, datasets)
    reference_dir = None
    if variant.reference_data and fp16.choose_backend(variant) == "modelopt":
        reference_dir = dest.parent / f"{variant.name}-reference"
        for k, batch in enumerate(datasets[variant.reference_data].batches[: variant.reference_batches]):
            write_npz(reference_dir / f"batch{k:04d}.npz", batch)
    result = fp16.convert_fp16(baseline_path, dest, variant, reference_dir)
    return {**result.record(), "reference_data": variant.reference_data if reference_dir else None}, None


def _saturation_warnings(recipe: Recipe, isa: dict[str, Any]) -> list[str]:
    """ONNX Runtime INT8 variants with 8-bit signed weights, judged here on a CPU whose u8×s8 kernels saturate
    (x86 without VNNI): their accuracy on this machine is lower than on a VNNI CPU, and differs from it."""
    if not saturating(isa):
        return []
    return [
        f"precision.variants[{i}] ({v.name}): this CPU ({isa['int8_dot']}) saturates 8-bit weight products, so "
        "its accuracy here is lower than on a CPU with VNNI; `reduce_range: true` (7-bit weights) gives the "
        "same results on both"
        for i, v in enumerate(recipe.precision.variants)
        if isinstance(v, Int8Variant)
        and v.backend.startswith("onnxruntime")
        and not v.reduce_range
        and v.weight_type == "int8"
    ]


def _precision_config(state: _Run, variant: Any) -> dict[str, Any]:
    """What a variant's build depends on besides its inputs: its section; for INT8, also what the
    accuracy-aware fallback tunes against (the accuracy gates, the targets that run, the evaluation
    settings and the task metric's code)."""
    config: dict[str, Any] = {"variant": to_plain(variant), "external_data_bytes": external_data_threshold()}
    if isinstance(variant, Int8Variant):
        from optimize.precision import fallback

        ran = [t for t, st in state.targets.items() if st["status"] == "ran"]
        config["fallback_gates"] = [
            g.model_dump() for g in fallback.accuracy_gates(state.recipe.gates, variant.name, ran)
        ]
        config["targets"] = ran
        config["evaluate"] = to_plain(state.recipe.evaluate)
        config["task_metric_code"] = state.task_metric_code
    return config


def _task_metric_sha256(recipe: Recipe) -> str | None:
    """sha256 of the file that defines the recipe's task metric: editing it changes what is measured."""
    if not recipe.evaluate.task_metric:
        return None
    import inspect

    from optimize.models import import_entry_point

    fn = import_entry_point(
        recipe.evaluate.task_metric, recipe.evaluate.task_metric_python_path, "evaluate.task_metric"
    )
    source = inspect.getsourcefile(fn)
    return sha256_file(Path(source)) if source else None


def _build_int8(
    state: _Run, index: int, baseline_path: Path, dest: Path, datasets: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Quantise one INT8 variant to `dest`, with the accuracy-aware fallback where the recipe has accuracy
    gates for it. Returns the stage record and the final nodes kept in high precision."""
    from optimize import accuracy, bench, gates
    from optimize.models import import_entry_point
    from optimize.precision import fallback, int8
    from optimize.runtimes import open_runner

    recipe = state.recipe
    variant = recipe.precision.variants[index]
    assert isinstance(variant, Int8Variant)
    where = f"precision.variants[{index}]"
    int8.require_backend(variant, where)
    work = state.run_dir / "work" / variant.name
    src, fusion = baseline_path, None
    if variant.fusion:
        src = work / "fused.onnx"
        fusion = int8.fuse(baseline_path, src, variant.fusion, where)
    int8.check_exclusions(src, variant.nodes_to_exclude, variant.op_types_to_exclude, where)
    calib = datasets[variant.calibration].batches[: variant.calibration_batches] if variant.calibration else []
    ran = [t for t, st in state.targets.items() if st["status"] == "ran"]
    checks = fallback.accuracy_gates(recipe.gates, variant.name, ran)
    fb_name = variant.fallback.dataset or variant.calibration
    fb_ds = datasets.get(fb_name) if fb_name else None
    untuned = []  # gates the trials cannot measure: said, since the evaluation will judge them
    if fb_ds is not None and fb_ds.labels is None:
        untuned = [g.check for g in checks if g.metric.startswith("accuracy.task_metric")]
        checks = [g for g in checks if not g.metric.startswith("accuracy.task_metric")]
    off_reason = (
        "fallback.enabled is false"
        if not variant.fallback.enabled
        else "no accuracy gate covers this variant on a target that runs here"
        if not checks
        else "no data to tune on: set fallback.dataset (never the evaluation dataset)"
        if fb_ds is None
        else None
    )
    if off_reason:
        if fb_ds is None and checks and variant.fallback.enabled and not state.options.quiet:
            console().print(f"  note: {variant.name}: accuracy-aware fallback off, {off_reason}", highlight=False)
        result = int8.quantize(src, dest, variant, calib, work, where, progress=state.progress.bar())
        result.fusion = fusion
        shutil.rmtree(work, ignore_errors=True)
        return {**result.record(), "fallback": {"enabled": False, "reason": off_reason}}, result.nodes_excluded

    if untuned and not state.options.quiet:
        console().print(
            f"  note: {variant.name}: the fallback data {fb_name} has no labels; not tuned on {', '.join(untuned)}",
            highlight=False,
        )
    batches = fb_ds.batches[: variant.fallback.batches]
    labels = fb_ds.labels[: int8.sample_count(batches)] if fb_ds.labels is not None else None
    metric_fn = None
    if recipe.evaluate.task_metric and labels is not None:
        metric_fn = import_entry_point(
            recipe.evaluate.task_metric, recipe.evaluate.task_metric_python_path, "evaluate.task_metric"
        )
    with open_runner("onnxruntime-cpu", baseline_path, recipe.benchmark.threads) as r:
        base_out = accuracy.run_all(r, batches)
        inputs = r.inputs
    largest = max(recipe.benchmark.shapes, key=lambda sh: int(np.prod(list(sh.values()))))
    speed_feeds = bench.make_feeds(inputs, largest, batches[0], "benchmark.shapes")
    results_by_trial: dict[int, Any] = {}
    cpu_only = {"onnxruntime-cpu": {"status": "ran"}}
    # Bars under the stage: the trials against their budget, and the calibration the first trial runs.
    trials, calibration = state.progress.bar(), state.progress.bar()

    def build(i: int, excluded: list[str]) -> Path:
        path = work / f"trial{i}.onnx"
        results_by_trial[i] = int8.quantize(src, path, variant, calib, work, where, excluded, progress=calibration)
        return path

    def judge(path: Path) -> tuple[dict[str, Any], list[str]]:
        with open_runner("onnxruntime-cpu", path, recipe.benchmark.threads) as r:
            out = accuracy.run_all(r, batches)
        acc = accuracy.compare_outputs(base_out, out, recipe.evaluate.top1_outputs, recipe.evaluate.neighbour_outputs)
        if metric_fn is not None:
            acc.update(accuracy.task_metric(metric_fn, base_out, out, labels))
        verdict = gates.evaluate_gates(
            checks, {"fp32": {}, variant.name: {"onnxruntime-cpu": {"accuracy": acc}}}, cpu_only
        )
        return acc, [f"{row['check']}: {row.get('reason')}" for row in verdict["gates"] if row["status"] == "failed"]

    def speed(path: Path) -> float:
        runners = {
            "fp32": open_runner("onnxruntime-cpu", baseline_path, recipe.benchmark.threads),
            "trial": open_runner("onnxruntime-cpu", path, recipe.benchmark.threads),
        }
        try:
            t = bench.time_interleaved(runners, speed_feeds, 3, max(10, recipe.benchmark.iterations // 5))
        finally:
            for r in runners.values():
                r.close()
        return float(np.percentile(t["fp32"], 50) / np.percentile(t["trial"], 50))

    rank_batches = batches[:2]
    with open_runner("onnxruntime-cpu", src, recipe.benchmark.threads) as r:
        rank_reference = accuracy.run_all(r, rank_batches)

    def outputs_of(path: Path) -> dict[str, np.ndarray]:
        with open_runner("onnxruntime-cpu", path, recipe.benchmark.threads) as r:
            return accuracy.run_all(r, rank_batches)

    def quantise_only(node: str) -> Path | None:
        path = work / "rank.onnx"
        try:
            int8.quantize(src, path, variant, calib, work, where, only=node)
        except StageError:  # a node that is not quantised on its own
            return None
        return path

    def rank(path: Path) -> list[tuple[str, float]]:
        import onnx

        candidates = fallback.quantised_nodes(
            onnx.load(str(src), load_external_data=False),
            onnx.load(str(path), load_external_data=False),
            int8.candidate_op_types(variant),
        )
        if not state.options.quiet:
            console().print(f"  fallback {variant.name}: ranking {len(candidates)} quantised nodes", highlight=False)
        return fallback.rank_isolated(
            candidates,
            quantise_only,
            outputs_of,
            rank_reference,
            progress=state.progress.bar(),
            only=fallback.judged_outputs(checks),
        )

    def shown(trial: fallback.Trial) -> None:
        if not state.options.quiet:
            acc = trial.accuracy
            console().print(
                f"  fallback {variant.name} trial {trial.index}: {len(trial.excluded)} node(s) high-precision, "
                + (f"cosine mean {acc['cosine_mean']:.4f}, " if "cosine_mean" in acc else "")
                + f"p50 speed-up {trial.p50_speedup:.2f}×, "
                + ("passed" if trial.passed else "failed: " + "; ".join(trial.failed_gates)),
                highlight=False,
            )

    outcome = fallback.search(variant.fallback, build, judge, speed, rank, on_trial=shown, progress=trials)
    copy_onnx(outcome.chosen.path, dest, link=True)  # the trial's data file becomes <variant>.onnx.data
    result = results_by_trial[outcome.chosen.index]
    result.fusion = fusion
    shutil.rmtree(work, ignore_errors=True)
    record = {**result.record(), "fallback": {"enabled": True, "dataset": fb_name, **outcome.record()}}
    if untuned:
        record["fallback"]["not_tuned_on"] = untuned
    return record, result.nodes_excluded


def _write_registry_folders(
    run_dir: Path,
    paths: dict[str, Path],
    meta: dict[str, Any],
    verdict: dict[str, Any],
    golden: dict[str, dict[str, np.ndarray]],
    sample: dict[str, np.ndarray],
    recipe: Recipe,
) -> None:
    """What a registered version carries: the model, sample inputs, golden outputs and their metadata.

    `golden` holds each variant's outputs on the sample batch from the first ONNX Runtime target that ran it
    (the caller's order); other ONNX Runtime targets' outputs (`golden/<target>/<variant>.npz`) ship too, as
    `golden_outputs.<target>.npz`, so a smoke check on that target compares like with like. `smoke` records
    the latency budget a smoke check holds the version to (`optimize.smoke.latency_budgets`).
    """
    import json

    from optimize.smoke import ONNX_TARGETS, smoke_record

    results = json.loads((run_dir / "metrics.json").read_text())["results"]  # written just before
    for name, status in verdict["variants"].items():
        if status["status"] != "passed":
            continue
        ran = [t for t, r in results[name].items() if "skipped" not in r]
        # The caller's order for `golden`: ONNX Runtime first, its CPU provider first of all.
        ran.sort(key=lambda t: (not t.startswith("onnxruntime-"), t != "onnxruntime-cpu"))
        folder = run_dir / "registry" / name
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / "model.onnx"
        if not dest.exists():  # hard links where possible; an external-data file becomes model.onnx.data
            copy_onnx(paths[name], dest, link=True)
        write_npz(folder / "sample_inputs.npz", sample)
        write_npz(folder / "golden_outputs.npz", golden[name])
        per_target = {ran[0]: "golden_outputs.npz"} if ran else {}
        for t in ran[1:]:
            src = run_dir / "golden" / t / f"{name}.npz"
            if t in ONNX_TARGETS and src.is_file():
                per_target[t] = f"golden_outputs.{t}.npz"
                write_with(folder / per_target[t], lambda tmp, src=src: shutil.copyfile(src, tmp))
        write_json(
            folder / "optimize.json",
            {
                "variant": name,
                "precision": meta[name]["precision"],
                "sha256": meta[name]["sha256"],
                "inputs": list(sample),
                "tolerance": recipe.export.tolerance.model_dump(),
                "recipe": recipe.name,
                "golden_target": ran[0] if ran else None,
                "golden": per_target,
                "smoke": smoke_record(name, paths[name], sample, results[name], recipe.gates, recipe.benchmark.threads),
            },
        )
