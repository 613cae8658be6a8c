"""Runs the stages of one recipe and owns the run directory and its manifest.

    load → export → fusion → precision → engine → evaluate → benchmark → serving → gate → report → register

Each stage is declared next to its code (optimize/stage.py says how); this module runs them in order, each
unit of cached work through the stage cache, and records in the manifest how far the run got. Every file in
the run directory is written atomically.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimize import gates, load, plan, preflight, recipe_yaml, registry
from optimize.cache import StageCache, cache_root, format_size, key_of
from optimize.console import Progress, Say, capture_output, capture_python_output
from optimize.errors import OptimizeError, RecipeError, RunInterrupted, StageError, no_space
from optimize.files import display_path, write_json, write_npz, write_text
from optimize.machine import environment
from optimize.recipe import Recipe, load_recipe, recipe_hash, to_plain
from optimize.reporting import write_reports
from optimize.runtimes import open_runner
from optimize.stage import Context, Done, Stage, Unit


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
    """The outcome of one run: where it is, the verdict, what was registered (None when nothing was), the exit
    code."""

    run_dir: Path
    status: str
    exit_code: int
    registered: registry.Registration | None = field(default=None)


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


# --- the stages --------------------------------------------------------------------------------------------


def _load(ctx: Context, done: list[tuple[Unit, Done]], rec: dict[str, Any]) -> None:
    """The model and the data: built where some unit needs them (text is tokenised on first use)."""
    ctx.loaded, ctx.datasets, ids = load.load(ctx.recipe, ctx.io_specs, ctx.art_dir / "fp32.onnx")
    ctx.ids.known.update(ids)
    ctx.manifest["model"] = {"description": ctx.loaded.description, "sha256": ctx.loaded.content_sha256}
    ctx.manifest["datasets"] = {n: d.record() for n, d in ctx.datasets.items()}
    rec["detail"] = f"{ctx.loaded.description}; {ctx.datasets[ctx.eval_name].description}"


def _measured(ctx: Context, done: list[tuple[Unit, Done]], rec: dict[str, Any]) -> None:
    """metrics.json, verdict.json, distributions.npz, the folders registered versions carry, the reports."""
    ctx.metrics = {"baseline": "fp32", "variants": ctx.variants, "results": ctx.results}
    fallbacks = {n: r["fallback"] for n, r in ctx.built.items() if r.get("fallback", {}).get("trials")}
    if fallbacks:
        ctx.metrics["fallback"] = fallbacks
    run_dir = ctx.run_dir
    write_json(run_dir / "metrics.json", ctx.metrics)
    write_json(run_dir / "verdict.json", ctx.verdict)
    write_npz(run_dir / "distributions.npz", ctx.distributions)
    # A registered version carries its ONNX: its golden outputs are ONNX Runtime's where that ran.
    order = sorted(ctx.golden, key=lambda t: (not t.startswith("onnxruntime-"), t != "onnxruntime-cpu"))
    golden = {n: next(ctx.golden[t][n] for t in order if n in ctx.golden[t]) for n in ctx.paths}
    registry.write_folders(run_dir, ctx.paths, ctx.variants, ctx.verdict, golden, ctx.sample_inputs, ctx.recipe)
    ctx.manifest["status"] = "measured"
    write_json(run_dir / "manifest.json", ctx.manifest)
    write_reports(run_dir, ctx.metrics, ctx.verdict, ctx.manifest)


def _register(ctx: Context, done: list[tuple[Unit, Done]], rec: dict[str, Any]) -> None:
    """The same idempotent publish as `optimize register RUN_DIR`, which retries a failure from here, except
    that a variant the store holds already as the same model is not registered again; when that is every
    variant of a local store (a rerun), it is known without importing MLflow."""
    uri = ctx.tracking_uri
    try:
        ctx.registered = registry.publish_new(ctx.run_dir, uri)
    except OptimizeError as e:
        ctx.manifest["registry"] = registry.failure_record(uri, e)
        raise
    reg = ctx.registered
    ctx.manifest["registry"] = registry.success_record(reg)
    versions = reg.all_versions
    rec["detail"] = (
        ", ".join(f"{reg.model_name} v{v} ({n})" for n, v in versions.items())
        + f", alias {reg.alias}"
        + ("" if reg.mlflow_run_id else "; registered already, nothing logged")
        if versions
        else "run logged; nothing passed, nothing registered"
    )


STAGES = (
    Stage("load", lambda ctx: "model and data", _load),
    *plan.WORK,  # export, precision, engine, evaluate, benchmark, serving: the stages with cached units
    gates.STAGE,
    Stage("report", lambda ctx: "metrics, verdict and reports", _measured, shown=False, logged=False),
    Stage("register", lambda ctx: f"MLflow at {ctx.tracking_uri}", _register, when=lambda ctx: ctx.register),
)


def _execute(state: _Run) -> RunResult:
    """The stages in order: each stage's units (cached), then the stage's own step."""
    ctx = state.ctx
    for stage in STAGES:
        if stage.when(ctx):
            with state.stage(stage) as rec:
                done = [(unit, state.execute(unit)) for unit in stage.units(ctx)]
                stage.finish(ctx, done, rec)
    state.manifest["status"] = "done"
    state.manifest["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    state.save_manifest()
    write_reports(state.run_dir, ctx.metrics, ctx.verdict, state.manifest)
    status = ctx.verdict["status"]
    return RunResult(state.run_dir, status, 0 if status == "passed" else 1, ctx.registered)


# --- the run ----------------------------------------------------------------------------------------------


class _Run:
    """State of one run while its stages execute (the pipeline's own bookkeeping, not a stage)."""

    def __init__(self, recipe: Recipe, recipe_path: Path, options: RunOptions) -> None:
        self.recipe = recipe
        self.options = options
        targets = load.resolve_targets(recipe, options.require_targets)
        tracking_uri = registry.resolve_tracking_uri(options.tracking_uri, recipe.registry.tracking_uri)
        self.run_dir, self.run_id = make_run_dir(options.runs_dir, recipe.name)
        self.progress = Progress(quiet=options.quiet)
        env = environment()
        self.manifest: dict[str, Any] = {
            "run_id": self.run_id,
            "recipe": recipe.name,
            "recipe_file": str(recipe_path.resolve()),
            "recipe_sha256": recipe_hash(recipe),
            "status": "running",
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **env,
            "stages": self.progress.timings,
            "cache": [],  # per cached unit: stage, unit, key, hit, seconds
        }
        self.cache = StageCache(cache_root()) if options.cache else None
        self._io_specs: dict[Path, tuple[list[Any], list[Any]]] = {}
        self.ctx = Context(
            recipe=recipe,
            recipe_file=recipe_path.resolve(),
            targets=targets,
            versions=env["versions"],
            hardware=env["hardware"],
            task_metric_code=lambda: load.task_metric_sha256(recipe),
            say=Say(options.quiet),
            register=options.register and recipe.registry.enabled,
            run_dir=self.run_dir,
            rebench=options.rebench,
            progress=self.progress,
            io_specs=self.io_specs,
            manifest=self.manifest,
            tracking_uri=tracking_uri,
        )
        plain = to_plain(recipe)
        write_text(self.run_dir / "recipe.yaml", recipe_yaml.dump(plain))
        write_json(self.run_dir / "recipe.json", plain)
        self.save_manifest()

    def save_manifest(self) -> None:
        write_json(self.run_dir / "manifest.json", self.manifest)

    def io_specs(self, path: Path) -> tuple[list[Any], list[Any]]:
        """An ONNX file's inputs and outputs as ONNX Runtime sees them (read once per file in this run)."""
        if path not in self._io_specs:
            with open_runner("onnxruntime-cpu", path) as r:
                self._io_specs[path] = (r.inputs, r.outputs)
        return self._io_specs[path]

    @contextmanager
    def stage(self, stage: Stage) -> Iterator[dict[str, Any]]:
        """A shown stage's progress line and manifest entry, and its log (logs/<stage>.log)."""
        _interrupts.check()
        with contextlib.ExitStack() as stack:
            rec = stack.enter_context(self.progress.stage(stage.name, stage.title(self.ctx))) if stage.shown else {}
            if stage.logged:
                capture = capture_output if self.options.capture_fds else capture_python_output
                stack.enter_context(capture(self.run_dir / "logs" / f"{stage.name}.log"))
            yield rec

    def execute(self, unit: Unit) -> Done:
        _interrupts.check()
        return execute(unit, self.ctx, self.cache)


def execute(unit: Unit, ctx: Context, cache: StageCache | None) -> Done:
    """One unit through the stage cache (see optimize/cache.py): its entry where the key has one, else made now
    and kept; its outcome goes into `ctx` (`unit.use`, the identity it produces) and the manifest's `cache`
    list. With no cache (--no-cache) every unit is made, in a temporary folder of the run directory."""
    desc = unit.description(ctx.versions)
    if cache is None:
        with tempfile.TemporaryDirectory(prefix=f".{unit.stage}-", dir=ctx.run_dir) as tmp:
            done = _make(unit, Path(tmp), None)
    else:
        key = key_of(desc)
        with cache.produce(unit.stage, key, desc, refresh=unit.refresh) as slot:
            if slot.hit is not None:
                kept = slot.hit.record
                done = Done(kept["record"], slot.hit.dir, True, kept.get("seconds"))
                unit.use(done)
            else:
                done = _make(unit, slot.dir, slot)
        cache.mark_latest(unit.stage, f"{ctx.recipe.name}/{unit.name}", key)  # for `optimize plan`
        ctx.manifest.setdefault("cache", []).append(
            {"stage": unit.stage, "unit": unit.name, "key": key, "hit": done.hit, "seconds": done.seconds}
        )
    if unit.produces:
        ctx.ids[unit.produces] = done.record["sha256"]
    return done


def _make(unit: Unit, folder: Path, slot: Any) -> Done:
    t0 = time.perf_counter()
    record = unit.run(folder)
    seconds = round(time.perf_counter() - t0, 3)
    if slot is not None:
        slot.record = {"seconds": seconds, "record": record}
    done = Done(record, folder, False, seconds)
    unit.use(done)
    return done


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
        room.append(f"{what} {display_path(path)} has {format_size(free)} free")
    file = f" writing {display_path(Path(e.filename))}" if e.filename else ""
    return (
        f"no space left on device{file}; {'; '.join(room)}. Free space, or pass --runs-dir / set "
        "OPTIMIZE_CACHE_DIR on a larger disk (`optimize cache prune --max-size SIZE` shrinks the cache); "
        "the same command again resumes from the stage cache"
    )
