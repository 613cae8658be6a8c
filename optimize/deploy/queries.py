"""The PromQL the rollout is judged by, built in one place: the PrometheusRule's alerts, Argo Rollouts' AnalysisTemplate
and `optimize canary analyze` run these same expressions, so an alert, an automatic analysis and a manual one cannot
disagree about what "the canary's p99" means.

The server's own series (`optimize serve`'s /metrics) of one registered version are selected by joining with
`optimize_model_info` on the scrape target, and carry its `model_version` label (the registered number, a string) from
there: `... * on(instance, job) group_left(model_version) optimize_model_info{name="NAME", model_version="N"}`. Every
server-side expression is aggregated `by (model_version)`, so with no version chosen it gives one series per served
version (one alert each), and with one chosen exactly one series.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from optimize.serving.metrics import ServerMetrics

# The container `optimize serve` runs in (the renderers name it so; cAdvisor and kube-state-metrics label by it).
CONTAINER = "server"
_JOIN = "on(instance, job) group_left(model_version)"
_UNITS = (("w", 604800.0), ("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0))


@dataclass(frozen=True)
class Scope:
    """Which server series a query reads: one registered model, one of its versions or all of them."""

    model: str  # registered model name (optimize_model_info's `name` label)
    # registered version number as a string; None: every version of the model (one result series per version).
    # May be a template placeholder such as "{{args.canary-version}}" (Argo Rollouts substitutes it).
    version: str | None = None


def duration(seconds: float) -> str:
    """`seconds` as a PromQL duration in its largest exact unit: 120 → "2m", 90 → "90s", 0.25 → "250ms"."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a PromQL duration needs a finite, non-negative number of seconds, got {seconds}")
    ms = round(seconds * 1000)
    if ms == 0:
        return "0s"
    if ms % 1000:
        return f"{ms}ms"
    for unit, size in _UNITS:
        if ms % round(size * 1000) == 0:
            return f"{ms // round(size * 1000)}{unit}"
    raise AssertionError("unreachable: every whole number of seconds is a number of 's'")


def quote(value: str) -> str:
    """A PromQL double-quoted string literal of `value` (backslash, quote and newlines escaped)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _matchers(**labels: str | None) -> str:
    """`{a="x", b!="y"}` from keyword arguments; a key ending in `__ne` / `__re` uses `!=` / `=~`; None is left out."""
    parts = []
    for key, value in labels.items():
        if value is None:
            continue
        op = "="
        if key.endswith("__ne"):
            key, op = key[:-4], "!="
        elif key.endswith("__re"):
            key, op = key[:-4], "=~"
        parts.append(f"{key}{op}{quote(value)}")
    return "{" + ", ".join(parts) + "}"


def model_info(scope: Scope) -> str:
    """The `optimize_model_info` selector of `scope`: one series per server process that serves it."""
    return "optimize_model_info" + _matchers(name=scope.model, model_version=scope.version)


def _joined(series: str, scope: Scope) -> str:
    return f"{series} * {_JOIN} {model_info(scope)}"


def _rate(metric: str, scope: Scope, window_s: float, matchers: str = "", fn: str = "rate") -> str:
    """`sum by (model_version) (fn(metric{matchers}[window]) joined with model_info)`."""
    return f"sum by (model_version) ({_joined(f'{fn}({metric}{matchers}[{duration(window_s)}])', scope)})"


def p99_seconds(scope: Scope, window_s: float, quantile: float = 0.99) -> str:
    """The `quantile` of the server's request latency (seconds, arrival to response) over the last `window_s`."""
    buckets = f"rate(optimize_request_duration_seconds_bucket[{duration(window_s)}])"
    return f"histogram_quantile({quantile:g}, sum by (le, model_version) ({_joined(buckets, scope)}))"


def error_ratio(scope: Scope, window_s: float) -> str:
    """Infer requests answered with anything but 200 / all infer requests, over the last `window_s`. Reads 0 (not
    nothing) while no request has failed, and nothing while no request came."""
    total = _rate("optimize_requests_total", scope, window_s)
    failed = _rate("optimize_requests_total", scope, window_s, _matchers(code__ne="200"))
    # a counter series appears with its first increment: before the first failure `failed` is empty
    return f"({failed} or {total} * 0) / {total}"


def request_count(scope: Scope, window_s: float) -> str:
    """Infer requests answered (any status) in the last `window_s`."""
    return _rate("optimize_requests_total", scope, window_s, fn="increase")


def shed_ratio(scope: Scope, window_s: float) -> str:
    """Requests refused with 503 by the queue (full, past their deadline, draining) / all infer requests (a shed
    request is answered, so counted in optimize_requests_total too), over the last `window_s`."""
    shed = _rate("optimize_shed_total", scope, window_s)
    return f"{shed} / {_rate('optimize_requests_total', scope, window_s)}"


def queue_saturation(scope: Scope, max_queue: int) -> str:
    """The fullest pod's queue: requests waiting / `max_queue` (serving.max_queue), now."""
    return f"max by (model_version) ({_joined('optimize_queue_depth', scope)}) / {max_queue}"


def p99_ratio(canary: Scope, stable: Scope, window_s: float) -> str:
    """The canary's p99 / the stable version's p99 over the last `window_s` (both scopes name one version)."""
    return f"{p99_seconds(canary, window_s)} / on() {p99_seconds(stable, window_s)}"


def _istio(service: str, namespace: str | None, version_label: str | None, extra: dict[str, str]) -> str:
    # reporter="destination": the server's sidecar measures every request once, whoever sent it
    return _matchers(
        reporter="destination",
        destination_service_name=service,
        destination_service_namespace=namespace,
        destination_version=version_label,
        **extra,
    )


def istio_p99_ms(service: str, namespace: str | None, version_label: str | None, window_s: float) -> str:
    """p99 (ms) of the requests Istio's sidecars saw reach `service` (pods labelled `version: version_label`; None:
    every version, one series each), over the last `window_s`."""
    sel = _istio(service, namespace, version_label, {})
    rate = f"rate(istio_request_duration_milliseconds_bucket{sel}[{duration(window_s)}])"
    return f"histogram_quantile(0.99, sum by (le, destination_version) ({rate}))"


def istio_error_ratio(service: str, namespace: str | None, version_label: str | None, window_s: float) -> str:
    """Requests to `service` Istio saw answered with anything but 200 / all of them, over the last `window_s`."""
    window = duration(window_s)
    every = _istio(service, namespace, version_label, {})
    total = f"sum by (destination_version) (rate(istio_requests_total{every}[{window}]))"
    not_ok = _istio(service, namespace, version_label, {"response_code__ne": "200"})
    failed = f"sum by (destination_version) (rate(istio_requests_total{not_ok}[{window}]))"
    return f"({failed} or {total} * 0) / {total}"


def pod_regex(app: str) -> str:
    """The names of `app`'s pods: Deployments `<app>-stable-…`/`<app>-canary-…` and the Rollout's `<app>-…`, each
    with its two generated suffixes, and not the pods of another app whose name starts with `<app>-`. `app` is a
    Kubernetes name (lowercase alphanumerics and '-'), nothing a regular expression would read as an operator."""
    return app + "(-stable|-canary)?-[a-z0-9]+-[a-z0-9]+"


def _per_pod(metric: str, app: str, namespace: str | None, extra: dict[str, str], window_s: float | None = None) -> str:
    """`sum by (namespace, pod)` of `metric` for `app`'s `server` containers (its rate over `window_s` if given)."""
    series = metric + _matchers(namespace=namespace, pod__re=pod_regex(app), container=CONTAINER, **extra)
    if window_s is not None:
        series = f"rate({series}[{duration(window_s)}])"
    return f"sum by (namespace, pod) ({series})"


def cpu_utilisation(app: str, namespace: str | None, window_s: float) -> str:
    """Each pod's CPU, one series per pod (labels namespace, pod): cores the `server` container used over the last
    `window_s` / its CPU limit. `max(...)` of it is the busiest pod's."""
    used = _per_pod("container_cpu_usage_seconds_total", app, namespace, {}, window_s)
    limit = _per_pod("kube_pod_container_resource_limits", app, namespace, {"resource": "cpu"})
    return f"{used} / {limit}"


def memory_utilisation(app: str, namespace: str | None) -> str:
    """Each pod's memory, one series per pod (labels namespace, pod): the `server` container's working set now / its
    memory limit. `max(...)` of it is the fullest pod's."""
    used = _per_pod("container_memory_working_set_bytes", app, namespace, {})
    limit = _per_pod("kube_pod_container_resource_limits", app, namespace, {"resource": "memory"})
    return f"{used} / {limit}"


def exported_metric_names() -> set[str]:
    """The series names `optimize serve` exports on /metrics: counters with `_total`, histograms with `_bucket`,
    `_sum` and `_count`, gauges as they are (read from the server's own metric definitions)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for family in ServerMetrics().registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', re.S)
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_TOKEN = re.compile(
    r"(?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:[a-zA-Z]\w*)?)"
    r"|(?P<ident>[a-zA-Z_:][\w:]*)"
)
_KEYWORDS = frozenset(
    "and or unless by without on ignoring group_left group_right bool offset atan2 inf nan".split()
    + "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio".split()
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords, label names in
    `{...}` or grouping lists, numbers or durations; plus any `{__name__="..."}` matcher's name."""
    names = set()
    for m in re.finditer(r"\{((?:[^{}\"]|\"(?:[^\"\\]|\\.)*\")*)\}", expr):
        names.update(_unescape(n) for n in _NAME_MATCHER.findall(m.group(1)))
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers (strings are gone, so no brace hides in them)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subquery steps
    text = _GROUPING.sub(" ", text)
    for m in _TOKEN.finditer(text):
        ident = m.group("ident")
        if ident is None or ident.lower() in _KEYWORDS:
            continue
        if text[m.end() :].lstrip().startswith("("):
            continue  # a function call
        names.add(ident)
    return names


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s)
