"""What `optimize canary analyze` is tested against: tiny ONNX models (conftest's MatMul chain, whose depth sets
its latency, and a table lookup that fails on an out-of-range index), registered as versions of one model in a real
sqlite MLflow store, served by `optimize serve` child processes on 127.0.0.1, scraped by a real Prometheus server
(Debian's package binary, started on loopback with a temporary config and storage), and an open-loop client that
sends a light constant rate of requests to each server. Everything binds 127.0.0.1 and is stopped by its owner."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optimize.deploy.tools import find_tool
from optimize.lazy import lazy
from optimize.onnx_files import onnx_sha256
from optimize.registry.connection import default_artifact_location, process_tracking_uri

onnx = lazy("onnx")
mlflow = lazy("mlflow")

PROMETHEUS_HINT = "install it with `bash ci/setup.sh cpu` (Debian's prometheus package, unpacked into .venv/bin)"


# --- models ---------------------------------------------------------------------------------------------------


LOOKUP_ROWS = 16


def lookup(path: Path) -> Path:
    """i (N, 1) INT64 → Gather rows of a (16, 4) table → y (N, 1, 4). An index outside [-16, 16) makes ONNX
    Runtime fail the run: the server answers 500 to that request (and to its batch-mates: serve it with
    max_batch_size 1)."""
    table = np.arange(LOOKUP_ROWS * 4, dtype=np.float32).reshape(LOOKUP_ROWS, 4)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["table", "i"], ["y"], axis=0, name="lookup")],
        "lookup",
        [onnx.helper.make_tensor_value_info("i", onnx.TensorProto.INT64, ["batch", 1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 1, 4])],
        [onnx.numpy_helper.from_array(table, "table")],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(path))
    return path


def chain_body(width: int) -> bytes:
    """One infer request (one row) for `matmul_chain`."""
    x = np.full((1, width), 0.5, dtype=np.float32)
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, width], "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def lookup_body(index: int) -> bytes:
    """One infer request for `lookup`; an index >= LOOKUP_ROWS fails it (500)."""
    return json.dumps({"inputs": [{"name": "i", "datatype": "INT64", "shape": [1, 1], "data": [index]}]}).encode()


# --- the registry -----------------------------------------------------------------------------------------------


def new_store(folder: Path) -> str:
    """An empty sqlite MLflow store in `folder`; its tracking URI."""
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()
    return uri


def register(uri: str, model: str, onnx_file: Path, recipe: dict | None = None) -> int:
    """Register `onnx_file` as a new version of `model` as `optimize run` would, as far as serve, promote and
    rollback look: a LoggedModel holding model.onnx, tags verdict=passed, sha256, target, variant; the run
    carries recipe.json when `recipe` is given. Returns the version number."""
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("canary-test")
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment("canary-test", artifact_location=default_artifact_location(uri))
    )
    run_id = client.create_run(exp_id).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "version"
        folder.mkdir()
        shutil.copy(onnx_file, folder / "model.onnx")
        (folder / "optimize.json").write_text(json.dumps({"variant": "fp32"}))
        if recipe is not None:
            (Path(tmp) / "recipe.json").write_text(json.dumps(recipe))
            client.log_artifact(run_id, str(Path(tmp) / "recipe.json"))
        sha = onnx_sha256(folder / "model.onnx")
        tags = {"verdict": "passed", "sha256": sha, "target": "onnxruntime-cpu", "variant": "fp32", "format": "onnx"}
        logged = client.create_logged_model(exp_id, name=f"{model}-fp32", source_run_id=run_id, model_type="onnx")
        client.log_model_artifacts(logged.model_id, str(folder))
        client.finalize_logged_model(logged.model_id, "READY")
    client.set_terminated(run_id)
    try:
        client.get_registered_model(model)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(model)
    with process_tracking_uri(uri):
        mv = client.create_model_version(
            model, source=f"models:/{logged.model_id}", run_id=run_id, tags=tags, model_id=logged.model_id
        )
    return int(mv.version)


def aliases(uri: str, model: str) -> dict[str, int]:
    """The model's aliases → version numbers, as the registry has them now."""
    rm = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).get_registered_model(model)
    return {a: int(v) for a, v in (rm.aliases or {}).items()}


# --- Prometheus ---------------------------------------------------------------------------------------------------


def prometheus_binary() -> Path:
    """Debian's prometheus server binary (PATH, else beside this Python: where ci/setup.sh puts it). An
    AssertionError naming the fix when it is missing: the test needs the real server and must not skip."""
    found = find_tool("prometheus")
    if found is None:
        raise AssertionError(
            f"the prometheus server binary is missing (PATH, {Path(sys.executable).parent}); {PROMETHEUS_HINT}"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen
    log: Path

    def query(self, expr: str) -> list[dict]:
        """The instant vector `expr` evaluates to now (the test's own look at the data)."""
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=5) as r:
            return json.loads(r.read())["data"]["result"]

    def wait_for_targets(self, count: int, timeout_s: float = 20) -> None:
        """Until `count` targets have been scraped successfully (`up == 1`)."""
        deadline = time.monotonic() + timeout_s
        while len([s for s in self.query("up") if s["value"][1] == "1"]) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"prometheus scraped fewer than {count} targets in {timeout_s} s: {self.query('up')}"
                )
            time.sleep(0.2)


@contextmanager
def prometheus(targets: list[str], folder: Path, timeout_s: float = 30) -> Iterator[Prometheus]:
    """A Prometheus server on 127.0.0.1 scraping `targets` (host:port) every second, its data in `folder`;
    stopped (SIGTERM, then killed) when the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [{"job_name": "optimize", "static_configs": [{"targets": targets}]}],
            }
        )
    )
    port = free_port()
    log = folder / "prometheus.log"
    args = [str(prometheus_binary()), f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus did not get ready in {timeout_s} s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield Prometheus(url, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- traffic ---------------------------------------------------------------------------------------------------


@dataclass
class Stream:
    """Requests to one server at a constant rate: `bodies` in turn (a bad one every N-th request, say)."""

    url: str  # the infer URL
    bodies: list[bytes]
    rps: float
    sent: int = 0
    codes: dict[int, int] = field(default_factory=dict)


def _send(stream: Stream, stop: threading.Event, deadline: float) -> None:
    period, n = 1.0 / stream.rps, 0
    start = time.monotonic()
    while not stop.is_set() and time.monotonic() < deadline:
        due = start + n * period
        pause = due - time.monotonic()
        if pause > 0:
            stop.wait(pause)
            continue
        body = stream.bodies[n % len(stream.bodies)]
        n += 1
        req = urllib.request.Request(stream.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                code = r.status
                r.read()
        except urllib.error.HTTPError as e:
            code = e.code
            e.read()
        except (urllib.error.URLError, OSError):
            code = 0
        stream.sent += 1
        stream.codes[code] = stream.codes.get(code, 0) + 1


@contextmanager
def traffic(streams: list[Stream], max_s: float = 120) -> Iterator[list[Stream]]:
    """Send every stream (one thread each, loopback only) until the block ends, at most `max_s` seconds."""
    stop = threading.Event()
    deadline = time.monotonic() + max_s
    threads = [threading.Thread(target=_send, args=(s, stop, deadline), daemon=True) for s in streams]
    for t in threads:
        t.start()
    try:
        yield streams
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
