"""optimize/deploy/kubernetes.py and istio.py: the plain rollout's Deployments, HPAs, Service, PDB, VirtualService
and DestinationRule; names, labels, namespace, probes, resources, grace period, weights and subsets."""

from __future__ import annotations

import yaml

from optimize.deploy import argo, istio, kubernetes
from optimize.deploy.sizing import size

NAME = "app.kubernetes.io/name"
PART_OF = "app.kubernetes.io/part-of"
APP = "minilm-fp16"


def plain(inputs):
    return {**kubernetes.render(inputs), **istio.render(inputs)}


def every(inputs):
    return {**plain(inputs), **argo.render(inputs)}


def _plain_types(value, where):
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), f"{where}: key {k!r}"
            _plain_types(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _plain_types(v, f"{where}[{i}]")
    else:
        assert type(value) in (str, int, float, bool), f"{where}: {type(value).__name__}"


def test_plain_render_names_the_objects_as_agreed(deploy_inputs):
    objs = plain(deploy_inputs)
    kinds = {path: (o["apiVersion"], o["kind"], o["metadata"]["name"]) for path, o in objs.items()}
    assert kinds == {
        "kubernetes/deployment-stable.yaml": ("apps/v1", "Deployment", f"{APP}-stable"),
        "kubernetes/deployment-canary.yaml": ("apps/v1", "Deployment", f"{APP}-canary"),
        "kubernetes/hpa-stable.yaml": ("autoscaling/v2", "HorizontalPodAutoscaler", f"{APP}-stable"),
        "kubernetes/hpa-canary.yaml": ("autoscaling/v2", "HorizontalPodAutoscaler", f"{APP}-canary"),
        "kubernetes/service.yaml": ("v1", "Service", APP),
        "kubernetes/pdb.yaml": ("policy/v1", "PodDisruptionBudget", APP),
        "kubernetes/virtualservice.yaml": ("networking.istio.io/v1", "VirtualService", APP),
        "kubernetes/destinationrule.yaml": ("networking.istio.io/v1", "DestinationRule", APP),
    }


def test_every_object_is_labelled_plain_data_and_dumps_without_aliases(deploy_inputs):
    for path, obj in every(deploy_inputs).items():
        assert obj["metadata"]["labels"][NAME] == APP and obj["metadata"]["labels"][PART_OF] == "optimize", path
        assert "namespace" not in obj["metadata"], path
        _plain_types(obj, path)
        assert "&id" not in yaml.safe_dump(obj), f"{path}: a shared object would be written as a YAML anchor"


def test_namespace_only_when_set(deploy_inputs, with_sections):
    inputs = with_sections(deploy_inputs, rollout={"namespace": "ml-serving"})
    for path, obj in every(inputs).items():
        assert obj["metadata"]["namespace"] == "ml-serving", path


def test_deployments_run_the_pinned_versions(deploy_inputs):
    objs = kubernetes.render(deploy_inputs)
    for track, version in (("stable", deploy_inputs.stable), ("canary", deploy_inputs.canary)):
        dep = objs[f"kubernetes/deployment-{track}.yaml"]
        template = dep["spec"]["template"]
        pod_labels = template["metadata"]["labels"]
        assert pod_labels == {NAME: APP, PART_OF: "optimize", "track": track, "version": f"v{version.number}"}
        selector = dep["spec"]["selector"]["matchLabels"]
        assert selector == {NAME: APP, "track": track}  # no version: a selector is immutable
        assert "replicas" not in dep["spec"]  # the HPA owns the count
        annotations = template["metadata"]["annotations"]
        assert annotations["optimize/model-uri"] == f"models:/minilm-fp16/{version.number}"
        assert annotations["optimize/sha256"] == version.sha256
        assert annotations["prometheus.io/scrape"] == "true"
        assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == ("8000", "/metrics")
        (c,) = template["spec"]["containers"]
        assert c["name"] == "server" and c["image"] == "registry.example/optimize:1.0"
        assert c["command"] == ["optimize"]
        # the batch and queue settings the HPA and the connection pool were sized for (fp16.yaml: the defaults)
        assert c["args"] == [
            "serve", version.uri, "--host", "0.0.0.0", "--port", "8000",
            "--max-batch-size", "16", "--max-queue-delay-ms", "2", "--max-queue", "256",
        ]  # fmt: skip
        assert c["env"] == [{"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.mlops:5000"}]
        assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
        assert c["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}


def test_resources_and_grace_period(deploy_inputs, with_sections):
    inputs = with_sections(deploy_inputs, serving={"drain_s": 30})
    objs = kubernetes.render(inputs)
    canary = objs["kubernetes/deployment-canary.yaml"]["spec"]["template"]["spec"]
    (c,) = canary["containers"]
    assert c["resources"] == {
        "requests": {"cpu": "350m", "memory": "512Mi"},
        "limits": {"cpu": "1000m", "memory": "512Mi"},
    }
    stable = objs["kubernetes/deployment-stable.yaml"]["spec"]["template"]["spec"]
    assert stable["containers"][0]["resources"]["requests"] == {"cpu": "358m", "memory": "500Mi"}  # its own test
    prestop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop == ["sleep", "5"]
    # the kubelet waits for the preStop pause and the whole drain before it would SIGKILL
    assert canary["terminationGracePeriodSeconds"] >= 5 + 30
    assert canary["terminationGracePeriodSeconds"] == 40


def test_autoscalers(deploy_inputs, with_sections):
    inputs = with_sections(deploy_inputs, rollout={"rps": 300, "replicas": {"min": 3, "max": 12}})
    objs = kubernetes.render(inputs, size(inputs))
    for track in ("stable", "canary"):
        hpa = objs[f"kubernetes/hpa-{track}.yaml"]
        spec = hpa["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{APP}-{track}"}
        assert (spec["minReplicas"], spec["maxReplicas"]) == (3, 12)
        cpu, queue = spec["metrics"]
        assert cpu == {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
        }
        assert queue["pods"]["metric"] == {"name": "optimize_queue_depth"}
        assert queue["pods"]["target"] == {"type": "AverageValue", "averageValue": "16"}
        assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    # 300 rps / 120 per canary pod; / 110 per stable pod
    assert objs["kubernetes/hpa-canary.yaml"]["metadata"]["annotations"]["optimize/expected-replicas"].startswith(
        "3 at 300 rps"
    )
    assert objs["kubernetes/hpa-stable.yaml"]["metadata"]["annotations"]["optimize/expected-replicas"].startswith(
        "3 at 300 rps"
    )
    assert "annotations" not in kubernetes.render(deploy_inputs)["kubernetes/hpa-canary.yaml"]["metadata"]


def test_service_and_pdb_select_every_pod_of_the_app(deploy_inputs):
    objs = kubernetes.render(deploy_inputs)
    svc = objs["kubernetes/service.yaml"]["spec"]
    assert svc["selector"] == {NAME: APP} and svc["type"] == "ClusterIP"
    assert svc["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    pdb = objs["kubernetes/pdb.yaml"]["spec"]
    assert pdb == {"maxUnavailable": 1, "selector": {"matchLabels": {NAME: APP}}}
    for track in ("stable", "canary"):
        pod_labels = objs[f"kubernetes/deployment-{track}.yaml"]["spec"]["template"]["metadata"]["labels"]
        assert svc["selector"].items() <= pod_labels.items()


def test_virtual_service_weights_timeout_and_retries(deploy_inputs, with_sections):
    inputs = with_sections(deploy_inputs, rollout={"steps": [20, 100]}, serving={"slo": {"p99_ms": 250}})
    vs = istio.render(inputs)["kubernetes/virtualservice.yaml"]["spec"]
    assert vs["hosts"] == [APP]
    (route,) = vs["http"]
    assert route["name"] == "primary"
    weights = {r["destination"]["subset"]: r["weight"] for r in route["route"]}
    assert weights == {"stable": 80, "canary": 20}
    assert {r["destination"]["host"] for r in route["route"]} == {APP}
    assert route["timeout"] == "500ms"  # 2 x the p99 budget
    assert route["retries"] == {
        "attempts": 2,
        "perTryTimeout": "500ms",
        "retryOn": "connect-failure,refused-stream,reset",
    }
    assert "503" not in route["retries"]["retryOn"] and "5xx" not in route["retries"]["retryOn"]
    default = istio.render(deploy_inputs)["kubernetes/virtualservice.yaml"]["spec"]["http"][0]
    assert {r["destination"]["subset"]: r["weight"] for r in default["route"]} == {"stable": 90, "canary": 10}


def test_destination_rule_subsets_pool_and_circuit_breaker(deploy_inputs, with_sections):
    inputs = with_sections(
        deploy_inputs,
        serving={"max_queue": 64, "max_batch_size": 8},
        rollout={"circuit_breaker": {"consecutive_5xx": 3, "interval_s": 5, "base_ejection_s": 0.5}},
    )
    objs = plain(inputs)
    dr = objs["kubernetes/destinationrule.yaml"]["spec"]
    assert dr["host"] == objs["kubernetes/service.yaml"]["metadata"]["name"]
    subsets = {s["name"]: s["labels"] for s in dr["subsets"]}
    assert subsets == {"stable": {"track": "stable"}, "canary": {"track": "canary"}}
    for route in objs["kubernetes/virtualservice.yaml"]["spec"]["http"][0]["route"]:
        assert route["destination"]["subset"] in subsets
    pool = dr["trafficPolicy"]["connectionPool"]
    assert pool == {"tcp": {"maxConnections": 72}, "http": {"http1MaxPendingRequests": 64, "http2MaxRequests": 72}}
    assert dr["trafficPolicy"]["outlierDetection"] == {
        "consecutive5xxErrors": 3,
        "interval": "5s",
        "baseEjectionTime": "500ms",
        "maxEjectionPercent": 50,
    }
    # each subset selects the pods of the Deployment of its track
    for track, selector in subsets.items():
        pod_labels = objs[f"kubernetes/deployment-{track}.yaml"]["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()


def test_first_rollout_sends_everything_to_the_canary(first_rollout):
    objs = plain(first_rollout)
    assert "kubernetes/deployment-stable.yaml" not in objs and "kubernetes/hpa-stable.yaml" not in objs
    assert "kubernetes/deployment-canary.yaml" in objs and "kubernetes/hpa-canary.yaml" in objs
    (route,) = objs["kubernetes/virtualservice.yaml"]["spec"]["http"]
    assert [(r["destination"]["subset"], r["weight"]) for r in route["route"]] == [("canary", 100)]
    assert [s["name"] for s in objs["kubernetes/destinationrule.yaml"]["spec"]["subsets"]] == ["canary"]


def test_duration_strings():
    assert [kubernetes.duration(s) for s in (10, 0.5, 1.5, 120, 0.0001)] == ["10s", "500ms", "1500ms", "120s", "1ms"]
