"""Registration through a real `mlflow server` on 127.0.0.1 (started and stopped by the test): versions are
strings over REST, tag searches and idempotent retries work there too, and parallel processes registering
different runs of one model get distinct versions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from optimize import registry
from optimize.files import sha256_file
from optimize.pipeline import RunOptions, run


@pytest.mark.slow
def test_run_registers_through_a_real_server(
    mlflow_server: str, write_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run(write_recipe(), RunOptions(runs_dir=tmp_path / "runs", tracking_uri=mlflow_server, quiet=True))
    assert result.exit_code == 0
    assert result.registered.versions == {"fp16": 1}
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

    # The description links the report artifact and the run in the server's UI.
    exp, run_id = result.registered.experiment_id, result.registered.mlflow_run_id
    assert f"runs:/{run_id}/report.md" in mv.description
    assert f"{mlflow_server}/#/experiments/{exp}/runs/{run_id}" in mv.description
    assert "report.md" in {a.path for a in client.list_artifacts(run_id)}
    # Tag searches work over REST, and registering the run again finds its version (an int here too).
    assert [str(v.version) for v in client.search_model_versions("tags.precision = 'fp16'")] == ["1"]
    again = registry.register_run(result.run_dir, mlflow_server)
    assert again.versions == {} and again.already == {"fp16": 1} and again.mlflow_run_id == run_id
    assert len(client.search_model_versions("name = 'tiny'")) == 1
    assert len(client.search_runs([exp])) == 1
    assert len(client.search_logged_models(experiment_ids=[exp])) == 1
    # The same recipe again, through the server (decided by MLflow's client, not the sqlite reader): the
    # same model, so no copy of it and nothing logged.
    rerun = run(write_recipe(), RunOptions(runs_dir=tmp_path / "runs", tracking_uri=mlflow_server, quiet=True))
    assert rerun.exit_code == 0 and rerun.registered.mlflow_run_id is None
    assert rerun.registered.versions == {} and rerun.registered.already == {"fp16": 1}
    assert len(client.search_model_versions("name = 'tiny'")) == 1 and len(client.search_runs([exp])) == 1


@pytest.mark.slow
def test_parallel_registrations_of_different_runs_get_distinct_versions(
    mlflow_server: str, finished_run: Path, tmp_path: Path
) -> None:
    runs = []
    for i in range(4):
        copy = tmp_path / f"run{i}"
        shutil.copytree(finished_run, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["run_id"] = f"20260101-00000{i}-par{i}"
        (copy / "manifest.json").write_text(json.dumps(manifest))
        runs.append(copy)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "optimize", "register", "--tracking-uri", mlflow_server, str(copy)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for copy in runs
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    registered = {}
    for copy in runs:
        manifest = json.loads((copy / "manifest.json").read_text())
        assert manifest["status"] == "done" and manifest["registry"]["status"] == "registered"
        for variant, version in manifest["registry"]["versions"].items():
            registered[(copy.name, variant)] = version
    assert len(registered) == 8 and sorted(registered.values()) == list(range(1, 9))
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    versions = client.search_model_versions("name = 'tiny'")
    assert sorted(int(v.version) for v in versions) == list(range(1, 9))
    for v in versions:  # each version carries the run it came from
        run_name = next(c for (c, variant), n in registered.items() if n == int(v.version))
        assert v.tags["optimize_run_id"] == json.loads((tmp_path / run_name / "manifest.json").read_text())["run_id"]
    # `candidate` ends on one of the fp16 versions (which one is a race: aliases have no compare-and-set).
    candidate = int(client.get_model_version_by_alias("tiny", "candidate").version)
    assert candidate in {n for (_, variant), n in registered.items() if variant == "fp16"}
    # A retry of one of them over REST adds nothing.
    again = registry.register_run(runs[0], mlflow_server)
    assert again.versions == {} and len(again.already) == 2
    assert len(client.search_model_versions("name = 'tiny'")) == 8
