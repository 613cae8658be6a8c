"""The alerts that guard a served version, from the same budgets that gated its build (`serving.slo`,
`rollout.alerts`, `rollout.analysis.max_p99_ratio`): a PrometheusRule for the Prometheus Operator, the same groups as
a plain rule file, and promtool unit tests generated from the budgets that prove each alert fires at budget × 1.05
(within one evaluation interval after its `for`) and stays silent at budget × 0.95.

Every expression is a `queries.py` query compared with its budget (`QUERY > BUDGET`), so the alerts, the Argo
analysis and `optimize canary analyze` read the same numbers the same way."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from optimize.deploy import queries
from optimize.deploy.inputs import DeployInputs
from optimize.deploy.queries import Scope, duration
from optimize.serving.metrics import LATENCY_BUCKETS

EVALUATION_INTERVAL_S = 30.0  # the rule group's `interval`, and the unit tests' evaluation_interval
FIRE_FACTOR = 1.05  # each alert's unit tests: its quantity at budget × this fires...
QUIET_FACTOR = 0.95  # ... and at budget × this never does
# Istio's default buckets of istio_request_duration_milliseconds (ms)
ISTIO_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000)
RULES_FILE = "monitoring/rules.yaml"
TESTS_FILE = "monitoring/rules.test.yaml"
PROMETHEUS_RULE_FILE = "monitoring/prometheusrule.yaml"

_JOB = "kubernetes-pods"  # the unit tests' scrape job (any name works: queries join on instance and job)
_LABEL_REF = re.compile(r"\{\{ \$labels\.(\w+) \}\}")


@dataclass(frozen=True)
class Series:
    """One unit-test input series: `start`, growing by `per_s` each second (0: a gauge)."""

    name: str
    labels: Mapping[str, str]
    start: float
    per_s: float = 0.0

    def selector(self) -> str:
        """`name{label="value", ...}` as promtool reads it."""
        inner = ", ".join(f"{k}={queries.quote(v)}" for k, v in self.labels.items())
        return f"{self.name}{{{inner}}}"

    def values(self, scrape_s: float, samples: int) -> str:
        """promtool's expanding notation: `start+incrementxN` for `samples` samples `scrape_s` apart."""
        return f"{_num(self.start)}+{_num(self.per_s * scrape_s)}x{samples - 1}"


@dataclass(frozen=True)
class Alert:
    """One alerting rule (`query > budget`), and how its unit tests drive its quantity to budget × a factor."""

    name: str
    query: str
    budget: float
    severity: str
    summary: str  # may name the result's labels as `{{ $labels.NAME }}`
    description: str
    series: Callable[[float], list[Series]]  # input series that put the alerted quantity at budget × factor
    fired_labels: Mapping[str, str]  # the result's labels when the tests' canary breaks the budget
    labels: Mapping[str, str] = field(default_factory=dict)  # static labels besides severity, service, model
    # the quantity is a counter's rate on its own (not a ratio of two rates over the same window): in the tests it
    # ramps up over the first window as the counters start, so it may first break its budget only near the window
    ramps: bool = False

    @property
    def expr(self) -> str:
        """The rule's expression."""
        return f"{self.query} > {_num(self.budget)}"


def render(inputs: DeployInputs) -> dict[str, dict]:
    """The monitoring/ files: the PrometheusRule `<app>-slo`, the same groups as a plain Prometheus rule file
    (`rules.yaml`, for promtool and Prometheus without the Operator) and its promtool unit tests."""
    groups = rule_groups(inputs)
    metadata: dict = {
        "name": f"{inputs.app}-slo",
        "labels": {"app.kubernetes.io/name": inputs.app, "app.kubernetes.io/part-of": "optimize"},
    }
    if inputs.rollout.namespace:
        metadata["namespace"] = inputs.rollout.namespace
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": metadata}
    return {
        PROMETHEUS_RULE_FILE: {**rule, "spec": {"groups": groups}},
        RULES_FILE: {"groups": groups},
        TESTS_FILE: unit_tests(inputs),
    }


def rule_groups(inputs: DeployInputs) -> list[dict]:
    """The rule groups (one: `<app>-slo`, evaluated every EVALUATION_INTERVAL_S)."""
    for_s = inputs.rollout.alerts.for_s
    rules = []
    for alert in alerts(inputs):
        rule: dict = {"alert": alert.name, "expr": alert.expr}
        if for_s > 0:
            rule["for"] = duration(for_s)
        rule["labels"] = {**_static_labels(inputs, alert), **alert.labels}
        rule["annotations"] = {"summary": alert.summary, "description": alert.description}
        rules.append(rule)
    return [{"name": f"{inputs.app}-slo", "interval": duration(EVALUATION_INTERVAL_S), "rules": rules}]


def _static_labels(inputs: DeployInputs, alert: Alert) -> dict[str, str]:
    return {"severity": alert.severity, "service": inputs.app, "model": inputs.canary.model}


def alerts(inputs: DeployInputs) -> list[Alert]:
    """Every alert of the render, in rule order: latency, errors, resources, load shedding, canary regression."""
    world = _World(inputs)
    out = [*_latency_alerts(world), *_error_alerts(world), *_resource_alerts(world), *_load_alerts(world)]
    if inputs.stable is not None:
        out.append(_canary_alert(world))
    return out


@dataclass(frozen=True)
class _World:
    """What the alerts and their test series are written against: names, budgets, and the test's pods."""

    inputs: DeployInputs

    @property
    def window(self) -> float:
        return self.inputs.rollout.alerts.window_s

    @property
    def model(self) -> str:
        return self.inputs.canary.model

    @property
    def namespace(self) -> str:
        return self.inputs.rollout.namespace or "default"

    def versions(self, factor: float) -> list[tuple[str, str, float]]:
        """(registered version, pod label, factor) of the tests' servers: the canary at `factor`, the stable version
        (if any) within its budget, so an alert that does not tell versions apart shows."""
        out = [(str(self.inputs.canary.number), self.inputs.canary.label, factor)]
        if self.inputs.stable is not None:
            out.append((str(self.inputs.stable.number), self.inputs.stable.label, QUIET_FACTOR))
        return out

    def target(self, version: str) -> dict[str, str]:
        """The scrape target labels of the tests' server of `version`."""
        host = 1 if version == str(self.inputs.canary.number) else 2  # one server each, never the same target
        return {"instance": f"10.0.0.{host}:{self.inputs.rollout.port}", "job": _JOB}

    def model_info(self, version: str) -> Series:
        """The `optimize_model_info` series the server of `version` exports."""
        labels = {"name": self.model, "model_version": version, "sha256": "0" * 64, "variant": "v", "target": "cpu"}
        return Series("optimize_model_info", {**labels, **self.target(version)}, 1.0)

    def pod(self, track: str) -> str:
        """A pod name as a Deployment gives it (template hash and random suffix)."""
        return f"{self.inputs.app}-{track}-5d8f7b9c6d-x7k2p"

    def words(self) -> dict[str, str]:
        """The window and the `for` as descriptions say them."""
        for_s = self.inputs.rollout.alerts.for_s
        held = f"for {duration(for_s)}" if for_s > 0 else "at the last evaluation (no `for`)"
        return {"window": duration(self.window), "for": held}


def _latency_alerts(w: _World) -> list[Alert]:
    slo = w.inputs.serving.slo
    budget_s = slo.p99_ms / 1000
    words = w.words()
    canary = w.versions(FIRE_FACTOR)[0]

    def server(factor: float) -> list[Series]:
        out = []
        for version, _, f in w.versions(factor):
            target = w.target(version)
            out += [
                w.model_info(version),
                *_histogram("optimize_request_duration_seconds", target, budget_s * f, budget_s),
            ]
        return out

    def istio(factor: float) -> list[Series]:
        out = []
        for _, label, f in w.versions(factor):
            out += _histogram("istio_request_duration_milliseconds", _istio_labels(w, label), slo.p99_ms * f)
        return out

    return [
        Alert(
            "OptimizeLatencyP99OverBudget",
            queries.p99_seconds(Scope(w.model), w.window),
            budget_s,
            "critical",
            f"{w.model} version {{{{ $labels.model_version }}}}: p99 latency over its {slo.p99_ms:g} ms budget",
            f"The 99th percentile of the server's request latency (arrival to response, over {words['window']}) of "
            f"{w.model} version {{{{ $labels.model_version }}}} has been above serving.slo.p99_ms = {slo.p99_ms:g} ms "
            f"{words['for']}.",
            server,
            {"model_version": canary[0]},
        ),
        Alert(
            "OptimizeIstioLatencyP99OverBudget",
            queries.istio_p99_ms(w.inputs.app, w.inputs.rollout.namespace, None, w.window),
            slo.p99_ms,
            "critical",
            f"{w.inputs.app} {{{{ $labels.destination_version }}}}: p99 latency seen by Istio over its "
            f"{slo.p99_ms:g} ms budget",
            f"The 99th percentile of the request duration Istio measured for service {w.inputs.app}, pods labelled "
            f"version={{{{ $labels.destination_version }}}} (over {words['window']}, queueing and the sidecar "
            f"included), has been above serving.slo.p99_ms = {slo.p99_ms:g} ms {words['for']}.",
            istio,
            {"destination_version": canary[1]},
        ),
    ]


def _error_alerts(w: _World) -> list[Alert]:
    budget = w.inputs.serving.slo.error_rate
    words = w.words()
    canary = w.versions(FIRE_FACTOR)[0]

    def server(factor: float) -> list[Series]:
        out = []
        for version, _, f in w.versions(factor):
            target = w.target(version)
            out += [w.model_info(version), *_requests("optimize_requests_total", target, "code", budget * f)]
        return out

    def istio(factor: float) -> list[Series]:
        out = []
        for _, label, f in w.versions(factor):
            out += _requests("istio_requests_total", _istio_labels(w, label), "response_code", budget * f)
        return out

    return [
        Alert(
            "OptimizeErrorRateOverBudget",
            queries.error_ratio(Scope(w.model), w.window),
            budget,
            "critical",
            f"{w.model} version {{{{ $labels.model_version }}}}: error rate over its {_pct(budget)} budget",
            f"More than {_pct(budget)} (serving.slo.error_rate) of the infer requests to {w.model} version "
            f"{{{{ $labels.model_version }}}} were answered with a status other than 200 (over {words['window']}), "
            f"{words['for']}.",
            server,
            {"model_version": canary[0]},
        ),
        Alert(
            "OptimizeIstioErrorRateOverBudget",
            queries.istio_error_ratio(w.inputs.app, w.inputs.rollout.namespace, None, w.window),
            budget,
            "critical",
            f"{w.inputs.app} {{{{ $labels.destination_version }}}}: error rate seen by Istio over its "
            f"{_pct(budget)} budget",
            f"More than {_pct(budget)} (serving.slo.error_rate) of the requests Istio saw reach service "
            f"{w.inputs.app}, pods labelled version={{{{ $labels.destination_version }}}}, were answered with a "
            f"status other than 200 (over {words['window']}), {words['for']}.",
            istio,
            {"destination_version": canary[1]},
        ),
    ]


def _resource_alerts(w: _World) -> list[Alert]:
    slo = w.inputs.serving.slo
    words = w.words()
    app, ns = w.inputs.app, w.inputs.rollout.namespace
    cpu_limit, memory_limit = 2.0, 512.0 * 2**20  # the tests' pods' limits (any positive number works)

    def cpu(factor: float) -> list[Series]:
        return _pods(w, factor, slo.cpu_utilisation, cpu_limit, "cpu", "container_cpu_usage_seconds_total")

    def memory(factor: float) -> list[Series]:
        budget = slo.memory_utilisation
        return _pods(w, factor, budget, memory_limit, "memory", "container_memory_working_set_bytes")

    fired = {"namespace": w.namespace, "pod": w.pod("canary")}
    pod = "Pod {{ $labels.pod }} (namespace {{ $labels.namespace }})"
    return [
        Alert(
            "OptimizeCPUOverBudget",
            queries.cpu_utilisation(app, ns, w.window),
            slo.cpu_utilisation,
            "warning",
            f"{{{{ $labels.pod }}}}: CPU over {_pct(slo.cpu_utilisation)} of its limit",
            f"{pod} used more than {_pct(slo.cpu_utilisation)} of its CPU limit (serving.slo.cpu_utilisation, the "
            f"autoscaler's target) over {words['window']}, {words['for']}: the autoscaler is not keeping up "
            "(at rollout.replicas.max?) or the pods are throttled.",
            cpu,
            fired,
            ramps=True,
        ),
        Alert(
            "OptimizeMemoryOverBudget",
            queries.memory_utilisation(app, ns),
            slo.memory_utilisation,
            "warning",
            f"{{{{ $labels.pod }}}}: memory over {_pct(slo.memory_utilisation)} of its limit",
            f"{pod} has had a working set above {_pct(slo.memory_utilisation)} of its memory limit "
            f"(serving.slo.memory_utilisation) {words['for']}: an out-of-memory kill is near.",
            memory,
            fired,
        ),
    ]


def _load_alerts(w: _World) -> list[Alert]:
    a, serving = w.inputs.rollout.alerts, w.inputs.serving
    words = w.words()
    canary = w.versions(FIRE_FACTOR)[0]

    def shed(factor: float) -> list[Series]:
        out = []
        for version, _, f in w.versions(factor):
            target = w.target(version)
            requests = _requests("optimize_requests_total", target, "code", a.shed_rate * f, failed="503")
            shed = {"reason": "queue_full", "priority": "low", **target}  # every 503 here is a shed request
            out += [w.model_info(version), *requests, Series("optimize_shed_total", shed, 0.0, requests[1].per_s)]
        return out

    def queue(factor: float) -> list[Series]:
        out = []
        for version, _, f in w.versions(factor):
            depth = a.queue_saturation * serving.max_queue * f
            out += [w.model_info(version), Series("optimize_queue_depth", w.target(version), depth)]
        return out

    depth = a.queue_saturation * serving.max_queue
    return [
        Alert(
            "OptimizeShedRateOverBudget",
            queries.shed_ratio(Scope(w.model), w.window),
            a.shed_rate,
            "warning",
            f"{w.model} version {{{{ $labels.model_version }}}}: over {_pct(a.shed_rate)} of requests shed",
            f"More than {_pct(a.shed_rate)} (rollout.alerts.shed_rate) of the requests to {w.model} version "
            f"{{{{ $labels.model_version }}}} were refused with 503 by its queue (full, past their deadline or "
            f"draining) over {words['window']}, {words['for']}: it needs more pods.",
            shed,
            {"model_version": canary[0]},
        ),
        Alert(
            "OptimizeQueueSaturated",
            queries.queue_saturation(Scope(w.model), serving.max_queue),
            a.queue_saturation,
            "warning",
            f"{w.model} version {{{{ $labels.model_version }}}}: queue over {_pct(a.queue_saturation)} full",
            f"A pod of {w.model} version {{{{ $labels.model_version }}}} has had more than {depth:g} requests waiting "
            f"({_pct(a.queue_saturation)} of serving.max_queue = {serving.max_queue}, rollout.alerts."
            f"queue_saturation) {words['for']}: when the queue is full, requests are refused.",
            queue,
            {"model_version": canary[0]},
        ),
    ]


def _canary_alert(w: _World) -> Alert:
    assert w.inputs.stable is not None
    ratio = w.inputs.rollout.analysis.max_p99_ratio
    canary, stable = str(w.inputs.canary.number), str(w.inputs.stable.number)
    budget_s = w.inputs.serving.slo.p99_ms / 1000
    stable_p99_s = budget_s / 2  # the tests' stable version, well within its budget

    def series(factor: float) -> list[Series]:
        return [
            w.model_info(stable),
            *_histogram("optimize_request_duration_seconds", w.target(stable), stable_p99_s, budget_s),
            w.model_info(canary),
            *_histogram("optimize_request_duration_seconds", w.target(canary), stable_p99_s * ratio * factor, budget_s),
        ]

    words = w.words()
    return Alert(
        "OptimizeCanaryP99Regressed",
        queries.p99_ratio(Scope(w.model, canary), Scope(w.model, stable), w.window),
        ratio,
        "warning",
        f"{w.model} canary version {canary}: p99 over {ratio:g} × stable version {stable}'s",
        f"The server p99 latency of the canary, {w.model} version {canary}, has been more than "
        f"rollout.analysis.max_p99_ratio = {ratio:g} times the stable version {stable}'s (over {words['window']}) "
        f"{words['for']}: stop the rollout or roll back (optimize rollback).",
        series,
        {},
        {"canary_version": canary, "stable_version": stable},
    )


def _istio_labels(w: _World, version_label: str) -> dict[str, str]:
    return {
        "reporter": "destination",
        "destination_service_name": w.inputs.app,
        "destination_service_namespace": w.namespace,
        "destination_version": version_label,
    }


def _pods(w: _World, factor: float, budget: float, limit: float, resource: str, usage: str) -> list[Series]:
    """cAdvisor usage and kube-state-metrics limit series of a canary pod at budget × factor and a stable pod within
    budget; plus the canary pod's own cgroup series (container="") that a query must not count twice."""
    unit = "core" if resource == "cpu" else "byte"
    out = []
    tracks = [("canary", factor)] + ([("stable", QUIET_FACTOR)] if w.inputs.stable is not None else [])
    for track, f in tracks:
        pod = {"namespace": w.namespace, "pod": w.pod(track)}
        used = budget * f * limit
        counter = usage.endswith("_total")
        out.append(Series(usage, {**pod, "container": "server"}, 0.0 if counter else used, used if counter else 0.0))
        if track == "canary":
            out.append(Series(usage, {**pod, "container": ""}, 0.0 if counter else used, used if counter else 0.0))
        limits = {**pod, "container": "server", "resource": resource, "unit": unit}
        out.append(Series("kube_pod_container_resource_limits", limits, limit))
    return out


def _histogram(
    name: str, labels: Mapping[str, str], p99: float, budget: float | None = None, per_s: float = 100.0
) -> list[Series]:
    """`name`_bucket/_count/_sum series whose histogram_quantile(0.99, rate(...)) is exactly `p99`: 99 % of the
    requests fall below `lo` < p99 ≤ `hi` (two neighbouring bucket bounds) but for a share placed so that linear
    interpolation within (lo, hi] lands on `p99`. The buckets are the exporter's (the server's with the `budget`
    bound it adds, or Istio's defaults)."""
    ms = name.endswith("_milliseconds")
    extra = {budget} if budget else set()
    bounds = sorted({float(b) for b in (ISTIO_BUCKETS_MS if ms else LATENCY_BUCKETS)} | extra)
    # outside the real buckets, histogram_quantile answers the last bound, or cannot interpolate below the first
    if p99 > bounds[-1]:
        bounds.append(p99 * 2)
    if p99 <= bounds[0]:
        bounds.insert(0, p99 / 2)
    i = next(i for i, b in enumerate(bounds) if p99 <= b)
    lo, hi = (bounds[i - 1] if i else 0.0), bounds[i]
    f = (p99 - lo) / (hi - lo)
    rank, spread = 0.99 * per_s, 0.01 * per_s  # rank = 0.99 × count; (lo, hi] holds `spread` requests
    below, up_to_hi = rank - f * spread, rank + (1 - f) * spread
    out = []
    for b in bounds:
        cumulative = below if b <= lo else (up_to_hi if b == hi else per_s)
        out.append(Series(f"{name}_bucket", {**labels, "le": _num(b)}, 0.0, cumulative))
    out.append(Series(f"{name}_bucket", {**labels, "le": "+Inf"}, 0.0, per_s))
    out.append(Series(f"{name}_count", labels, 0.0, per_s))
    out.append(Series(f"{name}_sum", labels, 0.0, per_s * p99 / 2))
    return out


def _requests(name: str, labels: Mapping[str, str], code: str, ratio: float, failed: str = "500") -> list[Series]:
    """Request counters (100 per second) with `ratio` of them answered `failed`, the rest 200."""
    total = 100.0
    return [
        Series(name, {**labels, code: "200"}, 0.0, total * (1 - ratio)),
        Series(name, {**labels, code: failed}, 0.0, total * ratio),
    ]


def unit_tests(inputs: DeployInputs) -> dict:
    """promtool's test file for `rules.yaml`: for every alert, a test group whose series put its quantity at
    budget × FIRE_FACTOR (not firing before its `for`, firing one `for` after the window fills) and one at budget ×
    QUIET_FACTOR (never firing)."""
    eval_s = EVALUATION_INTERVAL_S
    window_s, for_s = inputs.rollout.alerts.window_s, inputs.rollout.alerts.for_s
    scrape_s = round(min(eval_s, window_s / 4) * 1000) / 1000  # ≥ 4 samples a window: rate() sees them
    steady = math.ceil(window_s / eval_s) * eval_s  # every quantity is exact from here: its window is full
    fire = math.ceil((steady + for_s) / eval_s) * eval_s
    samples = math.ceil(fire / scrape_s) + 2
    groups = []
    static = {a.name: {**_static_labels(inputs, a), **a.labels} for a in alerts(inputs)}
    for alert in alerts(inputs):
        cases: list[dict] = []
        # The earliest evaluation at which the quantity can break its budget: at once, or for a rate of a counter
        # that starts with the test, not before the window has nearly filled (with the counters starting at 0,
        # rate() is at most target × (t + 2 scrapes) / window then)
        earliest = math.ceil(max(0.0, window_s / FIRE_FACTOR - 2 * scrape_s) / eval_s) * eval_s if alert.ramps else 0
        before = math.ceil((earliest + for_s) / eval_s) * eval_s - eval_s  # the last evaluation that must be quiet
        if for_s > 0 and before >= 0:
            cases.append({"eval_time": duration(before), "alertname": alert.name, "exp_alerts": []})
        labels = {**alert.fired_labels, **static[alert.name]}
        expected = {
            "exp_labels": labels,
            "exp_annotations": {
                "summary": _expand(alert.summary, labels),
                "description": _expand(alert.description, labels),
            },
        }
        cases.append({"eval_time": duration(fire), "alertname": alert.name, "exp_alerts": [expected]})
        groups.append(_group(alert, FIRE_FACTOR, scrape_s, samples, cases))
        quiet = [{"eval_time": duration(t), "alertname": alert.name, "exp_alerts": []} for t in (steady, fire)]
        groups.append(_group(alert, QUIET_FACTOR, scrape_s, samples, quiet))
    return {
        "rule_files": [RULES_FILE.rsplit("/", 1)[-1]],
        "evaluation_interval": duration(eval_s),
        "tests": groups,
    }


def _group(alert: Alert, factor: float, scrape_s: float, samples: int, cases: list[dict]) -> dict:
    return {
        "name": f"{alert.name} at budget x {factor:g}",
        "interval": duration(scrape_s),
        "input_series": [{"series": s.selector(), "values": s.values(scrape_s, samples)} for s in alert.series(factor)],
        "alert_rule_test": cases,
    }


def _expand(template: str, labels: Mapping[str, str]) -> str:
    """The annotation Prometheus writes for an alert with `labels` (templates here name labels only)."""
    return _LABEL_REF.sub(lambda m: labels[m.group(1)], template)


def _pct(ratio: float) -> str:
    return f"{ratio * 100:g}%"


def _num(x: float) -> str:
    """A number as PromQL and promtool read it, without a float's noise where it is whole."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)
