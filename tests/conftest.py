"""Shared fixtures: a tiny torch model as an entry point, its data, and a recipe writer."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from optimize.deploy.inputs import DeployInputs, Measured, Version
from optimize.lazy import lazy
from optimize.recipe import Recipe, RolloutSection, ServingSection, load_recipe
from optimize.runtimes.base import TensorSpec

# imported by the first builder that needs them, not at collection
torch = lazy("torch")
onnx = lazy("onnx")

REPO = Path(__file__).resolve().parent.parent

# Every top-level key a recipe may have.
RECIPE_SECTIONS = (
    "name",
    "model",
    "export",
    "precision",
    "data",
    "evaluate",
    "benchmark",
    "engine",
    "gates",
    "registry",
    "extends",
)

TINY_MODULE = textwrap.dedent(
    '''
    """Tiny models for tests: an MLP classifier with one input `x` (N, 8) and output `logits` (N, 4)."""
    import numpy as np
    import torch


    class TinyNet(torch.nn.Module):
        def __init__(self, scale: float = 1.0) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(8, 16)
            self.fc2 = torch.nn.Linear(16, 4)
            self.scale = scale

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x * self.scale)))


    def build(scale: float = 1.0):
        torch.manual_seed(0)
        return TinyNet(scale).eval(), {"x": torch.randn(2, 8, generator=torch.Generator().manual_seed(1))}


    class Overflow(torch.nn.Module):
        """Finite in FP32; exp(12 x) exceeds FP16's 65504 for x > 0.93."""

        def __init__(self) -> None:
            super().__init__()
            self.net = TinyNet()

        def forward(self, x):
            return self.net(x) + torch.exp(x[:, :4] * 12.0)


    def overflow():
        torch.manual_seed(0)
        return Overflow().eval(), {"x": torch.randn(2, 8, generator=torch.Generator().manual_seed(1))}


    def not_a_tuple():
        return TinyNet()


    def wrong_inputs():
        return TinyNet(), [torch.zeros(2, 8)]


    def raises():
        raise ValueError("boom")


    def accuracy(outputs, labels):
        return float((outputs["logits"].argmax(-1) == labels).mean())
    '''
)


def mlp(*widths: int, seed: int = 0, init_std: float | None = None, argmax: bool = False) -> Any:
    """A torch MLP in eval mode: Linear layers `fc1`…`fcN` from `widths` (input, hidden…, output), ReLU between
    them (`torch.relu`, as a hand-written forward calls it).

    The layers are made in order right after `torch.manual_seed(seed)`, so the same widths and seed give the same
    weights, and the global generator is left where a hand-written module's constructor leaves it. `init_std`
    then redraws every weight from N(0, init_std²), layer by layer; `argmax=True` makes forward return a second
    output, the int64 argmax over the last axis.
    """

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.depth = len(widths) - 1
            for i in range(self.depth):
                setattr(self, f"fc{i + 1}", torch.nn.Linear(widths[i], widths[i + 1]))

        def forward(self, x: Any) -> Any:
            for i in range(1, self.depth + 1):
                x = getattr(self, f"fc{i}")(x)
                if i < self.depth:
                    x = torch.relu(x)
            return (x, x.argmax(-1)) if argmax else x

    if len(widths) < 2:
        raise ValueError(f"mlp needs an input and an output width, got {widths}")
    torch.manual_seed(seed)
    module = Mlp()
    if init_std is not None:
        for i in range(1, module.depth + 1):
            torch.nn.init.normal_(getattr(module, f"fc{i}").weight, std=init_std)
    return module.eval()


def unary_onnx(path: Path, op: str, dims: list[Any], elem_type: int | None = None) -> Path:
    """Save a checked one-node ONNX model `y = op(x)` (x and y of type `elem_type`, default float32)."""
    kind = onnx.TensorProto.FLOAT if elem_type is None else elem_type
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node(op, ["x"], ["y"])],
        op.lower(),
        [onnx.helper.make_tensor_value_info("x", kind, dims)],
        [onnx.helper.make_tensor_value_info("y", kind, dims)],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def mlp_onnx(path: Path, outlier: float = 0.0) -> Path:
    """x (N, 8) → MatMul fc1 → Add → Relu → MatMul fc2 → Add → logits (N, 4); `outlier` spikes one fc2 weight."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float32) * 0.5
    w2 = rng.standard_normal((16, 4)).astype(np.float32) * 0.5
    w2[0, 0] += outlier
    inits = [
        onnx.numpy_helper.from_array(w1, "w1"),
        onnx.numpy_helper.from_array(np.zeros(16, np.float32) + 0.1, "b1"),
        onnx.numpy_helper.from_array(w2, "w2"),
        onnx.numpy_helper.from_array(np.zeros(4, np.float32), "b2"),
    ]
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        onnx.helper.make_node("Add", ["h1", "b1"], ["h1b"], name="fc1_bias"),
        onnx.helper.make_node("Relu", ["h1b"], ["h1r"], name="relu"),
        onnx.helper.make_node("MatMul", ["h1r", "w2"], ["h2"], name="fc2"),
        onnx.helper.make_node("Add", ["h2", "b2"], ["logits"], name="fc2_bias"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "mlp",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 8])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def conv_proto(channels: int, width: int, scales: tuple[float, float], seed: int = 0) -> onnx.ModelProto:
    """image (N, channels, 8, 8) → Conv → Relu → Conv → Relu → GlobalAveragePool → Flatten → logits
    (N, width); the two convolutions' random weights are scaled by `scales`."""
    rng = np.random.default_rng(seed)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((width, channels, 3, 3)).astype(np.float32) * scales[0], "c1"),
        onnx.numpy_helper.from_array(rng.standard_normal((width, width, 3, 3)).astype(np.float32) * scales[1], "c2"),
    ]
    nodes = [
        onnx.helper.make_node("Conv", ["image", "c1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
        onnx.helper.make_node("Conv", ["ar", "c2"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["b"], ["br"], name="relu2"),
        onnx.helper.make_node("GlobalAveragePool", ["br"], ["g"], name="pool"),
        onnx.helper.make_node("Flatten", ["g"], ["logits"], name="flatten"),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "cnn",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", channels, 8, 8])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])


@pytest.fixture()
def tiny_dir(tmp_path: Path) -> Path:
    """A folder with `tinynet.py` (entry points), `tiny.npz` (64 samples of `x`, labels) for evaluation and
    `tiny-calib.npz` (64 other samples) for calibration."""
    (tmp_path / "tinynet.py").write_text(TINY_MODULE)
    write_tiny_data(tmp_path)
    return tmp_path


def write_tiny_data(folder: Path) -> None:
    """The tiny recipe's evaluation set `tiny.npz` and calibration set `tiny-calib.npz` (64 samples of `x`, labels)."""
    rng = np.random.default_rng(0)
    np.savez(folder / "tiny.npz", x=rng.standard_normal((64, 8)).astype(np.float32), label=rng.integers(0, 4, 64))
    rng = np.random.default_rng(1)  # calibration data: other samples than the evaluation set's
    np.savez(folder / "tiny-calib.npz", x=rng.standard_normal((64, 8)).astype(np.float32), label=rng.integers(0, 4, 64))


def tiny_recipe() -> dict[str, Any]:
    """A complete recipe for the tiny model (fp32 + fp16, CPU), as a plain mapping."""
    return {
        "name": "tiny",
        "model": {"source": "entry_point", "entry_point": "tinynet:build", "python_path": ["."]},
        "export": {
            "input_names": ["x"],
            "output_names": ["logits"],
            "dynamic_axes": {"x": {0: "batch"}, "logits": {0: "batch"}},
        },
        "precision": {"variants": [{"name": "fp16", "kind": "fp16", "backend": "onnxruntime"}]},
        "data": {"eval": {"kind": "npz", "path": "tiny.npz", "labels": "label", "batch_size": 16}},
        "evaluate": {"dataset": "eval", "top1_outputs": ["logits"]},
        "benchmark": {"shapes": [{"batch": 1}, {"batch": 8}], "warmup": 2, "iterations": 10},
        "gates": ["accuracy.cosine_min >= 0.99", "accuracy.top1_agreement >= 0.9"],
    }


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `over` into a copy of `base` (a value of None deletes the key)."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


@pytest.fixture()
def write_recipe(tiny_dir: Path) -> Callable[..., Path]:
    """write_recipe(overrides={}, name="recipe.yaml") -> path of a tiny recipe in `tiny_dir`."""

    def _write(overrides: dict[str, Any] | None = None, name: str = "recipe.yaml") -> Path:
        path = tiny_dir / name
        path.write_text(yaml.safe_dump(merge(tiny_recipe(), overrides or {}), sort_keys=False))
        return path

    return _write


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder, with its own empty stage cache and no MLflow settings from the
    environment, nor a forced external-data threshold (a test that patches a library would otherwise be served
    another test's cached result)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPTIMIZE_CACHE_DIR", str(tmp_path / ".optimize-cache"))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "OPTIMIZE_EXTERNAL_DATA_BYTES"):
        monkeypatch.delenv(var, raising=False)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_finished_run(folder: Path, overrides: dict[str, Any] | None = None, exit_code: int = 0) -> Path:
    """Run the tiny model with two variants that both pass (fp16, fp16-fp32io) in `folder`, unregistered;
    `overrides` are merged into the recipe (and the run must end with `exit_code`). Returns the run directory."""
    from optimize.pipeline import RunOptions, run

    (folder / "tinynet.py").write_text(TINY_MODULE)
    rng = np.random.default_rng(0)
    np.savez(folder / "tiny.npz", x=rng.standard_normal((64, 8)).astype(np.float32), label=rng.integers(0, 4, 64))
    variants = [
        {"name": "fp16", "kind": "fp16", "backend": "onnxruntime"},
        {"name": "fp16-fp32io", "kind": "fp16", "backend": "onnxruntime", "keep_io_types": False},
    ]
    recipe = merge(merge(tiny_recipe(), {"precision": {"variants": variants}}), overrides or {})
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe))
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = run(folder / "r.yaml", RunOptions(runs_dir=folder / "runs", quiet=True, register=False))
    finally:
        os.chdir(cwd)
    assert result.exit_code == exit_code
    return result.run_dir


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, unregistered run of the tiny model with two variants that both pass (shared: copy it before
    changing anything in it)."""
    return build_finished_run(tmp_path_factory.mktemp("run"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(
    folder: Path,
    *,
    backend_uri: str | None = None,
    artifacts_destination: str | None = None,
    env: dict[str, str] | None = None,
    app_name: str | None = None,
) -> tuple[str, Callable[[], None]]:
    """Start a real `mlflow server` on a free 127.0.0.1 port; return its URI and a function that stops it by PID.

    Defaults: a sqlite backend `folder/server.db` and artifacts in `folder/server-artifacts`. `env` is added to
    this process's environment for the server only (S3 endpoint and keys, auth settings). The server runs in
    `folder`, so what it writes beside itself (basic-auth's `basic_auth.db`) stays there; its log is
    `folder/server-<port>.log`.
    """
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = folder / f"server-{port}.log"
    # MLflow 3.17 starts seven huey job consumers (GenAI jobs, nothing the registry uses) beside the web
    # server unless told not to: each is a Python process importing MLflow.
    server_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", backend_uri or f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination", artifacts_destination or str(folder / "server-artifacts"),
            *(["--app-name", app_name] if app_name else []),
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder, env=server_env,
    )  # fmt: skip

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()

    deadline = time.monotonic() + 120
    while True:
        try:
            # /health answers without credentials, with basic-auth on too.
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    return uri, stop
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop()
            pytest.fail(f"mlflow server did not start ({log_path}): " + log_path.read_text()[-2000:])
        time.sleep(0.5)


@pytest.fixture(scope="module")
def mlflow_server_factory() -> Iterator[Callable[..., str]]:
    """start(folder, backend_uri=..., artifacts_destination=..., env=..., app_name=...) -> URI of a real
    `mlflow server` (see `start_mlflow_server`); every server it started is stopped at the end of the module,
    so a module can share one server across its tests."""
    stops: list[Callable[[], None]] = []

    def _start(folder: Path, **kwargs: Any) -> str:
        uri, stop = start_mlflow_server(folder, **kwargs)
        stops.append(stop)
        return uri

    try:
        yield _start
    finally:
        for stop in reversed(stops):
            stop()


@pytest.fixture()
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts in tmp_path), stopped by its PID."""
    uri, stop = start_mlflow_server(tmp_path)
    try:
        yield uri
    finally:
        stop()


def chromium() -> str:
    """Debian's Chromium, which renders report.html headless in the reporting and CI-file tests; a test that needs
    it fails without it, saying how to install it."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("chromium is not installed: run `bash ci/setup.sh cpu` (it installs Debian's chromium)")


# --- deploy renderers (tests/deploy/): a DeployInputs made from recipes/fp16.yaml's `serving:` and `rollout:`
# sections, a canary and a stable registered version, and a first rollout (no stable version).
# The numbers in `Measured` below are STATED inputs for rendering, chosen so the arithmetic is easy to check by
# hand (0.245 cores / 0.7 -> 350m; 409.6 MB / 0.8 -> 512Mi); they are not measurements of anything.

# Stated, not measured (see the module docstring): the load test's numbers a registered version would carry.
CANARY_MEASURED = Measured(max_rps_at_slo=120.0, cpu_cores=0.245, rss_peak_mb=409.6, target="onnxruntime-cpu")
STABLE_MEASURED = Measured(max_rps_at_slo=110.0, cpu_cores=0.25, rss_peak_mb=400.0, target="onnxruntime-cpu")

# all-MiniLM-L6-v2's exported I/O (recipes/bases/minilm.yaml's export section)
MINILM_INPUTS = tuple(
    TensorSpec(name, "int64", ("batch", "sequence")) for name in ("input_ids", "attention_mask", "token_type_ids")
)
MINILM_OUTPUTS = (TensorSpec("sentence_embedding", "float32", ("batch", 384)),)


@pytest.fixture(scope="session")
def fp16_recipe() -> Recipe:
    """recipes/fp16.yaml, loaded once."""
    return load_recipe(REPO / "recipes" / "fp16.yaml")


@pytest.fixture
def deploy_inputs(tmp_path: Path, fp16_recipe: Recipe) -> DeployInputs:
    """A canary (version 3) replacing a stable (version 2) of minilm-fp16, with the recipe's own `serving:` and
    `rollout:` sections and STATED load-test numbers (CANARY_MEASURED, STABLE_MEASURED: inputs for rendering, not
    measurements). `model_file` is a placeholder file, not a real ONNX model: a test that needs a real one (the
    Triton repository's check) builds its own and replaces it with dataclasses.replace."""
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(b"placeholder: not an ONNX model")
    name = fp16_recipe.registry.model_name or fp16_recipe.name
    return DeployInputs(
        canary=Version(
            model=name, number=3, sha256="c" * 64, variant="fp16", precision="fp16", measured=CANARY_MEASURED
        ),
        stable=Version(
            model=name, number=2, sha256="5" * 64, variant="fp16", precision="fp16", measured=STABLE_MEASURED
        ),
        image="registry.example/optimize:1.0",
        tracking_uri="http://mlflow.mlops:5000",
        serving=fp16_recipe.serving,
        rollout=fp16_recipe.rollout,
        inputs=MINILM_INPUTS,
        outputs=MINILM_OUTPUTS,
        model_file=model_file,
    )


@pytest.fixture
def first_rollout(deploy_inputs: DeployInputs) -> DeployInputs:
    """`deploy_inputs` with no stable version: the first rollout of the model, the canary takes all traffic."""
    return dataclasses.replace(deploy_inputs, stable=None)


@pytest.fixture
def with_sections() -> Callable[..., DeployInputs]:
    """A function `(inputs, rollout={...}, serving={...}, **fields) -> DeployInputs`: `inputs` with some of its
    recipe sections' fields changed (validated as the recipe would be, nested dicts merged one level) and other
    DeployInputs fields replaced, e.g. `with_sections(deploy_inputs, rollout={"namespace": "ml", "rps": 500})`."""

    def change(
        inputs: DeployInputs,
        *,
        rollout: dict[str, Any] | None = None,
        serving: dict[str, Any] | None = None,
        **fields: Any,
    ) -> DeployInputs:
        if rollout:
            fields["rollout"] = RolloutSection.model_validate(_merged(inputs.rollout.model_dump(), rollout))
        if serving:
            fields["serving"] = ServingSection.model_validate(_merged(inputs.serving.model_dump(), serving))
        return dataclasses.replace(inputs, **fields)

    return change


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def triton_errors(run_dir: Path, dest: Path) -> dict[str, list[str]]:
    """Every variant of a finished run (the FP32 baseline included) as a Triton model repository under `dest`, with
    the run's recorded `serving:` section, checked with Triton's own config protobuf against its artifact: the errors
    per variant (none expected)."""
    from optimize.deploy import triton
    from optimize.deploy.inputs import k8s_name
    from optimize.runtimes import open_runner

    plain = json.loads((run_dir / "recipe.json").read_text())
    variants = json.loads((run_dir / "metrics.json").read_text())["variants"]
    found: dict[str, list[str]] = {}
    for name, entry in variants.items():
        model_file = run_dir / entry["path"]
        with open_runner("onnxruntime-cpu", model_file) as runner:
            inputs, outputs = tuple(runner.inputs), tuple(runner.outputs)
        model = k8s_name(f"{plain['name']}-{name}")
        version = Version(model=model, number=1, sha256=entry["sha256"], variant=name, precision="", measured=None)
        deploy = DeployInputs(
            canary=version,
            stable=None,
            image="unused",
            tracking_uri="unused",
            serving=ServingSection.model_validate(plain.get("serving") or {}),
            rollout=RolloutSection.model_validate(plain.get("rollout") or {}),
            inputs=inputs,
            outputs=outputs,
            model_file=model_file,
        )
        found[name] = triton.check_repository(triton.write_repository(deploy, dest))
    return found


def matmul_chain(path: Path, width: int, depth: int) -> Path:
    """x (N, width) → MatMul by one shared identity matrix `depth` times → y (N, width), so y == x, slowly."""
    nodes, prev = [], "x"
    for i in range(depth):
        out = "y" if i == depth - 1 else f"h{i}"
        nodes.append(onnx.helper.make_node("MatMul", [prev, "w"], [out], name=f"mm{i}"))
        prev = out
    graph = onnx.helper.make_graph(
        nodes,
        "chain",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", width])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", width])],
        [onnx.numpy_helper.from_array(np.eye(width, dtype=np.float32), "w")],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(path))
    return path
