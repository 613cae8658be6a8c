"""MLflow registry: URI precedence, reachability (bounded, exit 5), and publishing a finished run directory."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from optimize import registry
from optimize.errors import RecipeError, RegistryUnreachableError


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert registry.resolve_tracking_uri(None, None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert registry.resolve_tracking_uri(None, "http://recipe:5000") == "http://recipe:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert registry.resolve_tracking_uri(None, "http://recipe:5000") == "http://env:5000"
    assert registry.resolve_tracking_uri("http://cli:5000", "http://recipe:5000") == "http://cli:5000"


def test_sqlite_artifacts_are_pinned_beside_the_database(tmp_path: Path) -> None:
    loc = registry.default_artifact_location(f"sqlite:///{tmp_path}/x/m.db")
    assert loc == (tmp_path / "x" / "mlartifacts").as_uri()
    assert registry.default_artifact_location("http://host:5000") is None


def test_unreachable_server_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(RegistryUnreachableError) as e:
        registry.check_reachable(f"http://127.0.0.1:{port}")
    assert e.value.exit_code == 5 and f"127.0.0.1:{port}" in str(e.value)
    assert time.monotonic() - t0 < 30


def test_unwritable_sqlite_folder_and_bad_uri(tmp_path: Path) -> None:
    with pytest.raises(RegistryUnreachableError):
        registry.check_reachable(f"sqlite:///{tmp_path}/missing-folder/m.db")
    with pytest.raises(RecipeError) as e:
        registry.check_reachable("not a uri")
    assert "registry.tracking_uri" in str(e.value)


def test_publish_registers_each_passing_variant_with_aliases(finished_run: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/m.db"
    out = registry.publish(finished_run, uri)
    assert out["versions"] == {"fp16": 1, "fp16-fp32io": 2}
    client = _client(uri)
    # `candidate` goes to the first passing variant in recipe order; each variant has its own alias.
    assert client.get_model_version_by_alias("tiny", "candidate").version in (1, "1")
    assert int(client.get_model_version_by_alias("tiny", "candidate-fp16-fp32io").version) == 2
    metrics = json.loads((finished_run / "metrics.json").read_text())
    for variant, version in out["versions"].items():
        mv = client.get_model_version("tiny", str(version))
        assert mv.tags["sha256"] == metrics["variants"][variant]["sha256"]
        assert mv.run_id == out["run_id"]
        assert mv.source.startswith("models:/m-")  # the version points at its LoggedModel
        logged = client.get_logged_model(mv.source.removeprefix("models:/"))
        assert logged.tags["sha256"] == mv.tags["sha256"] and logged.source_run_id == out["run_id"]
    run_ = client.get_run(out["run_id"])
    assert run_.data.tags["optimize.verdict"] == "passed"
    assert run_.data.params["precision.variants"].count("fp16") >= 2


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


def test_publishing_again_makes_a_new_version_and_moves_the_alias(finished_run: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/m.db"
    registry.publish(finished_run, uri)
    again = registry.publish(finished_run, uri)
    assert again["versions"]["fp16"] == 3
    assert int(_client(uri).get_model_version_by_alias("tiny", "candidate").version) == 3


def test_a_failed_variant_is_not_registered(finished_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    verdict = json.loads((copy / "verdict.json").read_text())
    verdict["variants"]["fp16-fp32io"]["status"] = "failed"
    (copy / "verdict.json").write_text(json.dumps(verdict))
    uri = f"sqlite:///{tmp_path}/m.db"
    out = registry.publish(copy, uri)
    assert out["versions"] == {"fp16": 1}
    versions = _client(uri).search_model_versions("name='tiny'")
    assert [v.tags["precision"] for v in versions] == ["fp16"]


def test_description_is_the_gate_table(finished_run: Path) -> None:
    metrics = json.loads((finished_run / "metrics.json").read_text())
    verdict = json.loads((finished_run / "verdict.json").read_text())
    text = registry.describe("fp16", metrics, verdict)
    assert text.splitlines()[2] == "| gate | target | value | baseline | result |"
    rows = [r for r in verdict["gates"] if r["variant"] == "fp16"]
    assert len([ln for ln in text.splitlines() if ln.startswith("| `")]) == len(rows)
    assert "`accuracy.top1_agreement >= 0.9` | onnxruntime-cpu | 1 | 1 | passed" in text
