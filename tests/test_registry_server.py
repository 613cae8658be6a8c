"""Registration through a real `mlflow server` on 127.0.0.1 (started and stopped by the test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from optimize.files import sha256_file
from optimize.pipeline import RunOptions, run


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
