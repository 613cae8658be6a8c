"""Istio's traffic policy of a rollout (networking.istio.io/v1): the VirtualService that splits requests between
the stable and canary subsets with the SLO's timeout and retries, and the DestinationRule with the subsets, the
connection pool the server's queue can hold and outlier detection (the circuit breaker)."""

from __future__ import annotations

from typing import Any

from optimize.deploy.inputs import DeployInputs
from optimize.deploy.kubernetes import FOLDER, duration, metadata

API_VERSION = "networking.istio.io/v1"
ROUTE = "primary"
STABLE = "stable"
CANARY = "canary"
# Retry only what fails before the server did any work, or because the pod went away mid-request (inference has
# no side effects, so a second try is safe): a refused or failed connection, an HTTP/2 stream the server refused,
# a reset. Never 503: `optimize serve` sheds with 503 when its queue is full or a request cannot start in time, and
# retrying a shed request multiplies the load on a service that is already overloaded. (Istio's default retry
# policy does include 503 among its retriable status codes, which is why the route states its own.)
RETRY_ON = "connect-failure,refused-stream,reset"
RETRY_ATTEMPTS = 2


def canary_weight(inputs: DeployInputs) -> int:
    """The canary's share of requests in the plain (no Argo) rollout: the first of `rollout.steps`, or all of them
    on a first rollout (no stable version to share with)."""
    return inputs.rollout.steps[0] if inputs.stable is not None else 100


def virtual_service(inputs: DeployInputs, weights: dict[str, int]) -> dict[str, Any]:
    """VirtualService `<app>`: one HTTP route `primary` to the subsets in `weights` (subset name -> percent), with
    the SLO's timeout and retries."""
    app = inputs.app
    p99_s = inputs.serving.slo.p99_ms / 1000
    # A request still unanswered at twice the p99 budget is lost to its caller anyway: end it there rather than
    # hold the caller's connection. Each try gets the whole budget (perTryTimeout = timeout): a slow try is never
    # cut short and retried, which would send a second copy to a service that is slow because it is loaded.
    timeout = duration(2 * p99_s)
    return {
        "apiVersion": API_VERSION,
        "kind": "VirtualService",
        "metadata": metadata(inputs, app),
        "spec": {
            "hosts": [app],
            "http": [
                {
                    "name": ROUTE,
                    "route": [
                        {"destination": {"host": app, "subset": subset}, "weight": weight}
                        for subset, weight in weights.items()
                    ],
                    "timeout": timeout,
                    "retries": {"attempts": RETRY_ATTEMPTS, "perTryTimeout": timeout, "retryOn": RETRY_ON},
                }
            ],
        },
    }


def traffic_policy(inputs: DeployInputs) -> dict[str, Any]:
    """The DestinationRule's trafficPolicy: a connection pool sized to the server's queue, and outlier detection
    from `rollout.circuit_breaker`."""
    serving, breaker = inputs.serving, inputs.rollout.circuit_breaker
    # One pod holds at most serving.max_queue waiting requests plus one batch running. A client's sidecar keeps no
    # more than that pending or in flight towards the service: past it Envoy answers 503 at once (overflow)
    # instead of queueing requests in the mesh, where the server's queue timeout cannot see them.
    in_flight = serving.max_queue + serving.max_batch_size
    return {
        "connectionPool": {
            # HTTP/1.1 carries one request per connection at a time: as many connections as requests in flight
            "tcp": {"maxConnections": in_flight},
            "http": {"http1MaxPendingRequests": serving.max_queue, "http2MaxRequests": in_flight},
        },
        # A pod that answers 5xx several times in a row (crashing, out of memory, failing every run) leaves the
        # load balancing pool for a while; at most max_ejection_percent of the pods at once, so a fault shared by
        # every pod (overload, a bad version) cannot empty the pool.
        "outlierDetection": {
            "consecutive5xxErrors": breaker.consecutive_5xx,
            "interval": duration(breaker.interval_s),
            "baseEjectionTime": duration(breaker.base_ejection_s),
            "maxEjectionPercent": breaker.max_ejection_percent,
        },
    }


def destination_rule(inputs: DeployInputs, subsets: dict[str, dict[str, str]]) -> dict[str, Any]:
    """DestinationRule `<app>` (host `<app>`) with `subsets` (name -> pod labels) and the traffic policy."""
    return {
        "apiVersion": API_VERSION,
        "kind": "DestinationRule",
        "metadata": metadata(inputs, inputs.app),
        "spec": {
            "host": inputs.app,
            "trafficPolicy": traffic_policy(inputs),
            "subsets": [{"name": name, "labels": dict(labels)} for name, labels in subsets.items()],
        },
    }


def render(inputs: DeployInputs) -> dict[str, dict[str, Any]]:
    """The plain rollout's Istio objects by file path (in `kubernetes/`): the VirtualService at the first step's
    weights (the canary alone on a first rollout) and the DestinationRule whose subsets select the `track` label."""
    weight = canary_weight(inputs)
    weights = {CANARY: weight} if inputs.stable is None else {STABLE: 100 - weight, CANARY: weight}
    subsets = {track: {"track": track} for track in weights}
    return {
        f"{FOLDER}/virtualservice.yaml": virtual_service(inputs, weights),
        f"{FOLDER}/destinationrule.yaml": destination_rule(inputs, subsets),
    }
