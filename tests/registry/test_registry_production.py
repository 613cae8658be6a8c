"""The registry's production shape for real: `mlflow server` on a PostgreSQL backend store, an S3-compatible
artifact store (moto's S3 server) behind the server's artifact proxy, and basic-auth on. One server for the
module; PostgreSQL and S3 are started in temp folders on free 127.0.0.1 ports and stopped by PID."""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from optimize.errors import NotAuthorisedError
from optimize.files import sha256_file
from optimize.registry import check_reachable, publish

pytestmark = pytest.mark.slow  # one PostgreSQL, one S3 and one MLflow server: ~12 s before the first test

ADMIN = ("admin", "admin-Passw0rd!")
BUCKET = "mlflow"
# moto accepts any key; the server gets these, the clients (CI runners) never need them.
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
CLIENT_ENV = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_PROFILE",
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD",
)


@dataclass(frozen=True)
class TeamServer:
    uri: str  # the MLflow server
    backend_uri: str  # its PostgreSQL database
    s3: Any  # a boto3 S3 client on the moto server
    log: Path  # the MLflow server's log (its access log shows which artifact route served a file)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _postgres_bin(name: str) -> str | None:
    # Debian's postgresql packages keep initdb and postgres in /usr/lib/postgresql/<major>/bin, off the PATH.
    if found := shutil.which(name):
        return found
    found = [p for p in glob.glob(f"/usr/lib/postgresql/*/bin/{name}") if re.fullmatch(r"[\d.]+", Path(p).parts[-3])]
    return max(found, key=lambda p: [int(n) for n in Path(p).parts[-3].split(".")], default=None)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server of its own (trust auth on 127.0.0.1, no Unix socket) with an empty `mlflow`
    database; yields the database URI for SQLAlchemy's psycopg (3) driver."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg (the `test` extra) is needed for PostgreSQL")
    initdb, postgres_bin = _postgres_bin("initdb"), _postgres_bin("postgres")
    if not (initdb and postgres_bin):
        pytest.skip("PostgreSQL server binaries (initdb, postgres) are not installed")
    run_as: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the packaged `postgres` user
        runuser = shutil.which("runuser")
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            user = None
        if not (runuser and user):
            pytest.skip("running as root, and no `postgres` user and `runuser` to start PostgreSQL unprivileged")
        run_as = [runuser, "-u", "postgres", "--"]
        # pytest's temp folders are root-only (0700): the server's data lives in a folder of its own.
        folder = Path(tempfile.mkdtemp(prefix="optimize-pg-"))
        os.chown(folder, user.pw_uid, user.pw_gid)
    else:
        folder = tmp_path_factory.mktemp("postgres")
    data, log_path, port = folder / "data", folder / "postgres.log", _free_port()
    log = open(log_path, "wb")
    proc = None
    try:
        subprocess.run(
            [*run_as, initdb, "-D", str(data), "-U", "optimize", "--auth=trust", "-E", "UTF8", "--no-sync"],
            stdout=log, stderr=subprocess.STDOUT, check=True,
        )  # fmt: skip
        proc = subprocess.Popen(
            [*run_as, postgres_bin, "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", "", "-c", "fsync=off"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = psycopg.connect(
                    host="127.0.0.1", port=port, user="optimize", dbname="postgres", connect_timeout=2
                )
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"PostgreSQL did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.2)
        with conn:
            conn.autocommit = True
            conn.execute("CREATE DATABASE mlflow")
        yield f"postgresql+psycopg://optimize@127.0.0.1:{port}/mlflow"
    finally:
        if proc is not None:
            _stop(proc, signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """moto's S3 server with the bucket `mlflow`; yields (endpoint URL, boto3 S3 client)."""
    boto3 = pytest.importorskip("boto3", reason="boto3 (the `test` extra) is needed for the S3 artifact store")
    pytest.importorskip("moto.server", reason="moto[s3] (the `test` extra) is needed for the S3 server")
    folder = tmp_path_factory.mktemp("moto")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(folder / "moto.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(endpoint + "/moto-api/", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start: {(folder / 'moto.log').read_text()[-2000:]}")
                time.sleep(0.2)
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_KEYS["AWS_DEFAULT_REGION"],
        )
        s3.create_bucket(Bucket=BUCKET)
        yield endpoint, s3
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def team_server(
    postgres: str,
    moto_s3: tuple[str, Any],
    mlflow_server_factory: Callable[..., str],
    tmp_path_factory: pytest.TempPathFactory,
) -> TeamServer:
    """`mlflow server --backend-store-uri postgresql… --artifacts-destination s3://mlflow/artifacts
    --app-name basic-auth`, as docs/registry.md's "Registry server for teams" shows."""
    pytest.importorskip("flask_wtf", reason="mlflow[auth] (the `test` extra) is needed for --app-name basic-auth")
    endpoint, s3 = moto_s3
    folder = tmp_path_factory.mktemp("team-server")
    # MLflow's own basic_auth.ini with the user store in `folder` and its credential cache on: without the
    # cache every request pays a PBKDF2 check (~0.5 s here), and one publish took 16 s instead of 4 s.
    (folder / "basic_auth.ini").write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
        f"admin_username = {ADMIN[0]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n"
    )
    uri = mlflow_server_factory(
        folder,
        backend_uri=postgres,
        artifacts_destination=f"s3://{BUCKET}/artifacts",
        app_name="basic-auth",
        env={
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
            **S3_KEYS,
            "MLFLOW_AUTH_CONFIG_PATH": str(folder / "basic_auth.ini"),
            # MLflow 3.17 ships no admin password and refuses to start without one and a CSRF secret.
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-secret",
        },
    )
    return TeamServer(uri=uri, backend_uri=postgres, s3=s3, log=folder / f"server-{uri.rsplit(':', 1)[1]}.log")


@pytest.fixture()
def as_user(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], None]:
    """as_user(name, password): the client's credentials, and nothing of S3 in the client's environment."""
    for var in CLIENT_ENV:
        monkeypatch.delenv(var, raising=False)

    def _set(name: str, password: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)

    return _set


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def test_publish_through_postgres_and_s3(
    team_server: TeamServer,
    finished_run: Path,
    as_user: Callable[[str, str], None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import psycopg
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    as_user(*ADMIN)
    uri = team_server.uri
    out = publish(_copy(finished_run, tmp_path), uri)
    assert set(out.versions) == {"fp16", "fp16-fp32io"}

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("tiny", "candidate")
    assert int(mv.version) == out.versions["fp16"]
    # `models:/` URIs resolve through the process-wide registry URI (see test_registry_server), and without a
    # process-wide tracking URI download_artifacts creates ./mlflow.db.
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow 3.17 clients fetch files of an S3 destination straight from S3 by presigned URLs
    # (the server advertises it in /server-info); with MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false the
    # bytes come through the server, for runners that cannot reach the S3 endpoint.
    for proxied in (False, True):
        if proxied:
            monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
        dst = tmp_path / ("dl-proxied" if proxied else "dl-presigned")
        local = download_artifacts(artifact_uri="models:/tiny@candidate", dst_path=str(dst), tracking_uri=uri)
        assert sha256_file(Path(local) / "model.onnx") == mv.tags["sha256"]
    log = team_server.log.read_text()
    assert "/mlflow-artifacts/presigned/" in log, "the first download was not presigned"
    assert re.search(r'"GET /api/2\.0/mlflow-artifacts/artifacts/\S+/model\.onnx HTTP', log), "not proxied"
    assert not (tmp_path / "mlflow.db").exists(), "nothing may go to a local store"

    # The rows are in PostgreSQL, the bytes in the bucket (the client never had S3 credentials).
    with psycopg.connect(team_server.backend_uri.replace("postgresql+psycopg", "postgresql")) as conn:
        rows = conn.execute("SELECT version FROM model_versions WHERE name = 'tiny'").fetchall()
    assert {int(r[0]) for r in rows} >= set(out.versions.values())
    keys = [
        o["Key"]
        for page in team_server.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="artifacts/")
        for o in page.get("Contents", [])
    ]
    onnx = [k for k in keys if k.endswith("/model.onnx")]
    in_bucket = {
        hashlib.sha256(team_server.s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()).hexdigest() for k in onnx
    }
    shas = {client.get_model_version("tiny", str(v)).tags["sha256"] for v in out.versions.values()}
    assert shas <= in_bucket
    assert any(k.endswith("/report.md") for k in keys), "the run's artifacts go to S3 too"


# relies on registry/connection.py mapping MLflow's HTTP 401 (error_code UNAUTHENTICATED) to NotAuthorisedError
def test_wrong_credentials_are_exit_7(
    team_server: TeamServer, finished_run: Path, as_user: Callable[[str, str], None], tmp_path: Path
) -> None:
    as_user(ADMIN[0], "not-the-password")
    with pytest.raises(NotAuthorisedError) as info:
        publish(_copy(finished_run, tmp_path), team_server.uri)
    assert info.value.exit_code == 7
    message = str(info.value)
    assert "\n" not in message
    assert "not-the-password" not in message


# relies on registry/connection.py mapping MLflow's HTTP 403 (error_code PERMISSION_DENIED) to NotAuthorisedError
def test_a_user_without_permission_is_exit_7(
    team_server: TeamServer, finished_run: Path, as_user: Callable[[str, str], None], tmp_path: Path
) -> None:
    from mlflow import MlflowClient
    from mlflow.server.auth.client import AuthServiceClient

    as_user(*ADMIN)
    client = MlflowClient(tracking_uri=team_server.uri)
    if client.get_experiment_by_name("optimize/tiny") is None:  # the admin's; others get default READ
        client.create_experiment("optimize/tiny")
    AuthServiceClient(team_server.uri).create_user("reader", "reader-Passw0rd!")
    as_user("reader", "reader-Passw0rd!")
    with pytest.raises(NotAuthorisedError) as info:  # HTTP 403 on runs/create
        publish(_copy(finished_run, tmp_path), team_server.uri)
    assert info.value.exit_code == 7
    assert "\n" not in str(info.value)


def test_health_is_open_with_basic_auth(team_server: TeamServer, as_user: Callable[[str, str], None]) -> None:
    check_reachable(team_server.uri)  # no credentials: /health is one of basic-auth's unprotected routes
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(team_server.uri + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=5)
    assert info.value.code == 401
