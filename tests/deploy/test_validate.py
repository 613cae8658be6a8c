"""optimize/deploy/validate.py: a hand-written minimal rollout (plain Kubernetes + Istio, Argo Rollouts, alert rules
and their promtool tests) passes every validator, and each breakage the issue names is caught by the validator
meant to catch it: wrong weights, a missing subset, a host with no Service, an HPA aimed at nothing, a query of a
metric nobody exports, a typo in a Kubernetes field (strict schemas), a bad or unknown Istio/Argo field (the
@kubernetes-models schemas under node), a kind no schema knows.

Then the folders the renderers write for recipes/fp16.yaml and recipes/int8.yaml (and a first rollout) validate with
0 errors. node's packages and promtool come from `bash ci/setup.sh cpu`; without them these tests fail, they do not
skip."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from optimize.deploy import queries, render, tools, triton
from optimize.deploy.inputs import DeployInputs
from optimize.deploy.validate import (
    CRD,
    K8S,
    NODE_MODULES_ENV,
    PROMTOOL,
    SEMANTIC,
    TRITON,
    Doc,
    ValidationReport,
    crd_errors,
    format_report,
    kubernetes_errors,
    kubernetes_versions,
    semantic_errors,
    validate_folder,
)
from optimize.errors import RuntimeMissingError
from optimize.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
APP = "demo"
MODEL = "demo-model"
PORT = 8000


@pytest.fixture
def node_modules(monkeypatch: pytest.MonkeyPatch) -> Path:
    """ci/tools/node_modules with the @kubernetes-models packages (or $OPTIMIZE_NODE_MODULES where set)."""
    path = Path(os.environ.get(NODE_MODULES_ENV) or REPO / "ci" / "tools" / "node_modules")
    assert tools.find_tool("node"), "node is missing: run `bash ci/setup.sh cpu`"
    for package in ("istio", "argo-rollouts", "prometheus-operator"):
        assert (path / "@kubernetes-models" / package).is_dir(), (
            f"@kubernetes-models/{package} is not in {path}: run `bash ci/setup.sh cpu` (npm ci in ci/tools)"
        )
    monkeypatch.setenv(NODE_MODULES_ENV, str(path))
    return path


@pytest.fixture
def promtool() -> Path:
    found = tools.find_tool("promtool")
    assert found, "promtool is missing: run `bash ci/setup.sh cpu` (Debian's prometheus package)"
    return found


# --- a minimal valid rollout, by hand ---------------------------------------------------------------------------


def _meta(name: str, **labels: str) -> dict[str, Any]:
    return {"name": name, "labels": {"app.kubernetes.io/name": APP, "app.kubernetes.io/part-of": "optimize", **labels}}


def _pod(version: int, track: str | None) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": APP, "app.kubernetes.io/part-of": "optimize", "version": f"v{version}"}
    if track:
        labels["track"] = track
    probe = {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 5}
    return {
        "metadata": {"labels": labels, "annotations": {"optimize/model-uri": f"models:/{MODEL}/{version}"}},
        "spec": {
            "terminationGracePeriodSeconds": 40,
            "containers": [
                {
                    "name": "server",
                    "image": "registry.example/optimize:1.0",
                    "args": ["serve", f"models:/{MODEL}/{version}", "--port", str(PORT)],
                    "ports": [{"name": "http", "containerPort": PORT}],
                    "resources": {"requests": {"cpu": "350m", "memory": "512Mi"}, "limits": {"memory": "512Mi"}},
                    "readinessProbe": probe,
                    "livenessProbe": {**probe, "httpGet": {"path": "/v2/health/live", "port": "http"}},
                    "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
                }
            ],
        },
    }


def _deployment(track: str, version: int) -> dict[str, Any]:
    selector = {"app.kubernetes.io/name": APP, "track": track}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(f"{APP}-{track}", track=track),
        "spec": {"replicas": 2, "selector": {"matchLabels": selector}, "template": _pod(version, track)},
    }


def _hpa(kind: str, api: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(name),
        "spec": {
            "scaleTargetRef": {"apiVersion": api, "kind": kind, "name": name},
            "minReplicas": 2,
            "maxReplicas": 8,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                },
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": "optimize_queue_depth"},
                        "target": {"type": "AverageValue", "averageValue": "8"},
                    },
                },
            ],
        },
    }


def _service() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(APP),
        "spec": {
            "selector": {"app.kubernetes.io/name": APP},
            "ports": [{"name": "http", "port": PORT, "targetPort": "http"}],
        },
    }


def _pdb() -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(APP),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": APP}}},
    }


def _virtual_service(stable: int, canary: int) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": _meta(APP),
        "spec": {
            "hosts": [APP],
            "http": [
                {
                    "name": "primary",
                    "timeout": "2s",
                    "retries": {"attempts": 2, "perTryTimeout": "1s", "retryOn": "5xx,reset"},
                    "route": [
                        {"destination": {"host": APP, "subset": "stable", "port": {"number": PORT}}, "weight": stable},
                        {"destination": {"host": APP, "subset": "canary", "port": {"number": PORT}}, "weight": canary},
                    ],
                }
            ],
        },
    }


def _destination_rule(stable: dict[str, str], canary: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": _meta(APP),
        "spec": {
            "host": APP,
            "trafficPolicy": {
                "connectionPool": {"http": {"http1MaxPendingRequests": 64, "http2MaxRequests": 128}},
                "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s", "baseEjectionTime": "30s"},
            },
            "subsets": [{"name": "stable", "labels": stable}, {"name": "canary", "labels": canary}],
        },
    }


def _rollout() -> dict[str, Any]:
    analysis = {
        "templates": [{"templateName": f"{APP}-analysis"}],
        "args": [{"name": "canary-version", "value": "3"}, {"name": "stable-version", "value": "2"}],
    }
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": _meta(APP),
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": APP}},
            "template": _pod(3, None),
            "strategy": {
                "canary": {
                    "trafficRouting": {
                        "istio": {
                            "virtualService": {"name": APP, "routes": ["primary"]},
                            "destinationRule": {
                                "name": APP,
                                "canarySubsetName": "canary",
                                "stableSubsetName": "stable",
                            },
                        }
                    },
                    "steps": [{"setWeight": 10}, {"analysis": analysis}, {"setWeight": 50}, {"analysis": analysis}],
                }
            },
        },
    }


def _analysis_template() -> dict[str, Any]:
    canary = queries.Scope(MODEL, "{{args.canary-version}}")
    stable = queries.Scope(MODEL, "{{args.stable-version}}")
    metrics = {"p99": queries.p99_seconds(canary, 60), "p99-ratio": queries.p99_ratio(canary, stable, 60)}
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AnalysisTemplate",
        "metadata": _meta(f"{APP}-analysis"),
        "spec": {
            "args": [
                {"name": "canary-version"},
                {"name": "stable-version"},
                {"name": "prometheus-address", "value": "http://prometheus.monitoring:9090"},
            ],
            "metrics": [
                {
                    "name": name,
                    "interval": "1m",
                    "count": 5,
                    "failureLimit": 1,
                    "successCondition": "result[0] <= 0.1",
                    "provider": {"prometheus": {"address": "{{args.prometheus-address}}", "query": query}},
                }
                for name, query in metrics.items()
            ],
        },
    }


def _rule_groups() -> list[dict[str, Any]]:
    errors = 'sum(rate(optimize_requests_total{code!="200"}[1m])) / sum(rate(optimize_requests_total[1m]))'
    return [
        {
            "name": f"{APP}-slo",
            "rules": [
                {
                    "alert": "DemoErrorRate",
                    "expr": f"{errors} > 0.01",
                    "for": "1m",
                    "labels": {"severity": "page"},
                    "annotations": {"summary": "error rate over 1 %"},
                },
                {
                    "alert": "DemoIstioP99",
                    "expr": queries.istio_p99_ms(APP, None, "v3", 60) + " > 100",
                    "for": "1m",
                    "labels": {"severity": "page"},
                },
            ],
        }
    ]


def _rule_tests() -> dict[str, Any]:
    return {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    {"series": 'optimize_requests_total{code="200"}', "values": "0+980x20"},
                    {"series": 'optimize_requests_total{code="500"}', "values": "0+20x20"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "4m",
                        "alertname": "DemoErrorRate",
                        "exp_alerts": [
                            {"exp_labels": {"severity": "page"}, "exp_annotations": {"summary": "error rate over 1 %"}}
                        ],
                    }
                ],
            }
        ],
    }


def valid_files() -> dict[str, Any]:
    """Relative path -> content of a minimal valid rendered folder."""
    return {
        "kubernetes/service.yaml": _service(),
        "kubernetes/pdb.yaml": _pdb(),
        "kubernetes/deployment-stable.yaml": _deployment("stable", 2),
        "kubernetes/deployment-canary.yaml": _deployment("canary", 3),
        "kubernetes/hpa-stable.yaml": _hpa("Deployment", "apps/v1", f"{APP}-stable"),
        "kubernetes/hpa-canary.yaml": _hpa("Deployment", "apps/v1", f"{APP}-canary"),
        "kubernetes/virtualservice.yaml": _virtual_service(90, 10),
        "kubernetes/destinationrule.yaml": _destination_rule({"track": "stable"}, {"track": "canary"}),
        "argo-rollouts/rollout.yaml": _rollout(),
        "argo-rollouts/analysistemplate.yaml": _analysis_template(),
        "argo-rollouts/service.yaml": _service(),
        "argo-rollouts/hpa.yaml": _hpa("Rollout", "argoproj.io/v1alpha1", APP),
        "argo-rollouts/virtualservice.yaml": _virtual_service(100, 0),
        "argo-rollouts/destinationrule.yaml": _destination_rule({}, {}),
        "monitoring/prometheusrule.yaml": {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": _meta(f"{APP}-slo"),
            "spec": {"groups": _rule_groups()},
        },
        "monitoring/rules.yaml": {"groups": _rule_groups()},
        "monitoring/rules.test.yaml": _rule_tests(),
    }


def _write(folder: Path, files: dict[str, Any]) -> Path:
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(content, sort_keys=False))
    return folder


def _docs(files: dict[str, Any], under: str = "kubernetes/") -> list[Doc]:
    return [Doc(rel, obj) for rel, obj in files.items() if rel.startswith(under) and "kind" in obj]


def _messages(findings: list[tuple[str, str, str]]) -> str:
    return "\n".join(" ".join(f) for f in findings)


# --- the valid folder -------------------------------------------------------------------------------------------


def test_a_valid_minimal_rollout_passes_every_validator(tmp_path: Path, node_modules: Path, promtool: Path) -> None:
    report = validate_folder(_write(tmp_path, valid_files()))
    assert report.errors == [], format_report(report)
    assert report.skipped == []
    assert report.exit_code == 0 and report.ok
    # 8 core objects; 7 for node (2 VirtualServices, 2 DestinationRules, Rollout, AnalysisTemplate,
    # PrometheusRule); 2 promtool runs (check rules, test rules); the semantic checks saw those and the rule file
    assert report.checked[K8S] == 8 and report.checked[CRD] == 7 and report.checked[PROMTOOL] == 2
    assert report.checked[SEMANTIC] == 16
    assert kubernetes_versions()[0] == "1.29" and len(kubernetes_versions()) >= 9  # 1.29 .. 1.37 at least
    assert format_report(report).splitlines()[-1].startswith("valid: 0 error(s), 0 skipped")


# --- semantic breakages -----------------------------------------------------------------------------------------


def test_weights_that_do_not_sum_to_100_are_an_error() -> None:
    files = valid_files()
    files["kubernetes/virtualservice.yaml"] = _virtual_service(90, 20)
    errors = semantic_errors(_docs(files))
    assert len(errors) == 1 and "the weights [90, 20] sum to 110, not 100" in errors[0][2], _messages(errors)
    assert errors[0][:2] == ("kubernetes/virtualservice.yaml", f"VirtualService/{APP}")


def test_a_route_to_a_subset_the_destination_rule_lacks_is_an_error() -> None:
    files = valid_files()
    rule = files["kubernetes/destinationrule.yaml"]
    rule["spec"]["subsets"] = [s for s in rule["spec"]["subsets"] if s["name"] != "canary"]
    errors = semantic_errors(_docs(files))
    assert (
        len(errors) == 1 and "subset 'canary' of host 'demo' is not defined: its subsets are ['stable']" in errors[0][2]
    )


def test_hosts_that_name_no_service_are_an_error() -> None:
    files = valid_files()
    files["kubernetes/virtualservice.yaml"]["spec"]["hosts"] = ["demo.other.svc.cluster.local"]
    files["kubernetes/destinationrule.yaml"]["spec"]["host"] = "dmeo"
    errors = _messages(semantic_errors(_docs(files)))
    assert "VirtualService/demo host 'demo.other.svc.cluster.local' names no Service in this folder" in errors
    assert "DestinationRule/demo host 'dmeo' names no Service" in errors
    # the subsets are now on a host no route goes to: the routes' subsets are undefined
    assert "subset 'canary' of host 'demo' is not defined: no DestinationRule has that host" in errors
    # the fully qualified name of the right service is fine where the objects name their namespace
    files = valid_files()
    files["kubernetes/virtualservice.yaml"]["spec"]["hosts"] = ["demo.ml.svc.cluster.local"]
    docs = _docs(files)
    assert "host 'demo.ml.svc.cluster.local' names no Service" in _messages(semantic_errors(docs))
    for doc in docs:
        doc.obj["metadata"]["namespace"] = "ml"
    assert semantic_errors(docs) == []


def test_an_hpa_whose_target_does_not_exist_is_an_error() -> None:
    files = valid_files()
    files["kubernetes/hpa-canary.yaml"]["spec"]["scaleTargetRef"]["name"] = "demo-canry"
    files["argo-rollouts/hpa.yaml"]["spec"]["scaleTargetRef"]["apiVersion"] = "apps/v1"  # a Rollout is not apps/v1
    errors = semantic_errors(_docs(files, "kubernetes/") + _docs(files, "argo-rollouts/"))
    assert len(errors) == 2, _messages(errors)
    assert "scaleTargetRef Deployment/demo-canry (apps/v1) names no object in this folder" in errors[0][2]
    assert errors[1][:2] == ("argo-rollouts/hpa.yaml", "HorizontalPodAutoscaler/demo")
    assert "scaleTargetRef Rollout/demo (apps/v1)" in errors[1][2]


def test_a_query_of_a_metric_the_server_does_not_export_is_an_error() -> None:
    files = valid_files()
    template = files["argo-rollouts/analysistemplate.yaml"]
    template["spec"]["metrics"][0]["provider"]["prometheus"]["query"] = (
        'histogram_quantile(0.99, sum by (le) (rate(optimize_request_latency_seconds_bucket{version="3"}[1m])))'
    )
    files["monitoring/rules.yaml"]["groups"][0]["rules"][0]["expr"] = "rate(http_requests_total[1m]) > 1"
    rule_files = [("monitoring/rules.yaml", files["monitoring/rules.yaml"])]
    errors = semantic_errors(_docs(files, "argo-rollouts/") + _docs(files, "monitoring/"), rule_files)
    assert len(errors) == 2, _messages(errors)
    assert errors[0][1] == "AnalysisTemplate/demo-analysis"
    assert "spec.metrics[0] (p99): reads optimize_request_latency_seconds_bucket: neither exported" in errors[0][2]
    assert errors[1][0] == "monitoring/rules.yaml" and "reads http_requests_total" in errors[1][2]


def test_selectors_and_subsets_that_match_no_pods_are_errors() -> None:
    files = valid_files()
    files["kubernetes/service.yaml"]["spec"]["selector"] = {"app.kubernetes.io/name": "demo2"}
    files["kubernetes/destinationrule.yaml"]["spec"]["subsets"][1]["labels"] = {"track": "canray"}
    errors = _messages(semantic_errors(_docs(files)))
    assert "Service/demo selector {'app.kubernetes.io/name': 'demo2'} matches no pod template" in errors
    assert "subset 'canary' labels {'track': 'canray'} match no pod template of its host" in errors
    # an empty subset selects every pod: only Argo's DestinationRule may leave them empty
    files = valid_files()
    files["kubernetes/destinationrule.yaml"] = _destination_rule({}, {})
    assert "subset 'stable' has no labels" in _messages(semantic_errors(_docs(files)))


def test_argo_references_must_exist() -> None:
    files = valid_files()
    canary = files["argo-rollouts/rollout.yaml"]["spec"]["strategy"]["canary"]
    canary["trafficRouting"]["istio"]["virtualService"]["routes"] = ["main"]
    canary["trafficRouting"]["istio"]["destinationRule"]["canarySubsetName"] = "preview"
    canary["steps"][1] = {"analysis": {"templates": [{"templateName": f"{APP}-analysis"}]}}
    errors = _messages(semantic_errors(_docs(files, "argo-rollouts/")))
    assert "VirtualService/demo has no http route 'main'" in errors
    assert "trafficRouting.istio.canarySubsetName 'preview' is not a subset of DestinationRule/demo" in errors
    assert "steps[1]: AnalysisTemplate/demo-analysis needs args ['canary-version', 'stable-version']" in errors


# --- schema breakages -------------------------------------------------------------------------------------------


def test_a_field_typo_fails_strict_kubernetes_validation_for_every_version() -> None:
    deployment = _deployment("canary", 3)
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "IfNotPresent"
    service = _service()
    service["spec"]["ports"][0]["port"] = "8000"  # a string where the schema wants an integer
    errors = kubernetes_errors([Doc("kubernetes/d.yaml", deployment), Doc("kubernetes/s.yaml", service)])
    newest = kubernetes_versions()[-1]
    assert len(errors) == 2, _messages(errors)
    assert errors[0][1] == "Deployment/demo-canary"
    assert "spec.template.spec.containers.0: Additional properties are not allowed ('imagePullPolcy'" in errors[0][2]
    assert errors[0][2].endswith(f"(Kubernetes 1.29-{newest}, strict)")
    assert "spec.ports.0.port: '8000' is not of type 'integer'" in errors[1][2]


def test_a_kind_with_no_schema_is_an_error_not_a_warning() -> None:
    unknown = {"apiVersion": "apps/v1", "kind": "Deploymnet", "metadata": _meta(APP), "spec": {}}
    crd = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": _meta(APP)}
    errors = kubernetes_errors([Doc("a.yaml", unknown), Doc("b.yaml", crd)])
    assert [e[1] for e in errors] == ["Deploymnet/demo", "Widget/demo"], _messages(errors)
    assert "no Kubernetes schema for Deploymnet in apps/v1" in errors[0][2]


def test_bad_and_unknown_istio_and_argo_fields_fail_the_crd_schemas(node_modules: Path) -> None:
    files = valid_files()
    vs = files["kubernetes/virtualservice.yaml"]
    vs["spec"]["http"][0]["route"][0]["weight"] = "90"  # a string: the schema wants an integer
    dr = files["kubernetes/destinationrule.yaml"]
    dr["spec"]["trafficPolicy"]["outlierDetection"]["consecutive5xxErrorz"] = 5  # a typo: unknown to the schema
    rollout = files["argo-rollouts/rollout.yaml"]
    rollout["spec"]["strategy"]["canary"]["steps"][0] = {"setWeigth": 10}
    rule = files["monitoring/prometheusrule.yaml"]
    rule["spec"]["groups"][0]["rules"][0]["for"] = 60  # a duration string in the CRD
    bad_version = copy.deepcopy(vs)
    bad_version["apiVersion"] = "networking.istio.io/v1alpha9"
    docs = [Doc(f, o) for f, o in files.items() if o is vs or o is dr or o is rollout or o is rule]
    errors, skipped = crd_errors([*docs, Doc("x.yaml", bad_version)])
    assert skipped is None
    found = {(ref, message) for _, ref, message in errors}
    assert found == {
        ("VirtualService/demo", "/spec/http/0/route/0/weight: must be integer"),
        (
            "DestinationRule/demo",
            "/spec/trafficPolicy/outlierDetection/consecutive5xxErrorz: "
            "unknown field (not in the DestinationRule schema)",
        ),
        ("Rollout/demo", "/spec/strategy/canary/steps/0/setWeigth: unknown field (not in the Rollout schema)"),
        ("PrometheusRule/demo-slo", "/spec/groups/0/rules/0/for: must be string"),
        ("VirtualService/demo", "no published schema for VirtualService in networking.istio.io/v1alpha9"),
    }, _messages(errors)


def test_promtool_failures_are_errors(tmp_path: Path, promtool: Path) -> None:
    files = {
        rel: c for rel, c in valid_files().items() if rel in ("monitoring/rules.yaml", "monitoring/rules.test.yaml")
    }
    files["monitoring/rules.yaml"]["groups"][0]["rules"][1]["expr"] = "sum(rate(istio_requests_total[1m]) > "
    files["monitoring/rules.test.yaml"]["tests"][0]["alert_rule_test"][0]["exp_alerts"] = []  # it does fire
    report = validate_folder(_write(tmp_path, files))
    assert [(f, ref) for f, ref, _ in report.errors] == [
        ("monitoring/rules.yaml", ""),
        ("monitoring/rules.test.yaml", ""),
    ]
    assert "promtool check rules failed:" in report.errors[0][2] and "parse error" in report.errors[0][2]
    assert report.errors[1][2].startswith("promtool test rules failed:"), format_report(report)
    assert report.exit_code == 1


def test_the_triton_repository_is_checked_by_triton_check_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "triton" / APP
    model.mkdir(parents=True)
    (model / "config.pbtxt").write_text(f'name: "{APP}"\nplatform: "onnxruntime_onnx"\nmax_batch_sise: 8\n')
    report = validate_folder(tmp_path)
    assert report.checked[TRITON] == 1 and len(report.errors) == 1, format_report(report)
    assert report.errors[0][0] == "triton/" and 'no field named "max_batch_sise"' in report.errors[0][2]

    def missing(path: Path) -> list[str]:
        raise RuntimeMissingError("tritonclient is not installed")

    monkeypatch.setattr(triton, "check_repository", missing)
    report = validate_folder(tmp_path)
    assert report.errors == [] and report.skipped == [(TRITON, "tritonclient is not installed")]


# --- missing tools ----------------------------------------------------------------------------------------------


def test_a_missing_validator_is_skipped_and_exits_4_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {rel: obj for rel, obj in valid_files().items() if rel.startswith("argo-rollouts/")}
    folder = _write(tmp_path, files)
    monkeypatch.delenv(NODE_MODULES_ENV, raising=False)
    report = validate_folder(folder)
    assert report.errors == [], format_report(report)
    assert report.skipped == [
        (CRD, f"{NODE_MODULES_ENV} is not set: point it at ci/tools/node_modules (npm ci --prefix ci/tools)")
    ]
    assert report.exit_code == 4 and not report.ok
    allowed = validate_folder(folder, allow_missing=True)
    assert allowed.exit_code == 0 and "(allowed)" in format_report(allowed)
    assert isinstance(allowed, ValidationReport)


# --- what the renderers write -----------------------------------------------------------------------------------


def _recipe_inputs(deploy_inputs: DeployInputs, recipe: str) -> DeployInputs:
    """deploy_inputs (STATED load-test numbers, see conftest) with recipes/<recipe>.yaml's model, serving: and
    rollout: sections."""
    loaded = load_recipe(REPO / "recipes" / f"{recipe}.yaml")
    model = loaded.registry.model_name or loaded.name
    return dataclasses.replace(
        deploy_inputs,
        canary=dataclasses.replace(deploy_inputs.canary, model=model, variant=recipe, precision=recipe),
        stable=dataclasses.replace(deploy_inputs.stable, model=model, variant=recipe, precision=recipe),
        serving=loaded.serving,
        rollout=loaded.rollout,
    )


# each recipe once (a whole folder's check takes seconds): fp16 replacing a stable version, int8 as a first rollout
@pytest.mark.parametrize("recipe, first", [("fp16", False), ("int8", True)])
def test_the_rollout_rendered_for_each_minilm_recipe_validates_with_0_errors(
    recipe: str, first: bool, deploy_inputs: DeployInputs, tmp_path: Path, node_modules: Path, promtool: Path
) -> None:
    inputs = _recipe_inputs(deploy_inputs, recipe)
    if first:
        inputs = dataclasses.replace(inputs, stable=None)  # a first rollout: the canary takes all traffic
    out = render.render(inputs, tmp_path / "out").out
    report = validate_folder(out)
    assert report.errors == [] and report.skipped == [], format_report(report)
    assert report.checked[K8S] >= 7 and report.checked[CRD] >= 7 and report.checked[PROMTOOL] == 2, report.checked
