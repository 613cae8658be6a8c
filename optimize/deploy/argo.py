"""The Argo Rollouts variant of a rollout (folder `argo-rollouts/`): a Rollout that steps the canary's weight through
Istio and runs an analysis after each step, the AnalysisTemplate whose Prometheus queries are the same PromQL as
the alerts and `optimize canary analyze` (optimize.deploy.queries), and the Service, PodDisruptionBudget,
HorizontalPodAutoscaler, VirtualService and DestinationRule the Rollout works with."""

from __future__ import annotations

from typing import Any

from optimize.deploy import queries
from optimize.deploy.inputs import DeployInputs
from optimize.deploy.istio import CANARY, ROUTE, STABLE, destination_rule, virtual_service
from optimize.deploy.kubernetes import (
    NAME,
    autoscaler,
    duration,
    metadata,
    pod_disruption_budget,
    pod_template,
    service,
    version_annotations,
)
from optimize.deploy.sizing import Sizing, size

FOLDER = "argo-rollouts"
API_VERSION = "argoproj.io/v1alpha1"
DEFAULT_PROMETHEUS = "http://prometheus.monitoring:9090"
CANARY_ARG = "canary-version"
STABLE_ARG = "stable-version"
ADDRESS_ARG = "prometheus-address"


def template_name(inputs: DeployInputs) -> str:
    """The AnalysisTemplate's name: `<app>-analysis`."""
    return f"{inputs.app}-analysis"


def _number(x: float) -> str:
    """`x` as a plain decimal for an expr condition (no exponent: 1e-05 reads as 0.00001)."""
    return f"{x:.12f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def _measured(x: str) -> str:
    # Prometheus answers a vector: [] when no series matched, NaN for 0/0 (no request in the window). Neither is a
    # pass or a fail: with both conditions false the measurement is Inconclusive and the Rollout pauses for a person
    # to look, as `optimize canary analyze` exits 2 on too little data.
    return f"len(result) > 0 && !isNaN(result[0]) && {x}"


def _metric(inputs: DeployInputs, name: str, query: str, success: str, failure: str) -> dict[str, Any]:
    analysis = inputs.rollout.analysis
    return {
        "name": name,
        # The first measurement waits one window after the step, so that the window holds only traffic at the new
        # weight; then every interval_s, count times; more than failure_limit failures abort the Rollout.
        "initialDelay": duration(analysis.window_s),
        "interval": duration(analysis.interval_s),
        "count": analysis.count,
        "failureLimit": analysis.failure_limit,
        "successCondition": success,
        "failureCondition": failure,
        "provider": {"prometheus": {"address": f"{{{{args.{ADDRESS_ARG}}}}}", "query": query}},
    }


def metrics(inputs: DeployInputs) -> list[dict[str, Any]]:
    """The AnalysisTemplate's metrics: enough canary requests in the window (too few: Inconclusive, never a
    failure), the canary's p99 and error ratio against `serving.slo`, and, when a stable version exists, the
    canary's p99 against the stable's (`rollout.analysis.max_p99_ratio`)."""
    analysis, slo = inputs.rollout.analysis, inputs.serving.slo
    window = analysis.window_s
    model = inputs.canary.model
    canary = queries.Scope(model, f"{{{{args.{CANARY_ARG}}}}}")
    p99_budget_s = _number(slo.p99_ms / 1000)
    out = [
        _metric(
            inputs,
            "canary-requests",
            queries.request_count(canary, window),
            _measured(f"result[0] >= {analysis.min_requests}"),
            "false",
        ),
        _metric(
            inputs,
            "canary-p99",
            queries.p99_seconds(canary, window),
            _measured(f"result[0] <= {p99_budget_s}"),
            _measured(f"result[0] > {p99_budget_s}"),
        ),
        _metric(
            inputs,
            "canary-error-ratio",
            queries.error_ratio(canary, window),
            _measured(f"result[0] <= {_number(slo.error_rate)}"),
            _measured(f"result[0] > {_number(slo.error_rate)}"),
        ),
    ]
    if inputs.stable is not None:
        stable = queries.Scope(inputs.stable.model, f"{{{{args.{STABLE_ARG}}}}}")
        ratio = _number(analysis.max_p99_ratio)
        out.append(
            _metric(
                inputs,
                "canary-p99-vs-stable",
                queries.p99_ratio(canary, stable, window),
                _measured(f"result[0] <= {ratio}"),
                _measured(f"result[0] > {ratio}"),
            )
        )
    return out


def analysis_template(inputs: DeployInputs, prometheus_address: str = DEFAULT_PROMETHEUS) -> dict[str, Any]:
    """AnalysisTemplate `<app>-analysis`: args canary-version (and stable-version when there is a stable version:
    registered version numbers, what optimize_model_info's `version` label carries) and prometheus-address
    (default `prometheus_address`); its metrics (see `metrics`)."""
    args: list[dict[str, str]] = [{"name": CANARY_ARG}]
    if inputs.stable is not None:
        args.append({"name": STABLE_ARG})
    args.append({"name": ADDRESS_ARG, "value": prometheus_address})
    return {
        "apiVersion": API_VERSION,
        "kind": "AnalysisTemplate",
        "metadata": metadata(inputs, template_name(inputs)),
        "spec": {"args": args, "metrics": metrics(inputs)},
    }


def steps(inputs: DeployInputs) -> list[dict[str, Any]]:
    """The canary steps: for each weight of `rollout.steps` but the final 100 (Argo promotes fully after the last
    step), set the weight, then analyse it."""
    args = [{"name": CANARY_ARG, "value": str(inputs.canary.number)}]
    if inputs.stable is not None:
        args.append({"name": STABLE_ARG, "value": str(inputs.stable.number)})
    out: list[dict[str, Any]] = []
    for weight in inputs.rollout.steps:
        if weight == 100:
            break
        # a fresh object per step: a YAML writer would otherwise print a shared one as an anchor and aliases
        analysis = {"templates": [{"templateName": template_name(inputs)}], "args": [dict(a) for a in args]}
        out += [{"setWeight": weight}, {"analysis": analysis}]
    return out


def rollout(inputs: DeployInputs, sized: Sizing) -> dict[str, Any]:
    """Rollout `<app>`: the canary version's pods (no `track` label: Argo tells its ReplicaSets apart by
    rollouts-pod-template-hash, which it writes into the DestinationRule's subsets), canary steps with Istio
    subset-level traffic splitting. No `replicas`: the HorizontalPodAutoscaler owns the count."""
    app = inputs.app
    return {
        "apiVersion": API_VERSION,
        "kind": "Rollout",
        "metadata": metadata(inputs, app, annotations=version_annotations(inputs.canary)),
        "spec": {
            "selector": {"matchLabels": {NAME: app}},
            "template": pod_template(inputs, inputs.canary, sized, None),
            "strategy": {
                "canary": {
                    "trafficRouting": {
                        "istio": {
                            "virtualService": {"name": app, "routes": [ROUTE]},
                            "destinationRule": {"name": app, "canarySubsetName": CANARY, "stableSubsetName": STABLE},
                        }
                    },
                    "steps": steps(inputs),
                }
            },
        },
    }


def render(
    inputs: DeployInputs, sized: Sizing | None = None, *, prometheus_address: str = DEFAULT_PROMETHEUS
) -> dict[str, dict[str, Any]]:
    """The `argo-rollouts/` folder's objects by file path: Rollout, AnalysisTemplate, Service, PodDisruptionBudget,
    HPA (targeting the Rollout), VirtualService (stable 100 / canary 0: Argo moves the weights) and DestinationRule
    (subsets with no labels of their own: Argo adds each ReplicaSet's pod-template hash). `sized`: the canary's
    sizing (default: `size`)."""
    sized = sized if sized is not None else size(inputs)
    target = {"apiVersion": API_VERSION, "kind": "Rollout", "name": inputs.app}
    return {
        f"{FOLDER}/rollout.yaml": rollout(inputs, sized),
        f"{FOLDER}/analysistemplate.yaml": analysis_template(inputs, prometheus_address),
        f"{FOLDER}/service.yaml": service(inputs),
        f"{FOLDER}/pdb.yaml": pod_disruption_budget(inputs),
        f"{FOLDER}/hpa.yaml": autoscaler(inputs, inputs.app, target, sized),
        f"{FOLDER}/virtualservice.yaml": virtual_service(inputs, {STABLE: 100, CANARY: 0}),
        f"{FOLDER}/destinationrule.yaml": destination_rule(inputs, {STABLE: {}, CANARY: {}}),
    }
