"""The pipeline's serving stage (`serving.loadtest: true`): a tiny recipe served on 127.0.0.1 and load-tested end
to end, its `serving.*` gates judged like every other gate (verdict, JUnit, report row, exit 1 when one fails),
the registered version carrying its serving numbers, the units in `optimize plan`; a serving gate without the
load test is a recipe error."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from conftest import mlp_onnx
from mlflow import MlflowClient

from optimize import plan
from optimize.errors import RecipeError
from optimize.gates import evaluate_gates
from optimize.pipeline import RunOptions, run
from optimize.recipe import Gate, load_recipe
from optimize.registry import tags as tag

# Short, bounded load: one explicit step of 1 s at a rate a tiny MLP serves far within the default SLO
# (p99 500 ms, errors 0.1 %) on any machine.
LOAD = {"rps": [20], "step_s": 1}
SERVING_GATES = [
    "serving.p99_ms <= 500",
    "serving.error_rate <= 0.001",
    "serving.max_rps_at_slo >= 20",
    "serving.cpu_utilisation <= 1.0",
    "serving.rss_peak_mb <= 4096",
]
SERVED = ("fp32", "fp16")


def _recipe(write_recipe, gates: list[str], name: str = "recipe.yaml") -> Path:
    """The tiny MLP given as ONNX (every identity is in a file, so `optimize plan` knows each unit's key), load
    tested with LOAD, and `gates`."""
    recipe = write_recipe(
        {
            "model": {"source": "onnx", "path": "tiny.onnx", "entry_point": None, "python_path": None},
            "serving": {"loadtest": True, "load": LOAD},
            "gates": ["accuracy.cosine_min >= 0.99", *gates],
            "benchmark": {"shapes": [{"batch": 1}], "warmup": 1, "iterations": 5},
        },
        name=name,
    )
    mlp_onnx(recipe.parent / "tiny.onnx")
    return recipe


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def test_a_served_tiny_model_is_load_tested_gated_reported_and_registered(write_recipe, tmp_path: Path) -> None:
    recipe = _recipe(write_recipe, SERVING_GATES)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run(recipe, RunOptions(runs_dir=tmp_path / "runs", quiet=True, tracking_uri=uri))
    d = result.run_dir
    assert result.exit_code == 0, _json(d / "verdict.json")

    manifest = _json(d / "manifest.json")
    stages = [s["stage"] for s in manifest["stages"]]
    assert stages.index("benchmark") < stages.index("serving") < stages.index("gate")
    served = [c["unit"] for c in manifest["cache"] if c["stage"] == "serving"]
    assert served == [f"{n}@onnxruntime-cpu" for n in SERVED]

    metrics = _json(d / "metrics.json")
    for name in SERVED:
        doc = _json(d / "serving" / name / "onnxruntime-cpu" / "loadtest.json")
        assert (d / "serving" / name / "onnxruntime-cpu" / "loadtest.png").stat().st_size > 0
        assert [s["rps"] for s in doc["steps"]] == LOAD["rps"]
        assert all(s["answered"] == s["sent"] > 0 for s in doc["steps"]), doc["steps"]
        assert doc["url"].startswith("http://127.0.0.1:")
        s = metrics["results"][name]["onnxruntime-cpu"]["serving"]
        # metrics.json keeps what loadtest.json measured, for the gates, the report and the registry
        assert s["max_rps_at_slo"] == doc["max_rps_at_slo"] == 20
        assert s["p99_ms"] == doc["judged"]["p99_ms"] and s["rss_peak_mb"] == doc["judged"]["rss_peak_mb"]
        assert 0 < s["p99_ms"] < 500 and s["rss_peak_mb"] > 0 and s["error_rate"] == 0

    verdict = _json(d / "verdict.json")
    rows = {r["check"]: r for r in verdict["gates"] if r["metric"].startswith("serving.")}
    assert set(rows) == set(SERVING_GATES) and all(r["status"] == "passed" for r in rows.values())
    fp16 = metrics["results"]["fp16"]["onnxruntime-cpu"]["serving"]
    fp32 = metrics["results"]["fp32"]["onnxruntime-cpu"]["serving"]
    assert rows["serving.p99_ms <= 500"]["value"] == fp16["p99_ms"]
    assert rows["serving.p99_ms <= 500"]["baseline_value"] == fp32["p99_ms"]
    junit = ET.parse(d / "junit.xml").getroot()
    assert sum("serving." in (c.get("name") or "") for c in junit.iter("testcase")) == len(SERVING_GATES)

    html = (d / "report.html").read_text()
    assert 'id="serving"' in html and 'id="plot-serving-onnxruntime-cpu"' in html
    assert (d / "plots" / "serving-onnxruntime-cpu.png").is_file()
    assert "## Serving under load" in (d / "report.md").read_text()

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("tiny", "candidate")
    assert mv.tags[tag.LOADTEST_TARGET] == "onnxruntime-cpu"
    assert float(mv.tags[tag.LOADTEST_MAX_RPS_AT_SLO]) == fp16["max_rps_at_slo"]
    assert float(mv.tags[tag.LOADTEST_P99_MS]) == pytest.approx(fp16["p99_ms"], rel=1e-5)
    assert float(mv.tags[tag.LOADTEST_RPS]) == fp16["rps"]
    # what the server used at max_rps_at_slo, which `optimize deploy render` sizes pods from
    assert float(mv.tags[tag.LOADTEST_CPU_CORES]) == pytest.approx(fp16["capacity"]["cpu_cores"], rel=1e-5)
    assert float(mv.tags[tag.LOADTEST_RSS_PEAK_MB]) == pytest.approx(fp16["capacity"]["rss_peak_mb"], rel=1e-5)
    assert 0 < fp16["capacity"]["cpu_cores"] and fp16["capacity"]["rss_peak_mb"] > 0
    assert "Serving on onnxruntime-cpu: 20 req/s within the SLO" in mv.description

    # the plan lists the serving units the run made, now cached; --rebench measures them anew
    planned = {f"{u.stage}:{u.unit}": u for u in plan.make(recipe).units}
    run_units = {f"{c['stage']}:{c['unit']}" for c in manifest["cache"]}
    assert set(planned) == run_units
    assert [planned[f"serving:{n}@onnxruntime-cpu"].status for n in SERVED] == ["hit", "hit"]
    remeasured = plan.make(recipe, rebench=True).units
    assert {u.status for u in remeasured if u.stage == "serving"} == {"miss"}

    # A gate the served model cannot meet (p99 under 10 µs through HTTP) fails the run with exit 1, judged on
    # the same load test (taken from the stage cache: only the gates changed).
    strict = _recipe(write_recipe, ["serving.p99_ms <= 0.01"], name="strict.yaml")
    failed = run(strict, RunOptions(runs_dir=tmp_path / "runs", quiet=True, register=False))
    assert failed.exit_code == 1 and failed.status == "failed"
    hits = [c["hit"] for c in _json(failed.run_dir / "manifest.json")["cache"] if c["stage"] == "serving"]
    assert hits == [True, True]
    (row,) = [r for r in _json(failed.run_dir / "verdict.json")["gates"] if r["metric"] == "serving.p99_ms"]
    assert row["status"] == "failed" and row["value"] == fp16["p99_ms"]
    assert f"serving.p99_ms = {fp16['p99_ms']:.6g}, needs <= 0.01" in row["reason"]
    failures = list(ET.parse(failed.run_dir / "junit.xml").getroot().iter("failure"))
    assert len(failures) == 1 and "serving.p99_ms <= 0.01" in failures[0].get("message")


def test_a_serving_gate_needs_the_load_test(write_recipe) -> None:
    recipe = write_recipe({"gates": ["accuracy.cosine_min >= 0.99", "serving.p99_ms <= 500"]})
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert info.value.exit_code == 2
    assert "gates[1].check: serving gates need `serving.loadtest: true`" in str(info.value)
    on_torch = write_recipe(
        {"serving": {"loadtest": True}, "gates": [{"check": "serving.p99_ms <= 500", "target": "torch-cpu"}]}
    )
    with pytest.raises(RecipeError, match=r"gates\[0\]\.target: the load test serves ONNX Runtime targets only"):
        load_recipe(on_torch)


def test_without_the_load_test_nothing_is_served(write_recipe) -> None:
    units = plan.make(write_recipe()).units
    assert units and not [u for u in units if u.stage == "serving"]
    planned = [u.unit for u in plan.make(_recipe(write_recipe, [], name="served.yaml")).units if u.stage == "serving"]
    assert planned == [f"{n}@onnxruntime-cpu" for n in SERVED]


def test_a_serving_gate_is_judged_where_the_load_test_served_and_skipped_elsewhere() -> None:
    gate = Gate(check="serving.p99_ms <= 50")
    served = {"serving": {"p99_ms": 80.0}, "accuracy": {}}
    results = {
        "fp32": {"onnxruntime-cpu": {"serving": {"p99_ms": 20.0}}, "torch-cpu": {}},
        "fp16": {"onnxruntime-cpu": served, "torch-cpu": {"accuracy": {}}},
    }
    targets = {"onnxruntime-cpu": {"status": "ran"}, "torch-cpu": {"status": "ran"}}
    verdict = evaluate_gates([gate], results, targets)
    rows = {r["target"]: r for r in verdict["gates"]}
    assert rows["onnxruntime-cpu"]["status"] == "failed" and rows["onnxruntime-cpu"]["value"] == 80.0
    assert rows["onnxruntime-cpu"]["baseline_value"] == 20.0
    assert rows["onnxruntime-cpu"]["reason"] == "serving.p99_ms = 80, needs <= 50"
    skipped = rows["torch-cpu"]
    assert skipped["status"] == "skipped" and "serves ONNX Runtime targets only" in skipped["reason"]
    assert verdict["status"] == "failed"
