"""`optimize serve` of what the pipeline made: a registered version from a real sqlite MLflow store (its outputs
equal its golden outputs; a model.onnx altered after registration is refused with exit 6), a run folder's
variant, and the command line's usage errors."""

from __future__ import annotations

import json
import re
import shutil
import socket
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from test_cli import cli, one_error_line

from optimize import registry
from optimize.errors import IntegrityError, RecipeError
from optimize.files import read_npz
from optimize.serving.server import bind, resolve_source, start_local


@pytest.fixture(scope="module")
def store(finished_run: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A sqlite store with the tiny run registered: v1 = fp16 (@candidate), v2 = fp16-fp32io."""
    folder = tmp_path_factory.mktemp("store")
    shutil.copytree(finished_run, folder / "run")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    assert registry.publish(folder / "run", uri).versions == {"fp16": 1, "fp16-fp32io": 2}
    return uri


def stored(uri: str, version: int, name: str) -> Path:
    """The file `name` of a version's artifacts inside a sqlite store's artifact folder."""
    from mlflow import MlflowClient

    location = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_download_uri("tiny", str(version))
    path = Path(urllib.parse.urlparse(location).path) / name
    assert path.is_file(), path
    return path


def infer(url: str, model: str, x: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    req = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        out = json.loads(r.read())["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_a_registered_version_is_downloaded_and_verified(store: str, finished_run: Path, tmp_path: Path) -> None:
    meta = json.loads((finished_run / "registry" / "fp16" / "optimize.json").read_text())
    model = resolve_source("models:/tiny@candidate", tracking_uri=store, workdir=tmp_path)
    assert (model.name, model.version, model.variant, model.target) == ("tiny", "1", "fp16", "onnxruntime-cpu")
    assert model.sha256 == meta["sha256"] and model.path.is_relative_to(tmp_path)
    assert model.tolerance == (meta["tolerance"]["atol"], meta["tolerance"]["rtol"])
    assert model.settings.max_batch_size == 16  # the recorded recipe has no serving section: the defaults
    asked = resolve_source("models:/tiny/1", tracking_uri=store, workdir=tmp_path / "again", overrides={"max_queue": 3})
    assert asked.settings.max_queue == 3


def test_an_altered_model_is_refused_with_exit_6(store: str, tmp_path: Path) -> None:
    with open(stored(store, 2, "model.onnx"), "ab") as fh:
        fh.write(b"\0")
    proc = cli("serve", "models:/tiny/2", "--tracking-uri", store, "--port", "0", cwd=tmp_path)
    assert proc.returncode == 6, proc.stderr
    line = one_error_line(proc)
    assert line.startswith("error: serve: models:/tiny/2 (version 2): model.onnx sha256 ")
    assert "differs from the version's" in line
    assert proc.stdout == ""  # never served


def test_a_run_folder_variant_is_served_and_checked(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    folder = run / "registry" / "fp16"
    sample, golden = read_npz(folder / "sample_inputs.npz"), read_npz(folder / "golden_outputs.npz")
    with start_local(run, variant="fp16", timeout_s=60) as local:
        assert (local.ready["model"], local.ready["variant"]) == ("tiny", "fp16")
        assert local.ready["version"] == json.loads((run / "manifest.json").read_text())["run_id"]
        got = infer(local.url, "tiny", sample["x"])
        assert local.log.read_text() == f"serving tiny (fp16, onnxruntime-cpu) at {local.url}\n"
    np.testing.assert_allclose(got, golden["logits"], atol=1e-4, rtol=1e-3)  # the recipe's tolerance
    with pytest.raises(RecipeError, match=r"name the variant to serve with --variant \(its variants: fp32, fp16, "):
        resolve_source(str(run), workdir=tmp_path)
    model = resolve_source(str(run), variant="fp32", workdir=tmp_path)  # not registered: its artifact
    assert model.path == (run / "artifacts" / "fp32.onnx").resolve() and model.variant == "fp32"
    with open(run / "registry" / "fp16-fp32io" / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(IntegrityError, match=r"sha256 .* differs from the run's record") as e:
        resolve_source(str(run), variant="fp16-fp32io", workdir=tmp_path)
    assert e.value.exit_code == 6


@pytest.mark.parametrize(
    ("source", "options", "expected"),
    [
        ("nothing-here", {}, "is neither models:/NAME@ALIAS, models:/NAME/VERSION, a run folder nor an .onnx file"),
        ("models:/tiny", {}, "is not a registered model URI"),
        ("m.onnx", {"target": "tensorrt"}, "serve loads an ONNX model on ONNX Runtime"),
        ("m.onnx", {"overrides": {"max_batch_size": 0}}, "--max-batch-size: Input should be greater than or equal"),
        ("m.onnx", {"variant": "fp16"}, "--variant applies to a run folder, not an .onnx file"),
        ("models:/tiny@candidate", {"variant": "fp16"}, "--variant applies to a run folder"),
    ],
)
def test_bad_sources_and_options_are_recipe_errors(tmp_path: Path, source: str, options: dict, expected: str) -> None:
    (tmp_path / "m.onnx").write_bytes(b"never loaded: the arguments are checked first")
    with pytest.raises(RecipeError, match=re.escape(expected)) as e:
        resolve_source(source, workdir=tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'none.db'}", **options)
    assert e.value.exit_code == 2


def test_help_names_the_sources_routes_and_drain(tmp_path: Path) -> None:
    proc = cli("serve", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for words in (
        "models:/NAME@ALIAS, models:/NAME/VERSION, a run folder",
        "--ready-file",
        "--max-queue-delay-ms",
        "/v2/health/live",
        "exit 6",
        "Retry-After",
        "serving.drain_s",
    ):
        assert words in text, words


def test_a_port_in_use_is_a_recipe_error_before_the_model_loads() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RecipeError, match=rf"serve: cannot listen on 127.0.0.1:{port}: .*choose another --port"):
            bind("127.0.0.1", port)
    with bind("127.0.0.1", 0) as free:
        assert free.getsockname()[1] > 0


def test_start_local_raises_the_childs_error_with_its_exit_codes_class(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"^serve: 'nothing-here' is neither models:/NAME@ALIAS") as e:
        with start_local("nothing-here", timeout_s=60):
            pytest.fail("a server that cannot start is never yielded")
    assert e.value.exit_code == 2
