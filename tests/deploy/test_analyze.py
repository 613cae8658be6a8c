"""`optimize canary analyze` against a real Prometheus (Debian's server binary, on 127.0.0.1) scraping real
`optimize serve` processes of registered versions in a sqlite MLflow store, under a light constant load:

- version 1, the stable one (`production`): a MatMul chain of CHAIN_DEPTH;
- version 2, a healthy canary: the same model;
- version 3, a slow canary: a chain SLOW_FACTOR times as deep (its p99 many times the stable one's);
- version 4, a failing canary: a table lookup sent an out-of-range index in 1 request of 100 (a 500 each);
- version 5: registered, never served (no data).

Each canary has its own alias, promoted from version 1 first, so that a rollback returns there. The three
analyses run at once against the same Prometheus, in this process (`analyze`, what the command runs: starting
three commands at once costs each seconds of imports on a two-core machine), with the budgets recorded with the
versions (recipe.json: short analysis settings); the command itself runs once, for its exit code, its JSON and
its lines, on a failing canary with --once --no-rollback (1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from canary_env import (
    Prometheus,
    Stream,
    aliases,
    chain_body,
    free_port,
    lookup,
    lookup_body,
    new_store,
    prometheus,
    register,
    traffic,
)
from conftest import matmul_chain

from optimize.deploy import analyze as analyze_mod
from optimize.deploy import queries
from optimize.errors import RecipeError, StageError
from optimize.registry import promotion
from optimize.serving.server import LocalServer, start_local

REPO = Path(__file__).resolve().parents[2]
MODEL = "canary-demo"
# ~2 ms of model time a request for the stable version, ~40 times that for the slow one: its p99 stays over the
# stable one's × max_p99_ratio however much a busy machine adds to both.
CHAIN_WIDTH, CHAIN_DEPTH, SLOW_FACTOR = 1024, 8, 40
# Per server: 400 requests in a window, so that a p99 is the 4th slowest, not the 2nd (on a busy two-core machine a
# single scheduling stall of tens of ms moves a p99 of 200 requests by more than max_p99_ratio).
RPS = 40
SLOW_RPS = 8  # the slow one uses ~0.5 core at this rate
WARM_S = 8  # traffic before the analyses start, so that the first window already holds min_requests
SLO = {"p99_ms": 250, "error_rate": 0.002}
ANALYSIS = {"interval_s": 2, "count": 5, "window_s": 10, "min_requests": 20, "max_p99_ratio": 1.4, "failure_limit": 0}
RECORDED = {"serving": {"threads": 1, "max_queue_delay_ms": 0, "slo": SLO}, "rollout": {"analysis": ANALYSIS}}


def cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m optimize ARGS` in `cwd`."""
    return subprocess.run(
        [sys.executable, "-m", "optimize", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@dataclass
class Env:
    folder: Path
    store: str
    prom: Prometheus
    versions: dict[str, int]  # role → version number
    streams: dict[str, Stream]
    analyses: dict[str, dict[str, Any]]  # canary alias → its outcome (analyze's document, plus "error", "exit_code")
    lines: dict[str, list[str]]  # canary alias → the lines it printed
    seconds: dict[str, float]  # canary alias → how long its analysis took
    cli: dict[str, subprocess.CompletedProcess[str]]  # the CLI runs (see `env`)


def analyze_cli(env: Env, prometheus_url: str, *extra: str | Path) -> subprocess.CompletedProcess[str]:
    return cli(
        "canary", "analyze", MODEL, "--prometheus", prometheus_url, "--tracking-uri", env.store, *extra,
        cwd=env.folder,
    )  # fmt: skip


def _registered(folder: Path) -> tuple[str, dict[str, int]]:
    stable = matmul_chain(folder / "stable.onnx", CHAIN_WIDTH, CHAIN_DEPTH)
    slow = matmul_chain(folder / "slow.onnx", CHAIN_WIDTH, CHAIN_DEPTH * SLOW_FACTOR)
    failing = lookup(folder / "lookup.onnx")
    store = new_store(folder / "registry")
    versions = {
        role: register(store, MODEL, path, RECORDED)
        for role, path in (("stable", stable), ("healthy", stable), ("slow", slow), ("failing", failing),
                           ("idle", stable))
    }  # fmt: skip
    promotion.promote(MODEL, "production", version=versions["stable"], tracking_uri=store)
    for role in ("healthy", "slow", "failing"):  # promoted from the stable version: a rollback goes back there
        promotion.promote(MODEL, f"canary-{role}", version=versions["stable"], tracking_uri=store)
        promotion.promote(MODEL, f"canary-{role}", version=versions[role], tracking_uri=store)
    promotion.promote(MODEL, "canary-idle", version=versions["idle"], tracking_uri=store)
    promotion.promote(MODEL, "canary-cli", version=versions["failing"], tracking_uri=store)
    return store, versions


def _served(stack: ExitStack, store: str, versions: dict[str, int]) -> dict[str, LocalServer]:
    """The four served versions, started at once (each child imports MLflow and downloads its version)."""

    def start(role: str) -> LocalServer:
        overrides = {"max_batch_size": 1} if role == "failing" else None  # a bad row fails only its own request
        uri = f"models:/{MODEL}/{versions[role]}"
        return stack.enter_context(start_local(uri, tracking_uri=store, overrides=overrides, timeout_s=90))

    roles = ["stable", "healthy", "slow", "failing"]
    with ThreadPoolExecutor(max_workers=len(roles)) as pool:
        return dict(zip(roles, pool.map(start, roles), strict=True))


def _stop_all(servers: dict[str, LocalServer]) -> None:
    """SIGTERM every server (start_local's own stop then waits for each, already draining)."""
    for server in servers.values():
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)


def _analysed(e: Env, alias: str) -> None:
    """Run the analysis of `alias` in this process (what the CLI runs), keeping its outcome and lines."""
    started = time.monotonic()
    lines = e.lines.setdefault(alias, [])
    doc = analyze_mod.analyze(
        MODEL, prometheus=e.prom.url, tracking_uri=e.store, canary_alias=alias,
        on_measurement=lambda _m, line: lines.append(line),
    )  # fmt: skip
    error = analyze_mod.decision_error(doc)
    e.analyses[alias] = {**doc, "error": str(error) if error else None, "exit_code": error.exit_code if error else 0}
    e.seconds[alias] = time.monotonic() - started


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """Everything in the module docstring running: the command itself on a failing canary (--once --no-rollback:
    exit 1, nothing moves) as the traffic starts, then, WARM_S into the traffic at the earliest, the three canaries
    analysed at once in this process."""
    folder = tmp_path_factory.mktemp("canary")
    store, versions = _registered(folder)
    with ExitStack() as stack:
        servers = _served(stack, store, versions)
        prom = stack.enter_context(prometheus([s.url.removeprefix("http://") for s in servers.values()], folder))
        stack.callback(_stop_all, servers)  # after the traffic stops: the four drain at once, not one by one
        infer = {role: f"{s.url}/v2/models/{MODEL}/infer" for role, s in servers.items()}
        bad = [lookup_body(1000)] + [lookup_body(i % 16) for i in range(99)]  # 1 request in 100 fails, from the first
        streams = {role: Stream(infer[role], [chain_body(CHAIN_WIDTH)], RPS) for role in ("stable", "healthy")}
        streams["slow"] = Stream(infer["slow"], [chain_body(CHAIN_WIDTH)], SLOW_RPS)
        streams["failing"] = Stream(infer["failing"], bad, RPS)
        prom.wait_for_targets(len(servers))  # every counter's zero is scraped before the first request
        runs = {"once": (prom.url, "--canary-alias", "canary-cli", "--once", "--no-rollback", "--json")}
        e = Env(folder, store, prom, versions, streams, {}, {}, {}, {})
        stack.enter_context(traffic(list(streams.values()), max_s=120))
        warm_until = time.monotonic() + WARM_S
        # The command runs as the traffic warms up (it measures when its imports are done, seconds into the
        # traffic: 20+ requests, the first one failed), and is over before the analyses start: its imports
        # would add seconds of CPU contention to the healthy canary's p99 and to the stable one's.
        with ThreadPoolExecutor(max_workers=len(runs)) as commands:
            e.cli = dict(zip(runs, commands.map(lambda args: analyze_cli(e, *args), runs.values()), strict=True))
        time.sleep(max(0.0, warm_until - time.monotonic()))
        names = ["canary-healthy", "canary-slow", "canary-failing"]
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            list(pool.map(lambda alias: _analysed(e, alias), names))
        yield e


def outcome(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def test_a_healthy_canary_is_promoted_with_no_false_rollback_in_five_measurements(env: Env) -> None:
    doc = env.analyses["canary-healthy"]
    assert doc["decision"] == "promote" and doc["exit_code"] == 0, env.lines["canary-healthy"]
    assert doc["budgets"]["source"].startswith("recipe.json of") and doc["budgets"]["analysis"]["count"] == 5
    assert doc["stable"] == {"alias": "production", "version": env.versions["stable"]}
    ms = doc["measurements"]
    assert [m["verdict"] for m in ms] == ["passed"] * 5, env.lines["canary-healthy"]
    assert all(m["p99_ratio"] is not None and m["canary_error_ratio"] == 0 for m in ms), ms
    assert aliases(env.store, MODEL)["canary-healthy"] == env.versions["healthy"]  # nothing moved
    assert len(env.lines["canary-healthy"]) == 5 and doc["rollback"] is None


def test_a_slower_canary_is_rolled_back_within_two_intervals(env: Env) -> None:
    doc = env.analyses["canary-slow"]
    assert doc["decision"] == "rollback" and doc["exit_code"] == 1, env.lines["canary-slow"]
    failed = doc["measurements"][-1]
    assert failed["verdict"] == "failed" and failed["index"] <= 2, env.lines["canary-slow"]
    assert failed["p99_ratio"] >= 1.5 and "max_p99_ratio" in " ".join(failed["reasons"]), failed
    assert doc["rollback"]["version"] == env.versions["stable"]
    assert aliases(env.store, MODEL)["canary-slow"] == env.versions["stable"]
    assert env.seconds["canary-slow"] < env.seconds["canary-healthy"]  # it stopped at the failure
    assert "canary-slow rolled back to version" in doc["error"]


def test_a_canary_failing_one_request_in_a_hundred_is_rolled_back_within_two_intervals(env: Env) -> None:
    doc = env.analyses["canary-failing"]
    assert doc["decision"] == "rollback" and doc["exit_code"] == 1, env.lines["canary-failing"]
    failed = doc["measurements"][-1]
    assert failed["verdict"] == "failed" and failed["index"] <= 2, env.lines["canary-failing"]
    assert 0.002 < failed["canary_error_ratio"] < 0.05, failed
    assert "serving.slo.error_rate" in " ".join(failed["reasons"])
    assert aliases(env.store, MODEL)["canary-failing"] == env.versions["stable"]
    sent = env.streams["failing"].codes
    assert sent.get(500, 0) >= 1 and sent.get(200, 0) > 50 * sent[500], sent


def test_the_command_exits_1_on_a_failing_canary_and_moves_nothing_with_no_rollback(env: Env) -> None:
    proc = env.cli["once"]
    doc = outcome(proc)
    assert proc.returncode == 1, proc.stderr
    assert doc["command"] == "canary analyze" and doc["status"] == "failed" and doc["decision"] == "rollback"
    assert len(doc["measurements"]) == 1 and doc["rollback"] is None
    assert "not rolled back (--no-rollback)" in doc["error"]
    assert "measurement 1/1: canary version" in proc.stderr and proc.stderr.strip().splitlines()[-1] == (
        f"error: {doc['error']}"
    )
    assert aliases(env.store, MODEL)["canary-cli"] == env.versions["failing"]


def test_the_server_series_are_told_apart_by_version(env: Env) -> None:
    """What the analyses read: each served version's own requests; none for the version nobody serves."""
    for role in ("stable", "healthy", "slow", "failing"):
        scope = queries.Scope(MODEL, str(env.versions[role]))
        assert env.prom.query(queries.request_count(scope, 30)), role
    assert not env.prom.query(queries.request_count(queries.Scope(MODEL, str(env.versions["idle"])), 30))


def test_a_canary_without_traffic_is_not_enough_data(env: Env) -> None:
    recipe = env.folder / "short.yaml"
    recipe.write_text(
        f"extends: {REPO / 'recipes' / 'fp16.yaml'}\n"
        "rollout: {analysis: {interval_s: 0.5, count: 2, window_s: 10, min_requests: 20}}\n"
    )
    doc = analyze_mod.analyze(
        MODEL, prometheus=env.prom.url, tracking_uri=env.store, canary_alias="canary-idle", recipe=recipe
    )
    assert doc["decision"] == "not-enough-data" and len(doc["measurements"]) == 2
    assert doc["budgets"]["source"] == str(recipe) and doc["measurements"][0]["canary_requests"] == 0
    error = analyze_mod.decision_error(doc)
    assert error.exit_code == 2 and "not enough data in 2 of 2 measurements" in str(error)
    assert aliases(env.store, MODEL)["canary-idle"] == env.versions["idle"]


def test_an_unreachable_prometheus_is_a_stage_error_and_nothing_moves(env: Env) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StageError, match=r"^canary analyze: Prometheus at http://127.0.0.1:\d+ cannot be reached") as e:
        analyze_mod.analyze(MODEL, prometheus=url, tracking_uri=env.store, canary_alias="canary-cli", once=True)
    assert e.value.exit_code == 3 and "nothing rolled back" in str(e.value)
    assert aliases(env.store, MODEL)["canary-cli"] == env.versions["failing"]


# --- the decision alone (no Prometheus, no registry) ------------------------------------------------------------


def _scripted(monkeypatch: pytest.MonkeyPatch, verdicts: list[str], **analysis: Any) -> list[float]:
    """analyze() with the registry and the measurements replaced: measurement i has verdicts[i]; returns the pauses
    it asked for."""
    from optimize.recipe import AnalysisSection, SloSection

    b = analyze_mod.Budgets(SloSection(), AnalysisSection(interval_s=3, count=len(verdicts), **analysis), "test")
    monkeypatch.setattr(analyze_mod, "resolve", lambda *_a: (7, 6, b))

    def measure(_url: str, _model: str, _canary: int, _stable: int | None, _b: Any, index: int) -> Any:
        m = analyze_mod.Measurement(index=index, at=0.0, canary_requests=100.0, verdict=verdicts[index - 1])
        m.reasons = [] if m.verdict == "passed" else [f"reason {index}"]
        return m

    monkeypatch.setattr(analyze_mod, "measure", measure)
    return []


def _run(monkeypatch: pytest.MonkeyPatch, verdicts: list[str], **analysis: Any) -> dict[str, Any]:
    pauses = _scripted(monkeypatch, verdicts, **analysis)
    rolled: list[str] = []
    monkeypatch.setattr(
        promotion, "rollback", lambda model, alias, tracking_uri: rolled.append(alias) or {"version": 6}
    )
    doc = analyze_mod.analyze("m", prometheus="http://127.0.0.1:9", tracking_uri="sqlite:///x.db", sleep=pauses.append)
    doc["_rolled"], doc["_pauses"] = rolled, pauses
    return doc


def test_failures_within_the_limit_still_promote(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _run(monkeypatch, ["passed", "failed", "passed"], failure_limit=1)
    assert doc["decision"] == "promote" and analyze_mod.decision_error(doc) is None and doc["_rolled"] == []
    assert analyze_mod.promote_line(doc) == (
        "promote: m version 7 (canary) passed 3 measurement(s); promote it with "
        "`optimize promote m --to production --from canary`"
    )
    # measurement i is due interval_s × i after the first (the fake sleep does not pass the time)
    assert [round(p) for p in doc["_pauses"]] == [3, 6]


def test_the_failure_past_the_limit_stops_and_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _run(monkeypatch, ["failed", "passed", "failed", "passed"], failure_limit=1)
    assert doc["decision"] == "rollback" and len(doc["measurements"]) == 3 and doc["_rolled"] == ["canary"]
    error = analyze_mod.decision_error(doc)
    assert error.exit_code == 1 and "measurement 3 failed: reason 3; canary rolled back to version 6" in str(error)


def test_some_measurements_without_data_is_not_enough_data(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _run(monkeypatch, ["no-data", "passed", "passed"])
    error = analyze_mod.decision_error(doc)
    assert doc["decision"] == "not-enough-data" and error.exit_code == 2 and doc["_rolled"] == []
    assert "not enough data in 1 of 3 measurements (reason 1)" in str(error)


def test_a_prometheus_url_without_a_scheme_is_a_usage_error() -> None:
    with pytest.raises(RecipeError, match="--prometheus 'prometheus:9090'"):
        analyze_mod.analyze("m", prometheus="prometheus:9090", tracking_uri="sqlite:///x.db")
