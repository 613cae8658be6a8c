"""Registration through a real `mlflow server` on 127.0.0.1 (started and stopped by the test)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from optimize.files import sha256_file
from optimize.pipeline import RunOptions, run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", str(tmp_path / "server-artifacts"),
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.mark.slow
def test_run_registers_through_a_real_server(
    mlflow_server: str, write_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run(write_recipe(), RunOptions(runs_dir=tmp_path / "runs", tracking_uri=mlflow_server, quiet=True))
    assert result.exit_code == 0
    assert result.registered["versions"] == {"fp16": 1}
    assert not (tmp_path / "mlflow.db").exists(), "nothing may go to the local default store"
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    mv = client.get_model_version_by_alias("tiny", "candidate")
    assert str(mv.version) == "1"  # a string over REST, an int over sqlite
    from mlflow.artifacts import download_artifacts

    # `models:/` URIs resolve through the process-wide registry URI, not download_artifacts' tracking_uri.
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server)

    local = download_artifacts(
        artifact_uri="models:/tiny@candidate", dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_server
    )
    assert sha256_file(Path(local) / "model.onnx") == mv.tags["sha256"]
    assert (tmp_path / "server-artifacts").is_dir()
