"""`optimize canary analyze`: judge a running canary from Prometheus, for pipelines that step the rollout
themselves (Jenkins, GitHub Actions) rather than through Argo Rollouts. It runs the same PromQL as the Argo
AnalysisTemplate and the alerts (optimize.deploy.queries) against the same budgets, and decides:

- every `rollout.analysis.interval_s` (the first at once), up to `count` measurements, each over the last `window_s`:
  the canary's request count (under `min_requests`: this measurement has not enough data and neither passes nor
  fails), its p99 against `serving.slo.p99_ms`, its error ratio against `serving.slo.error_rate`, and its p99 /
  the stable version's p99 against `max_p99_ratio` (when a stable version exists, is another version, and has
  data in the window);
- more failed measurements than `failure_limit`: stop, roll the canary alias back (`optimize rollback`) unless
  told not to, and exit 1 (GateFailedError);
- all `count` measurements had data and at most `failure_limit` of them failed: promote (exit 0; the promotion
  itself is the pipeline's `optimize promote`);
- otherwise (some or every measurement without enough data, none failing beyond the limit): exit 2
  (NotEnoughDataError): nothing to decide on; send traffic or widen the window, then analyse again.

A Prometheus that cannot be reached or answers with an error is a StageError (exit 3): the analysis could not
run, which says nothing about the canary (a failed gate, 1) nor about the registry (5); the pipeline should
retry or stop, not roll back.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from optimize.deploy import queries
from optimize.errors import GateFailedError, OptimizeError, RecipeError, StageError, first_line
from optimize.lazy import lazy
from optimize.recipe import AnalysisSection, SloSection, load_recipe
from optimize.registry import promotion
from optimize.registry import tags as tag
from optimize.registry.connection import session
from optimize.registry.smoke import recorded_recipe, resolve_version

pydantic = lazy("pydantic")

QUERY_TIMEOUT_S = 10.0
COMMAND = "canary analyze"


class NotEnoughDataError(OptimizeError):
    """The canary served too few requests in the analysis windows to judge it (exit 2): nothing moves."""

    exit_code = 2


@dataclass(frozen=True)
class Budgets:
    """What a canary is judged against, and where it was read from (`source`: --recipe's path, the canary's
    recorded recipe.json, or the defaults)."""

    slo: SloSection
    analysis: AnalysisSection
    source: str


@dataclass
class Measurement:
    """One measurement over the window ending at `at` (UTC epoch seconds). Numbers are None where Prometheus had
    none (no requests, no stable version). `verdict`: passed, failed or no-data; `reasons`: why it failed or
    had no data."""

    index: int
    at: float
    canary_requests: float
    canary_p99_ms: float | None = None
    canary_error_ratio: float | None = None
    stable_requests: float | None = None
    stable_p99_ms: float | None = None
    p99_ratio: float | None = None
    verdict: str = "passed"
    reasons: list[str] = field(default_factory=list)


def prometheus_query(url: str, expr: str, timeout_s: float = QUERY_TIMEOUT_S) -> list[tuple[dict[str, str], float]]:
    """Evaluate `expr` now with Prometheus's HTTP API (`/api/v1/query`): [(labels, value)] of the instant vector
    (a scalar is one unlabelled value). Unreachable, silent past `timeout_s`, or an error answer: StageError."""
    full = f"{url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(full, timeout=timeout_s) as r:
            doc = json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = _error_text(e)
        raise StageError(
            f"{COMMAND}: Prometheus at {url} answered HTTP {e.code} to a query ({detail}); check --prometheus "
            "(the server's base URL, e.g. http://prometheus.monitoring:9090)"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise StageError(
            f"{COMMAND}: Prometheus at {url} cannot be reached ({first_line(reason)}); check --prometheus and that "
            "the server is up (nothing was decided, nothing rolled back)"
        ) from None
    if doc.get("status") != "success":
        raise StageError(f"{COMMAND}: Prometheus at {url} refused a query: {doc.get('error', doc)}")
    data = doc.get("data") or {}
    if data.get("resultType") == "scalar":
        return [({}, float(data["result"][1]))]
    return [(s.get("metric", {}), float(s["value"][1])) for s in data.get("result", [])]


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(e.read()).get("error"))[:300]
    except (ValueError, OSError, AttributeError):
        return first_line(e)


def _one(url: str, expr: str) -> float | None:
    """The single value of `expr` (None when the vector is empty or the value is NaN or infinite)."""
    values = [v for _, v in prometheus_query(url, expr) if math.isfinite(v)]
    return values[0] if values else None


def budgets(recipe: Path | None, recorded: dict[str, Any] | None, where: str) -> Budgets:
    """The SLO and analysis settings: from `recipe` (a recipe file), else from `recorded` (the canary's
    recipe.json, as a dict), else the defaults. A recorded recipe with bad sections is a RecipeError."""
    if recipe is not None:
        rec = load_recipe(recipe)
        return Budgets(rec.serving.slo, rec.rollout.analysis, str(recipe))
    if recorded is not None:
        try:
            slo = SloSection.model_validate((recorded.get("serving") or {}).get("slo") or {})
            analysis = AnalysisSection.model_validate((recorded.get("rollout") or {}).get("analysis") or {})
        except pydantic.ValidationError as e:
            raise RecipeError(f"{COMMAND}: {where}: {first_line(e)}; pass --recipe") from None
        return Budgets(slo, analysis, where)
    return Budgets(SloSection(), AnalysisSection(), "defaults")


def resolve(
    model: str, tracking_uri: str, canary_alias: str, stable_alias: str, recipe: Path | None
) -> tuple[int, int | None, Budgets]:
    """The canary's and the stable version's numbers (stable None when `stable_alias` is not set, or names the
    canary's own version) and the budgets (see `budgets`)."""
    with session(tracking_uri) as client:
        canary = resolve_version(client, f"models:/{model}@{canary_alias}", tracking_uri, command=COMMAND)
        aliases = dict(client.get_registered_model(model).aliases or {})
        stable = int(aliases[stable_alias]) if stable_alias in aliases else None
        recorded = recorded_recipe(client, canary) if recipe is None else None
    where = f"recipe.json of {model} version {canary.version}'s run"
    number = int(canary.version)
    return number, (stable if stable != number else None), budgets(recipe, recorded, where)


def measure(url: str, model: str, canary: int, stable: int | None, b: Budgets, index: int) -> Measurement:
    """One measurement of the canary (see the module docstring): its numbers, verdict and reasons."""
    a, slo = b.analysis, b.slo
    scope = queries.Scope(model, str(canary))
    requests = _one(url, queries.request_count(scope, a.window_s)) or 0.0
    m = Measurement(index=index, at=time.time(), canary_requests=requests)
    if m.canary_requests < a.min_requests:
        m.verdict = "no-data"
        m.reasons.append(
            f"{m.canary_requests:.0f} canary requests in the last {a.window_s:g} s, fewer than "
            f"rollout.analysis.min_requests {a.min_requests}"
        )
        return m
    p99_s = _one(url, queries.p99_seconds(scope, a.window_s))
    m.canary_p99_ms = None if p99_s is None else p99_s * 1000
    m.canary_error_ratio = _one(url, queries.error_ratio(scope, a.window_s))
    if m.canary_p99_ms is not None and m.canary_p99_ms > slo.p99_ms:
        m.reasons.append(f"p99 {m.canary_p99_ms:.1f} ms over serving.slo.p99_ms {slo.p99_ms:g}")
    if m.canary_error_ratio is not None and m.canary_error_ratio > slo.error_rate:
        m.reasons.append(f"error ratio {m.canary_error_ratio:.2%} over serving.slo.error_rate {slo.error_rate:.2%}")
    if stable is not None:
        other = queries.Scope(model, str(stable))
        m.stable_requests = _one(url, queries.request_count(other, a.window_s)) or 0.0
        stable_s = _one(url, queries.p99_seconds(other, a.window_s)) if m.stable_requests >= a.min_requests else None
        m.stable_p99_ms = None if stable_s is None else stable_s * 1000
        if m.stable_p99_ms and m.canary_p99_ms is not None:
            m.p99_ratio = m.canary_p99_ms / m.stable_p99_ms
            if m.p99_ratio > a.max_p99_ratio:
                m.reasons.append(
                    f"p99 {m.p99_ratio:.2f}× the stable version {stable}'s ({m.stable_p99_ms:.1f} ms), over "
                    f"rollout.analysis.max_p99_ratio {a.max_p99_ratio:g}"
                )
    m.verdict = "failed" if m.reasons else "passed"
    return m


def measurement_line(m: Measurement, count: int, canary: int, stable: int | None) -> str:
    """One line for a measurement, as the command prints it."""
    head = f"measurement {m.index}/{count}: canary version {canary}: {m.canary_requests:.0f} requests"
    if m.verdict == "no-data":
        return f"{head}; not enough data ({'; '.join(m.reasons)})"
    parts = [head]
    if m.canary_p99_ms is not None:
        parts.append(f"p99 {m.canary_p99_ms:.1f} ms")
    if m.canary_error_ratio is not None:
        parts.append(f"errors {m.canary_error_ratio:.2%}")
    if m.p99_ratio is not None:
        parts.append(f"p99 {m.p99_ratio:.2f}× stable version {stable}")
    elif stable is not None:
        parts.append(f"stable version {stable}: no data")
    tail = "passed" if m.verdict == "passed" else f"FAILED: {'; '.join(m.reasons)}"
    return f"{', '.join(parts)}: {tail}"


def analyze(
    model: str,
    *,
    prometheus: str,
    tracking_uri: str,
    recipe: Path | None = None,
    canary_alias: str = tag.CANARY,
    stable_alias: str = tag.PRODUCTION,
    once: bool = False,
    rollback: bool = True,
    on_measurement: Callable[[Measurement, str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Analyse `model`'s canary (see the module docstring) and return the outcome as a JSON-able dict: model,
    prometheus, canary {alias, version}, stable {alias, version} or null, budgets, measurements, decision
    (promote, rollback or not-enough-data), rollback (what `optimize rollback` did; null when it did not run)
    and rollback_error. `once`: a single measurement, now. `decision_error` turns a decision into its error."""
    parsed = urllib.parse.urlparse(prometheus)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise RecipeError(f"{COMMAND}: --prometheus {prometheus!r}: give the server's URL, e.g. http://127.0.0.1:9090")
    canary, stable, b = resolve(model, tracking_uri, canary_alias, stable_alias, recipe)
    count = 1 if once else b.analysis.count
    doc: dict[str, Any] = {
        "model": model,
        "prometheus": prometheus,
        "canary": {"alias": canary_alias, "version": canary},
        "stable": {"alias": stable_alias, "version": stable} if stable is not None else None,
        "budgets": {"source": b.source, "slo": b.slo.model_dump(), "analysis": b.analysis.model_dump()},
        "measurements": [],
        "decision": None,
        "rollback": None,
        "rollback_error": None,
    }
    start, failed = time.monotonic(), 0
    for i in range(count):
        pause = start + i * b.analysis.interval_s - time.monotonic()
        if pause > 0:
            sleep(pause)
        m = measure(prometheus, model, canary, stable, b, i + 1)
        doc["measurements"].append(asdict(m))
        if on_measurement is not None:
            on_measurement(m, measurement_line(m, count, canary, stable))
        failed += m.verdict == "failed"
        if failed > b.analysis.failure_limit:
            doc["decision"] = "rollback"
            break
    else:
        no_data = sum(m["verdict"] == "no-data" for m in doc["measurements"])
        doc["decision"] = "not-enough-data" if no_data else "promote"
    if doc["decision"] == "rollback" and rollback:
        try:
            doc["rollback"] = promotion.rollback(model, canary_alias, tracking_uri=tracking_uri)
        except OptimizeError as e:
            doc["rollback_error"] = first_line(e)
    return doc


def decision_error(doc: dict[str, Any]) -> OptimizeError | None:
    """The error a decision ends the command with: rollback → GateFailedError (1), not-enough-data →
    NotEnoughDataError (2); None for promote."""
    model, canary = doc["model"], doc["canary"]
    who = f"{COMMAND}: {model} version {canary['version']} ({canary['alias']})"
    ms = doc["measurements"]
    if doc["decision"] == "rollback":
        bad = [m for m in ms if m["verdict"] == "failed"]
        why = f"measurement {bad[-1]['index']} failed: {'; '.join(bad[-1]['reasons'])}"
        by_hand = f"run `optimize rollback {model} --alias {canary['alias']}`"
        if doc["rollback"] is not None:
            done = f"{canary['alias']} rolled back to version {doc['rollback']['version']}"
        elif doc["rollback_error"] is not None:
            done = f"the rollback failed ({doc['rollback_error']}); {by_hand}"
        else:
            done = f"not rolled back (--no-rollback): {by_hand}"
        return GateFailedError(f"{who}: {why}; {done}")
    if doc["decision"] == "not-enough-data":
        no_data = [m for m in ms if m["verdict"] == "no-data"]
        return NotEnoughDataError(
            f"{who}: not enough data in {len(no_data)} of {len(ms)} measurements ({no_data[-1]['reasons'][0]}); "
            "send it traffic or widen rollout.analysis.window_s, then analyse again. Nothing moved"
        )
    return None


def promote_line(doc: dict[str, Any], stable_alias: str = tag.PRODUCTION) -> str:
    """What the command prints when the canary passed."""
    model, canary, n = doc["model"], doc["canary"], len(doc["measurements"])
    return (
        f"promote: {model} version {canary['version']} ({canary['alias']}) passed {n} measurement(s); "
        f"promote it with `optimize promote {model} --to {stable_alias} --from {canary['alias']}`"
    )
