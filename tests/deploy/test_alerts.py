"""deploy/alerts.py: the rendered rules pass `promtool check rules`, and the unit tests generated from the budgets
pass `promtool test rules` (each alert fires at budget × 1.05 within one evaluation interval after its `for`, never
at × 0.95), for recipes/fp16.yaml's sections and for odd budgets. Mutations prove the generated tests can fail:
thresholds raised or lowered by 10 %, or `for` dropped, and promtool names every alert as failing.

promtool comes from Debian's prometheus package (`bash ci/setup.sh cpu`); without it these tests fail."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from optimize.deploy import alerts, queries
from optimize.deploy.inputs import DeployInputs
from optimize.deploy.tools import find_tool

ALERTS = {
    "OptimizeLatencyP99OverBudget",
    "OptimizeIstioLatencyP99OverBudget",
    "OptimizeErrorRateOverBudget",
    "OptimizeIstioErrorRateOverBudget",
    "OptimizeCPUOverBudget",
    "OptimizeMemoryOverBudget",
    "OptimizeShedRateOverBudget",
    "OptimizeQueueSaturated",
    "OptimizeCanaryP99Regressed",
}
PARALLEL = 4  # promtool runs a file's test groups one after another (~0.3 s each); separate files run side by side


@pytest.fixture(scope="module")
def promtool() -> Path:
    """promtool, or a failure that says how to install it."""
    found = find_tool("promtool")
    if found is None:
        pytest.fail("promtool not found on PATH or beside this Python: run `bash ci/setup.sh cpu`")
    return found


def write(folder: Path, files: dict[str, dict]) -> Path:
    """The rendered files under `folder`; returns the monitoring/ folder."""
    for rel, obj in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(obj, sort_keys=False, width=200), encoding="utf-8")
    return folder / "monitoring"


def test_rules(promtool: Path, monitoring: Path, tests: dict) -> list[tuple[int, str]]:
    """`promtool test rules` of `tests` (a test file's content) split into PARALLEL files run side by side: each
    run's exit status and output."""
    procs = []
    for i in range(PARALLEL):
        part = {**tests, "tests": tests["tests"][i::PARALLEL]}
        if not part["tests"]:
            continue
        path = monitoring / f"part{i}.test.yaml"
        path.write_text(yaml.safe_dump(part, sort_keys=False, width=200), encoding="utf-8")
        procs.append(
            subprocess.Popen(
                [str(promtool), "test", "rules", path.name],
                cwd=monitoring,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outputs, strict=True)]


test_rules.__test__ = False  # a helper, not a test


def check_passes(promtool: Path, inputs: DeployInputs, folder: Path) -> dict[str, dict]:
    """Render, `promtool check rules` and `promtool test rules`: both must pass; returns the rendered files."""
    files = alerts.render(inputs)
    monitoring = write(folder, files)
    check = subprocess.run(
        [str(promtool), "check", "rules", "rules.yaml"], cwd=monitoring, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    rules = files[alerts.RULES_FILE]["groups"][0]["rules"]
    assert f"SUCCESS: {len(rules)} rules found" in check.stdout
    for rc, out in test_rules(promtool, monitoring, files[alerts.TESTS_FILE]):
        assert rc == 0, out
    return files


def test_fp16_alerts_pass_promtool(promtool: Path, deploy_inputs: DeployInputs, tmp_path: Path) -> None:
    files = check_passes(promtool, deploy_inputs, tmp_path)
    rule = files[alerts.PROMETHEUS_RULE_FILE]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["metadata"] == {
        "name": "minilm-fp16-slo",
        "labels": {"app.kubernetes.io/name": "minilm-fp16", "app.kubernetes.io/part-of": "optimize"},
    }
    assert rule["spec"]["groups"] == files[alerts.RULES_FILE]["groups"]
    group = rule["spec"]["groups"][0]
    assert group["interval"] == "30s"
    assert {r["alert"] for r in group["rules"]} == ALERTS
    assert all(r["for"] == "5m" and r["labels"]["severity"] in ("critical", "warning") for r in group["rules"])
    budgets = {r["alert"]: r["expr"].rsplit(" > ", 1)[1] for r in group["rules"]}
    assert budgets["OptimizeLatencyP99OverBudget"] == "0.5"  # serving.slo.p99_ms 500, in seconds
    assert budgets["OptimizeIstioLatencyP99OverBudget"] == "500"
    assert budgets["OptimizeErrorRateOverBudget"] == budgets["OptimizeIstioErrorRateOverBudget"] == "0.001"
    assert (budgets["OptimizeCPUOverBudget"], budgets["OptimizeMemoryOverBudget"]) == ("0.7", "0.8")
    assert (budgets["OptimizeShedRateOverBudget"], budgets["OptimizeQueueSaturated"]) == ("0.01", "0.8")
    assert budgets["OptimizeCanaryP99Regressed"] == "1.25"
    # every alert has a group at × 1.05 that expects it firing and one at × 0.95 that never does
    names = [t["name"] for t in files[alerts.TESTS_FILE]["tests"]]
    assert sorted(names) == sorted(f"{a} at budget x {f}" for a in ALERTS for f in ("1.05", "0.95"))


def test_odd_budgets_pass_promtool(
    promtool: Path,
    first_rollout: DeployInputs,
    deploy_inputs: DeployInputs,
    with_sections: Callable[..., DeployInputs],
    tmp_path: Path,
) -> None:
    """A first rollout (no stable: no canary-regression alert) in a namespace with `for: 0`, a short window and a
    p99 budget inside the first latency bucket; then a p99 budget beyond the last bucket, `for` off the
    evaluation grid and large error and shed budgets."""
    odd = with_sections(
        first_rollout,
        rollout={"namespace": "ml", "alerts": {"for_s": 0, "window_s": 40, "queue_saturation": 0.5}},
        serving={"max_queue": 10, "slo": {"p99_ms": 0.8, "cpu_utilisation": 0.9, "memory_utilisation": 0.5}},
    )
    files = check_passes(promtool, odd, tmp_path / "first")
    rules = files[alerts.RULES_FILE]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == ALERTS - {"OptimizeCanaryP99Regressed"}
    assert all("for" not in r for r in rules)
    assert files[alerts.PROMETHEUS_RULE_FILE]["metadata"]["namespace"] == "ml"
    assert all('destination_service_namespace="ml"' in r["expr"] for r in rules if "istio_" in r["expr"])
    odder = with_sections(
        deploy_inputs,
        rollout={"alerts": {"for_s": 45, "window_s": 90, "shed_rate": 0.2}, "analysis": {"max_p99_ratio": 1.1}},
        serving={"slo": {"p99_ms": 20000, "error_rate": 0.05}},
    )
    check_passes(promtool, odder, tmp_path / "odder")


def mutated(rules: dict, change: Callable[[dict], None]) -> dict:
    """A copy of a rule file with `change` applied to every rule."""
    copy = yaml.safe_load(yaml.safe_dump(rules))
    for rule in copy["groups"][0]["rules"]:
        change(rule)
    return copy


def scale_budget(factor: float) -> Callable[[dict], None]:
    def change(rule: dict) -> None:
        query, budget = rule["expr"].rsplit(" > ", 1)
        rule["expr"] = f"{query} > {float(budget) * factor!r}"

    return change


@pytest.mark.parametrize(
    ("mutation", "factor", "what"),
    [
        (scale_budget(1.1), "1.05", "budget × 1.1: the alerts stay silent at × 1.05"),
        (scale_budget(0.9), "0.95", "budget × 0.9: the alerts fire at × 0.95"),
        (lambda rule: rule.pop("for"), "1.05", "no `for`: the alerts fire before it has passed"),
    ],
)
def test_generated_tests_fail_on_mutated_rules(
    promtool: Path,
    deploy_inputs: DeployInputs,
    tmp_path: Path,
    mutation: Callable[[dict], None],
    factor: str,
    what: str,
) -> None:
    """The unit tests generated for the real budgets FAIL against rules changed as `what` says, for every alert
    (only the test groups the mutation concerns are run)."""
    files = alerts.render(deploy_inputs)
    files[alerts.RULES_FILE] = mutated(files[alerts.RULES_FILE], mutation)
    monitoring = write(tmp_path, files)
    tests = files[alerts.TESTS_FILE]
    tests = {**tests, "tests": [t for t in tests["tests"] if t["name"].endswith(f" x {factor}")]}
    results = test_rules(promtool, monitoring, tests)
    output = "\n".join(out for _, out in results)
    assert all(rc != 0 for rc, _ in results), f"{what}: promtool passed:\n{output}"
    failed = set(re.findall(r"alertname: (\w+), time: ", output))
    assert failed == ALERTS, f"{what}: promtool did not fail {sorted(ALERTS - failed)}:\n{output}"


def test_server_alerts_read_only_what_the_server_exports(deploy_inputs: DeployInputs) -> None:
    exported = queries.exported_metric_names()
    for alert in alerts.alerts(deploy_inputs):
        names = queries.metric_names(alert.expr)
        server = {n for n in names if n.startswith("optimize_")}
        assert server <= exported, f"{alert.name} reads {server - exported}, which optimize serve does not export"
        assert names, alert.name


def test_annotations_state_the_budget(deploy_inputs: DeployInputs) -> None:
    text = {a.name: a.summary + " " + a.description for a in alerts.alerts(deploy_inputs)}
    assert "500 ms" in text["OptimizeLatencyP99OverBudget"] and "500 ms" in text["OptimizeIstioLatencyP99OverBudget"]
    assert "0.1%" in text["OptimizeErrorRateOverBudget"] and "0.1%" in text["OptimizeIstioErrorRateOverBudget"]
    assert "70%" in text["OptimizeCPUOverBudget"] and "80%" in text["OptimizeMemoryOverBudget"]
    assert "1%" in text["OptimizeShedRateOverBudget"]
    assert "204.8 requests" in text["OptimizeQueueSaturated"] and "256" in text["OptimizeQueueSaturated"]
    assert "1.25" in text["OptimizeCanaryP99Regressed"] and "version 3" in text["OptimizeCanaryP99Regressed"]
