"""deploy/queries.py: durations, quoting, the metric names a PromQL expression reads, the server's exported names,
and the queries themselves: every one parses (`promtool check rules`, Argo placeholders included), and promtool
evaluates the ones whose shape matters (an error ratio of 0 before the first failure, one series per version, a
p99 ratio without labels, one utilisation series per pod of the app and none of another app).

promtool comes from Debian's prometheus package (`bash ci/setup.sh cpu`); without it the promtool tests fail."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from optimize.deploy import queries
from optimize.deploy.queries import Scope
from optimize.deploy.tools import find_tool

CANARY = Scope("minilm-fp16", "3")
STABLE = Scope("minilm-fp16", "2")
ARGO_CANARY = Scope("minilm-fp16", "{{args.canary-version}}")
ARGO_STABLE = Scope("minilm-fp16", "{{args.stable-version}}")
SERVER_JOIN = {"optimize_model_info"}


def every_query() -> dict[str, str]:
    """One expression of each builder, for concrete versions, every version and Argo's placeholders."""
    return {
        "p99": queries.p99_seconds(CANARY, 120),
        "p99_all": queries.p99_seconds(Scope("minilm-fp16"), 300, quantile=0.5),
        "errors": queries.error_ratio(ARGO_CANARY, 120),
        "count": queries.request_count(ARGO_CANARY, 120),
        "shed": queries.shed_ratio(CANARY, 300),
        "queue": queries.queue_saturation(CANARY, 256),
        "ratio": queries.p99_ratio(ARGO_CANARY, ARGO_STABLE, 120),
        "istio_p99": queries.istio_p99_ms("minilm-fp16", "ml", "v3", 300),
        "istio_errors": queries.istio_error_ratio("minilm-fp16", None, None, 300),
        "cpu": queries.cpu_utilisation("minilm-fp16", "ml", 300),
        "memory": queries.memory_utilisation("minilm-fp16", None),
    }


@pytest.fixture(scope="module")
def promtool() -> Path:
    """promtool, or a failure that says how to install it."""
    found = find_tool("promtool")
    if found is None:
        pytest.fail("promtool not found on PATH or beside this Python: run `bash ci/setup.sh cpu`")
    return found


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(120, "2m"), (90, "90s"), (0.25, "250ms"), (1.5, "1500ms"), (3600, "1h"), (86400, "1d"), (0, "0s"), (300, "5m")],
)
def test_duration(seconds: float, text: str) -> None:
    assert queries.duration(seconds) == text


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_duration_refuses_what_is_no_duration(bad: float) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        queries.duration(bad)


def test_label_values_are_quoted() -> None:
    assert queries.quote('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    expr = queries.request_count(Scope('we"ird\\name', None), 60)
    assert 'optimize_model_info{name="we\\"ird\\\\name"}' in expr
    assert "model_version=" not in expr  # no version: every version, one series each
    assert 'version="{{args.canary-version}}"' in queries.p99_seconds(ARGO_CANARY, 60)


def test_metric_names_of_the_builders() -> None:
    names = {key: queries.metric_names(expr) for key, expr in every_query().items()}
    assert (
        names["p99"] == names["p99_all"] == names["ratio"] == {"optimize_request_duration_seconds_bucket"} | SERVER_JOIN
    )
    assert names["errors"] == names["count"] == {"optimize_requests_total"} | SERVER_JOIN
    assert names["shed"] == {"optimize_shed_total", "optimize_requests_total"} | SERVER_JOIN
    assert names["queue"] == {"optimize_queue_depth"} | SERVER_JOIN
    assert names["istio_p99"] == {"istio_request_duration_milliseconds_bucket"}
    assert names["istio_errors"] == {"istio_requests_total"}
    assert names["cpu"] == {"container_cpu_usage_seconds_total", "kube_pod_container_resource_limits"}
    assert names["memory"] == {"container_memory_working_set_bytes", "kube_pod_container_resource_limits"}


def test_metric_names_of_hand_written_promql() -> None:
    expr = (
        'sum without (instance) (rate(http_total{path=~"/v2/{x}", le="0.5"}[5m:30s] offset 1h)) by (le) '
        "/ ignoring(code) group_left(version) up * 1e3 + 0x1F - 2.5e-3 > bool on() max_over_time(go_gc[1h30m]) "
        'unless {__name__="by_name", job="j"} and topk(3, node:load:avg) or absent(nope) @ start()'
    )
    assert queries.metric_names(expr) == {"http_total", "up", "go_gc", "by_name", "node:load:avg", "nope"}
    assert queries.metric_names('count by (version) (optimize_model_info{name="sum(x)"})') == {"optimize_model_info"}


def test_exported_metric_names_are_what_the_server_exposes() -> None:
    from optimize.serving.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.set_model("m", "1", "0" * 64, "fp16", "cpu")
    metrics.answered(200, 0.01)
    exposed = {
        line.split("{")[0].split(" ")[0]
        for line in metrics.exposition()[0].decode().splitlines()
        if line and not line.startswith("#") and "_created" not in line.split("{")[0]
    }
    assert queries.exported_metric_names() == exposed
    assert {"optimize_requests_total", "optimize_request_duration_seconds_bucket"} <= exposed


def test_server_queries_read_only_exported_metrics() -> None:
    exported = queries.exported_metric_names()
    for key, expr in every_query().items():
        server = {n for n in queries.metric_names(expr) if n.startswith("optimize_")}
        assert server <= exported, f"{key}: {server - exported}"


def test_pod_regex_tells_apps_apart() -> None:
    import re

    pods = re.compile(queries.pod_regex("minilm"))
    assert pods.fullmatch("minilm-canary-5d8f7b9c6d-x7k2p")
    assert pods.fullmatch("minilm-stable-7c9d8f6b5d-abcde")
    assert pods.fullmatch("minilm-6f7d9c8b5-q2w3e")  # the Argo Rollout's pods
    assert not pods.fullmatch("minilm-int8-canary-5d8f7b9c6d-x7k2p")
    assert not pods.fullmatch("minilm-int8-6f7d9c8b5-q2w3e")


def test_every_query_parses_and_evaluates(promtool: Path, tmp_path: Path) -> None:
    """promtool parses every query (as recording rules), and evaluates five whose result shape others rely on."""
    rules = {"groups": [{"name": "q", "rules": [{"record": f"q:{k}", "expr": e} for k, e in every_query().items()]}]}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules), encoding="utf-8")
    target = {3: 'instance="10.0.0.3:8000", job="pods"', 2: 'instance="10.0.0.2:8000", job="pods"'}
    info = (
        'optimize_model_info{{name="minilm-fp16", model_version="{v}", sha256="s", variant="fp16", target="cpu", {t}}}'
    )
    series = [{"series": info.format(v=v, t=t), "values": "1+0x20"} for v, t in target.items()]
    series += [{"series": f'optimize_requests_total{{code="200", {t}}}', "values": "0+60x20"} for t in target.values()]
    for v, t in target.items():  # p99: 10 % of requests in (0.1, 0.2] (version 3) or (0.1, 0.15] (version 2)
        for le, n in (("0.1", 54), ("0.15", 60 if v == 2 else 57), ("0.2", 60), ("+Inf", 60)):
            series.append(
                {"series": f'optimize_request_duration_seconds_bucket{{le="{le}", {t}}}', "values": f"0+{n}x20"}
            )
    pod = 'namespace="ml", pod="minilm-fp16-canary-5d8f7b9c6d-x7k2p"'
    other = 'namespace="ml", pod="minilm-fp16x-canary-5d8f7b9c6d-x7k2p"'  # another app's pod
    for p in (pod, other):
        series.append({"series": f'container_cpu_usage_seconds_total{{{p}, container="server"}}', "values": "0+15x20"})
        series.append({"series": f'container_cpu_usage_seconds_total{{{p}, container=""}}', "values": "0+15x20"})
        limit = f'kube_pod_container_resource_limits{{{p}, container="server", resource="cpu", unit="core"}}'
        series.append({"series": limit, "values": "2+0x20"})
    cases = [
        (queries.error_ratio(CANARY, 120), [({"model_version": "3"}, 0)]),  # 0, not nothing, before the first failure
        (
            queries.request_count(Scope("minilm-fp16"), 120),
            [({"model_version": "2"}, 480), ({"model_version": "3"}, 480)],
        ),
        (queries.p99_seconds(CANARY, 120), [({"model_version": "3"}, 0.19)]),
        (queries.p99_ratio(CANARY, STABLE, 120), [({}, 0.19 / 0.145)]),
        (queries.cpu_utilisation("minilm-fp16", "ml", 120), [({"namespace": "ml", "pod": pod.split('"')[3]}, 0.5)]),
    ]
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": e,
                        "eval_time": "4m",
                        "exp_samples": [{"labels": _labels(lab), "value": v} for lab, v in exp],
                    }
                    for e, exp in cases
                ],
            }
        ],
    }
    (tmp_path / "q.test.yaml").write_text(yaml.safe_dump(tests, width=1000), encoding="utf-8")
    check = subprocess.run(
        [str(promtool), "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run([str(promtool), "test", "rules", "q.test.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _labels(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
