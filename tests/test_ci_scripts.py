"""The ci/ scripts as a CI stage (or a developer) runs them, on the tiny model with a real MLflow store:
run-recipes writes JUnit and the summary and fails on an impossible gate naming it; publish registers; canary
promotes, smoke-checks and rolls back when the check fails."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, build_finished_run

CI_VARS = ("CI", "JENKINS_URL", "GITHUB_STEP_SUMMARY", "MLFLOW_TRACKING_URI", "CI_OUT", "OPTIMIZE_VENV")


def ci(script: str, *args: str, cwd: Path, out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`bash ci/<script> args` from `cwd`, with this test environment's venv as the project's venv."""
    full = {k: v for k, v in os.environ.items() if k not in CI_VARS}
    full.update({"OPTIMIZE_VENV": sys.prefix, "CI_OUT": str(out), **env})
    return subprocess.run(
        ["bash", str(REPO / "ci" / script), *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=900
    )


def test_run_recipes_writes_junit_and_summary_and_fails_on_an_impossible_gate(write_recipe, tiny_dir: Path) -> None:
    good = write_recipe(name="good.yaml")
    impossible = write_recipe({"gates": ["accuracy.cosine_min >= 0.99", "size.ratio <= 0.01"]}, name="impossible.yaml")
    step_summary = tiny_dir / "github-step-summary.md"
    step_summary.write_text("# before\n")
    out = tiny_dir / "ci-out"
    # relative paths are the caller's, though the scripts work from the repository root
    proc = ci(
        "run-recipes.sh", "good.yaml", "impossible.yaml", "missing.yaml", cwd=tiny_dir, out=out,
        GITHUB_STEP_SUMMARY=str(step_summary),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the first failure's status: a gate failed
    assert f"{impossible}: exit 1" in proc.stderr and f"{tiny_dir / 'missing.yaml'}: exit 2" in proc.stderr
    assert f"{good}: exit" not in proc.stderr

    passed = ET.parse(out / "junit" / "optimize-good.xml").getroot()
    assert passed.get("tests") == "2" and passed.get("failures") == "0" and passed.get("errors") == "0"
    failed = ET.parse(out / "junit" / "optimize-impossible.xml").getroot()
    assert failed.get("tests") == "2" and failed.get("failures") == "1"
    (failure,) = failed.iter("failure")
    assert "size.ratio <= 0.01 failed" in failure.get("message") and "fp32 baseline: 1" in failure.get("message")
    missing = ET.parse(out / "junit" / "optimize-missing.xml").getroot()
    assert missing.find("./testsuite/testcase/error").get("type") == "exit 2 (bad recipe or usage)"

    summary = (out / "summary.md").read_text()
    assert summary.count("### ✅ tiny: PASSED") == 1 and summary.count("### ❌ tiny: FAILED") == 1
    assert "`size.ratio <= 0.01`" in summary and "missing.yaml: exit 2" in summary
    assert step_summary.read_text() == "# before\n" + summary
    assert len(list((out / "runs" / "tiny").glob("*/verdict.json"))) == 2


def test_a_required_runtime_that_is_missing_fails_the_stage_with_exit_4(write_recipe, tiny_dir: Path) -> None:
    # what ci/gpu-stage.sh does on a runner without TensorRT: no skip, exit 4, an <error> in JUnit
    from optimize.runtimes import unavailable_reason

    if not unavailable_reason("tensorrt"):
        pytest.skip("TensorRT is installed here: nothing is missing")
    write_recipe(name="r.yaml")
    out = tiny_dir / "ci-out"
    proc = ci("run-recipes.sh", "--require-target", "tensorrt", "r.yaml", cwd=tiny_dir, out=out)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    error = ET.parse(out / "junit" / "optimize-r.xml").getroot().find("./testsuite/testcase/error")
    assert error.get("type") == "exit 4 (a required runtime is missing)"
    assert "tensorrt is required but not available" in error.get("message")
    assert "exit 4 (a required runtime is missing)" in (out / "summary.md").read_text()


def test_run_recipes_usage_errors(tmp_path: Path) -> None:
    proc = ci("run-recipes.sh", cwd=tmp_path, out=tmp_path / "out")
    assert proc.returncode == 2 and "usage: bash ci/run-recipes.sh" in proc.stderr
    proc = ci("run-recipes.sh", "--bogus", "x.yaml", cwd=tmp_path, out=tmp_path / "out")
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr
    proc = ci("run-recipes.sh", "x.yaml", cwd=tmp_path, out=tmp_path / "out", OPTIMIZE_VENV=str(tmp_path / "none"))
    assert proc.returncode == 2 and "run `bash ci/setup.sh cpu`" in proc.stderr


def test_publish_refuses_to_guess_the_registry_in_ci(tmp_path: Path) -> None:
    (tmp_path / "out" / "runs").mkdir(parents=True)
    proc = ci("publish.sh", "some-run", cwd=tmp_path, out=tmp_path / "out", CI="true")
    assert proc.returncode == 2 and "MLFLOW_TRACKING_URI is not set" in proc.stderr


def _aliases(uri: str) -> dict[str, int]:
    from mlflow import MlflowClient

    return {a: int(v) for a, v in MlflowClient(uri).get_registered_model("tiny").aliases.items()}


@pytest.mark.slow
def test_publish_then_canary_promotes_and_rolls_back_a_failing_smoke_check(finished_run: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    out = tmp_path / "ci-out"
    run1 = tmp_path / "run1"
    shutil.copytree(finished_run, run1)
    # the finished run's recipe (name: tiny), its canary load-tested in one short step; and the same with an SLO
    # no server meets (p99 under 1 µs)
    folder = finished_run.parent.parent.parent
    plain = yaml.safe_load((folder / "r.yaml").read_text())
    plain["model"]["python_path"] = [str(folder)]
    plain["data"]["eval"]["path"] = str(folder / "tiny.npz")
    plain["serving"] = {"load": {"rps": [10], "step_s": 1}}
    plain["rollout"] = {"cpu": 0.25, "memory_mb": 256}  # its versions are not load-tested at registration
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(plain))
    plain["serving"]["slo"] = {"p99_ms": 0.001}
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(plain))

    proc = ci("publish.sh", str(run1), cwd=tmp_path, out=out, MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "registered tiny version 1" in proc.stdout
    candidate = _aliases(uri)["candidate"]

    proc = ci("canary.sh", "canary", str(recipe), cwd=tmp_path, out=out, MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _aliases(uri)["canary"] == candidate
    loadtest = json.loads((out / "loadtest" / "tiny-canary.json").read_text())
    assert [s["rps"] for s in loadtest["steps"]] == [10] and loadtest["max_rps_at_slo"] == 10
    proc = ci("canary.sh", "production", str(recipe), cwd=tmp_path, out=out, MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _aliases(uri)["production"] == candidate

    # a second run, registered; its stored golden outputs then corrupted: the canary's smoke check fails
    (tmp_path / "second").mkdir()
    run2 = build_finished_run(tmp_path / "second")
    before = set(store.rglob("golden_outputs.npz"))
    proc = ci("publish.sh", str(run2), cwd=tmp_path, out=out, MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    new_candidate = _aliases(uri)["candidate"]
    assert new_candidate != candidate

    # a canary over the SLO under load (exit 1) is rolled back: it cannot go to production
    proc = ci("canary.sh", "canary", str(strict), cwd=tmp_path, out=out, MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "load test of canary failed (exit 1): rolling canary back" in proc.stderr
    assert _aliases(uri)["canary"] == candidate

    for golden in set(store.rglob("golden_outputs.npz")) - before:
        with np.load(golden) as z:
            bad = {k: z[k] + 1.0 for k in z.files}
        np.savez(golden, **bad)

    proc = ci("canary.sh", "canary", str(recipe), cwd=tmp_path, out=out, MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 6, proc.stdout + proc.stderr  # the smoke check's status: not what was gated
    assert "smoke check of canary failed (exit 6): rolling canary back" in proc.stderr
    assert _aliases(uri)["canary"] == candidate, "the canary must be back on the version before"
    assert _aliases(uri)["production"] == candidate

    # a rejected canary is rolled back by `abort`; a second rollback in a row moves nothing
    proc = ci("canary.sh", "abort", str(recipe), cwd=tmp_path, out=out, MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "already rolled back" in proc.stdout and _aliases(uri)["canary"] == candidate

    _rollout_renders_validates_and_rolls_back(recipe, tmp_path, out, uri, candidate, new_candidate)


def _rollout_renders_validates_and_rolls_back(
    recipe: Path, tmp_path: Path, out: Path, uri: str, stable: int, canary: int
) -> None:
    """`canary.sh rollout`: an image is required; without cluster credentials it renders and validates only;
    with them (kubectl here is a test double that records what it is asked to apply) it applies, sets the first
    weight, and when the analysis fails (no Prometheus answers) sends the traffic back to stable and rolls the
    canary alias back."""
    proc = ci("canary.sh", "rollout", str(recipe), cwd=tmp_path, out=out, MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 2 and "OPTIMIZE_IMAGE is not set" in proc.stderr

    # the second version as the canary, the first in production
    subprocess.run(
        [sys.executable, "-m", "optimize", "promote", "tiny", "--from", "candidate", "--to", "canary",
         "--tracking-uri", uri], check=True, capture_output=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert _aliases(uri)["canary"] == canary
    image = {"OPTIMIZE_IMAGE": "registry.example/optimize:test", "MLFLOW_TRACKING_URI": uri}
    proc = ci("canary.sh", "rollout", str(recipe), cwd=tmp_path, out=out, **image)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no cluster credentials" in proc.stderr and "nothing applied" in proc.stderr
    record = json.loads((out / "deploy" / "tiny" / "render.json").read_text())
    assert (record["canary"]["number"], record["stable"]["number"]) == (canary, stable)

    # kubectl: a test double on PATH that logs its arguments and the VirtualService weights it is given
    bin_dir, log = tmp_path / "bin", tmp_path / "kubectl.log"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {log}\n'
        'for a in "$@"; do case "$a" in *virtualservice.applied.yaml) '
        f"grep -A1 'subset:' \"$a\" | grep -o 'subset: [a-z]*\\|weight: [0-9]*' | paste -sd' ' >> {log};; esac; done\n"
    )
    (bin_dir / "kubectl").chmod(0o755)
    closed = f"http://127.0.0.1:{_closed_port()}"
    proc = ci(
        "canary.sh", "rollout", str(recipe), cwd=tmp_path, out=out, KUBECONFIG=str(tmp_path / "kubeconfig"),
        PATH=f"{bin_dir}:{os.environ['PATH']}", PROMETHEUS_URL=closed, **image,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stdout + proc.stderr  # the analysis's status: Prometheus did not answer
    applied = log.read_text().splitlines()
    assert applied[0].startswith("apply -f") and "prometheusrule.yaml" in applied[0] and "kubernetes" in applied[0]
    assert applied[2] == "subset: stable weight: 90 subset: canary weight: 10", applied
    assert applied[4] == "subset: stable weight: 100 subset: canary weight: 0", applied
    assert "the analysis at 10 % failed (exit 3): all traffic back to stable" in proc.stderr
    assert _aliases(uri)["canary"] == stable, "the canary alias is rolled back"


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_canary_stops_on_a_recipe_that_does_not_validate(tmp_path: Path) -> None:
    proc = ci(
        "canary.sh", "canary", "nope.yaml", cwd=tmp_path, out=tmp_path / "out",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'm.db'}",
    )  # fmt: skip
    assert proc.returncode == 2 and "nope.yaml: file not found" in proc.stdout + proc.stderr
    proc = ci("canary.sh", "sideways", "r.yaml", cwd=tmp_path, out=tmp_path / "out")
    assert proc.returncode == 2 and "usage: bash ci/canary.sh" in proc.stderr
