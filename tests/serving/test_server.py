"""`optimize serve` against real clients: each server is a child process on 127.0.0.1 (start_local), serving a
tiny ONNX model built here; tritonclient (in its own process: it imports gevent), bad requests, overload and
priority, and the SIGTERM drain. All traffic goes to loopback and is bounded in count."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import matmul_chain, merge, mlp_onnx, tiny_recipe

from optimize.lazy import lazy
from optimize.serving.server import LocalServer, start_local

onnx = lazy("onnx")
ort = lazy("onnxruntime")
aiohttp = lazy("aiohttp")

# The slow model: one 2048×2048 identity matrix applied 64 times (16 MB read per MatMul and row: ~100 ms a
# request on one thread here), so three requests keep a queue of 2 full for a while.
SLOW_WIDTH, SLOW_DEPTH = 2048, 64


def serving_recipe(folder: Path, name: str, serving: dict[str, Any]) -> Path:
    """A recipe file `name` whose `serving:` section is `serving` (the rest is the tiny recipe, never run)."""
    path = folder / name
    path.write_text(yaml.safe_dump(merge(tiny_recipe(), {"serving": serving})))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    mlp_onnx(folder / "mlp.onnx")
    matmul_chain(folder / "slow.onnx", SLOW_WIDTH, SLOW_DEPTH)
    return folder


@pytest.fixture(scope="module")
def server(models: Path) -> Iterator[LocalServer]:
    """The tiny MLP (x (N, 8) → logits (N, 4)) served with a 10 KB body limit."""
    recipe = serving_recipe(models, "mlp.yaml", {"max_body_mb": 0.01})
    started = time.monotonic()
    with start_local(models / "mlp.onnx", recipe=recipe, timeout_s=60) as local:
        local.ready["seconds_to_ready"] = time.monotonic() - started
        yield local


def reference(models: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(models / "mlp.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def request(
    url: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request; (status, headers, body) whatever the status."""
    req = urllib.request.Request(url + path, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def infer_body(x: np.ndarray, name: str = "x", datatype: str = "FP32", **params: Any) -> bytes:
    doc: dict[str, Any] = {
        "inputs": [{"name": name, "datatype": datatype, "shape": list(x.shape), "data": x.ravel().tolist()}]
    }
    if params:
        doc["parameters"] = params
    return json.dumps(doc).encode()


def requests_by_code(url: str) -> dict[str, float]:
    """optimize_requests_total by code, read from the server's /metrics."""
    _, _, text = request(url, "/metrics")
    out = {}
    for line in text.decode().splitlines():
        if line.startswith("optimize_requests_total{"):
            code = line.split('code="')[1].split('"')[0]
            out[code] = float(line.rsplit(" ", 1)[1])
    return out


def gauge(url: str, name: str) -> float:
    _, _, text = request(url, "/metrics")
    line = next(x for x in text.decode().splitlines() if x.startswith(name + " "))
    return float(line.rsplit(" ", 1)[1])


# --- a real client ----------------------------------------------------------------------------------------

TRITON_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tritonclient.http as http

    url, = sys.argv[1:]
    client = http.InferenceServerClient(url.removeprefix("http://"))
    x = np.arange(24, dtype=np.float32).reshape(3, 8) / 10
    out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
           "model_ready": client.is_model_ready("mlp"), "model_ready_v1": client.is_model_ready("mlp", "1"),
           "metadata": client.get_model_metadata("mlp"), "x": x.tolist()}
    binary = http.InferInput("x", list(x.shape), "FP32")
    binary.set_data_from_numpy(x)  # binary tensors: tritonclient's default
    out["binary"] = client.infer("mlp", [binary]).as_numpy("logits").tolist()
    as_json = http.InferInput("x", list(x.shape), "FP32")
    as_json.set_data_from_numpy(x, binary_data=False)
    result = client.infer("mlp", [as_json], outputs=[http.InferRequestedOutput("logits", binary_data=False)],
                          model_version="1", request_id="r-7")
    out["json"] = result.as_numpy("logits").tolist()
    out["json_response"] = result.get_response()
    try:
        client.infer("nope", [binary])
    except http.InferenceServerException as e:
        out["unknown_model"] = [e.status(), e.message()]
    print(json.dumps(out))
    """
)


def test_tritonclient_json_and_binary_metadata_and_readiness(server: LocalServer, models: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, server.url], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["live"] and out["ready"] and out["model_ready"] and out["model_ready_v1"]
    assert out["metadata"] == {
        "name": "mlp",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 4]}],
    }
    expected = reference(models, np.asarray(out["x"], dtype=np.float32))
    np.testing.assert_allclose(np.asarray(out["binary"]), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["json"]), expected, rtol=1e-6, atol=1e-6)
    response = out["json_response"]
    assert (response["model_name"], response["model_version"], response["id"]) == ("mlp", "1", "r-7")
    assert out["unknown_model"][0] == "404" and "unknown model 'nope'" in out["unknown_model"][1]


def test_ready_within_3_s_of_start_and_the_ready_file(server: LocalServer) -> None:
    ready = server.ready
    assert ready["seconds_to_ready"] < 3.0, ready
    assert ready["url"].startswith("http://127.0.0.1:") and ready["pid"] == server.pid
    assert (ready["model"], ready["version"], ready["variant"], ready["target"]) == (
        "mlp",
        "1",
        None,
        "onnxruntime-cpu",
    )
    assert len(ready["sha256"]) == 64
    status, _, body = request(server.url, "/v2")
    assert status == 200 and json.loads(body)["name"] == "optimize"


# --- bad requests: each a 4xx with a JSON error, and the server keeps serving -------------------------------


def _good(server: LocalServer) -> None:
    x = np.ones((2, 8), np.float32)
    status, _, body = request(server.url, "/v2/models/mlp/infer", infer_body(x))
    assert status == 200, body
    assert json.loads(body)["outputs"][0]["shape"] == [2, 4]


def _binary_body(x: np.ndarray, cut: int = 0) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": list(x.shape), "parameters": {"binary_data_size": x.nbytes}}
            ]
        }
    ).encode()
    data = x.tobytes()
    return header + data[: len(data) - cut], {"Inference-Header-Content-Length": str(len(header))}


BAD = {
    "wrong input name": (infer_body(np.ones((1, 8)), name="y"), {}, 400, "unknown input 'y'"),
    "wrong dtype": (infer_body(np.ones((1, 8), np.int64), datatype="INT64"), {}, 400, "datatype 'INT64'"),
    "wrong shape": (infer_body(np.ones((1, 7))), {}, 400, "has 7 at dim 1"),
    "truncated binary body": (*_binary_body(np.ones((2, 8), np.float32), cut=4), 400, "truncated binary body"),
    "body over the size limit": (b"{" + b" " * 20_000 + b"}", {}, 413, "over the limit of 10485 bytes"),
    "malformed JSON": (b'{"inputs": [', {}, 400, "malformed JSON"),
    "bad priority header": (infer_body(np.ones((1, 8))), {"X-Priority": "urgent"}, 400, "X-Priority 'urgent'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_gets_a_4xx_json_error_and_the_server_keeps_serving(server: LocalServer, case: str) -> None:
    body, headers, code, message = BAD[case]
    before = requests_by_code(server.url)
    status, got_headers, answer = request(server.url, "/v2/models/mlp/infer", body, headers)
    assert status == code, answer
    assert got_headers["content-type"] == "application/json"
    assert message in json.loads(answer)["error"]
    _good(server)
    after = requests_by_code(server.url)
    assert after.get(str(code), 0) == before.get(str(code), 0) + 1  # counted by its code
    assert after["200"] == before.get("200", 0) + 1


def test_a_body_over_the_limit_streamed_without_length_is_refused_too(server: LocalServer) -> None:
    """40 chunks of 1000 bytes, no Content-Length. The whole request goes out in one write: sent chunk by chunk, a
    chunk the client is still writing when the server has answered 413 and closed meets a reset instead."""
    import socket

    parts = urllib.parse.urlsplit(server.url)
    body = b"".join(b"3e8\r\n" + b" " * 1000 + b"\r\n" for _ in range(40)) + b"0\r\n\r\n"
    head = f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: {parts.netloc}\r\nTransfer-Encoding: chunked\r\n\r\n"
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == 413 and "over the limit" in json.loads(answer.read())["error"]
    _good(server)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/v2/models/other/infer", "unknown model 'other'"),
        ("/v2/models/mlp/versions/2/infer", "model 'mlp' has no version '2'"),
    ],
)
def test_unknown_model_or_version_is_404(server: LocalServer, path: str, message: str) -> None:
    status, _, body = request(server.url, path, infer_body(np.ones((1, 8))))
    assert status == 404 and message in json.loads(body)["error"]
    for meta in (path.removesuffix("/infer"), path.removesuffix("/infer") + "/ready"):
        status, _, body = request(server.url, meta)
        assert status == 404 and message in json.loads(body)["error"]
    status, _, _ = request(server.url, "/v2/models/mlp/versions/1/infer", infer_body(np.ones((1, 8))))
    assert status == 200


def test_unknown_paths_and_methods_get_json_errors(server: LocalServer) -> None:
    status, headers, body = request(server.url, "/v2/nothing")
    assert status == 404 and json.loads(body) == {"error": "no such path: /v2/nothing"}
    status, headers, body = request(server.url, "/v2/models/mlp/infer")  # a GET
    assert status == 405 and json.loads(body) == {"error": "method GET is not allowed: /v2/models/mlp/infer"}
    assert headers["allow"] == "POST"


# --- overload and priority ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow(models: Path) -> Iterator[LocalServer]:
    """The slow model, one request a run, at most 2 waiting, one ONNX Runtime thread (a core left for the
    server's event loop and the client). The module's last test stops it with SIGTERM."""
    recipe = serving_recipe(
        models,
        "slow.yaml",
        # a long queue timeout: the queue's size is the only reason to shed here
        {"threads": 1, "max_batch_size": 1, "max_queue_delay_ms": 0, "max_queue": 2, "queue_timeout_ms": 10_000,
         "drain_s": 5},
    )  # fmt: skip
    with start_local(models / "slow.onnx", recipe=recipe, timeout_s=60) as local:
        yield local


SLOW_BODY = infer_body(np.full((1, SLOW_WIDTH), 0.5, np.float32))


async def _send(session: Any, url: str, priority: str, results: list[dict[str, Any]]) -> None:
    start = time.perf_counter()
    async with session.post(url + "/v2/models/slow/infer", data=SLOW_BODY, headers={"X-Priority": priority}) as r:
        body = await r.read()
        results.append(
            {
                "status": r.status,
                "ms": (time.perf_counter() - start) * 1000,
                "retry_after": r.headers.get("Retry-After"),
                "priority": priority,
                "body": body,
            }
        )


async def _fill(session: Any, url: str, results: list[dict[str, Any]]) -> list[asyncio.Task[None]]:
    """Send low requests, one at a time, until the queue holds 2 (and one runs); returns their tasks."""
    tasks = []
    deadline = time.monotonic() + 10
    while gauge(url, "optimize_queue_depth") < 2:
        assert time.monotonic() < deadline, "the queue did not fill"
        tasks.append(asyncio.create_task(_send(session, url, "low", results)))
        await asyncio.sleep(0.02)  # admitted by then, on loopback
    return tasks


def test_a_full_queue_answers_503_at_once_and_nothing_is_lost(slow: LocalServer) -> None:
    before = sum(requests_by_code(slow.url).values())
    filling: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []

    async def scenario() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            tasks = []
            for _ in range(30):  # one at a time, each after topping the queue up
                tasks += await _fill(session, slow.url, filling)
                await _send(session, slow.url, "low", probes)
                if sum(r["status"] == 503 for r in probes) == 10:
                    break
            await asyncio.gather(*tasks)

    asyncio.run(scenario())
    everything = filling + probes
    assert {r["status"] for r in everything} <= {200, 503}, [r["status"] for r in everything]
    ok = [r for r in everything if r["status"] == 200]
    shed = [r for r in probes if r["status"] == 503]
    assert len(ok) >= 3 and len(shed) == 10, (len(ok), [r["status"] for r in probes])
    for r in ok:
        assert json.loads(r["body"])["outputs"][0]["data"][:3] == [0.5, 0.5, 0.5]  # identity chain: y == x
    for r in shed:
        assert int(r["retry_after"]) >= 1, r
        assert "server busy: the queue is full (2 waiting)" in json.loads(r["body"])["error"]
    assert max(r["ms"] for r in shed) < 50, [round(r["ms"], 1) for r in shed]  # at once, not after a wait
    after = requests_by_code(slow.url)
    assert sum(after.values()) - before == len(everything), after  # the server's count adds up to what was sent


def test_with_the_queue_full_of_low_high_priority_still_gets_200(slow: LocalServer) -> None:
    low: list[dict[str, Any]] = []
    high: list[dict[str, Any]] = []

    async def scenario() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            tasks = []
            for _ in range(3):
                tasks += await _fill(session, slow.url, low)
                await _send(session, slow.url, "high", high)
            await asyncio.gather(*tasks)

    asyncio.run(scenario())
    assert [r["status"] for r in high] == [200] * 3
    assert {r["status"] for r in low} == {200, 503}
    errors = [json.loads(r["body"])["error"] for r in low if r["status"] == 503]
    evicted = [e for e in errors if "evicted by a high-priority request" in e]
    assert evicted, errors  # a high request took a queued low one's place
    assert all(e in evicted or "the queue is full" in e for e in errors), errors


# --- SIGTERM -------------------------------------------------------------------------------------------------


def gather_onnx(path: Path) -> Path:
    """i (N,) int64 → Gather rows of a constant (4, 2) table → y (N, 2); an index past 3 fails in the run."""
    table = onnx.numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(4, 2), "table")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["table", "i"], ["y"], axis=0)],
        "gather",
        [onnx.helper.make_tensor_value_info("i", onnx.TensorProto.INT64, ["batch"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 2])],
        [table],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(path))
    return path


def test_a_failing_model_run_is_a_500_json_error_and_the_server_keeps_serving(tmp_path: Path) -> None:
    def body(index: int) -> bytes:
        return json.dumps({"inputs": [{"name": "i", "datatype": "INT64", "shape": [1], "data": [index]}]}).encode()

    with start_local(gather_onnx(tmp_path / "gather.onnx"), timeout_s=60) as local:
        status, headers, answer = request(local.url, "/v2/models/gather/infer", body(9))
        assert status == 500 and headers["content-type"] == "application/json", answer
        assert "model run failed" in json.loads(answer)["error"]
        status, _, answer = request(local.url, "/v2/models/gather/infer", body(3))
        assert status == 200 and json.loads(answer)["outputs"][0]["data"] == [6.0, 7.0]
        assert requests_by_code(local.url) == {"500": 1.0, "200": 1.0}


def test_a_load_test_of_a_deliberately_slow_model_fails_its_gate(models: Path) -> None:
    """`optimize loadtest URL --recipe R` against the slow model (64 chained 2048 x 2048 MatMuls a request, one
    thread, no batching): at 20 rps its p99 is over a 2-ms budget, exit 1 naming the numbers; the same load with a
    5-s budget passes, so it is the model's time that failed the gate."""
    rows = np.linspace(-1, 1, 16 * SLOW_WIDTH, dtype=np.float32).reshape(16, SLOW_WIDTH)
    np.savez(models / "slow-eval.npz", x=rows, label=np.zeros(16, np.int64))
    settings = {"threads": 1, "max_batch_size": 1, "max_queue_delay_ms": 0, "queue_timeout_ms": 10_000}

    def loadtest(p99_ms: float) -> subprocess.CompletedProcess:
        serving = {**settings, "load": {"rps": [20], "step_s": 1}, "slo": {"p99_ms": p99_ms}}
        recipe = models / f"slow-{p99_ms:g}.yaml"
        recipe.write_text(
            yaml.safe_dump(merge(tiny_recipe(), {"data": {"eval": {"path": "slow-eval.npz"}}, "serving": serving}))
        )
        with start_local(models / "slow.onnx", recipe=recipe, timeout_s=60) as local:
            cmd = [sys.executable, "-m", "optimize", "loadtest", local.url, "--recipe", str(recipe), "-q"]
            cmd += ["--out", str(models / f"slow-{p99_ms:g}.json"), "--server-pid", str(local.pid)]
            return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    failed = loadtest(2)
    assert failed.returncode == 1, failed.stderr
    judged = json.loads((models / "slow-2.json").read_text())["judged"]
    assert judged["p99_ms"] > 2 and judged["error_rate"] == 0
    assert f"at 20 rps p99 {judged['p99_ms']:.1f} ms > 2 ms" in failed.stderr
    passed = loadtest(5000)
    assert passed.returncode == 0, passed.stderr


def test_sigterm_answers_everything_in_flight_goes_unready_and_exits_0(slow: LocalServer) -> None:
    """Last of the module: it ends the slow server."""
    results: list[dict[str, Any]] = []

    async def scenario() -> dict[str, Any]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            deadline = time.monotonic() + 5
            sent = [asyncio.create_task(_send(session, slow.url, "low", results))]
            while gauge(slow.url, "optimize_in_flight") < 1 or gauge(slow.url, "optimize_queue_depth") > 0:
                assert time.monotonic() < deadline, "the first request did not start"  # it runs: 2 more may wait
                await asyncio.sleep(0.005)
            sent += [asyncio.create_task(_send(session, slow.url, "low", results)) for _ in range(2)]
            while gauge(slow.url, "optimize_in_flight") + len(results) < 3:  # 1 running, 2 queued
                assert time.monotonic() < deadline, "the requests were not accepted"
                await asyncio.sleep(0.005)
            os.kill(slow.pid, signal.SIGTERM)
            seen: dict[str, Any] = {"signalled": time.monotonic()}
            await asyncio.sleep(0.05)
            async with session.get(slow.url + "/v2/health/ready") as r:
                seen["ready"] = r.status
            late: list[dict[str, Any]] = []
            try:
                await _send(session, slow.url, "low", late)
                seen["late"] = late[0]["status"]
            except aiohttp.ClientConnectionError:
                seen["late"] = "refused"
            await asyncio.gather(*sent)
            return seen

    seen = asyncio.run(scenario())
    code = slow.proc.wait(timeout=10)
    exited_after = time.monotonic() - seen["signalled"]
    assert [r["status"] for r in results] == [200] * 3, "every request in flight is answered"
    assert seen["ready"] == 503
    assert seen["late"] in (503, "refused")
    assert code == 0 and exited_after < slow.ready["drain_s"], (code, exited_after)
    assert not slow.ready_file.exists()  # the ready file goes with the server
