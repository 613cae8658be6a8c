"""`optimize deploy render` end to end: a tiny model run with `serving.loadtest: true` and registered in a real
sqlite MLflow store, rendered from the registry (pods sized from its measured load test), written whole, and
checked by `optimize deploy validate` with every validator; its error paths (not load-tested, tampered artifact,
the canary named as stable) leave an existing output folder as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import merge, mlp_onnx, tiny_recipe, write_tiny_data
from mlflow import MlflowClient

from optimize.deploy import render
from optimize.errors import IntegrityError, RecipeError
from optimize.pipeline import RunOptions, run
from optimize.registry import tags as tag

REPO = Path(__file__).resolve().parents[2]
NODE_MODULES = REPO / "ci" / "tools" / "node_modules"
IMAGE = "registry.example/optimize:test"


def _optimize(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPTIMIZE_NODE_MODULES": str(NODE_MODULES)}
    return subprocess.run(
        [sys.executable, "-m", "optimize", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A sqlite store holding `tiny`: version 1 (load-tested on 127.0.0.1 in its run, alias production) and
    version 2 (the same registered model again, as a new release of it would be: alias canary)."""
    folder = tmp_path_factory.mktemp("deploy")
    recipe = folder / "recipe.yaml"
    overrides = {
        "model": {"source": "onnx", "path": "tiny.onnx", "entry_point": None, "python_path": None},
        "serving": {"loadtest": True, "load": {"rps": [20], "step_s": 1}},
        "benchmark": {"shapes": [{"batch": 1}], "warmup": 1, "iterations": 5},
        "rollout": {"replicas": {"min": 2, "max": 4}, "rps": 30},
    }
    write_tiny_data(folder)
    recipe.write_text(yaml.safe_dump(merge(tiny_recipe(), overrides), sort_keys=False))
    mlp_onnx(folder / "tiny.onnx")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    result = run(recipe, RunOptions(runs_dir=folder / "runs", quiet=True, tracking_uri=uri))
    assert result.exit_code == 0
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    first = client.get_model_version_by_alias("tiny", "candidate")
    second = _copy_version(client, first, dict(first.tags))
    client.set_registered_model_alias("tiny", tag.PRODUCTION, first.version)
    client.set_registered_model_alias("tiny", tag.CANARY, second.version)
    return uri, folder


def _copy_version(client: MlflowClient, mv: Any, tags: dict[str, str]) -> Any:
    """A new version of mv's registered model from the same artifacts (its storage location), with `tags`."""
    where = client.get_model_version_download_uri(mv.name, mv.version)
    return client.create_model_version(mv.name, where, run_id=mv.run_id, tags=tags)


def test_a_registered_load_tested_version_renders_and_validates(store: tuple[str, Path], tmp_path: Path) -> None:
    uri, _ = store
    out = tmp_path / "deploy"
    proc = _optimize(
        "deploy", "render", "models:/tiny@canary", "--image", IMAGE, "--out", str(out), "--tracking-uri", uri,
        "--format", "kubernetes", "--format", "triton", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "rendered models:/tiny/2, stable models:/tiny/1" in proc.stderr + proc.stdout

    record = json.loads((out / "render.json").read_text())
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tags = client.get_model_version("tiny", "2").tags
    # the pods are sized from what the version measured (its loadtest.* tags), not from stated numbers
    measured = record["canary"]["measured"]
    assert measured["cpu_cores"] == pytest.approx(float(tags[tag.LOADTEST_CPU_CORES]))
    assert measured["rss_peak_mb"] == pytest.approx(float(tags[tag.LOADTEST_RSS_PEAK_MB]))
    assert record["stable"]["number"] == 1 and record["canary"]["number"] == 2
    for rel in record["files"]:
        assert (out / rel).is_file(), rel

    canary = yaml.safe_load((out / "kubernetes" / "deployment-canary.yaml").read_text())
    container = canary["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == IMAGE and "models:/tiny/2" in container["args"]
    stable = yaml.safe_load((out / "kubernetes" / "deployment-stable.yaml").read_text())
    assert "models:/tiny/1" in stable["spec"]["template"]["spec"]["containers"][0]["args"]
    assert (out / "triton" / "tiny" / "config.pbtxt").is_file()

    checked = _optimize("deploy", "validate", str(out), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _render(canary: str, out: Path, uri: str, **options: Any) -> render.Rendered:
    """`optimize deploy render` in this process (the CLI's own function; the first test runs the command)."""
    settings: dict[str, Any] = {
        "stable_uri": None, "image": IMAGE, "out": out, "formats": ("kubernetes",), "tracking_uri": uri,
        "recipe": None, "engine": None, "cluster_tracking_uri": None,
        "prometheus_address": render.DEFAULT_PROMETHEUS, "echo": lambda line: None,
    }  # fmt: skip
    return render.main(canary, **{**settings, **options})


def test_a_version_that_was_not_load_tested_needs_stated_resources(store: tuple[str, Path], tmp_path: Path) -> None:
    uri, folder = store
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    first = client.get_model_version("tiny", "1")
    bare = _copy_version(client, first, {k: v for k, v in first.tags.items() if not k.startswith("loadtest.")})
    out = tmp_path / "deploy"
    (out / "kubernetes").mkdir(parents=True)
    (out / "kubernetes" / "kept.yaml").write_text("kept: true\n")

    with pytest.raises(RecipeError) as e:
        _render(f"models:/tiny/{bare.version}", out, uri)
    assert e.value.exit_code == 2 and "rollout.cpu" in str(e.value) and "serving.loadtest" in str(e.value)
    # a failed render leaves the folder as it was, and no temporary folder beside it
    assert (out / "kubernetes" / "kept.yaml").read_text() == "kept: true\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy"]

    # stated resources (a recipe's rollout.cpu and rollout.memory_mb) render it, into a folder replaced whole
    stated = tmp_path / "stated.yaml"
    stated.write_text(
        yaml.safe_dump({"extends": str(folder / "recipe.yaml"), "rollout": {"cpu": 0.5, "memory_mb": 512}})
    )
    done = _render(f"models:/tiny/{bare.version}", out, uri, recipe=stated)
    assert done.sizing is not None and done.sizing.cpu_request == "500m" and done.sizing.memory == "512Mi"
    assert not (out / "kubernetes" / "kept.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy", "stated.yaml"]


def test_a_tampered_canary_is_refused(store: tuple[str, Path], tmp_path: Path) -> None:
    uri, _ = store
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    first = client.get_model_version("tiny", "1")
    forged = _copy_version(client, first, {**first.tags, tag.SHA256: "0" * 64})
    with pytest.raises(IntegrityError):
        _render(f"models:/tiny/{forged.version}", tmp_path / "d", uri)
    assert not (tmp_path / "d").exists()


def test_the_canary_cannot_be_its_own_stable(store: tuple[str, Path], tmp_path: Path) -> None:
    uri, _ = store
    with pytest.raises(RecipeError, match="the canary itself"):
        _render("models:/tiny@canary", tmp_path / "d", uri, stable_uri="models:/tiny/2")
