"""A rerun registers no copy of a model the registry holds: a variant whose bytes, targets and verdict match a
live version of the registered model (`IDENTITY_TAGS`) is reported as that version. When every passing
variant is such a copy and the aliases already point there, nothing is logged, and on a local sqlite store
that is known without importing MLflow (`already_registered`); `publish(reuse=True)` gives the same answer
through MLflow, and `optimize register RUN_DIR` registers the run anyway. (The user's command run twice, on
the real model, is in test_e2e.)"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from mlflow import MlflowClient

from optimize import registry
from optimize.registry import connection, reuse

RUN_ID = "20260101-000000-"


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _rerun(finished_run: Path, dest: Path, n: int, change=None) -> Path:
    """A copy of the shared finished run as another optimize run (`n` in its run id) of the same recipe,
    with `change(docs)` applied to its manifest, metrics and verdict."""
    shutil.copytree(finished_run, dest)
    docs = {name: json.loads((dest / f"{name}.json").read_text()) for name in ("manifest", "metrics", "verdict")}
    docs["manifest"]["run_id"] = f"{RUN_ID}{n:04d}"
    if change:
        change(docs)
    for name, doc in docs.items():
        (dest / f"{name}.json").write_text(json.dumps(doc))
    return dest


def _both(run_dir: Path, uri: str) -> tuple[dict | None, dict]:
    """What the fast reader says, then what `publish(reuse=True)` does, on the same store state."""
    fast = registry.already_registered(run_dir, uri)
    return fast, registry.publish(run_dir, uri, reuse=True)


def _counts(uri: str) -> tuple[int, int]:
    """(versions of `tiny`, MLflow runs) in the store."""
    client = _client(uri)
    exp = client.get_experiment_by_name("optimize/tiny")
    return len(client.search_model_versions("name = 'tiny'")), len(client.search_runs([exp.experiment_id]))


def test_the_fast_reader_and_publish_agree_on_what_is_registered_already(finished_run: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/m.db"
    first = tmp_path / "first"
    fast, out = _both(_rerun(finished_run, first, 1), uri)
    assert fast is None  # no store yet
    assert out.versions == {"fp16": 1, "fp16-fp32io": 2} and out.mlflow_run_id

    # The same model bytes from another run of the recipe: nothing is logged, by either path.
    same = _rerun(finished_run, tmp_path / "same", 2)
    fast, out = _both(same, uri)
    expected = {"fp16": 1, "fp16-fp32io": 2}
    assert fast == out == reuse.reused_record(uri, "tiny", "candidate", expected)
    assert registry.success_record(out)["status"] == "already registered"
    assert _counts(uri) == (2, 1)

    # A new gate threshold changes the verdict's rows and the recipe's hash, not the model: still the same.
    def stricter(docs: dict) -> None:
        docs["manifest"]["recipe_sha256"] = "1" * 64
        for row in docs["verdict"]["gates"]:
            if row["check"] == "accuracy.cosine_min >= 0.99":
                row["check"], row["threshold"] = "accuracy.cosine_min >= 0.999", 0.999

    fast, out = _both(_rerun(finished_run, tmp_path / "gate", 3, stricter), uri)
    assert fast is not None and fast == out and _counts(uri) == (2, 1)

    # Other bytes for one variant: that variant gets a version, the other is the one already there, and
    # the run is logged (it is the evidence of the new version).
    def other_bytes(docs: dict) -> None:
        docs["metrics"]["variants"]["fp16"]["sha256"] = "0" * 64

    fast, out = _both(_rerun(finished_run, tmp_path / "other", 4, other_bytes), uri)
    assert fast is None
    assert out.versions == {"fp16": 3} and out.already == {"fp16-fp32io": 2} and out.mlflow_run_id
    assert _counts(uri) == (3, 2)
    assert int(_client(uri).get_model_version_by_alias("tiny", "candidate").version) == 3

    # Another target (an engine on a GPU) is another verification, so another model version.
    def on_tensorrt(docs: dict) -> None:
        for row in docs["verdict"]["gates"]:
            row["target"] = "tensorrt"

    fast, out = _both(_rerun(finished_run, tmp_path / "trt", 5, on_tensorrt), uri)
    assert fast is None and out.versions == {"fp16": 4, "fp16-fp32io": 5}
    assert _client(uri).get_model_version("tiny", "4").tags["target"] == "tensorrt"


def test_a_deleted_version_or_a_moved_alias_is_not_taken_as_registered(finished_run: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/m.db"
    registry.publish(_rerun(finished_run, tmp_path / "first", 1), uri)
    client = _client(uri)

    # The alias of one variant was removed: the registration would set it again, so it is not skipped;
    # publish points it at the version there and registers nothing new.
    client.delete_registered_model_alias("tiny", "candidate-fp16-fp32io")
    fast, out = _both(_rerun(finished_run, tmp_path / "alias", 2), uri)
    assert fast is None and out.versions == {} and out.already == {"fp16": 1, "fp16-fp32io": 2}
    assert out.mlflow_run_id and int(client.get_model_version_by_alias("tiny", "candidate-fp16-fp32io").version) == 2

    # A deleted version is not a model the registry holds: the same bytes are registered again.
    client.delete_model_version("tiny", "1")
    fast, out = _both(_rerun(finished_run, tmp_path / "deleted", 3), uri)
    assert fast is None and out.versions == {"fp16": 3} and out.already == {"fp16-fp32io": 2}
    assert registry.already_registered(_rerun(finished_run, tmp_path / "after", 4), uri) == reuse.reused_record(
        uri, "tiny", "candidate", {"fp16": 3, "fp16-fp32io": 2}
    )


def test_the_fast_reader_declines_what_it_cannot_read(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store this reader cannot read (another schema, a locked file), another kind of store, or MLflow
    workspaces: None, and `publish` decides through MLflow (and still registers no copy)."""
    uri = f"sqlite:///{tmp_path}/m.db"
    registry.publish(_rerun(finished_run, tmp_path / "first", 1), uri)
    again = _rerun(finished_run, tmp_path / "again", 2)
    assert registry.already_registered(again, uri) is not None

    with monkeypatch.context() as patch:
        patch.setenv("MLFLOW_WORKSPACE", "team-a")
        assert registry.already_registered(again, uri) is None
    assert registry.already_registered(again, "http://127.0.0.1:9") is None
    assert registry.already_registered(again, f"sqlite:///{tmp_path}/none.db") is None

    db = tmp_path / "m.db"
    with sqlite3.connect(db) as con:
        con.execute("ALTER TABLE model_version_tags RENAME COLUMN value TO val")
    assert registry.already_registered(again, uri) is None
    with sqlite3.connect(db) as con:
        con.execute("ALTER TABLE model_version_tags RENAME COLUMN val TO value")
    assert registry.publish(again, uri, reuse=True).mlflow_run_id is None

    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()  # an sqlite file without MLflow's tables holds no model
    assert registry.already_registered(again, f"sqlite:///{empty}") is None


def test_the_fast_reader_reads_only_schema_revisions_it_was_tested_on(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's schema revision (`alembic_version`) decides whether the file is read directly: a store at a
    revision not in SQLITE_SCHEMAS is left to MLflow's client, which gives the same answer."""
    uri = f"sqlite:///{tmp_path}/m.db"
    db = tmp_path / "m.db"
    registry.publish(_rerun(finished_run, tmp_path / "first", 1), uri)
    again = _rerun(finished_run, tmp_path / "again", 2)
    # The installed MLflow writes a revision this reader was tested on (the lock pins MLflow; a new MLflow
    # with a new revision: compare `_sqlite_view` with its tables, then add the revision).
    revision = reuse.sqlite_schema(db)
    assert revision in reuse.SQLITE_SCHEMAS
    expected = reuse.reused_record(uri, "tiny", "candidate", {"fp16": 1, "fp16-fp32io": 2})
    assert registry.already_registered(again, uri) == expected

    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = '0123456789ab'")
    assert reuse.sqlite_schema(db) == "0123456789ab"
    assert registry.already_registered(again, uri) is None
    with sqlite3.connect(db) as con:  # MLflow's client refuses a store whose schema is not its own
        con.execute("UPDATE alembic_version SET version_num = ?", (revision,))

    # A revision the reader does not know: the registration `optimize run` does asks MLflow's client instead.
    monkeypatch.setattr(reuse, "SQLITE_SCHEMAS", {})
    assert registry.already_registered(again, uri) is None
    assert registry.publish_new(again, uri) == expected
    assert _counts(uri) == (2, 1)


def test_mlflows_private_tracking_uri_variable_is_read_defensively(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`publish` saves and puts back MLflow's process-wide tracking URI, which MLflow keeps in a private
    variable: what is set there is read, and a release without it (or with something else there) reads as
    none set instead of failing."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    uri = f"sqlite:///{tmp_path}/m.db"
    set_before = f"sqlite:///{tmp_path}/set.db"
    mlflow.set_tracking_uri(set_before)
    try:
        assert connection._global_tracking_uri() == set_before
        registry.publish(_rerun(finished_run, tmp_path / "first", 1), uri)
        assert mlflow.get_tracking_uri() == set_before  # put back exactly
        with monkeypatch.context() as patch:
            patch.delattr(tracking_utils, "_tracking_uri")
            assert connection._global_tracking_uri() is None
        with monkeypatch.context() as patch:
            patch.setattr(tracking_utils, "_tracking_uri", object())
            assert connection._global_tracking_uri() is None
    finally:
        mlflow.set_tracking_uri(None)
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_optimize_register_registers_a_reused_run_as_new_versions(finished_run: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/m.db"
    registry.publish(_rerun(finished_run, tmp_path / "first", 1), uri)
    again = _rerun(finished_run, tmp_path / "again", 2)
    assert registry.already_registered(again, uri) is not None
    out = registry.register_run(again, uri)
    assert out.versions == {"fp16": 3, "fp16-fp32io": 4} and out.mlflow_run_id
    manifest = json.loads((again / "manifest.json").read_text())
    assert manifest["registry"]["status"] == "registered"
