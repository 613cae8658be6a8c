"""The server's Prometheus metrics (prometheus_client, in their own CollectorRegistry so that two servers in one
process, as in tests, never share counters). `optimize loadtest` parses exactly these names from `/metrics`."""

from __future__ import annotations

from optimize.lazy import lazy

prom = lazy("prometheus_client")

# Seconds: the R10 series (steps of ~1.26×) from 1 ms to 10 s. A p99 is judged from these buckets by Prometheus's
# histogram_quantile, which interpolates within a bucket: with steps of 2-2.5× (as before) a 20 ms and a 35 ms p99
# could read the same, and a canary's p99 against the stable one's (a ratio of 1.25 fails it) was mostly bucket
# noise. Steps of 1.26× bound that error at the ratio's own scale; the SLO's p99 can be added as an exact boundary.
_R10 = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
LATENCY_BUCKETS = tuple(round(m * 10.0**e, 6) for e in range(-3, 1) for m in _R10) + (10.0,)
QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SHED_REASONS = ("queue_full", "deadline", "draining")
PRIORITIES = ("high", "low")


class ServerMetrics:
    """The serving metrics, each an attribute (prometheus_client objects), registered in `self.registry`:

    requests (`optimize_requests_total{code}`), request_duration (`optimize_request_duration_seconds`, arrival to
    response), queue_time (`optimize_queue_time_seconds`, enqueue to batch start), batch_size
    (`optimize_batch_size`, rows per model run), queue_depth (`optimize_queue_depth`, requests waiting), in_flight
    (`optimize_in_flight`, accepted and not answered), shed (`optimize_shed_total{reason,priority}`) and
    model_info (`optimize_model_info{name,model_version,sha256,variant,target}` = 1).
    """

    def __init__(self, latency_bounds_s: tuple[float, ...] = ()) -> None:
        """`latency_bounds_s`: extra latency bucket boundaries (seconds), e.g. serving.slo.p99_ms / 1000, so that
        a p99 at the budget is judged on a boundary rather than interpolated."""
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter(
            "optimize_requests", "Infer requests answered, by HTTP status code.", ["code"], registry=r
        )
        # A counter series that appears already at 1 hides that first increment from rate() and increase() (they
        # need two samples): a canary's first model failure would not count. Success and failure exist from the start.
        for code in ("200", "500"):
            self.requests.labels(code=code)
        self.request_duration = prom.Histogram(
            "optimize_request_duration_seconds",
            "Infer request latency in the server, arrival to response.",
            buckets=sorted({*LATENCY_BUCKETS, *(float(b) for b in latency_bounds_s if b > 0)}),
            registry=r,
        )
        self.queue_time = prom.Histogram(
            "optimize_queue_time_seconds", "Time a request waited, enqueue to batch start.", buckets=QUEUE_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.batch_size = prom.Histogram(
            "optimize_batch_size", "Rows per model run.", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = prom.Gauge("optimize_queue_depth", "Requests waiting in the queue.", registry=r)
        self.in_flight = prom.Gauge("optimize_in_flight", "Requests accepted and not yet answered.", registry=r)
        self.shed = prom.Counter(
            "optimize_shed", "Requests refused with 503, by reason and priority.", ["reason", "priority"], registry=r
        )
        for reason in SHED_REASONS:  # every series exists from the start, so a scrape before any shed reads 0
            for priority in PRIORITIES:
                self.shed.labels(reason=reason, priority=priority)
        self.model_info = prom.Gauge(
            "optimize_model_info",
            "The served model (value 1).",
            ["name", "model_version", "sha256", "variant", "target"],
            registry=r,
        )

    def set_model(self, name: str, version: str, sha256: str, variant: str, target: str) -> None:
        """Record the served model in `optimize_model_info`."""
        self.model_info.labels(name=name, model_version=version, sha256=sha256, variant=variant, target=target).set(1)

    def answered(self, code: int, seconds: float) -> None:
        """Count one answered infer request with its HTTP status and its time in the server."""
        self.requests.labels(code=str(code)).inc()
        self.request_duration.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The registry in the Prometheus text format, and its Content-Type."""
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
