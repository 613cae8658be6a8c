"""Promotion, rollback and the canary manifest against real MLflow stores (a sqlite store in tmp_path and a real
`mlflow server`), each command through the CLI as a user runs it: exit codes, one error line, nothing moved."""

from __future__ import annotations

import json
import multiprocessing
import queue
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
from mlflow import MlflowClient
from test_cli import cli, one_error_line

from optimize import registry
from optimize.errors import GateFailedError, IntegrityError, RecipeError
from optimize.registry import promotion

MODEL = "tiny"


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sqlite database with MLflow's tables: creating them takes seconds, copying the file does not."""
    db = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def publish_runs(finished_run: Path, tmp_path: Path, uri: str, runs: int) -> list[int]:
    """Publish `runs` copies of the finished run (each with its own run id, as separate runs would have) and
    return the registered versions: per run, fp16 then fp16-fp32io."""
    versions: list[int] = []
    for i in range(runs):
        copy = tmp_path / f"run-{i}"
        shutil.copytree(finished_run, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["run_id"] = f"{manifest['run_id']}-{i}"
        (copy / "manifest.json").write_text(json.dumps(manifest))
        versions += registry.publish(copy, uri).versions.values()
    return versions


@pytest.fixture()
def store(finished_run: Path, tmp_path: Path, empty_store: Path) -> str:
    """A sqlite registry in tmp_path with model `tiny` versions 1 and 3 (fp16) and 2 and 4 (fp16-fp32io), all
    passed; `candidate` on 3."""
    folder = tmp_path / "registry"
    folder.mkdir()
    shutil.copy(empty_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder}/mlflow.db"
    assert publish_runs(finished_run, tmp_path, uri, runs=2) == [1, 2, 3, 4]
    return uri


def client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def aliases(uri: str) -> dict[str, int]:
    return {a: int(v) for a, v in client(uri).get_registered_model(MODEL).aliases.items()}


def history(uri: str, alias: str) -> list[dict[str, Any]]:
    return json.loads(client(uri).get_registered_model(MODEL).tags.get(f"alias_history.{alias}", "[]"))


def moves(uri: str, alias: str) -> list[tuple[int, int | None, str]]:
    return [(e["version"], e["from"], e["action"]) for e in history(uri, alias)]


def version_tags(uri: str, version: int) -> dict[str, str]:
    return client(uri).get_model_version(MODEL, str(version)).tags


def audit(uri: str, version: int) -> list[dict[str, Any]]:
    return json.loads(version_tags(uri, version).get("audit", "[]"))


def snapshot(uri: str) -> dict[str, Any]:
    """Everything an alias move changes: aliases, the model's tags and every version's tags."""
    c = client(uri)
    rm = c.get_registered_model(MODEL)
    versions = {int(v.version): dict(v.tags) for v in c.search_model_versions(f"name='{MODEL}'")}
    return {"aliases": dict(rm.aliases), "tags": dict(rm.tags), "versions": versions}


def fail_gate(uri: str, version: int) -> None:
    """Mark a version's gates as failed. `publish` registers only passed variants, so this stands for an old or
    hand-registered version whose gates failed."""
    client(uri).set_model_version_tag(MODEL, str(version), "verdict", "failed")


def alter_artifact(uri: str, version: int) -> Path:
    """Change a version's stored model.onnx in the sqlite store's artifact folder (as a tampered or corrupted
    artifact store would)."""
    location = client(uri).get_model_version_download_uri(MODEL, str(version))
    path = Path(unquote(urlparse(location).path)) / "model.onnx"
    assert "mlartifacts" in path.parts and path.is_file()
    path.write_bytes(path.read_bytes() + b"\0")
    return path


def promote(uri: str, alias: str, version: int) -> dict[str, Any]:
    return promotion.promote(MODEL, alias, version=version, tracking_uri=uri)


def cli_parallel(cwd: Path, *commands: tuple[str | Path, ...]) -> list[Any]:
    """Run several `python -m optimize` commands at once (each starts MLflow for seconds); results in order."""
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return list(pool.map(lambda args: cli(*args, cwd=cwd), commands))


# --- promote ---------------------------------------------------------------------------------------------


def test_promote_moves_the_alias_and_records_who_what_when(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.setenv(var, "ci-bot")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("BUILD_URL", "https://jenkins.example/job/optimize/42/")
    started = datetime.now(timezone.utc) - timedelta(seconds=1)

    proc = cli("promote", MODEL, "--to", "canary", "--version", "1", "--tracking-uri", store, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "tiny@canary → version 1; sha256 verified\n"
    proc = cli(
        "promote", MODEL, "--to", "canary", "--from", "candidate-fp16-fp32io", "--tracking-uri", store, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "tiny@canary → version 4 (was version 1); sha256 verified\n"
    assert proc.stderr == ""

    assert aliases(store) == {"canary": 4, "candidate": 3, "candidate-fp16": 3, "candidate-fp16-fp32io": 4}
    assert moves(store, "canary") == [(1, None, "promote"), (4, 1, "promote")]
    assert version_tags(store, 4)["previous_canary_version"] == "1"
    assert "previous_canary_version" not in version_tags(store, 1)  # the alias pointed nowhere before
    [line] = audit(store, 4)
    tags = version_tags(store, 4)
    assert {k: line[k] for k in ("by", "mlflow_user", "action", "alias", "from", "to", "build_url")} == {
        "by": "ci-bot",
        "mlflow_user": "alice",
        "action": "promote",
        "alias": "canary",
        "from": 1,
        "to": 4,
        "build_url": "https://jenkins.example/job/optimize/42/",
    }
    assert (line["optimize_run_id"], line["mlflow_run_id"]) == (tags["optimize_run_id"], tags["mlflow_run_id"])
    at = datetime.fromisoformat(line["at"].replace("Z", "+00:00"))
    assert at.tzinfo is not None and started <= at <= datetime.now(timezone.utc)


def test_build_url_from_jenkins_or_github_actions() -> None:
    assert promotion.build_url({"BUILD_URL": "https://ci/job/7/"}) == "https://ci/job/7/"
    github = {"GITHUB_SERVER_URL": "https://github.com", "GITHUB_REPOSITORY": "org/repo", "GITHUB_RUN_ID": "123"}
    assert promotion.build_url(github) == "https://github.com/org/repo/actions/runs/123"
    assert promotion.build_url({"GITHUB_RUN_ID": "123"}) is None
    assert promotion.build_url({}) is None


def test_promote_refuses_and_moves_nothing(store: str, tmp_path: Path) -> None:
    promote(store, "canary", 1)
    fail_gate(store, 2)
    alter_artifact(store, 3)
    before = snapshot(store)
    uri = ("--tracking-uri", store)
    cases = {
        "unknown model": (("promote", "tinny", "--to", "canary", "--version", "4", *uri), 2, "did you mean tiny?"),
        "unknown --from": (("promote", MODEL, "--to", "canary", "--from", "nope", *uri), 2, "no alias 'nope'"),
        "unknown version": (
            ("promote", MODEL, "--to", "canary", "--version", "9", *uri),
            2,
            "has no version 9; its newest is version 4",
        ),
        "latest": (("promote", MODEL, "--to", "latest", "--version", "4", *uri), 2, "'latest' is reserved"),
        "v<N>": (("promote", MODEL, "--to", "V3", "--version", "4", *uri), 2, "'V3' is reserved"),
        "bad name": (("promote", MODEL, "--to", "a b", "--version", "4", *uri), 2, "an MLflow alias has"),
        "gate failed": (("promote", MODEL, "--to", "canary", "--version", "2", *uri), 1, "verdict is 'failed'"),
        "sha256": (("promote", MODEL, "--to", "canary", "--version", "3", *uri), 6, "the stored artifact changed"),
    }
    procs = cli_parallel(tmp_path, *(args for args, _, _ in cases.values()))
    for (name, (_, code, text)), proc in zip(cases.items(), procs, strict=True):
        assert proc.returncode == code, (name, proc.stderr)
        assert text in one_error_line(proc), name
    assert snapshot(store) == before


def test_promoting_the_version_the_alias_points_to_changes_nothing(store: str) -> None:
    promote(store, "canary", 1)
    before = snapshot(store)
    done = promote(store, "canary", 1)
    assert (done["version"], done["previous"], done.get("unchanged")) == (1, 1, True)
    assert snapshot(store) == before


def test_records_stay_bounded(store: str) -> None:
    c = client(store)
    old = [{"at": "2026-01-01T00:00:00Z", "action": "promote", "note": "x" * 400, "id": str(i)} for i in range(25)]
    c.set_model_version_tag(MODEL, "1", "audit", json.dumps(old))
    moved = [{"version": 2, "from": 1, "action": "promote", "at": "x" * 200, "id": str(i)} for i in range(40)]
    c.set_registered_model_tag(MODEL, "alias_history.canary", json.dumps(moved))
    c.set_registered_model_alias(MODEL, "canary", "2")
    promote(store, "canary", 1)
    lines = audit(store, 1)
    assert len(lines) <= promotion.AUDIT_MAX_ENTRIES
    assert len(version_tags(store, 1)["audit"]) <= promotion.AUDIT_MAX_CHARS
    assert lines[-1]["action"] == "promote" and lines[-2]["id"] == "24"  # newest last, oldest dropped
    entries = history(store, "canary")
    assert len(entries) <= promotion.HISTORY_MAX_ENTRIES
    assert len(c.get_registered_model(MODEL).tags["alias_history.canary"]) <= promotion.HISTORY_MAX_CHARS
    assert (entries[-1]["version"], entries[-1]["from"], entries[-2]["id"]) == (1, 2, "39")


def test_a_missing_sqlite_store_is_not_created(tmp_path: Path) -> None:
    # Without --tracking-uri the store is ./mlflow.db; in the wrong folder that must not make an empty store.
    proc = cli("promote", MODEL, "--to", "canary", "--version", "1", cwd=tmp_path)
    assert proc.returncode == 2
    assert "mlflow.db does not exist" in one_error_line(proc)
    with pytest.raises(RecipeError, match="pass --tracking-uri"):
        promotion.rollback(MODEL, "canary", tracking_uri=f"sqlite:///{tmp_path}/other.db")
    assert not list(tmp_path.glob("*.db"))


# --- rollback --------------------------------------------------------------------------------------------


def test_rollback_undoes_the_last_promotion_once(store: str, tmp_path: Path) -> None:
    for version in (1, 2, 3):
        promote(store, "production", version)
    proc = cli("rollback", MODEL, "--alias", "production", "--tracking-uri", store, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "tiny@production → version 2 (was version 3); sha256 verified\n"
    assert aliases(store)["production"] == 2
    after_first = moves(store, "production")
    assert after_first == [(1, None, "promote"), (2, 1, "promote"), (3, 2, "promote"), (2, 3, "rollback")]
    assert audit(store, 2)[-1]["action"] == "rollback" and audit(store, 3)[-1]["action"] == "rolled-back"
    assert version_tags(store, 2)["previous_production_version"] == "1"  # promote's record, left as it was

    # A second rollback (a retried CI step) neither goes back to 3 nor further back to 1.
    proc = cli("rollback", MODEL, "--alias", "production", "--tracking-uri", store, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    again = promotion.rollback(MODEL, "production", tracking_uri=store)
    assert (again["version"], again["already_rolled_back"], again["rolled_back_from"]) == (2, True, 3)
    assert aliases(store)["production"] == 2
    assert moves(store, "production") == after_first

    # Going further back is an explicit promotion; rolling that back returns to 2, never to the rolled-back 3.
    assert promote(store, "production", 1)["previous"] == 2
    assert promotion.rollback(MODEL, "production", tracking_uri=store)["version"] == 2
    assert moves(store, "production")[-2:] == [(1, 2, "promote"), (2, 1, "rollback")]


def test_rollback_refuses_and_moves_nothing(store: str, tmp_path: Path) -> None:
    for alias, versions in {"gated": (2, 4), "altered": (3, 4), "moved": (1, 4), "first": (4,)}.items():
        for version in versions:
            promote(store, alias, version)
    client(store).set_registered_model_alias(MODEL, "moved", "1")  # by hand, outside optimize
    fail_gate(store, 2)
    alter_artifact(store, 3)
    before = snapshot(store)
    uri = ("--tracking-uri", store)
    cases = {
        "gate failed": (("rollback", MODEL, "--alias", "gated", *uri), 1, "tiny version 2: gate verdict is 'failed'"),
        "sha256": (("rollback", MODEL, "--alias", "altered", *uri), 6, "tiny version 3: model.onnx downloaded"),
        "moved by hand": (("rollback", MODEL, "--alias", "moved", *uri), 2, "moved outside `optimize promote`"),
        "first promotion": (("rollback", MODEL, "--alias", "first", *uri), 2, "nothing to roll back to: version 4"),
        "no such alias": (("rollback", MODEL, "--alias", "never", *uri), 2, "has no alias 'never'"),
        "unknown model": (("rollback", "tinny", "--alias", "gated", *uri), 2, "did you mean tiny?"),
    }
    procs = cli_parallel(tmp_path, *(args for args, _, _ in cases.values()))
    for (name, (_, code, text)), proc in zip(cases.items(), procs, strict=True):
        assert proc.returncode == code, (name, proc.stderr)
        assert text in one_error_line(proc), name
    assert snapshot(store) == before


def test_rollback_of_an_alias_set_outside_optimize(store: str) -> None:
    # `candidate` is set by `optimize run`'s publish, which records no history: nothing to go back to.
    with pytest.raises(RecipeError, match="no move recorded by `optimize promote`"):
        promotion.rollback(MODEL, "candidate", tracking_uri=store)


# --- canary manifest -------------------------------------------------------------------------------------


def test_canary_manifest_describes_what_the_alias_points_to(store: str, tmp_path: Path, finished_run: Path) -> None:
    promote(store, "canary", 1)
    promote(store, "canary", 2)
    c = client(store)
    c.set_model_version_tag(MODEL, "2", "gpu_sm", "90")
    c.set_model_version_tag(MODEL, "2", "tensorrt", "10.16.0")
    proc = cli("canary-manifest", MODEL, "--tracking-uri", store, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    tags = version_tags(store, 2)
    metrics = json.loads((finished_run / "metrics.json").read_text())
    verdict = json.loads((finished_run / "verdict.json").read_text())
    assert manifest["version"] == 2 and manifest["alias"] == "canary"
    assert (manifest["model_uri"], manifest["version_uri"]) == ("models:/tiny@canary", "models:/tiny/2")
    assert manifest["sha256"] == metrics["variants"]["fp16-fp32io"]["sha256"] == tags["sha256"]
    assert (manifest["format"], manifest["precision"], manifest["variant"]) == ("onnx", "fp16", "fp16-fp32io")
    assert manifest["targets"] == ["onnxruntime-cpu"]
    assert (manifest["gpu_sm"], manifest["tensorrt"]) == ("90", "10.16.0")
    assert manifest["recipe"] == {"name": "tiny", "sha256": tags["recipe_sha256"]}
    assert (manifest["previous_version"], manifest["rolled_back"]) == (1, False)
    rows = [r for r in verdict["gates"] if r["variant"] == "fp16-fp32io"]
    assert manifest["gates"] == [
        {"check": r["check"], "target": r["target"], "value": r["value"], "baseline": r["baseline_value"],
         "status": r["status"]}
        for r in rows
    ]  # fmt: skip
    assert len(rows) == 2

    other = promotion.canary_manifest(MODEL, "candidate", tracking_uri=store)
    assert (other["version"], other["variant"], other["gpu_sm"], other["tensorrt"]) == (3, "fp16", None, None)
    assert other["previous_version"] is None and len(other["gates"]) == 2

    promotion.rollback(MODEL, "canary", tracking_uri=store)
    back = promotion.canary_manifest(MODEL, tracking_uri=store)
    assert (back["version"], back["previous_version"], back["rolled_back"]) == (1, 2, True)

    proc = cli("canary-manifest", MODEL, "--alias", "production", "--tracking-uri", store, cwd=tmp_path)
    assert proc.returncode == 2
    assert "has no alias 'production'" in one_error_line(proc)
    fail_gate(store, 1)
    with pytest.raises(GateFailedError, match="not deployable"):
        promotion.canary_manifest(MODEL, tracking_uri=store)


# --- the registry refusing, or not there -------------------------------------------------------------------


@pytest.fixture()
def refusing_registry() -> Iterator[Callable[[int, str], str]]:
    """refusing_registry(status, body) -> URI of an HTTP server that is healthy but answers every API call with
    `status` and `body` (JSON, as MLflow's auth answers, or plain text, as a proxy in front of it does)."""
    servers: list[ThreadingHTTPServer] = []

    def start(status: int, body: str) -> str:
        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                code, text = (200, "OK") if self.path == "/health" else (status, body)
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json" if text.startswith("{") else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_refused_credentials_exit_7(refusing_registry: Callable[[int, str], str], tmp_path: Path) -> None:
    unauthenticated = refusing_registry(401, json.dumps({"error_code": "UNAUTHENTICATED", "message": "bad token"}))
    forbidden = refusing_registry(403, "Forbidden")
    procs = cli_parallel(
        tmp_path,
        ("promote", MODEL, "--to", "canary", "--version", "1", "--tracking-uri", unauthenticated),
        ("rollback", MODEL, "--alias", "canary", "--tracking-uri", forbidden),
        ("canary-manifest", MODEL, "--tracking-uri", forbidden),
    )
    for proc in procs:
        assert proc.returncode == 7, proc.stderr
        assert "refused the request" in one_error_line(proc)
        assert "MLFLOW_TRACKING_USERNAME" in proc.stderr
    assert "bad token" in procs[0].stderr


def test_unreachable_registry_exit_5_fast(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    proc = cli("promote", MODEL, "--to", "canary", "--version", "1", "--tracking-uri", f"http://127.0.0.1:{port}",
               cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 5, proc.stderr
    assert f"cannot reach http://127.0.0.1:{port}" in one_error_line(proc)
    assert time.monotonic() - t0 < 30


# --- promotions racing on one alias (processes) -------------------------------------------------------------


def _promote_after_barrier(barrier: Any, results: Any, uri: str, alias: str, version: int) -> None:
    """Child process: wait until every racer has started (imports take seconds), then promote."""
    barrier.wait(timeout=120)
    try:
        done = promotion.promote(MODEL, alias, version=version, tracking_uri=uri)
        results.put((version, "ok", done["previous"]))
    except Exception as e:
        results.put((version, type(e).__name__, str(e)))


def race(uri: str, alias: str, versions: list[int]) -> dict[int, tuple[str, Any]]:
    """Promote each of `versions` to `alias` from its own process, all released at once."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(versions)), ctx.Queue()
    procs = [ctx.Process(target=_promote_after_barrier, args=(barrier, results, uri, alias, v)) for v in versions]
    for p in procs:
        p.start()
    out: dict[int, tuple[str, Any]] = {}
    try:
        for _ in versions:
            version, status, detail = results.get(timeout=180)
            out[version] = (status, detail)
    except queue.Empty:
        pytest.fail(f"racers did not report: {out}")
    finally:
        for p in procs:
            p.join(timeout=60)
    return out


def test_racing_promotions_on_sqlite_are_serialised(store: str) -> None:
    results = race(store, "canary", [1, 2, 3, 4])
    assert all(status == "ok" for status, _ in results.values()), results
    entries = moves(store, "canary")
    # Each promotion saw the one before it: one chain, no lost record, the alias at its end.
    assert sorted(v for v, _, _ in entries) == [1, 2, 3, 4]
    assert [f for _, f, _ in entries] == [None] + [v for v, _, _ in entries[:-1]]
    assert aliases(store)["canary"] == entries[-1][0]
    for version, (_, previous) in results.items():
        assert [(a["from"], a["to"]) for a in audit(store, version)] == [(previous, version)]
    assert promotion.rollback(MODEL, "canary", tracking_uri=store)["version"] == entries[-2][0]


@pytest.mark.slow
def test_racing_promotions_through_a_real_server(mlflow_server: str, finished_run: Path, tmp_path: Path) -> None:
    # A server offers no lock: the alias ends on one of the racers, and the history keeps both, ending there.
    assert publish_runs(finished_run, tmp_path, mlflow_server, runs=1) == [1, 2]
    results = race(mlflow_server, "canary", [1, 2])
    assert all(status == "ok" for status, _ in results.values()), results
    entries = history(mlflow_server, "canary")
    assert sorted(e["version"] for e in entries) == [1, 2]
    winner = aliases(mlflow_server)["canary"]
    assert entries[-1]["version"] == winner
    for version in (1, 2):
        assert [a["to"] for a in audit(mlflow_server, version)] == [version]
    manifest = promotion.canary_manifest(MODEL, tracking_uri=mlflow_server)
    assert manifest["version"] == winner and len(manifest["gates"]) == 2
    if entries[-1]["from"] is not None:  # the winner saw the loser's move: rollback returns to it (verified)
        assert promotion.rollback(MODEL, "canary", tracking_uri=mlflow_server)["version"] == 3 - winner
    else:
        with pytest.raises(RecipeError, match="nothing to roll back to"):
            promotion.rollback(MODEL, "canary", tracking_uri=mlflow_server)


def test_integrity_error_names_the_fix(store: str) -> None:
    alter_artifact(store, 1)
    with pytest.raises(IntegrityError) as e:
        promote(store, "canary", 1)
    assert e.value.exit_code == 6 and "tag sha256" in str(e.value)
    assert "canary" not in aliases(store)
