"""The plain Kubernetes objects of a rollout (folder `kubernetes/`): a Deployment per version running `optimize
serve`, their HorizontalPodAutoscalers, the Service and the PodDisruptionBudget; and the metadata, pod template and
autoscaler builders the Argo Rollouts renderer shares."""

from __future__ import annotations

from typing import Any

from optimize.deploy.inputs import DeployInputs, Version
from optimize.deploy.queries import CONTAINER
from optimize.deploy.sizing import Sizing, size, size_stable

FOLDER = "kubernetes"
NAME = "app.kubernetes.io/name"
PART_OF = "app.kubernetes.io/part-of"
PROJECT = "optimize"
HEALTH_READY = "/v2/health/ready"
HEALTH_LIVE = "/v2/health/live"
# The HPA's Pods metric: `optimize serve`'s gauge of requests waiting, exposed per pod by a metrics adapter
# (e.g. prometheus-adapter) under the same name.
QUEUE_DEPTH_METRIC = "optimize_queue_depth"
SCALE_DOWN_WINDOW_S = 300
# The startup probe's budget: downloading the version from MLflow, verifying its sha256, loading and warming it.
STARTUP_BUDGET_S = 300
PROBE_PERIOD_S = 5


def duration(seconds: float) -> str:
    """A Go/protobuf duration string for Istio and Argo fields: whole seconds as "10s", else milliseconds "1500ms"
    (at least 1ms, what Istio's schema requires)."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def labels(inputs: DeployInputs, **extra: str) -> dict[str, str]:
    """The labels every object of the rollout carries (`app.kubernetes.io/name: <app>`, `part-of: optimize`),
    plus `extra`."""
    return {NAME: inputs.app, PART_OF: PROJECT, **extra}


def metadata(
    inputs: DeployInputs,
    name: str,
    extra_labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An object's metadata: its name, the rollout's labels, the namespace only when `rollout.namespace` is set."""
    meta: dict[str, Any] = {"name": name}
    if inputs.rollout.namespace is not None:
        meta["namespace"] = inputs.rollout.namespace
    meta["labels"] = labels(inputs, **(extra_labels or {}))
    if annotations:
        meta["annotations"] = annotations
    return meta


def version_annotations(version: Version) -> dict[str, str]:
    """What a pod serves: the pinned model URI and the sha256 it verifies the download against."""
    return {"optimize/model-uri": version.uri, "optimize/sha256": version.sha256}


def serve_args(inputs: DeployInputs, version: Version) -> list[str]:
    """`optimize serve`'s arguments in the pod: the pinned version on all interfaces, with the batch and queue
    settings the autoscaler and the connection pool were sized for (a recipe given to the render may differ from
    the one recorded with the version, which the server would read otherwise)."""
    s = inputs.serving
    return [
        "serve", version.uri, "--host", "0.0.0.0", "--port", str(inputs.rollout.port),
        "--max-batch-size", str(s.max_batch_size), "--max-queue-delay-ms", f"{s.max_queue_delay_ms:g}",
        "--max-queue", str(s.max_queue),
    ]  # fmt: skip


def container(inputs: DeployInputs, version: Version, sized: Sizing) -> dict[str, Any]:
    """The `server` container: `optimize serve` of the pinned version, its probes, resources and drain hook."""
    port = inputs.rollout.port

    def probe(path: str, period_s: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": "http"},
            "periodSeconds": period_s,
            "timeoutSeconds": 2,
            "failureThreshold": failures,
        }

    return {
        "name": CONTAINER,
        "image": inputs.image,
        "command": ["optimize"],
        "args": serve_args(inputs, version),
        "env": [{"name": "MLFLOW_TRACKING_URI", "value": inputs.tracking_uri}],
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        # Ready only once the version is downloaded, verified and warmed; the server turns readiness 503 when it
        # starts draining, so no new request reaches a pod that is shutting down.
        "startupProbe": probe(HEALTH_READY, PROBE_PERIOD_S, STARTUP_BUDGET_S // PROBE_PERIOD_S),
        "readinessProbe": probe(HEALTH_READY, PROBE_PERIOD_S, 2),
        # Liveness asks only whether the process answers: a busy or draining server is alive, and restarting it
        # would drop what it has queued.
        "livenessProbe": probe(HEALTH_LIVE, 10, 3),
        "resources": {
            "requests": {"cpu": sized.cpu_request, "memory": sized.memory},
            "limits": {"cpu": sized.cpu_limit, "memory": sized.memory},
        },
        # Endpoints and the other pods' sidecars learn of the termination a moment after it starts: keep serving
        # while they do, then SIGTERM starts the drain (serving.drain_s) within the grace period.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(sized.prestop_s)]}}},
    }


def pod_template(inputs: DeployInputs, version: Version, sized: Sizing, track: str | None) -> dict[str, Any]:
    """The pod template serving `version`: labels (with `track` unless None: Argo Rollouts tells its pods apart by
    its own hash label), the version's and Prometheus' scrape annotations, the container and the grace period."""
    pod_labels = labels(inputs, **({"track": track} if track else {}), version=version.label)
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(inputs.rollout.port),
        "prometheus.io/path": "/metrics",
        **version_annotations(version),
    }
    return {
        "metadata": {"labels": pod_labels, "annotations": annotations},
        "spec": {
            "terminationGracePeriodSeconds": sized.termination_grace_s,
            "containers": [container(inputs, version, sized)],
        },
    }


def deployment(inputs: DeployInputs, version: Version, track: str, sized: Sizing) -> dict[str, Any]:
    """Deployment `<app>-<track>` serving `version`. No `replicas`: its HorizontalPodAutoscaler owns the count, and
    a re-applied manifest would otherwise reset it. The selector leaves the version out (it is immutable; the
    next version replaces the pods of the same Deployment)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(
            inputs,
            f"{inputs.app}-{track}",
            {"track": track, "version": version.label},
            version_annotations(version),
        ),
        "spec": {
            "selector": {"matchLabels": {NAME: inputs.app, "track": track}},
            # a new pod must be ready before an old one goes: capacity never drops during an update
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": pod_template(inputs, version, sized, track),
        },
    }


def service(inputs: DeployInputs) -> dict[str, Any]:
    """Service `<app>`: every pod of the app (stable and canary); Istio's subsets split the traffic."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(inputs, inputs.app),
        "spec": {
            "type": "ClusterIP",
            "selector": {NAME: inputs.app},
            "ports": [{"name": "http", "port": inputs.rollout.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def pod_disruption_budget(inputs: DeployInputs) -> dict[str, Any]:
    """PodDisruptionBudget `<app>`: a node drain takes at most one of the app's pods at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(inputs, inputs.app),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {NAME: inputs.app}}},
    }


def autoscaler(inputs: DeployInputs, name: str, target: dict[str, str], sized: Sizing) -> dict[str, Any]:
    """HorizontalPodAutoscaler `name` (autoscaling/v2) of `target` (its scaleTargetRef): CPU utilisation at
    slo.cpu_utilisation of the request (the load test's max_rps_at_slo), and queue depth per pod at one batch."""
    rollout = inputs.rollout
    annotations = {}
    if sized.expected_replicas is not None and sized.rps is not None:
        annotations["optimize/expected-replicas"] = (
            f"{sized.expected_replicas} at {sized.rps:g} rps ({sized.max_rps_at_slo:g} rps per pod within the SLO)"
        )
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(inputs, name, annotations=annotations),
        "spec": {
            "scaleTargetRef": target,
            "minReplicas": rollout.replicas.min,
            "maxReplicas": rollout.replicas.max,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": round(inputs.serving.slo.cpu_utilisation * 100),
                        },
                    },
                },
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": QUEUE_DEPTH_METRIC},
                        "target": {"type": "AverageValue", "averageValue": str(sized.queue_depth_target)},
                    },
                },
            ],
            # scale up at once, down only after five quiet minutes: a dip between bursts does not cost pods
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": SCALE_DOWN_WINDOW_S}},
        },
    }


def render(inputs: DeployInputs, sized: Sizing | None = None) -> dict[str, dict[str, Any]]:
    """The `kubernetes/` folder's Kubernetes objects by file path: Deployment and HPA per version (stable only when
    there is one), the Service and the PodDisruptionBudget. `sized` is the canary's sizing (default: `size`); the
    stable version is sized from its own load test (`size_stable`)."""
    sized = sized if sized is not None else size(inputs)
    out: dict[str, dict[str, Any]] = {}
    tracks: list[tuple[str, Version, Sizing]] = [("canary", inputs.canary, sized)]
    stable_sized = size_stable(inputs)
    if inputs.stable is not None and stable_sized is not None:
        tracks.insert(0, ("stable", inputs.stable, stable_sized))
    for track, version, version_sized in tracks:
        name = f"{inputs.app}-{track}"
        out[f"{FOLDER}/deployment-{track}.yaml"] = deployment(inputs, version, track, version_sized)
        target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        out[f"{FOLDER}/hpa-{track}.yaml"] = autoscaler(inputs, name, target, version_sized)
    out[f"{FOLDER}/service.yaml"] = service(inputs)
    out[f"{FOLDER}/pdb.yaml"] = pod_disruption_budget(inputs)
    return out
