"""`optimize runs`: run directories newest first, with status, verdict, key numbers and the report; a failed
run, a run with only its manifest and a folder with a damaged or no manifest are listed, never a crash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_cli import _imports_of, cli

from optimize.reporting import html as report_html
from optimize.reporting.runs import list_runs


def _edit(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture()
def runs_dir(finished_run: Path, tmp_path: Path) -> Path:
    """runs/ with: tiny/passed (a real run, with report.html), tiny/gates-failed (its verdict failed), tiny/crashed
    (stopped in a stage: manifest only, status failed), other/running (manifest only, status running),
    other/empty (no files) and other/garbled (manifest not JSON)."""
    runs = tmp_path / "runs"
    passed = runs / "tiny" / "passed"
    shutil.copytree(finished_run, passed)
    _edit(passed / "manifest.json", lambda m: m.update(run_id="passed", started="2026-11-28T10:00:00+00:00"))
    report_html.write(passed)
    failed = runs / "tiny" / "gates-failed"
    shutil.copytree(finished_run, failed)
    (failed / "report.html").unlink(missing_ok=True)
    _edit(failed / "manifest.json", lambda m: m.update(run_id="gates-failed", started="2026-11-28T11:00:00+00:00"))
    _edit(failed / "verdict.json", lambda v: (v.update(status="failed"), v["variants"]["fp16"].update(status="failed")))
    manifest = json.loads((finished_run / "manifest.json").read_text())
    crashed = runs / "tiny" / "crashed"
    crashed.mkdir(parents=True)
    (crashed / "manifest.json").write_text(
        json.dumps(
            {**manifest, "run_id": "crashed", "status": "failed", "error": "export: boom",
             "started": "2026-11-28T12:00:00+00:00", "stages": manifest["stages"][:1]}
        )
    )  # fmt: skip
    running = runs / "other" / "running"
    running.mkdir(parents=True)
    (running / "manifest.json").write_text(
        json.dumps(
            {"run_id": "running", "recipe": "other", "status": "running", "started": "2026-11-28T13:00:00+00:00"}
        )
    )
    (runs / "other" / "empty").mkdir()
    (runs / "other" / "garbled").mkdir()
    (runs / "other" / "garbled" / "manifest.json").write_text("{not json")
    (runs / "stray-file.txt").write_text("not a recipe folder")
    return runs


def test_runs_are_listed_newest_first_with_what_each_has(runs_dir: Path, finished_run: Path) -> None:
    lines = {r.run_id: r for r in list_runs(runs_dir)}
    order = [r.run_id for r in list_runs(runs_dir)]
    assert order[:4] == ["running", "crashed", "gates-failed", "passed"]
    assert set(order[4:]) == {"empty", "garbled"}  # no start time: last

    metrics = json.loads((finished_run / "metrics.json").read_text())
    passed = lines["passed"]
    assert (passed.status, passed.verdict, passed.recipe) == ("done", "passed", "tiny")
    assert passed.report_html == "runs/tiny/passed/report.html"  # as the user types it, from the working directory
    for v in passed.variants:
        result = metrics["results"][v.name]["onnxruntime-cpu"]
        speeds = {k: s["p50_speedup"] for k, s in result["shapes"].items()}
        assert v.target == "onnxruntime-cpu" and v.status == "passed"
        assert v.p50_speedup == min(speeds.values()) and speeds[v.shape] == v.p50_speedup
        assert v.cosine_min == result["accuracy"]["cosine_min"]
    assert [v.name for v in passed.variants] == ["fp16", "fp16-fp32io"]

    failed = lines["gates-failed"]
    assert failed.verdict == "failed" and failed.report_html is None and failed.report_md
    assert [v.status for v in failed.variants] == ["failed", "passed"]
    crashed = lines["crashed"]
    assert (crashed.status, crashed.verdict, crashed.error, crashed.variants) == ("failed", None, "export: boom", [])
    running = lines["running"]
    assert (running.status, running.recipe, running.verdict) == ("running", "other", None)
    for name in ("empty", "garbled"):
        assert lines[name].status == "incomplete" and lines[name].error == "no readable manifest.json"
        assert lines[name].recipe == "other"


def test_optimize_runs_json_and_table(runs_dir: Path, tmp_path: Path) -> None:
    proc = cli("runs", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert [r["run_id"] for r in listed][:4] == ["running", "crashed", "gates-failed", "passed"]
    passed = next(r for r in listed if r["run_id"] == "passed")
    assert passed["report_html"] == "runs/tiny/passed/report.html"
    assert set(passed["variants"][0]) == {"name", "status", "target", "p50_speedup", "shape", "cosine_min", "reason"}

    proc = cli("runs", "--runs-dir", "runs", cwd=tmp_path, env={"COLUMNS": "220"})
    assert proc.returncode == 0, proc.stderr
    for run_id in ("running", "crashed", "gates-failed", "passed", "empty", "garbled"):
        assert run_id in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if " passed " in line and "tiny" in line)
    speed = next(v for v in passed["variants"] if v["name"] == "fp16")["p50_speedup"]
    assert f"p50 {speed:.2f}×" in row and "runs/tiny/passed/report.html" in row
    assert "failed: export: boom" in proc.stdout

    empty = cli("runs", "--runs-dir", "none", cwd=tmp_path)
    assert empty.returncode == 0 and empty.stdout.strip() == "no runs in none"


def test_listing_runs_imports_no_heavy_library(runs_dir: Path, tmp_path: Path) -> None:
    result = _imports_of(["runs", "--json"], tmp_path)
    assert result["code"] in (0, None), result
    assert result["heavy"] == []
