"""What `optimize serve` serves and how it runs: the source resolved to one verified ONNX file (a registered
version, a run folder's variant, or a file), its runner loaded and warmed, uvicorn on 127.0.0.1, the ready
file, and the SIGTERM drain. `start_local` runs it as a child process for the load test and the pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optimize import errors
from optimize.child import child_env
from optimize.errors import IntegrityError, OptimizeError, RecipeError, RuntimeMissingError, StageError, first_line
from optimize.files import write_json
from optimize.lazy import available, lazy
from optimize.onnx_files import onnx_sha256
from optimize.recipe import ServingSection
from optimize.registry import tags as tag
from optimize.registry.connection import resolve_tracking_uri, session
from optimize.registry.smoke import (
    META_FILE,
    MODEL_FILE,
    download_version,
    parse_model_uri,
    recorded_recipe,
    resolve_version,
    verify_sha256,
)
from optimize.runtimes import TensorSpec, open_runner, unavailable_reason
from optimize.serving.app import make_app
from optimize.serving.batcher import Batcher
from optimize.serving.metrics import ServerMetrics

np = lazy("numpy")
uvicorn = lazy("uvicorn")
uvloop = lazy("uvloop")
recipe_mod = lazy("optimize.recipe")
pydantic = lazy("pydantic")

# serve loads an ONNX file; TensorRT needs an engine and torch the source module, which no source here carries.
SERVE_TARGETS = ("onnxruntime-cpu", "onnxruntime-cuda")
DEFAULT_TARGET = "onnxruntime-cpu"
# How long start_local waits for the child's ready file by default (imports, download, load, warm-up).
START_TIMEOUT_S = 120.0
# How far the model's threads yield to the event loop (added to their nice value; see yield_to_event_loop).
WORKER_NICENESS = 10
# The key an external tensor names its data file with (onnx TensorProto.external_data).


@dataclass(frozen=True)
class ServedModel:
    """What is served: the model's name and version in the URL paths, the verified ONNX file, where it came
    from (variant, target), its tensors (filled from the runner once loaded) and the serving settings."""

    name: str
    version: str
    path: Path
    sha256: str
    variant: str | None
    target: str
    settings: ServingSection
    tolerance: tuple[float, float] | None = None
    inputs: tuple[TensorSpec, ...] = field(default=())
    outputs: tuple[TensorSpec, ...] = field(default=())


# --- what to serve ------------------------------------------------------------------------------------


def resolve_source(
    source: str,
    *,
    variant: str | None = None,
    tracking_uri: str | None = None,
    recipe: Path | None = None,
    workdir: Path,
    target: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> ServedModel:
    """The model `source` names, its sha256 verified: `models:/NAME@ALIAS` or `models:/NAME/N` (downloaded into
    `workdir`; a model.onnx whose sha256 differs from the version's tag is IntegrityError, exit 6), a run folder
    of `optimize run` with `variant` (its registry/<variant>/ folder, else its artifact), or an `.onnx` file.

    Serving settings: `recipe`'s `serving:` section, else the one recorded with the version or run, else the
    defaults; `overrides` (max_batch_size, max_queue_delay_ms, max_queue) go on top."""
    if target is not None and target not in SERVE_TARGETS:
        raise RecipeError(
            f"serve: --target {target}: serve loads an ONNX model on ONNX Runtime; use {' or '.join(SERVE_TARGETS)}"
        )
    # Bad values and a target that cannot run here fail before anything is downloaded.
    with_overrides(ServingSection(), overrides or {})
    if target is not None and (why := unavailable_reason(target)):
        raise RuntimeMissingError(f"serve: {source}: cannot run on {target}: {why}")
    asked = recipe_mod.load_recipe(recipe).serving if recipe is not None else None
    if source.startswith("models:/"):
        if variant is not None:
            raise RecipeError(
                f"serve: {source}: --variant applies to a run folder; a registered version is one variant"
            )
        model = _registered(source, tracking_uri, workdir, target, asked)
    else:
        path = Path(source)
        if path.is_dir():
            model = _run_folder(path, variant, target, asked)
        elif path.suffix == ".onnx" and path.is_file():
            if variant is not None:
                raise RecipeError(f"serve: {source}: --variant applies to a run folder, not an .onnx file")
            model = ServedModel(
                path.stem,
                "1",
                path.resolve(),
                onnx_sha256(path),
                None,
                target or DEFAULT_TARGET,
                asked or ServingSection(),
            )
        else:
            raise RecipeError(
                f"serve: {source!r} is neither models:/NAME@ALIAS, models:/NAME/VERSION, a run folder nor an .onnx file"
            )
    why = unavailable_reason(model.target)
    if why:
        raise RuntimeMissingError(f"serve: {source}: cannot run on {model.target}: {why}")
    return replace(model, settings=with_overrides(model.settings, overrides or {}))


def with_overrides(settings: ServingSection, overrides: dict[str, Any]) -> ServingSection:
    """`settings` with the command line's values (None: not given) on top, validated as the recipe's are."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return settings
    try:
        return ServingSection.model_validate({**settings.model_dump(), **given})
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise RecipeError(f"serve: --{where.replace('_', '-')}: {err['msg']}") from None


def _registered(
    uri: str, tracking_uri: str | None, workdir: Path, target: str | None, asked: ServingSection | None
) -> ServedModel:
    """A registered version downloaded into `workdir` and verified against its sha256 tag."""
    name, _, _ = parse_model_uri(uri, "serve")
    store = resolve_tracking_uri(tracking_uri, None)
    with session(store) as client:
        mv = resolve_version(client, uri, store, command="serve")
        tags = dict(mv.tags or {})
        folder = download_version(client, mv, workdir, store)
        recorded = recorded_recipe(client, mv) if asked is None else None
    where = f"serve: {uri} (version {mv.version})"
    model_file = folder / MODEL_FILE
    if not model_file.is_file():
        raise IntegrityError(f"{where}: its artifacts lack {MODEL_FILE}; it was not registered by optimize")
    actual = verify_sha256(model_file, tags, where)
    meta = _read_json(folder / META_FILE)
    gated = [t for t in tags.get(tag.TARGET, "").split(",") if t in SERVE_TARGETS and unavailable_reason(t) is None]
    return ServedModel(
        name=name,
        version=str(mv.version),
        path=model_file,
        sha256=actual,
        variant=tags.get(tag.VARIANT) or meta.get("variant"),
        target=target or (gated[0] if gated else DEFAULT_TARGET),
        settings=asked or _settings_from(recorded or {}, where),
        tolerance=_tolerance(meta.get("tolerance")),
    )


def _run_folder(run_dir: Path, variant: str | None, target: str | None, asked: ServingSection | None) -> ServedModel:
    """A variant of a run folder: its registry/<variant>/model.onnx (what would be registered), else the
    artifact metrics.json names; either checked against the sha256 the run recorded."""
    metrics = _read_json(run_dir / "metrics.json")
    plain = _read_json(run_dir / "recipe.json")
    if not metrics or not plain:
        raise RecipeError(f"serve: {run_dir}: not a run folder of `optimize run` (no metrics.json or recipe.json)")
    known = list(metrics.get("variants") or {})
    registered = sorted(p.name for p in (run_dir / "registry").glob("*") if (p / MODEL_FILE).is_file())
    if variant is None:
        if len(registered) != 1:
            raise RecipeError(
                f"serve: {run_dir}: name the variant to serve with --variant (its variants: {', '.join(known)}; "
                f"passed: {', '.join(registered) or 'none'})"
            )
        variant = registered[0]
    if variant not in known:
        raise RecipeError(f"serve: {run_dir}: no variant {variant!r} (its variants: {', '.join(known)})")
    folder = run_dir / "registry" / variant
    if (folder / MODEL_FILE).is_file():
        path, meta = folder / MODEL_FILE, _read_json(folder / META_FILE)
        expected = meta.get("sha256")
    else:
        entry = metrics["variants"][variant]
        path, meta, expected = run_dir / entry["path"], {}, entry.get("sha256")
    actual = onnx_sha256(path)
    if expected and actual != expected:
        raise IntegrityError(
            f"serve: {path}: sha256 {actual[:16]}… differs from the run's record {expected[:16]}…; "
            "the file changed after the run"
        )
    manifest = _read_json(run_dir / "manifest.json")
    settings = asked or _settings_from(plain, f"serve: {run_dir / 'recipe.json'}")
    tolerance = meta.get("tolerance") or plain.get("export", {}).get("tolerance")
    return ServedModel(
        name=(plain.get("registry") or {}).get("model_name") or plain.get("name") or run_dir.parent.name,
        version=str(manifest.get("run_id") or run_dir.name),
        path=path.resolve(),
        sha256=actual,
        variant=variant,
        target=target or DEFAULT_TARGET,
        settings=settings,
        tolerance=_tolerance(tolerance),
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _settings_from(plain: dict[str, Any], where: str) -> ServingSection:
    """The `serving:` section of a recorded recipe (recipe.json); the defaults when it has none."""
    try:
        return ServingSection.model_validate(plain.get("serving") or {})
    except pydantic.ValidationError as e:
        raise RecipeError(f"{where}: serving: {first_line(e)}") from None


def _tolerance(value: dict[str, Any] | None) -> tuple[float, float] | None:
    return (float(value.get("atol", 0.0)), float(value.get("rtol", 0.0))) if value else None


# --- serving ------------------------------------------------------------------------------------------


def warm_feeds(inputs: tuple[TensorSpec, ...], rows: int) -> dict[str, np.ndarray]:
    """Zeros of each input's dtype, `rows` along the first axis when it is dynamic, 1 along other dynamic axes."""
    feeds = {}
    for spec in inputs:
        shape = [d if isinstance(d, int) else (rows if axis == 0 else 1) for axis, d in enumerate(spec.shape)]
        feeds[spec.name] = np.zeros(shape, dtype=np.dtype(spec.dtype))
    return feeds


def serve(model: ServedModel, host: str = "127.0.0.1", port: int = 8000, ready_file: Path | None = None) -> None:
    """Load `model` on its target (the runner smoke and benchmark use), warm it, and serve it with uvicorn on
    `host`:`port` (0: the OS picks) until SIGTERM or SIGINT; then drain (see `_drain`) and return.

    Once ready, writes `ready_file` atomically ({"url", "pid", "model", "version", "sha256", "variant", "target",
    "drain_s"}), removed when it stops, and prints `serving NAME (variant, target) at URL`."""
    sock = bind(host, port)  # a port in use fails before the model loads
    with sock, open_runner(model.target, model.path, model.settings.threads) as runner:
        model = replace(model, inputs=tuple(runner.inputs), outputs=tuple(runner.outputs))
        # the p99 budget as a bucket boundary: alerts and the canary analysis judge it exactly, not interpolated
        metrics = ServerMetrics((model.settings.slo.p99_ms / 1000,))
        metrics.set_model(model.name, model.version, model.sha256, model.variant or "", model.target)
        batcher = Batcher(runner, model.settings, metrics, list(model.inputs), list(model.outputs))
        # The first runs of a session allocate; the batcher times these (1 row and max_batch_size rows) to admit
        # requests by their predicted wait from the first one. Dynamic axes other than the batch are 1 here.
        batcher.warm(warm_feeds(model.inputs, 1))
        app = make_app(model, batcher, metrics, model.settings)
        batcher.start()
        yield_to_event_loop()
        run = uvloop.run if available("uvloop") else asyncio.run  # uvloop: less CPU per request than asyncio's loop
        try:
            run(_serve_async(app, batcher, model, sock, ready_file))
        finally:
            batcher.stop(timeout_s=0.5)  # after a drain it is idle; after a forced exit nobody waits for it


def yield_to_event_loop(niceness: int = WORKER_NICENESS) -> None:
    """Lower the scheduling priority of every thread of this process but the calling one (the event loop's): the
    model's threads (the batcher's worker, ONNX Runtime's pool) then yield the CPU to the loop, so that under
    overload it still reads requests at once and answers 503 in milliseconds, and health checks stay prompt; the
    model gets the rest. Linux threads have their own nice values; elsewhere (or without /proc) a no-op."""
    tasks = Path("/proc/self/task")
    if not hasattr(os, "setpriority") or not tasks.is_dir():
        return
    me = threading.get_native_id()
    for entry in tasks.iterdir():
        tid = int(entry.name)
        if tid != me:
            with contextlib.suppress(OSError):  # a thread that has ended since
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))


def _uvicorn_server(config: Any) -> Any:
    """A uvicorn Server that leaves SIGTERM and SIGINT to us: its own handlers would close the listeners and
    wait for connections at once, before the queued requests are answered and without readiness going 503."""

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(config)


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host`:`port` (0: the OS picks), not listening yet: uvicorn listens on it once the
    model is loaded, so a client is refused until then rather than left waiting in the backlog."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise RecipeError(
            f"serve: cannot listen on {host}:{port}: {e.strerror or e}; choose another --port (0: the OS picks one)"
        ) from None
    return sock


async def _serve_async(
    app: Any, batcher: Batcher, model: ServedModel, sock: socket.socket, ready_file: Path | None
) -> None:
    drain_s = model.settings.drain_s
    config = uvicorn.Config(
        app,
        http="auto",  # httptools where installed (it parses faster than h11), else h11
        lifespan="off",
        access_log=False,  # one log line per request costs throughput
        log_level="warning",
        timeout_graceful_shutdown=max(1, int(drain_s)),
    )
    server = _uvicorn_server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
            raise StageError("serve: uvicorn stopped before it started serving")
        await asyncio.sleep(0.005)
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"
    loop = asyncio.get_running_loop()
    drain: dict[str, Any] = {}

    def on_signal(sig: int) -> None:
        if "task" in drain:  # a second signal: stop now
            server.should_exit = server.force_exit = True
            return
        drain["task"] = asyncio.create_task(_drain(app, batcher, server, drain_s))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    app.state.ready = True
    if ready_file is not None:
        write_json(
            ready_file,
            {
                "url": url,
                "pid": os.getpid(),
                "model": model.name,
                "version": model.version,
                "sha256": model.sha256,
                "variant": model.variant,
                "target": model.target,
                "drain_s": drain_s,
            },
        )
    print(f"serving {model.name} ({model.variant or 'model'}, {model.target}) at {url}", flush=True)
    try:
        await task
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if ready_file is not None:  # it says a server is ready there: not once it has stopped
            ready_file.unlink(missing_ok=True)


async def _drain(app: Any, batcher: Batcher, server: Any, drain_s: float) -> None:
    """SIGTERM: readiness goes 503 and new requests are answered 503 (draining) while the listener stays open,
    so a load balancer sees the server leave; everything queued or running is answered; then uvicorn closes
    the listener, lets the last responses finish and returns, within `drain_s` in all."""
    deadline = time.monotonic() + drain_s
    app.state.draining = True
    # uvicorn's exit takes ~0.2 s (a 0.1 s tick, then 0.1 s before it waits on connections): keep that margin.
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(batcher.drain(max(0.1, drain_s - 0.5)), timeout=max(0.1, drain_s - 0.4))
    server.config.timeout_graceful_shutdown = max(0.1, deadline - time.monotonic() - 0.3)
    server.should_exit = True


# --- a child process that serves ----------------------------------------------------------------------


@dataclass
class LocalServer:
    """A server started by `start_local`: its URL, process, and what its ready file says."""

    url: str
    pid: int
    proc: subprocess.Popen[bytes]
    ready: dict[str, Any]
    log: Path
    ready_file: Path

    @property
    def model(self) -> str:
        return str(self.ready["model"])


@contextlib.contextmanager
def start_local(
    source: str | Path,
    *,
    variant: str | None = None,
    target: str | None = None,
    recipe: Path | None = None,
    tracking_uri: str | None = None,
    overrides: dict[str, Any] | None = None,
    timeout_s: float = START_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> Iterator[LocalServer]:
    """Serve `source` on 127.0.0.1 (a port the OS picks) in a child process, `python -m optimize serve`, with its
    own CPU and memory, for the block; waits for its ready file (`timeout_s`). A child that fails to start
    raises the OptimizeError of its exit code with its error line. On exit: SIGTERM, then a kill after the
    server's drain_s + 5 s."""
    with tempfile.TemporaryDirectory(prefix="optimize-serve-") as tmp:
        ready_file, log_path = Path(tmp) / "ready.json", Path(tmp) / "serve.log"
        args = [sys.executable, "-m", "optimize", "serve", str(source), "--host", "127.0.0.1", "--port", "0"]
        args += ["--ready-file", str(ready_file)]
        for flag, value in (("--variant", variant), ("--target", target), ("--recipe", recipe)):
            if value is not None:
                args += [flag, str(value)]
        if tracking_uri is not None:
            args += ["--tracking-uri", tracking_uri]
        for key, value in (overrides or {}).items():
            if value is not None:
                args += [f"--{key.replace('_', '-')}", str(value)]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env={**child_env(), **(env or {})}, start_new_session=True
            )
        ready: dict[str, Any] = {}
        try:
            ready = _wait_ready(proc, ready_file, log_path, timeout_s)
            yield LocalServer(ready["url"], proc.pid, proc, ready, log_path, ready_file)
        finally:
            stop_local(proc, float(ready.get("drain_s", ServingSection().drain_s)))


def _wait_ready(proc: subprocess.Popen[bytes], ready_file: Path, log_path: Path, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not ready_file.is_file():
        code = proc.poll()
        if code is not None:
            raise _child_error(code, log_path)
        if time.monotonic() > deadline:
            last = (log_path.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise StageError(f"serve: the server did not get ready within {timeout_s:g} s; its last line: {last}")
        time.sleep(0.01)
    return json.loads(ready_file.read_text())


def _child_error(code: int, log_path: Path) -> OptimizeError:
    """The child's failure as the OptimizeError of its exit code, with its `error: ...` line."""
    lines = log_path.read_text(errors="replace").strip().splitlines()
    line = next((x.removeprefix("error: ") for x in reversed(lines) if x.startswith("error: ")), None)
    kinds = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, OptimizeError)]
    kind = next((k for k in kinds if k.exit_code == code and k is not OptimizeError), StageError)
    return kind(line or f"serve: the server exited with {code} before it was ready: {(lines or ['no output'])[-1]}")


def stop_local(proc: subprocess.Popen[bytes], drain_s: float) -> int:
    """SIGTERM the server and wait for its drain; kill its process group after drain_s + 5 s. Returns its exit
    status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=drain_s + 5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


# --- the command --------------------------------------------------------------------------------------


def main(
    source: str,
    *,
    variant: str | None,
    target: str | None,
    host: str,
    port: int,
    recipe: Path | None,
    tracking_uri: str | None,
    ready_file: Path | None,
    overrides: dict[str, Any],
) -> None:
    """`optimize serve`: resolve, verify, serve until SIGTERM; a downloaded version lives in a temporary folder
    removed at exit."""
    with tempfile.TemporaryDirectory(prefix="optimize-serve-") as tmp:
        model = resolve_source(
            source,
            variant=variant,
            tracking_uri=tracking_uri,
            recipe=recipe,
            workdir=Path(tmp),
            target=target,
            overrides=overrides,
        )
        serve(model, host, port, ready_file)
