"""What CI reads: junit.xml (one test case per gate per variant and target; a failed gate names the gate, the
value, the threshold and the baseline) and the Markdown gate table; and `optimize run --junit/--summary`,
including a run that stops before its gates."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from test_cli import cli
from test_gates import TARGETS, gate, result, results

from optimize.errors import StageError
from optimize.gates import evaluate_gates
from optimize.reporting import ci

MANIFEST = {"recipe": "bert", "run_id": "20261128-000000-abcd", "started": "2026-11-28T00:00:00+00:00"}


def _verdict() -> dict[str, Any]:
    gates = [
        gate("accuracy.cosine_min >= 0.999"),
        gate("latency.p50_speedup >= 1.0"),  # fp16's batch=8 is at 0.8: fails
        gate("size.ratio <= 0.6", variants=["fp16"]),
        gate("latency.p50_speedup >= 1.5", target="tensorrt"),  # tensorrt skipped here
    ]
    return evaluate_gates(gates, results(fp16=result(), int8=result(cosine_min=0.9)), TARGETS)


def _cases(xml: str) -> list[ET.Element]:
    root = ET.fromstring(xml)
    assert root.tag == "testsuites"
    return root.findall("./testsuite/testcase")


def test_junit_has_one_case_per_gate_row_with_counts() -> None:
    verdict = _verdict()
    xml = ci.junit_xml(verdict, MANIFEST, "runs/bert/x/report.md")
    root = ET.fromstring(xml)
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == len(verdict["gates"]) == 7  # 2 gates × 2 variants + 1 + 2 tensorrt rows
    statuses = [r["status"] for r in verdict["gates"]]
    assert suite.get("tests") == "7" and root.get("tests") == "7"
    assert suite.get("failures") == str(statuses.count("failed")) == "3"
    assert suite.get("skipped") == str(statuses.count("skipped")) == "2"
    assert suite.get("errors") == "0" and suite.get("name") == "optimize.bert"
    assert {c.get("classname") for c in cases} == {"bert.fp16", "bert.int8"}
    names = [c.get("name") for c in cases]
    assert "accuracy.cosine_min >= 0.999 [onnxruntime-cpu]" in names
    assert len(set(zip([c.get("classname") for c in cases], names, strict=True))) == 7, "test ids must be unique"
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["run_id"] == MANIFEST["run_id"] and props["verdict"] == "failed"
    assert props["target.tensorrt"] == "skipped: TensorRT is not installed"


def test_a_failed_gate_names_gate_value_threshold_and_baseline() -> None:
    cases = _cases(ci.junit_xml(_verdict(), MANIFEST))
    failures = {(c.get("classname"), c.get("name")): c.find("failure") for c in cases if c.find("failure") is not None}
    accuracy = failures[("bert.int8", "accuracy.cosine_min >= 0.999 [onnxruntime-cpu]")]
    assert accuracy.get("message") == (
        "int8 on onnxruntime-cpu: accuracy.cosine_min >= 0.999 failed: accuracy.cosine_min = 0.9, needs >= 0.999 "
        "(fp32 baseline: 1)"
    )
    assert "threshold: >= 0.999" in accuracy.text and "value: 0.9" in accuracy.text
    speed = failures[("bert.fp16", "latency.p50_speedup >= 1.0 [onnxruntime-cpu]")]
    assert "latency.p50_speedup = 0.8, needs >= 1" in speed.get("message")
    assert "fp32 baseline: 1 (a ratio to it)" in speed.get("message")
    skipped = [c.find("skipped") for c in cases if c.find("skipped") is not None]
    assert [s.get("message") for s in skipped] == ["tensorrt: TensorRT is not installed"] * 2


def test_junit_escapes_what_xml_cannot_hold() -> None:
    verdict = _verdict()
    verdict["gates"][1]["reason"] = 'p50 < 1 & "quoted" <tag>'
    xml = ci.junit_xml(verdict, {**MANIFEST, "recipe": "a<b"})
    assert ET.fromstring(xml).find("testsuite").get("name") == "optimize.a<b"


def test_junit_for_a_run_that_stopped_before_its_gates() -> None:
    xml = ci.junit_error_xml("recipes/x.yaml", StageError("export: outputs differ\nsecond line"), 3)
    root = ET.fromstring(xml)
    assert root.get("errors") == "1" and root.get("tests") == "1"
    (case,) = root.findall("./testsuite/testcase")
    error = case.find("error")
    assert error.get("type") == "exit 3 (a stage failed)"
    assert error.get("message") == "export: outputs differ" and "second line" in error.text


def test_summary_table_has_every_gate_row_and_escapes_pipes() -> None:
    verdict = _verdict()
    verdict["gates"][0]["reason"] = "a | b"
    verdict["gates"][0]["status"] = "failed"
    md = ci.summary_markdown(verdict, MANIFEST, "runs/bert/x/report.md")
    assert md.startswith("### ❌ bert: FAILED\n")
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(verdict["gates"])
    assert all(row.count(" | ") == 6 for row in rows), rows  # 7 columns, the reason's pipe escaped
    assert "| fp16 | onnxruntime-cpu | `latency.p50_speedup >= 1.0` | 0.8 | ≥ 1 | 1 (a ratio to it) | ❌ failed" in md
    assert "- target `tensorrt` skipped: TensorRT is not installed" in md
    assert "report `runs/bert/x/report.md`" in md


def test_a_finished_run_leaves_junit_and_summary(finished_run: Path) -> None:
    verdict = json.loads((finished_run / "verdict.json").read_text())
    cases = _cases((finished_run / "junit.xml").read_text())
    assert len(cases) == len(verdict["gates"]) > 0
    assert all(c.find("failure") is None for c in cases)
    summary = (finished_run / "summary.md").read_text()
    assert summary.startswith("### ✅ tiny: PASSED") and summary.count("✅ passed") == len(verdict["gates"])


def test_run_writes_junit_and_appends_the_summary(write_recipe, tiny_dir: Path) -> None:
    recipe = write_recipe({"gates": ["accuracy.cosine_min >= 0.99", "size.ratio <= 0.01"]})
    summary = tiny_dir / "step-summary.md"
    summary.write_text("# earlier step\n\n")
    args = ("--no-register", "-q", "--junit", "out/junit.xml", "--summary", str(summary))
    proc = cli("run", str(recipe), *args, cwd=tiny_dir)
    assert proc.returncode == 1, proc.stderr
    (failure,) = ET.parse(tiny_dir / "out" / "junit.xml").getroot().iter("failure")
    message = failure.get("message")
    assert message.startswith("fp16 on onnxruntime-cpu: size.ratio <= 0.01 failed: size.ratio = 0.")
    assert message.endswith(", needs <= 0.01 (fp32 baseline: 1)")
    text = summary.read_text()
    assert text.startswith("# earlier step\n\n### ❌ tiny: FAILED")


def test_run_that_fails_before_its_gates_still_writes_junit_and_summary(tiny_dir: Path) -> None:
    (tiny_dir / "bad.yaml").write_text("name: tiny\nmodel: {source: nowhere}\n")
    proc = cli("run", "bad.yaml", "--junit", "j.xml", "--summary", "s.md", cwd=tiny_dir)
    assert proc.returncode == 2
    error = ET.parse(tiny_dir / "j.xml").getroot().find("./testsuite/testcase/error")
    assert error.get("type") == "exit 2 (bad recipe or usage)"
    assert error.get("message") in proc.stderr
    assert (tiny_dir / "s.md").read_text().startswith("### ❌ bad.yaml: exit 2 (bad recipe or usage)")
