"""`optimize smoke`: a registered version downloaded, verified, run on its sample and timed against its
budget, through the real CLI against a sqlite store (and once against a real `mlflow server`)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import build_finished_run, merge, tiny_recipe
from test_cli import _has_cuda_provider, cli, one_error_line

from optimize import registry
from optimize.errors import (
    IntegrityError,
    NotAuthorisedError,
    RecipeError,
    RegistryUnreachableError,
    RuntimeMissingError,
)
from optimize.recipe import Gate
from optimize.registry.smoke import closest_shape, latency_budgets, parse_model_uri, smoke

# fp16 has an absolute latency gate (its budget is the gate's threshold); fp16-fp32io has none (its budget is
# measured × factor, floored).
LATENCY_GATE = "latency.p50_ms <= 1000"


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, unregistered run of the tiny model, written by this code (so its optimize.json carries the
    smoke record): fp16 with a latency gate, fp16-fp32io without one."""
    gates = [*tiny_recipe()["gates"], {"check": LATENCY_GATE, "variants": ["fp16"]}]
    return build_finished_run(tmp_path_factory.mktemp("smoke-run"), {"gates": gates})


def _publish(run_dir: Path, folder: Path, edit: dict[str, dict] | None = None) -> str:
    """Publish a copy of `run_dir` into a sqlite store in `folder` (after replacing, per variant, keys of its
    optimize.json by `edit[variant]`, None deleting one); returns the tracking URI."""
    copy = folder / "run"
    shutil.copytree(run_dir, copy)
    for variant, changes in (edit or {}).items():
        path = copy / "registry" / variant / "optimize.json"
        path.write_text(json.dumps(merge(json.loads(path.read_text()), changes)))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    assert registry.publish(copy, uri).versions == {"fp16": 1, "fp16-fp32io": 2}
    return uri


@pytest.fixture(scope="module")
def store(gated_run: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A sqlite store with the gated run registered (tiny v1 = fp16 @candidate, v2 = fp16-fp32io); read only."""
    return _publish(gated_run, tmp_path_factory.mktemp("store"))


@pytest.fixture()
def own_store(gated_run: Path, tmp_path: Path) -> str:
    """A store of this test's own, to tamper with."""
    return _publish(gated_run, tmp_path)


def stored(uri: str, version: int, name: str) -> Path:
    """The file `name` of a version's artifacts inside a sqlite store's artifact folder."""
    from mlflow import MlflowClient

    location = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_download_uri("tiny", str(version))
    path = Path(urllib.parse.urlparse(location).path) / name
    assert path.is_file(), path
    return path


# --- the budget rule -------------------------------------------------------------------------------


def _results(**p50_by_target: dict[str, float]) -> dict[str, dict]:
    return {t: {"shapes": {k: {"p50_ms": v} for k, v in shapes.items()}} for t, shapes in p50_by_target.items()}


def test_closest_shape_is_nearest_in_ratio_and_ties_go_to_the_smaller() -> None:
    assert closest_shape(["batch=1", "batch=8"], {"batch": 16}) == "batch=8"
    assert closest_shape(["batch=8", "batch=32"], {"batch": 16}) == "batch=8"
    assert closest_shape(["batch=1,sequence=64", "batch=16,sequence=64"], {"batch": 16, "sequence": 32}) == (
        "batch=16,sequence=64"
    )


def test_budget_is_the_covering_gate_else_factor_times_measured_p50_floored() -> None:
    results = _results(**{"onnxruntime-cpu": {"batch=1": 0.5, "batch=8": 2.0}, "torch-cpu": {"batch=8": 1.0}})
    sizes = {"batch": 16}
    budgets = latency_budgets("fp16", results, [], sizes)
    assert budgets == {
        "onnxruntime-cpu": {"shape": "batch=8", "p50_ms": 2.0, "budget_ms": 6.0, "source": "measured"}
    }  # torch times the source module, which a version does not carry
    assert latency_budgets("fp16", _results(**{"onnxruntime-cpu": {"batch=8": 0.01}}), [], sizes)["onnxruntime-cpu"][
        "budget_ms"
    ] == pytest.approx(1.0)  # floored

    def budget(*gates: dict) -> dict:
        return latency_budgets("fp16", results, [Gate.model_validate(g) for g in gates], sizes)["onnxruntime-cpu"]

    assert budget({"check": "latency.p50_ms <= 10"}) == {
        "shape": "batch=8",
        "p50_ms": 2.0,
        "budget_ms": 10.0,
        "source": "gate",
        "check": "latency.p50_ms <= 10",
    }
    assert (
        budget({"check": "latency.p50_ms <= 10"}, {"check": "latency.p50_ms < 7", "target": "onnxruntime-cpu"})[
            "budget_ms"
        ]
        == 7.0
    )  # the tightest covering gate
    for not_covering in (
        {"check": "latency.p50_ms <= 10", "variants": ["other"]},
        {"check": "latency.p50_ms <= 10", "target": "onnxruntime-cuda"},
        {"check": "latency.p50_ms <= 10", "shape": {"batch": 1}},  # not the shape the smoke check times
        {"check": "latency.p99_ms <= 10"},
        {"check": "latency.p50_speedup >= 1.1"},
    ):
        assert budget(not_covering)["source"] == "measured", not_covering
    assert budget({"check": "latency.p50_ms <= 10", "shape": {"batch": 8}})["source"] == "gate"


def test_registry_folder_records_budgets_and_golden_target(gated_run: Path) -> None:
    metrics = json.loads((gated_run / "metrics.json").read_text())
    gated = json.loads((gated_run / "registry" / "fp16" / "optimize.json").read_text())
    assert gated["golden_target"] == "onnxruntime-cpu"
    assert gated["golden"] == {"onnxruntime-cpu": "golden_outputs.npz"}
    smoke_rec = gated["smoke"]
    assert (smoke_rec["budget_factor"], smoke_rec["warmup"], smoke_rec["iterations"]) == (3.0, 5, 30)
    # The sample batch is 16; benchmark shapes are batch 1 and 8.
    assert smoke_rec["latency_budget"]["onnxruntime-cpu"] == {
        "shape": "batch=8",
        "p50_ms": metrics["results"]["fp16"]["onnxruntime-cpu"]["shapes"]["batch=8"]["p50_ms"],
        "budget_ms": 1000.0,
        "source": "gate",
        "check": LATENCY_GATE,
    }
    measured = json.loads((gated_run / "registry" / "fp16-fp32io" / "optimize.json").read_text())
    budget = measured["smoke"]["latency_budget"]["onnxruntime-cpu"]
    p50 = metrics["results"]["fp16-fp32io"]["onnxruntime-cpu"]["shapes"]["batch=8"]["p50_ms"]
    assert budget == {"shape": "batch=8", "p50_ms": p50, "budget_ms": max(3.0 * p50, 1.0), "source": "measured"}


# --- passing -----------------------------------------------------------------------------------------


def test_smoke_passes_through_the_cli(store: str, tmp_path: Path) -> None:
    proc = cli("smoke", "models:/tiny@candidate", "--tracking-uri", store, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("models:/tiny@candidate: ok on onnxruntime-cpu — max |diff| ")
    assert "(budget 1000.000 ms)" in proc.stdout
    assert proc.stderr == ""  # no download progress bar
    assert list(tmp_path.iterdir()) == [], "nothing may be left in the working folder"


def test_smoke_returns_what_it_checked(store: str) -> None:
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service import utils as tracking_utils

    before = (
        tracking_utils._tracking_uri,
        os.environ.get("MLFLOW_TRACKING_URI"),
        os.environ.get("MLFLOW_REGISTRY_URI"),
    )
    out = smoke("models:/tiny/2", tracking_uri=store)
    after = (tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
    assert after == before, "the process-wide MLflow URIs are left as they were"
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
    mv = MlflowClient(tracking_uri=store, registry_uri=store).get_model_version("tiny", "2")
    assert out["model"] == "tiny" and out["version"] == 2 and out["uri"] == "models:/tiny/2"
    assert out["target"] == "onnxruntime-cpu" and out["golden_target"] == "onnxruntime-cpu"
    assert out["sha256"] == mv.tags["sha256"]
    assert out["worst_output"] == "logits" and 0.0 <= out["max_abs_error"] < 1e-4
    assert out["latency_check"] == "passed" and out["budget_source"] == "measured"
    assert out["latency_shape"] == "batch=8" and out["budget_ms"] >= 1.0 and out["p50_ms"] > 0


def test_a_version_registered_without_a_budget_skips_the_latency_check(gated_run: Path, tmp_path: Path) -> None:
    legacy = {"smoke": None, "golden": None, "golden_target": None}  # optimize.json as first registered
    uri = _publish(gated_run, tmp_path, {"fp16": legacy})
    out = smoke("models:/tiny@candidate", tracking_uri=uri, target="onnxruntime-cpu")
    assert out["latency_check"] == "skipped" and out["budget_ms"] is None and out["golden_target"] is None
    assert out["max_abs_error"] < 1e-4  # compared with golden_outputs.npz all the same
    assert out["p50_ms"] > 0  # measured on the sample batch, reported, not judged
    proc = cli("smoke", "models:/tiny@candidate", "--tracking-uri", uri, cwd=tmp_path)
    assert proc.returncode == 0 and "budget" not in proc.stdout, proc.stdout + proc.stderr


# --- integrity (exit 6) ------------------------------------------------------------------------------


def test_a_tampered_model_exits_6(own_store: str, tmp_path: Path) -> None:
    with open(stored(own_store, 1, "model.onnx"), "ab") as fh:
        fh.write(b"\0")
    proc = cli("smoke", "models:/tiny@candidate", "--tracking-uri", own_store, cwd=tmp_path)
    assert proc.returncode == 6, proc.stderr
    line = one_error_line(proc)
    assert "model.onnx sha256" in line and "differs from the version's" in line


def test_altered_golden_outputs_exit_6_naming_the_output(own_store: str, tmp_path: Path) -> None:
    path = stored(own_store, 1, "golden_outputs.npz")
    golden = dict(np.load(path))
    golden["logits"] = golden["logits"].copy()
    golden["logits"][3, 1] += 0.5
    np.savez(path, **golden)
    proc = cli("smoke", "models:/tiny@candidate", "--tracking-uri", own_store, cwd=tmp_path)
    assert proc.returncode == 6, proc.stderr
    line = one_error_line(proc)
    assert "output 'logits' differs from its golden outputs: 1 of 64 value(s) out of tolerance" in line
    assert "at (3, 1) |diff| 0.5" in line and "atol 0.0001 + rtol 0.001" in line


def test_non_finite_outputs_exit_6(own_store: str) -> None:
    path = stored(own_store, 1, "sample_inputs.npz")
    sample = dict(np.load(path))
    sample["x"] = sample["x"].copy()
    sample["x"][0, 0] = np.nan
    np.savez(path, **sample)
    with pytest.raises(IntegrityError, match=r"output 'logits' has 4 NaN/Inf value\(s\) of 64") as e:
        smoke("models:/tiny@candidate", tracking_uri=own_store)
    assert e.value.exit_code == 6


# --- latency (exit 1) --------------------------------------------------------------------------------


def test_an_impossible_budget_exits_1(gated_run: Path, tmp_path: Path) -> None:
    impossible = {"smoke": {"latency_budget": {"onnxruntime-cpu": {"budget_ms": 1e-6}}}}
    uri = _publish(gated_run, tmp_path, {"fp16": impossible})
    proc = cli("smoke", "models:/tiny@candidate", "--tracking-uri", uri, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc)
    assert "on onnxruntime-cpu: p50 " in line and "ms at batch=8 is over its budget 0.000 ms" in line
    assert f"the recipe's gate `{LATENCY_GATE}`" in line


# --- runtimes (exit 4) -------------------------------------------------------------------------------


def test_a_missing_runtime_asked_for_exits_4(store: str, tmp_path: Path) -> None:
    if _has_cuda_provider():
        pytest.skip("this machine has ONNX Runtime's CUDA provider")
    proc = cli("smoke", "models:/tiny@candidate", "--target", "onnxruntime-cuda", "--tracking-uri", store, cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert "cannot run on onnxruntime-cuda: " in one_error_line(proc)
    assert "CUDAExecutionProvider" in proc.stderr


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("tensorrt", "the version carries no TensorRT engine for this GPU"),
        ("torch-cpu", "runs the source PyTorch module, which a registered version does not carry"),
    ],
)
def test_a_target_the_version_carries_nothing_for_exits_4(store: str, target: str, why: str) -> None:
    with pytest.raises(RuntimeMissingError, match=why) as e:
        smoke("models:/tiny@candidate", tracking_uri=store, target=target)
    assert e.value.exit_code == 4


# --- usage (exit 2), registry (exit 5, 7) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/tiny@nope", "model 'tiny' has no alias 'nope' (its aliases: candidate, candidate-fp16, "),
        ("models:/tiny/9", "model 'tiny' has no version 9"),
        ("models:/other@candidate", "no registered model 'other' in sqlite:///"),
        ("runs:/abc/model", "is not a registered model URI; use models:/NAME@ALIAS or models:/NAME/VERSION"),
        ("models:/tiny", "is not a registered model URI; use models:/NAME@ALIAS or models:/NAME/VERSION"),
    ],
)
def test_unknown_or_malformed_uris_exit_2(store: str, tmp_path: Path, uri: str, expected: str) -> None:
    proc = cli("smoke", uri, "--tracking-uri", store, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert expected in one_error_line(proc)


def test_parse_model_uri() -> None:
    assert parse_model_uri("models:/tiny@candidate") == ("tiny", "candidate", None)
    assert parse_model_uri("models:/my.model-x/12") == ("my.model-x", None, 12)
    for bad in ("models:/tiny/latest", "models:/a/b/1", "models:/@x", "tiny@candidate"):
        with pytest.raises(RecipeError):
            parse_model_uri(bad)
    with pytest.raises(RecipeError, match="unknown target 'gpu'"):
        smoke("models:/tiny@candidate", tracking_uri="sqlite:///unused.db", target="gpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_registry_exits_5() -> None:
    with pytest.raises(RegistryUnreachableError, match="cannot reach") as e:
        smoke("models:/tiny@candidate", tracking_uri=f"http://127.0.0.1:{_free_port()}")
    assert e.value.exit_code == 5


@pytest.fixture()
def refusing_server() -> Iterator[str]:
    """An HTTP server that answers 401 to everything (a tracking server whose credentials we lack)."""

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_refused_credentials_exit_7(refusing_server: str) -> None:
    with pytest.raises(NotAuthorisedError, match=r"refused the request \(HTTP 401") as e:
        smoke("models:/tiny@candidate", tracking_uri=refusing_server)
    assert e.value.exit_code == 7


# --- a real server -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_against_a_real_server(mlflow_server: str, gated_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(gated_run, copy)
    assert registry.publish(copy, mlflow_server).versions == {"fp16": 1, "fp16-fp32io": 2}
    proc = cli("smoke", "models:/tiny@candidate-fp16-fp32io", "--tracking-uri", mlflow_server, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("models:/tiny@candidate-fp16-fp32io: ok on onnxruntime-cpu")
    assert not (tmp_path / "mlflow.db").exists(), "nothing may go to the local default store"
