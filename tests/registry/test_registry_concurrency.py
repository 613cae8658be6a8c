"""Registrations at the same time: four identical runs registering at once (each in its own process, through
`registry.publish_new`, the step `optimize run` registers with) leave one version per variant and every alias
on the same run's versions, on a local sqlite store (a file lock) and through a real `mlflow server` (create,
look again, keep the lowest copy, and take the other variants from the registration that made it). Four
different runs registered at once on sqlite get their own versions, and the aliases end on one of them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from optimize.registry.reuse import aliases_to_move

PROCESSES = 4
VARIANTS = ("fp16", "fp16-fp32io")

# A worker imports MLflow once, then takes registrations from stdin (one JSON line each: run directory, store,
# how, and two files): it says it is ready, waits for the go file, registers, and prints the result as a line.
# The parent releases the four at one moment, so their registrations overlap instead of queueing behind imports.
WORKER = """
import json, sys, time, traceback
from pathlib import Path
from optimize import registry
import mlflow  # noqa: F401  (the import is most of a worker's start-up)

for line in sys.stdin:
    job = json.loads(line)
    Path(job["ready"]).touch()
    while not Path(job["go"]).exists():
        time.sleep(0.01)
    run_dir, uri = Path(job["run_dir"]), job["uri"]
    try:
        if job["how"] == "new":  # what `optimize run` registers with
            result = registry.publish_new(run_dir, uri)
        else:  # `optimize register RUN_DIR`
            result = registry.register_run(run_dir, uri)
    except Exception:
        result = {"error": traceback.format_exc()}
    print(json.dumps(result if isinstance(result, dict) else result.as_json()), flush=True)
"""


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[subprocess.Popen]]:
    """PROCESSES worker processes for the module's tests, ended at the end of the module."""
    folder = tmp_path_factory.mktemp("workers")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            cwd=folder,
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=(folder / f"worker{i}.log").open("w"),
        )
        for i in range(PROCESSES)
    ]
    try:
        yield procs
    finally:
        for p in procs:  # between jobs a worker holds nothing: no need to wait for its interpreter to wind down
            p.stdin.close()
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite store with its tables made and nothing registered (copied by each test: making the
    tables takes MLflow's migrations). It exists, as a project's `mlflow.db` that registered before does, so
    every worker may read it without MLflow first (`already_registered`)."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    _client(f"sqlite:///{db}").search_registered_models()
    return db


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(finished_run: Path, folder: Path) -> list[Path]:
    """Copies of the shared finished run as PROCESSES runs of the same recipe (their own optimize run ids,
    the same model bytes)."""
    out = []
    for i in range(PROCESSES):
        copy = folder / f"run{i}"
        shutil.copytree(finished_run, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["run_id"] = f"20260101-000000-con{i}"
        (copy / "manifest.json").write_text(json.dumps(manifest))
        out.append(copy)
    return out


def _at_once(workers: list[subprocess.Popen], run_dirs: list[Path], uri: str, how: str, folder: Path) -> list[dict]:
    """Register each run directory in its own worker, all released at the same moment; their results."""
    go, ready = folder / "go", [folder / f"ready{i}" for i in range(len(run_dirs))]
    for proc, run_dir, r in zip(workers, run_dirs, ready, strict=True):
        job = {"run_dir": str(run_dir), "uri": uri, "how": how, "ready": str(r), "go": str(go)}
        proc.stdin.write(json.dumps(job) + "\n")
        proc.stdin.flush()
    deadline = time.monotonic() + 180
    while not all(r.exists() for r in ready):
        assert time.monotonic() < deadline and all(p.poll() is None for p in workers), "a worker did not start"
        time.sleep(0.05)
    go.touch()
    results = [json.loads(_result_line(p)) for p in workers]
    for result in results:
        assert "error" not in result, result.get("error")
    return results


def _result_line(worker: subprocess.Popen) -> str:
    """The worker's next JSON line (anything a library printed to stdout before it is skipped)."""
    while True:
        line = worker.stdout.readline()
        assert line, "a worker ended without a result (see the worker<i>.log files in the workers' folder)"
        if line.startswith("{"):
            return line


def _aliases_on_one_run(client: MlflowClient) -> str:
    """The optimize run id that `candidate` and every `candidate-<variant>` point into (fails when mixed)."""
    model = client.get_registered_model("tiny")
    aliases = {a: int(v) for a, v in model.aliases.items()}
    assert set(aliases) == {"candidate", *(f"candidate-{v}" for v in VARIANTS)}
    assert aliases["candidate"] == aliases["candidate-fp16"]
    owners = {a: client.get_model_version("tiny", str(n)).tags for a, n in aliases.items()}
    for variant in VARIANTS:
        assert owners[f"candidate-{variant}"]["variant"] == variant
    runs = {tags["optimize_run_id"] for tags in owners.values()}
    assert len(runs) == 1, f"aliases point into several runs: {aliases}"
    return runs.pop()


def _one_version_per_variant(results: list[dict], client: MlflowClient) -> dict[str, int]:
    """Checks that the store holds one live version per variant, that every process reported those, and that
    they were made by one process; returns them (variant: version)."""
    live = client.search_model_versions("name = 'tiny'")
    by_variant = {mv.tags["variant"]: int(mv.version) for mv in live}
    assert len(live) == len(VARIANTS) and set(by_variant) == set(VARIANTS), [
        (mv.version, mv.tags["variant"], mv.tags["optimize_run_id"]) for mv in live
    ]
    for result in results:
        assert {**result["already"], **result["versions"]} == by_variant
    makers = [r for r in results if r["versions"]]
    assert len(makers) == 1 and makers[0]["versions"] == by_variant
    assert len({mv.tags["optimize_run_id"] for mv in live}) == 1
    return by_variant


@pytest.mark.slow
def test_identical_runs_at_once_on_sqlite_register_one_version_per_variant(
    workers: list[subprocess.Popen], empty_store: Path, finished_run: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{shutil.copy(empty_store, tmp_path / 'mlflow.db')}"
    results = _at_once(workers, _runs(finished_run, tmp_path), uri, "new", tmp_path)
    client = _client(uri)
    versions = _one_version_per_variant(results, client)
    owner = _aliases_on_one_run(client)
    assert client.get_model_version("tiny", str(versions["fp16"])).tags["optimize_run_id"] == owner
    # Under the lock the others found the model and made no LoggedModel (a copy of its files) either.
    exp = client.get_experiment_by_name("optimize/tiny").experiment_id
    assert len(client.search_logged_models(experiment_ids=[exp])) == len(VARIANTS)


@pytest.mark.slow
def test_identical_runs_at_once_through_a_server_converge_on_the_lowest_versions(
    workers: list[subprocess.Popen], finished_run: Path, tmp_path: Path, mlflow_server_factory: Callable[..., str]
) -> None:
    uri = mlflow_server_factory(tmp_path)
    results = _at_once(workers, _runs(finished_run, tmp_path), uri, "new", tmp_path)
    client = _client(uri)
    versions = _one_version_per_variant(results, client)
    _aliases_on_one_run(client)
    # A copy made at the same moment was deleted with its LoggedModel: the store holds the model's files once.
    exp = client.get_experiment_by_name("optimize/tiny").experiment_id
    models = client.search_logged_models(experiment_ids=[exp])
    kept = {client.get_model_version("tiny", str(n)).source.removeprefix("models:/") for n in versions.values()}
    assert {m.model_id for m in models} == kept, [(m.model_id, m.status, m.tags.get("optimize_run_id")) for m in models]


@pytest.mark.slow
def test_different_runs_at_once_on_sqlite_get_their_own_versions_and_the_aliases_of_one(
    workers: list[subprocess.Popen], empty_store: Path, finished_run: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{shutil.copy(empty_store, tmp_path / 'mlflow.db')}"
    # `optimize register RUN_DIR` registers each run anyway (no reuse): 4 runs × 2 variants.
    results = _at_once(workers, _runs(finished_run, tmp_path), uri, "register", tmp_path)
    client = _client(uri)
    numbers = sorted(n for r in results for n in r["versions"].values())
    assert numbers == list(range(1, PROCESSES * len(VARIANTS) + 1))
    assert len(client.search_model_versions("name = 'tiny'")) == PROCESSES * len(VARIANTS)
    _aliases_on_one_run(client)


def test_aliases_move_together_or_not_at_all() -> None:
    targets = {"candidate": 3, "candidate-a": 3, "candidate-b": 4}
    assert aliases_to_move(targets, {}) == targets
    # Where one alias was left by another registration of the same moment, all of them move to this one's.
    assert aliases_to_move(targets, {"candidate": 1, "candidate-a": 1, "candidate-b": 4}) == {
        "candidate": 3,
        "candidate-a": 3,
    }
    assert aliases_to_move(targets, {"candidate": 3, "candidate-a": 3, "candidate-b": 4}) == {}
    # A later registration holds them (a version newer than any of ours): a late retry moves none back.
    assert aliases_to_move(targets, {"candidate": 5, "candidate-a": 5, "candidate-b": 2}) == {}
    # Other aliases of the model (canary, production) do not count.
    assert aliases_to_move(targets, {"production": 9}) == targets
