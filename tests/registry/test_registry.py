"""MLflow registry: URI precedence, bounded failure (exit 5 with the retry command), publishing a finished run
directory once (idempotent on its run id), never an empty registered model, and tags to search versions by."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from test_cli import cli

from optimize import registry
from optimize.errors import OptimizeError, RecipeError, RegistryUnreachableError, StageError
from optimize.files import display_path
from optimize.pipeline import RunOptions, run
from optimize.recipe import load_recipe
from optimize.registry import connection, description
from optimize.registry import tags as tag
from optimize.registry.publish import git_commit


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _copy_run(finished_run: Path, dest: Path, run_id: str | None = None) -> Path:
    """A private copy of the shared finished run, optionally under another optimize run id."""
    shutil.copytree(finished_run, dest)
    if run_id:
        _edit_json(dest / "manifest.json", lambda m: m.update(run_id=run_id))
    return dest


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def silent_server() -> Iterator[str]:
    """An HTTP URI whose port accepts TCP connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


# --- where, and how long ---------------------------------------------------------------------------


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert registry.resolve_tracking_uri(None, None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert registry.resolve_tracking_uri(None, "http://recipe:5000") == "http://recipe:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert registry.resolve_tracking_uri(None, "http://recipe:5000") == "http://env:5000"
    assert registry.resolve_tracking_uri("http://cli:5000", "http://recipe:5000") == "http://cli:5000"


def test_timeout_budget_precedence(monkeypatch: pytest.MonkeyPatch, write_recipe) -> None:
    monkeypatch.delenv(connection.TIMEOUT_ENV, raising=False)
    assert load_recipe(write_recipe()).registry.timeout_s == 30
    assert registry.registry_timeout_s(None) == 30
    budget = load_recipe(write_recipe({"registry": {"timeout_s": 4.5}})).registry.timeout_s
    assert registry.registry_timeout_s(budget) == 4.5
    monkeypatch.setenv(connection.TIMEOUT_ENV, "2")
    assert registry.registry_timeout_s(4.5) == 2.0
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv(connection.TIMEOUT_ENV, bad)
        with pytest.raises(RecipeError) as e:
            registry.registry_timeout_s(4.5)
        assert e.value.exit_code == 2 and connection.TIMEOUT_ENV in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe({"registry": {"timeout_s": 0}}))
    assert "registry.timeout_s" in str(e.value)


def test_bounded_http_sets_mlflows_timeout_and_retries_and_puts_them_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    with connection.bounded_http(2.5):
        assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 3 and MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 0
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "120"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_sqlite_artifacts_are_pinned_beside_the_database(tmp_path: Path) -> None:
    loc = connection.default_artifact_location(f"sqlite:///{tmp_path}/x/m.db")
    assert loc == (tmp_path / "x" / "mlartifacts").as_uri()
    assert connection.default_artifact_location("http://host:5000") is None


def test_unreachable_server_fails_fast(tmp_path: Path) -> None:
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(RegistryUnreachableError) as e:
        registry.check_reachable(f"http://127.0.0.1:{port}")
    assert e.value.exit_code == 5 and f"127.0.0.1:{port}" in str(e.value)
    assert time.monotonic() - t0 < 30


def test_silent_server_fails_within_the_budget() -> None:
    with silent_server() as uri:
        t0 = time.monotonic()
        with pytest.raises(RegistryUnreachableError) as e:
            registry.check_reachable(uri, timeout_s=1.5)
        elapsed = time.monotonic() - t0
    assert e.value.exit_code == 5 and "did not answer within 1.5 s" in str(e.value)
    assert 1.0 < elapsed < 1.5 + 1.0


@contextmanager
def serving(handler: type) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 with `handler` (a BaseHTTPRequestHandler), for the block."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def health_only_server() -> Iterator[str]:
    """An HTTP server that answers /health and leaves every MLflow API request unanswered (a hung backend)."""
    import threading
    from http.server import BaseHTTPRequestHandler

    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")
            else:
                release.wait(60)

        do_POST = do_GET

        def log_message(self, *args) -> None:
            pass

    with serving(Handler) as uri:
        try:
            yield uri
        finally:
            release.set()  # before the server shuts down: its handlers are waiting


def test_a_registry_that_stops_answering_fails_each_request_within_the_budget(
    finished_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /health answers, so this is MLflow's own client bounded by the budget (its defaults: minutes of retries).
    monkeypatch.setenv(connection.TIMEOUT_ENV, "2")
    with health_only_server() as uri:
        t0 = time.monotonic()
        with pytest.raises(RegistryUnreachableError) as e:
            registry.publish(finished_run, uri)
        elapsed = time.monotonic() - t0
    assert e.value.exit_code == 5
    assert f"{uri} did not answer a request to /api/2.0/mlflow/experiments/get-by-name within 2 s" in str(e.value)
    assert 2 <= elapsed < 2 + 3
    assert str(e.value).endswith(f"retry: optimize register --tracking-uri {uri} {display_path(finished_run)}")
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


@contextmanager
def answering_server(status: int, body: bytes, content_type: str = "text/plain") -> Iterator[str]:
    """An HTTP server that answers /health and every MLflow API request with `status` and `body` (a proxy in front
    of a server that is down, an authenticating proxy, a server that fails)."""
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code, payload = (200, b"OK") if self.path == "/health" else (status, body)
            self.send_response(code)
            self.send_header("Content-Type", content_type if code == status else "text/plain")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.do_GET()

        do_PATCH = do_DELETE = do_POST

        def log_message(self, *args) -> None:
            pass

    with serving(Handler) as uri:
        yield uri


MLFLOW_ERROR = b'{"error_code": "INTERNAL_ERROR", "message": "connection timed out while unreachable"}'


@pytest.mark.parametrize(
    ("status", "body", "content_type", "exit_code"),
    [
        (503, b"Service Unavailable", "text/plain", 5),  # a proxy whose server is down
        (502, b"Bad Gateway", "text/html", 5),
        (504, b"Gateway Timeout", "text/html", 5),
        (401, b"You are not authenticated.", "text/plain", 7),
        (403, b'{"error_code": "PERMISSION_DENIED", "message": "no"}', "application/json", 7),
        # MLflow's first request is a GET: with retries off, requests gives up on a 5xx with a RetryError.
        (500, MLFLOW_ERROR, "application/json", 5),
    ],
)
def test_registry_errors_are_classed_by_status_not_by_their_words(
    finished_run: Path, status: int, body: bytes, content_type: str, exit_code: int
) -> None:
    with answering_server(status, body, content_type) as uri:
        with pytest.raises(OptimizeError) as e:
            registry.publish(finished_run, uri, timeout_s=5)
    assert e.value.exit_code == exit_code, str(e.value)
    assert uri in str(e.value) and "\n" not in str(e.value)


def test_registry_failure_reads_types_and_statuses_in_the_chain() -> None:
    import requests
    import urllib3
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, TEMPORARILY_UNAVAILABLE, UNAUTHENTICATED

    def raised(inner: BaseException) -> MlflowException:
        """An MlflowException raised while handling `inner`, as MLflow's REST client wraps requests' errors."""
        try:
            try:
                raise inner
            except BaseException:
                raise MlflowException("API request to http://h/api/2.0/mlflow/x failed with exception") from None
        except MlflowException as e:
            e.__suppress_context__ = False
            return e

    assert registry.registry_failure(raised(requests.exceptions.ConnectionError("x"))) == "unreachable"
    assert registry.registry_failure(raised(urllib3.exceptions.NewConnectionError(None, "x"))) == "unreachable"
    assert registry.registry_failure(raised(requests.exceptions.ReadTimeout("x"))) == "timeout"
    # What MLflow's SQL store raises for a database it cannot use (sqlite locked), and REST errors' codes.
    assert registry.registry_failure(MlflowException("locked", error_code=TEMPORARILY_UNAVAILABLE)) == "unreachable"
    assert registry.registry_failure(MlflowException("x", error_code=UNAUTHENTICATED)) == "refused"
    assert registry.http_status(MlflowException("x", error_code=PERMISSION_DENIED)) == 403
    response = requests.Response()
    response.status_code = 401
    assert registry.http_status(requests.exceptions.HTTPError("x", response=response)) == 401
    # Words are not evidence: a message that talks of timeouts and connections classes as nothing.
    for text in ("Connection string timed out", "HTTP 401 error code 403 max retries unreachable"):
        assert registry.registry_failure(MlflowException(text)) is None
        assert registry.http_status(MlflowException(text)) is None


def test_unwritable_sqlite_folder_and_bad_uri(tmp_path: Path) -> None:
    with pytest.raises(RegistryUnreachableError):
        registry.check_reachable(f"sqlite:///{tmp_path}/missing-folder/m.db")
    with pytest.raises(RecipeError) as e:
        registry.check_reachable("not a uri")
    assert "registry.tracking_uri" in str(e.value)


# --- publishing --------------------------------------------------------------------------------------


def test_publish_registers_each_passing_variant_with_aliases(finished_run: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/m.db"
    out = registry.publish(finished_run, uri)
    assert out.versions == {"fp16": 1, "fp16-fp32io": 2} and out.already == {}
    client = _client(uri)
    # `candidate` goes to the first passing variant in recipe order; each variant has its own alias.
    assert client.get_model_version_by_alias("tiny", "candidate").version in (1, "1")
    assert int(client.get_model_version_by_alias("tiny", "candidate-fp16-fp32io").version) == 2
    metrics = json.loads((finished_run / "metrics.json").read_text())
    manifest = json.loads((finished_run / "manifest.json").read_text())
    for variant, version in out.versions.items():
        mv = client.get_model_version("tiny", str(version))
        assert mv.tags["sha256"] == metrics["variants"][variant]["sha256"]
        assert mv.tags["variant"] == variant and mv.tags["verdict"] == "passed"
        assert mv.tags["optimize_run_id"] == manifest["run_id"]
        assert mv.tags["recipe_sha256"] == manifest["recipe_sha256"]
        assert mv.tags["target"] == "onnxruntime-cpu"
        assert "gpu_sm" not in mv.tags and "tensorrt" not in mv.tags  # no engine was built
        assert mv.run_id == out.mlflow_run_id
        assert mv.source.startswith("models:/m-")  # the version points at its LoggedModel
        logged = client.get_logged_model(mv.source.removeprefix("models:/"))
        assert logged.tags["sha256"] == mv.tags["sha256"] and logged.source_run_id == out.mlflow_run_id
        assert f"runs:/{out.mlflow_run_id}/report.md" in mv.description
    run_ = client.get_run(out.mlflow_run_id)
    assert run_.data.tags["optimize.verdict"] == "passed"
    assert run_.data.tags["optimize.run_id"] == manifest["run_id"]
    assert run_.data.params["precision.variants"].count("fp16") >= 2


def test_versions_are_found_by_their_tags(finished_run: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/m.db"
    out = registry.publish(finished_run, uri)
    client = _client(uri)
    run_id = json.loads((finished_run / "manifest.json").read_text())["run_id"]
    assert sorted(int(v.version) for v in client.search_model_versions("tags.precision = 'fp16'")) == [1, 2]
    assert client.search_model_versions("tags.precision = 'int8'") == []
    (mv,) = client.search_model_versions("name = 'tiny' AND tags.variant = 'fp16-fp32io'")
    assert int(mv.version) == out.versions["fp16-fp32io"]
    assert len(client.search_model_versions(f"tags.optimize_run_id = '{run_id}' AND tags.verdict = 'passed'")) == 2
    assert len(client.search_model_versions("tags.target = 'onnxruntime-cpu'")) == 2


def test_publish_leaves_the_process_tracking_uri_as_it_was(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = tracking_utils._tracking_uri
    registry.publish(finished_run, f"sqlite:///{tmp_path}/m.db")
    assert tracking_utils._tracking_uri == before
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    registry.publish(finished_run, f"sqlite:///{tmp_path}/other.db")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/env.db"


def test_publishing_the_same_run_again_adds_nothing(finished_run: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/m.db"
    first = registry.publish(finished_run, uri)
    again = registry.publish(finished_run, uri)
    assert again.versions == {} and again.already == {"fp16": 1, "fp16-fp32io": 2}
    assert again.mlflow_run_id == first.mlflow_run_id, "the MLflow run of the first attempt is reused"
    client = _client(uri)
    assert len(client.search_model_versions("name = 'tiny'")) == 2
    assert len(client.search_runs([first.experiment_id])) == 1
    assert len(client.search_logged_models(experiment_ids=[first.experiment_id])) == 2
    # Metrics are not logged twice into the reused run.
    key = next(k for k in client.get_run(first.mlflow_run_id).data.metrics if k.startswith("fp16.onnxruntime-cpu"))
    assert len(client.get_metric_history(first.mlflow_run_id, key)) == 1


def test_another_run_makes_new_versions_and_a_late_retry_never_moves_the_alias_back(
    finished_run: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path}/m.db"
    older = _copy_run(finished_run, tmp_path / "older", run_id="20260101-000000-aaaa")
    newer = _copy_run(finished_run, tmp_path / "newer", run_id="20260101-000000-bbbb")
    registry.publish(older, uri)
    assert registry.publish(newer, uri).versions == {"fp16": 3, "fp16-fp32io": 4}
    client = _client(uri)
    assert int(client.get_model_version_by_alias("tiny", "candidate").version) == 3
    # Registering the older run again finds its versions and leaves `candidate` on the newer one.
    assert registry.publish(older, uri).already == {"fp16": 1, "fp16-fp32io": 2}
    assert int(client.get_model_version_by_alias("tiny", "candidate").version) == 3
    assert int(client.get_model_version_by_alias("tiny", "candidate-fp16-fp32io").version) == 4


def test_a_failed_variant_is_not_registered(finished_run: Path, tmp_path: Path) -> None:
    copy = _copy_run(finished_run, tmp_path / "run")
    _edit_json(copy / "verdict.json", lambda v: v["variants"]["fp16-fp32io"].update(status="failed"))
    uri = f"sqlite:///{tmp_path}/m.db"
    out = registry.publish(copy, uri)
    assert out.versions == {"fp16": 1}
    versions = _client(uri).search_model_versions("name='tiny'")
    assert [v.tags["precision"] for v in versions] == ["fp16"]


# --- a failure in the middle, and its retry --------------------------------------------------------------


def _failing_create_model_version(monkeypatch: pytest.MonkeyPatch, fail_on: set[int], error: Exception) -> list[int]:
    """Make MlflowClient.create_model_version raise `error` on the calls numbered in `fail_on` (1-based)."""
    calls: list[int] = []
    real = MlflowClient.create_model_version

    def create(self, *args, **kwargs):
        calls.append(len(calls) + 1)
        if calls[-1] in fail_on:
            raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_model_version", create)
    return calls


def test_a_failure_before_any_version_leaves_no_empty_registered_model(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path}/m.db"
    _failing_create_model_version(monkeypatch, {1}, MlflowException("injected: version creation failed"))
    with pytest.raises(StageError) as e:
        registry.publish(finished_run, uri)
    assert "injected" in str(e.value) and e.value.exit_code == 3
    assert str(e.value).endswith(f"retry: optimize register --tracking-uri {uri} {display_path(finished_run)}")
    client = _client(uri)
    with pytest.raises(MlflowException) as missing:
        client.get_registered_model("tiny")
    assert missing.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert client.search_registered_models() == []


def test_a_registered_model_that_existed_before_is_not_deleted(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path}/m.db"
    _client(uri).create_registered_model("tiny", description="made by hand")
    _failing_create_model_version(monkeypatch, {1}, MlflowException("injected"))
    with pytest.raises(StageError):
        registry.publish(finished_run, uri)
    assert _client(uri).get_registered_model("tiny").description == "made by hand"


def test_a_retry_after_a_partial_failure_finishes_the_same_mlflow_run_without_duplicates(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import requests

    uri = f"sqlite:///{tmp_path}/m.db"
    calls = _failing_create_model_version(monkeypatch, {2}, requests.exceptions.ConnectionError("Connection refused"))
    with pytest.raises(RegistryUnreachableError) as e:  # lost the registry after the first version
        registry.publish(finished_run, uri)
    assert e.value.exit_code == 5 and "retry: optimize register" in str(e.value)
    client = _client(uri)
    assert [int(v.version) for v in client.search_model_versions("name = 'tiny'")] == [1]  # not deleted: not empty
    monkeypatch.undo()
    out = registry.publish(finished_run, uri)
    assert len(calls) == 2
    assert out.already == {"fp16": 1} and out.versions == {"fp16-fp32io": 2}
    assert len(client.search_runs([out.experiment_id])) == 1
    # The LoggedModel made for fp16-fp32io before the failure is the one its version points at.
    assert len(client.search_logged_models(experiment_ids=[out.experiment_id])) == 2
    assert int(client.get_model_version_by_alias("tiny", "candidate").version) == 1
    assert int(client.get_model_version_by_alias("tiny", "candidate-fp16-fp32io").version) == 2
    assert client.get_run(out.mlflow_run_id).info.status == "FINISHED"


# --- optimize register RUN_DIR --------------------------------------------------------------------------


def test_register_run_publishes_once_and_records_it_in_the_manifest(finished_run: Path, tmp_path: Path) -> None:
    copy = _copy_run(finished_run, tmp_path / "run")
    uri = f"sqlite:///{tmp_path}/m.db"
    first = registry.register_run(copy, uri)
    assert first.versions == {"fp16": 1, "fp16-fp32io": 2}
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["status"] == "done" and "error" not in manifest
    assert manifest["registry"]["status"] == "registered" and manifest["registry"]["versions"] == first.versions
    again = registry.register_run(copy, uri)
    assert again.versions == {} and again.already == first.versions
    assert len(_client(uri).search_model_versions("name = 'tiny'")) == 2


def test_register_run_uses_the_environment_then_the_runs_recipe(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = _copy_run(finished_run, tmp_path / "run")
    recipe_uri = f"sqlite:///{tmp_path}/recipe.db"
    _edit_json(copy / "recipe.json", lambda r: r["registry"].update(tracking_uri=recipe_uri))
    assert registry.register_run(copy, None).tracking_uri == recipe_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    assert registry.register_run(copy, None).tracking_uri == f"sqlite:///{tmp_path}/env.db"


@pytest.mark.parametrize(
    "remove", ["verdict.json", "metrics.json", "manifest.json", "registry/fp16-fp32io/model.onnx", "."]
)
def test_register_run_refuses_a_run_that_is_not_finished(finished_run: Path, tmp_path: Path, remove: str) -> None:
    copy = _copy_run(finished_run, tmp_path / "run")
    if remove == ".":
        shutil.rmtree(copy)
    else:
        (copy / remove).unlink()
    with pytest.raises(RecipeError) as e:
        registry.register_run(copy, f"sqlite:///{tmp_path}/m.db")
    assert e.value.exit_code == 2
    assert (remove if remove != "." else "no such run directory") in str(e.value)
    assert not (tmp_path / "m.db").exists()


def test_register_run_against_a_silent_server_fails_within_the_budget_and_keeps_the_run(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = _copy_run(finished_run, tmp_path / "run")
    monkeypatch.setenv(connection.TIMEOUT_ENV, "1.5")
    with silent_server() as uri:
        t0 = time.monotonic()
        with pytest.raises(RegistryUnreachableError) as e:
            registry.register_run(copy, uri)
        assert time.monotonic() - t0 < 1.5 + 1.5
    msg = str(e.value)
    assert "did not answer within 1.5 s" in msg
    assert msg.endswith(f"retry: optimize register --tracking-uri {uri} {display_path(copy)}")
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert manifest["registry"]["status"] == "failed" and manifest["registry"]["tracking_uri"] == uri
    assert manifest["registry"]["retry"] == f"optimize register --tracking-uri {uri} {display_path(copy)}"
    for name in ("metrics.json", "verdict.json", "report.md", "registry/fp16/model.onnx"):
        assert (copy / name).is_file(), name


# --- optimize run: the register stage fails within its budget, keeps the run, says how to retry -----------


@pytest.mark.parametrize("registry_state", ["silent", "refusing"])
def test_run_with_a_dead_registry_is_exit_5_within_the_recipes_budget(
    write_recipe, tmp_path: Path, registry_state: str
) -> None:
    with silent_server() as silent:
        uri = silent if registry_state == "silent" else f"http://127.0.0.1:{_free_port()}"
        recipe = write_recipe({"registry": {"tracking_uri": uri, "timeout_s": 2}})
        with pytest.raises(RegistryUnreachableError) as e:
            run(recipe, RunOptions(runs_dir=tmp_path / "runs", quiet=True))
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    msg = str(e.value)
    assert e.value.exit_code == 5 and uri in msg
    # The tracking URI comes from the recipe, so the retry needs no --tracking-uri.
    assert msg.endswith(f"retry: optimize register {display_path(run_dir)}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    register = manifest["stages"][-1]
    assert register["stage"] == "register" and register["status"] == "failed"
    assert register["seconds"] < 2 + 1.5
    assert manifest["status"] == "failed" and manifest["registry"]["status"] == "failed"
    assert manifest["registry"]["retry"] == f"optimize register {display_path(run_dir)}"
    for name in ("metrics.json", "verdict.json", "report.md", "registry/fp16/model.onnx"):
        assert (run_dir / name).is_file(), name


@pytest.mark.slow
def test_cli_prints_the_retry_command_and_optimize_register_retries_once(write_recipe, tmp_path: Path) -> None:
    recipe = write_recipe()
    with silent_server() as uri:
        t0 = time.monotonic()
        proc = cli("run", "--quiet", "--tracking-uri", uri, recipe, cwd=tmp_path, env={connection.TIMEOUT_ENV: "2"})
        elapsed = time.monotonic() - t0
    assert proc.returncode == 5, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    retry = f"optimize register --tracking-uri {uri} runs/tiny/{run_dir.name}"
    assert line.endswith(f"retry: {retry}"), line
    assert elapsed < 120  # the tiny run plus a 2 s registry budget; with MLflow's defaults it hangs for minutes
    # The same command, pointed at a store that works, registers the run; a second time it adds nothing.
    args = shlex.split(retry)[1:]
    store = f"sqlite:///{tmp_path / 'ok.db'}"
    args[args.index(uri)] = store
    first = cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "registered tiny version 1 (fp16) → models:/tiny/1" in first.stdout
    second = cli(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "already registered: fp16 v1" in second.stdout and "registered tiny version" not in second.stdout
    assert len(_client(store).search_model_versions("name = 'tiny'")) == 1
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["registry"]["already"] == {"fp16": 1}


# --- what a version says about itself -------------------------------------------------------------------


def test_engine_tags_come_from_the_engine_sidecar(finished_run: Path, tmp_path: Path) -> None:
    copy = _copy_run(finished_run, tmp_path / "run")
    (copy / "engines").mkdir()
    sidecar = {"compute_capability": "9.0", "tensorrt": "10.16.0.32", "gpu": "NVIDIA H100 80GB HBM3"}
    (copy / "engines" / "tiny-fp16.json").write_text(json.dumps(sidecar))
    _edit_json(copy / "metrics.json", lambda m: m["variants"]["fp16"].update(engine={"path": "engines/tiny-fp16.plan"}))
    uri = f"sqlite:///{tmp_path}/m.db"
    out = registry.publish(copy, uri)
    client = _client(uri)
    tags = client.get_model_version("tiny", str(out.versions["fp16"])).tags
    assert tags["gpu_sm"] == "sm90" and tags["tensorrt"] == "10.16.0.32" and tags["gpu"] == sidecar["gpu"]
    other = client.get_model_version("tiny", str(out.versions["fp16-fp32io"])).tags
    assert "gpu_sm" not in other and "tensorrt" not in other
    (mv,) = client.search_model_versions("tags.gpu_sm = 'sm90'")
    assert int(mv.version) == out.versions["fp16"]


def _git(folder: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_commit_of_the_recipes_checkout(finished_run: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "r.yaml").write_text("name: tiny\n")
    _git(repo, "add", "r.yaml")
    _git(repo, "commit", "-q", "-m", "recipe")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_commit(repo) == head
    assert git_commit(tmp_path / "run-elsewhere") is None  # no such folder
    (tmp_path / "plain").mkdir()
    assert git_commit(tmp_path / "plain") is None  # not a checkout (tmp_path is in none)

    copy = _copy_run(finished_run, tmp_path / "run")
    _edit_json(copy / "manifest.json", lambda m: m.update(recipe_file=str(repo / "r.yaml")))
    uri = f"sqlite:///{tmp_path}/m.db"
    out = registry.publish(copy, uri)
    assert _client(uri).get_model_version("tiny", "1").tags[tag.GIT_COMMIT] == head
    (repo / "r.yaml").write_text("name: changed\n")
    assert git_commit(repo) == head + "-dirty"
    assert out.versions["fp16"] == 1
    # The shared run's recipe is in a temporary folder, in no checkout: no tag rather than a wrong one.
    other = registry.publish(finished_run, f"sqlite:///{tmp_path}/other.db")
    assert tag.GIT_COMMIT not in _client(f"sqlite:///{tmp_path}/other.db").get_model_version("tiny", "1").tags
    assert other.versions["fp16"] == 1


def test_description_shows_baseline_value_and_delta_per_gate(finished_run: Path) -> None:
    metrics = json.loads((finished_run / "metrics.json").read_text())
    verdict = json.loads((finished_run / "verdict.json").read_text())
    text = description.describe("fp16", metrics, verdict)
    lines = text.splitlines()
    assert lines[1] == "Gates PASSED: 2 gate(s) passed"
    assert lines[3] == "| gate | target | baseline | value | Δ | result |"
    rows = [r for r in verdict["gates"] if r["variant"] == "fp16"]
    assert len([ln for ln in lines if ln.startswith("| `")]) == len(rows)
    assert "| `accuracy.top1_agreement >= 0.9` | onnxruntime-cpu | 1 | 1 | +0 | passed |" in text
    cosine = next(r for r in rows if r["metric"] == "accuracy.cosine_min")
    delta = cosine["value"] - cosine["baseline_value"]
    assert f"| {cosine['baseline_value']:.6g} | {cosine['value']:.6g} | {delta:+.3g} (" in text
    assert "runs:/" not in text  # no run given, no link

    linked = description.describe(
        "fp16", metrics, verdict, run_id="abc", experiment_id="7", tracking_uri="http://mlflow.example:5000/"
    )
    assert "Report: `runs:/abc/report.md`" in linked
    assert "MLflow run: http://mlflow.example:5000/#/experiments/7/runs/abc" in linked
    local = description.describe("fp16", metrics, verdict, run_id="abc", experiment_id="7", tracking_uri="sqlite:///x")
    assert "runs:/abc/report.md" in local and "#/experiments" not in local


# --- the report's plots ------------------------------------------------------------------------------

_SERVE = """
import hashlib, json, os, sys
os.environ["_MLFLOW_SERVER_FILE_STORE"] = sys.argv[1]  # what `mlflow server --backend-store-uri` sets
from mlflow.server import app
client = app.test_client()
out = {}
for link in json.loads(sys.argv[2]):
    r = client.get("/" + link)
    out[link] = [r.status_code, hashlib.sha256(r.data).hexdigest()]
print(json.dumps(out))
"""


def test_the_report_and_its_plots_are_logged_and_each_version_shows_them(finished_run: Path, tmp_path: Path) -> None:
    import re

    from optimize.files import sha256_file
    from optimize.reporting import html as report_html

    run_dir = _copy_run(finished_run, tmp_path / "run")
    report_html.write(run_dir)
    pngs = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    # the report's order: trade-off, latency, accuracy (where the run has per-sample data), size and memory
    order = ("tradeoff.png", "latency-onnxruntime-cpu.png", "accuracy-onnxruntime-cpu.png", "size-memory.png")
    expected = [name.removesuffix(".png") for name in order if name in pngs]
    assert set(pngs) <= set(order) and len(expected) >= 3
    uri = f"sqlite:///{tmp_path}/m.db"
    out = registry.publish(run_dir, uri)
    client, run_id = _client(uri), out.mlflow_run_id

    def listing() -> tuple[list[str], list[str]]:
        root = sorted(a.path for a in client.list_artifacts(run_id))
        return root, sorted(a.path for a in client.list_artifacts(run_id, "plots"))

    root, plots = listing()
    assert {"report.html", "report.md", "metrics.json", "verdict.json", "manifest.json", "recipe.json", "plots"} <= set(
        root
    )
    assert plots == [f"plots/{name}" for name in pngs]
    for path in ("report.html", *plots):
        local = Path(client.download_artifacts(run_id, path, str(tmp_path / "down")))
        assert sha256_file(local) == sha256_file(run_dir / path)

    links = {}
    for variant, version in out.versions.items():
        description = client.get_model_version("tiny", str(version)).description
        images = re.findall(r"!\[([^\]]+)\]\((get-artifact\?[^)]+)\)", description)
        assert [alt for alt, _ in images] == expected, variant
        for alt, link in images:
            assert link == f"get-artifact?path=plots%2F{alt}.png&run_uuid={run_id}"
            links[link] = run_dir / "plots" / f"{alt}.png"
        page = re.search(r"\[report\.html\]\((get-artifact\?[^)]+)\)", description)
        assert page and page.group(1) == f"get-artifact?path=report.html&run_uuid={run_id}"
        links[page.group(1)] = run_dir / "report.html"
        assert f"`runs:/{run_id}/plots/`" in description

    # The links are what an MLflow server beside the UI serves: the same bytes.
    proc = subprocess.run(
        [sys.executable, "-c", _SERVE, uri, json.dumps(list(links))], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    assert served == {link: [200, sha256_file(path)] for link, path in links.items()}

    # A retry logs the same files at the same paths: nothing twice.
    again = registry.publish(run_dir, uri)
    assert again.mlflow_run_id == run_id and again.versions == {}
    assert listing() == (root, plots)
