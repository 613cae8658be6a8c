"""optimize/deploy/argo.py: the Rollout's steps and Istio routing, the AnalysisTemplate running queries.py's PromQL
with the SLO as conditions (no data: Inconclusive, never a pass), and the objects beside them."""

from __future__ import annotations

import math
import re

import pytest

from optimize.deploy import argo, queries

APP = "minilm-fp16"
NAME = "app.kubernetes.io/name"


def _condition(expr: str, result: list[float]) -> bool:
    """Evaluate an Argo (expr-lang) condition of the form these templates use, in Python."""
    python = expr.replace("&&", " and ").replace("!isNaN(", " not isNaN(")
    assert re.fullmatch(r"[\w\s\[\]().<>=!,]+", python.replace(".", "")), expr
    return bool(eval(python, {"__builtins__": {}}, {"result": result, "len": len, "isNaN": math.isnan, "false": False}))


def _phase(metric: dict, result: list[float]) -> str:
    """What Argo makes of one measurement with both conditions set."""
    if _condition(metric["failureCondition"], result):
        return "Failed"
    return "Successful" if _condition(metric["successCondition"], result) else "Inconclusive"


def test_rollout_files_and_targets(deploy_inputs):
    objs = argo.render(deploy_inputs)
    kinds = {path: (o["apiVersion"], o["kind"], o["metadata"]["name"]) for path, o in objs.items()}
    assert kinds == {
        "argo-rollouts/rollout.yaml": ("argoproj.io/v1alpha1", "Rollout", APP),
        "argo-rollouts/analysistemplate.yaml": ("argoproj.io/v1alpha1", "AnalysisTemplate", f"{APP}-analysis"),
        "argo-rollouts/service.yaml": ("v1", "Service", APP),
        "argo-rollouts/pdb.yaml": ("policy/v1", "PodDisruptionBudget", APP),
        "argo-rollouts/hpa.yaml": ("autoscaling/v2", "HorizontalPodAutoscaler", APP),
        "argo-rollouts/virtualservice.yaml": ("networking.istio.io/v1", "VirtualService", APP),
        "argo-rollouts/destinationrule.yaml": ("networking.istio.io/v1", "DestinationRule", APP),
    }
    hpa = objs["argo-rollouts/hpa.yaml"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout", "name": APP}
    spec = objs["argo-rollouts/rollout.yaml"]["spec"]
    assert "replicas" not in spec
    assert spec["selector"] == {"matchLabels": {NAME: APP}}
    pod_labels = spec["template"]["metadata"]["labels"]
    assert "track" not in pod_labels and pod_labels["version"] == "v3"
    assert spec["template"]["spec"]["containers"][0]["args"][1] == "models:/minilm-fp16/3"
    routing = spec["strategy"]["canary"]["trafficRouting"]["istio"]
    assert routing == {
        "virtualService": {"name": APP, "routes": ["primary"]},
        "destinationRule": {"name": APP, "canarySubsetName": "canary", "stableSubsetName": "stable"},
    }
    (route,) = objs["argo-rollouts/virtualservice.yaml"]["spec"]["http"]
    assert route["name"] == "primary"
    assert [(r["destination"]["subset"], r["weight"]) for r in route["route"]] == [("stable", 100), ("canary", 0)]
    dr = objs["argo-rollouts/destinationrule.yaml"]["spec"]
    assert dr["subsets"] == [{"name": "stable", "labels": {}}, {"name": "canary", "labels": {}}]


@pytest.mark.parametrize(
    ("weights", "expected"), [([10, 50, 100], [10, 50]), ([5, 25, 60, 100], [5, 25, 60]), ([100], [])]
)
def test_steps_follow_rollout_steps(deploy_inputs, with_sections, weights, expected):
    steps = argo.render(with_sections(deploy_inputs, rollout={"steps": weights}))["argo-rollouts/rollout.yaml"]
    steps = steps["spec"]["strategy"]["canary"]["steps"]
    assert [s["setWeight"] for s in steps[::2]] == expected
    for analysis in steps[1::2]:
        assert analysis["analysis"]["templates"] == [{"templateName": f"{APP}-analysis"}]
        args = {a["name"]: a["value"] for a in analysis["analysis"]["args"]}
        assert args == {"canary-version": "3", "stable-version": "2"}  # registered numbers, model_info's label


def test_analysis_runs_the_same_promql_with_the_slo(deploy_inputs, with_sections):
    inputs = with_sections(
        deploy_inputs,
        serving={"slo": {"p99_ms": 200, "error_rate": 0.00001}},
        rollout={"analysis": {"interval_s": 30, "count": 4, "window_s": 90, "failure_limit": 1, "min_requests": 80}},
    )
    spec = argo.render(inputs, prometheus_address="http://prom.example:9090")["argo-rollouts/analysistemplate.yaml"]
    spec = spec["spec"]
    assert spec["args"] == [
        {"name": "canary-version"},
        {"name": "stable-version"},
        {"name": "prometheus-address", "value": "http://prom.example:9090"},
    ]
    by_name = {m["name"]: m for m in spec["metrics"]}
    assert list(by_name) == ["canary-requests", "canary-p99", "canary-error-ratio", "canary-p99-vs-stable"]
    canary = queries.Scope("minilm-fp16", "{{args.canary-version}}")
    stable = queries.Scope("minilm-fp16", "{{args.stable-version}}")
    expected = {
        "canary-requests": queries.request_count(canary, 90),
        "canary-p99": queries.p99_seconds(canary, 90),
        "canary-error-ratio": queries.error_ratio(canary, 90),
        "canary-p99-vs-stable": queries.p99_ratio(canary, stable, 90),
    }
    for name, metric in by_name.items():
        assert metric["provider"]["prometheus"] == {"address": "{{args.prometheus-address}}", "query": expected[name]}
        assert (metric["interval"], metric["count"], metric["failureLimit"]) == ("30s", 4, 1)
        assert metric["initialDelay"] == "90s"  # a window of traffic at the new weight first
        # Argo fails a template whose {{...}} names no declared argument
        declared = {a["name"] for a in spec["args"]}
        assert set(re.findall(r"\{\{\s*args\.([\w-]+)\s*\}\}", str(metric))) <= declared
        assert str(metric).count("{{") == len(re.findall(r"\{\{\s*args\.[\w-]+\s*\}\}", str(metric)))
    nan = float("nan")
    # p99 budget 0.2 s; error budget 0.00001 written without an exponent
    assert [_phase(by_name["canary-p99"], r) for r in ([0.19], [0.21], [], [nan], [math.inf])] == [
        "Successful",
        "Failed",
        "Inconclusive",
        "Inconclusive",
        "Failed",
    ]
    assert "0.00001" in by_name["canary-error-ratio"]["successCondition"]
    assert [_phase(by_name["canary-error-ratio"], r) for r in ([0.0], [0.00002], [])] == [
        "Successful",
        "Failed",
        "Inconclusive",
    ]
    # too few requests is never a failure, only not enough to judge
    assert [_phase(by_name["canary-requests"], r) for r in ([80.0], [79.0], [])] == [
        "Successful",
        "Inconclusive",
        "Inconclusive",
    ]
    assert [_phase(by_name["canary-p99-vs-stable"], r) for r in ([1.2], [1.3], [nan])] == [
        "Successful",
        "Failed",
        "Inconclusive",
    ]


def test_first_rollout_has_nothing_to_compare_against(first_rollout):
    objs = argo.render(first_rollout)
    spec = objs["argo-rollouts/analysistemplate.yaml"]["spec"]
    assert [a["name"] for a in spec["args"]] == ["canary-version", "prometheus-address"]
    assert [m["name"] for m in spec["metrics"]] == ["canary-requests", "canary-p99", "canary-error-ratio"]
    assert "stable-version" not in str(spec)
    steps = objs["argo-rollouts/rollout.yaml"]["spec"]["strategy"]["canary"]["steps"]
    for step in steps[1::2]:
        assert step["analysis"]["args"] == [{"name": "canary-version", "value": "3"}]
    # Argo needs both subsets and routes even before it has a stable ReplicaSet
    (route,) = objs["argo-rollouts/virtualservice.yaml"]["spec"]["http"]
    assert [r["destination"]["subset"] for r in route["route"]] == ["stable", "canary"]
