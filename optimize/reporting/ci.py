"""What CI reads from a run: `junit.xml`, one test case per gate per variant per target (a failed gate is a
`<failure>` naming the gate, the measured value, the threshold and the baseline), and a Markdown gate table
for a job summary (`$GITHUB_STEP_SUMMARY`) or a pull-request comment. A run that stopped before its gates
(bad recipe, failed stage, missing runtime) gives one `<error>` test case with the reason and exit code.

Built only from `verdict.json` and `manifest.json`, like `report.md` (optimize/reporting/markdown.py)."""

from __future__ import annotations

import math
import socket
import xml.etree.ElementTree as ET
from typing import Any

from optimize.errors import first_line

EXIT_MEANING = {
    1: "a gate failed",
    2: "bad recipe or usage",
    3: "a stage failed",
    4: "a required runtime is missing",
    5: "the registry is unreachable",
    6: "an artifact is not what was gated",
    7: "the registry refused the credentials",
}

_MARK = {"passed": "✅", "failed": "❌", "skipped": "⏭️"}
_OP_TEXT = {">=": "≥", "<=": "≤", ">": ">", "<": "<"}


def fmt_number(v: Any, digits: int = 6) -> str:
    """A value for a table cell: floats with `digits` significant digits, "–" for none."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def gate_label(row: dict[str, Any]) -> str:
    """A gate row's name: its check, the output it judges and the shape, e.g.
    `accuracy.max_abs_error <= 0.05 on output score` (report, junit, compare)."""
    at = f" at {row['shape']}" if row.get("shape") else ""
    on = f" on output {row['output']}" if row.get("output") else ""
    return f"{row['check']}{on}{at}"


def _baseline(row: dict[str, Any]) -> str:
    if row.get("baseline_value") is not None:
        return fmt_number(row["baseline_value"])
    if row["metric"].endswith(("speedup", "ratio")):
        return "1 (a ratio to it)"
    return "–"


def failure_message(row: dict[str, Any]) -> str:
    """One line: which gate, on which variant and target, the measured value, the threshold, the baseline."""
    value = row.get("value")
    measured = "not measured" if value is None else f"{row['metric']} = {fmt_number(value)}"
    return (
        f"{row['variant']} on {row['target']}: {gate_label(row)} failed: {measured}, needs {row['op']} "
        f"{row['threshold']:g} (fp32 baseline: {_baseline(row)})"
    )


def _target_status(s: dict[str, Any]) -> str:
    return s["status"] + (f": {s['reason']}" if s.get("reason") else "")


def _suite(name: str) -> ET.Element:
    return ET.Element("testsuite", name=name, hostname=socket.gethostname())


def _finish(suites: ET.Element, suite: ET.Element, counts: dict[str, int], seconds: float) -> str:
    for el in (suite, suites):
        el.set("tests", str(counts["tests"]))
        el.set("failures", str(counts["failures"]))
        el.set("errors", str(counts["errors"]))
        el.set("skipped", str(counts["skipped"]))
        el.set("time", f"{seconds:.3f}")
    suites.append(suite)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _properties(suite: ET.Element, props: dict[str, Any]) -> None:
    el = ET.SubElement(suite, "properties")
    for k, v in props.items():
        if v is not None:
            ET.SubElement(el, "property", name=k, value=str(v))


def junit_xml(verdict: dict[str, Any], manifest: dict[str, Any], report: str | None = None) -> str:
    """The verdict as JUnit XML: suite `optimize.<recipe>`, class `<recipe>.<variant>`, one test case named
    `<gate> [<target>]` per gate row of `verdict.json`."""
    recipe = manifest["recipe"]
    suites = ET.Element("testsuites", name="optimize")
    suite = _suite(f"optimize.{recipe}")
    seconds = sum(s.get("seconds", 0.0) for s in manifest.get("stages", []))
    if manifest.get("started"):
        suite.set("timestamp", str(manifest["started"]))
    _properties(
        suite,
        {
            "run_id": manifest.get("run_id"),
            "run_dir": manifest.get("run_dir"),
            "verdict": verdict["status"],
            "report": report,
            **{f"target.{t}": _target_status(s) for t, s in verdict["targets"].items()},
        },
    )
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for row in verdict["gates"]:
        counts["tests"] += 1
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"{recipe}.{row['variant']}",
            name=f"{gate_label(row)} [{row['target']}]",
            time="0",
        )
        if row["status"] == "failed":
            counts["failures"] += 1
            failure = ET.SubElement(case, "failure", type="gate", message=failure_message(row))
            failure.text = "\n".join(
                f"{k}: {v}"
                for k, v in (
                    ("recipe", recipe),
                    ("variant", row["variant"]),
                    ("target", row["target"]),
                    ("gate", gate_label(row)),
                    ("value", fmt_number(row.get("value"))),
                    ("threshold", f"{row['op']} {row['threshold']:g}"),
                    ("baseline (fp32)", _baseline(row)),
                    ("reason", row.get("reason", "")),
                    ("report", report),
                )
                if v is not None
            )
        elif row["status"] == "skipped":
            counts["skipped"] += 1
            ET.SubElement(case, "skipped", message=f"{row['target']}: {row.get('reason', 'did not run')}")
        else:
            ET.SubElement(case, "system-out").text = (
                f"{row['metric']} = {fmt_number(row.get('value'))} ({row['op']} {row['threshold']:g}; "
                f"fp32 baseline: {_baseline(row)})"
            )
    return _finish(suites, suite, counts, seconds)


def junit_error_xml(recipe: str, error: BaseException, exit_code: int, run_dir: str | None = None) -> str:
    """JUnit XML for a run that ended before its gates: one test case `optimize run` with an `<error>`."""
    suites = ET.Element("testsuites", name="optimize")
    suite = _suite(f"optimize.{recipe}")
    _properties(suite, {"run_dir": run_dir, "exit_code": exit_code})
    case = ET.SubElement(suite, "testcase", classname=f"{recipe}.run", name="optimize run", time="0")
    meaning = EXIT_MEANING.get(exit_code, "unexpected error")
    err = ET.SubElement(case, "error", type=f"exit {exit_code} ({meaning})", message=first_line(error, 2000))
    err.text = str(error)
    return _finish(suites, suite, {"tests": 1, "failures": 0, "errors": 1, "skipped": 0}, 0.0)


def delta_text(value: Any, base: Any) -> str:
    """`value − base` with 3 significant digits and, where `base` is not 0, the change in percent: "+0.26 (+26.00%)";
    "–" where either is not a number."""
    numbers = (int, float)
    if not (isinstance(value, numbers) and isinstance(base, numbers)) or isinstance(value, bool):
        return "–"
    d = float(value) - float(base)
    if not math.isfinite(d):
        return "–"
    return f"{d:+.3g}" + (f" ({d / abs(base):+.2%})" if base and d else "")


def gate_rows(verdict: dict[str, Any]) -> list[dict[str, str]]:
    """The gate rows of `verdict.json` as display cells, one dict per row: variant, target, gate, value,
    threshold, baseline, delta (against the FP32 baseline; 1 for a ratio to it), status and reason. The one
    place that formats a gate row: the Markdown table here and report.html both read it."""
    out = []
    for row in verdict["gates"]:
        base = row.get("baseline_value")
        if base is None and row["metric"].endswith(("speedup", "ratio")):
            base = 1.0
        out.append(
            {
                "variant": row["variant"],
                "target": row["target"],
                "gate": gate_label(row),
                "value": fmt_number(row.get("value")),
                "threshold": f"{_OP_TEXT[row['op']]} {row['threshold']:g}",
                "baseline": _baseline(row),
                "delta": delta_text(row.get("value"), base),
                "status": row["status"],
                "reason": row.get("reason", "") if row["status"] != "passed" else "",
            }
        )
    return out


def gate_table(verdict: dict[str, Any]) -> list[str]:
    """The gate rows as a Markdown table (lines): variant, target, gate, value, threshold, baseline, result."""
    out = [
        "| variant | target | gate | value | threshold | baseline | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in gate_rows(verdict):
        result = f"{_MARK[row['status']]} {row['status']}"
        if row["reason"]:
            result += f": {row['reason']}"
        out.append(
            f"| {row['variant']} | {row['target']} | `{row['gate']}` | {row['value']} | "
            f"{row['threshold']} | {row['baseline']} | {_md_cell(result)} |"
        )
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary_markdown(verdict: dict[str, Any], manifest: dict[str, Any], report: str | None = None) -> str:
    """A job-summary section for one run: verdict line, per-variant status, the gate table."""
    status = verdict["status"]
    lines = [f"### {_MARK.get(status, '')} {manifest['recipe']}: {status.upper()}", ""]
    variants = ", ".join(f"`{v}` {s['status']}" for v, s in verdict["variants"].items())
    where = f" · report `{report}`" if report else ""
    lines += [f"Run `{manifest.get('run_id', '?')}` · variants: {variants}{where}", ""]
    lines += gate_table(verdict)
    skipped = {t: s for t, s in verdict["targets"].items() if s["status"] != "ran"}
    if skipped:
        lines.append("")
        lines += [f"- target `{t}` skipped: {_md_cell(s.get('reason', ''))}" for t, s in skipped.items()]
    return "\n".join(lines) + "\n\n"


def summary_error_markdown(recipe: str, error: BaseException, exit_code: int) -> str:
    """A job-summary section for a run that ended before its gates."""
    meaning = EXIT_MEANING.get(exit_code, "unexpected error")
    return f"### ❌ {recipe}: exit {exit_code} ({meaning})\n\n> {_md_cell(first_line(error, 2000))}\n\n"
