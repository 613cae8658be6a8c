"""report.html: valid, self-contained HTML whose numbers are metrics.json's; the verdict, headlines and gates
first; plots drawn from distributions.npz where the run has one and from the recorded percentiles where it
has not; the same PNG bytes in the page and in plots/; and Debian's Chromium renders it without a console
error, the plots visible."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import chromium
from test_cli import cli, one_error_line

from optimize.files import write_npz
from optimize.reporting import html as report_html

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
TARGET = "onnxruntime-cpu"
# Samples whose class the fp16 variant changes in the hand-written argmax arrays: (sample, reference, variant).
FLIPS = ((3, 1, 2), (10, 1, 2), (20, 0, 3))


# --- fixtures: a real run, with and without distributions.npz ------------------------------------------


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _edit_json(path: Path, change: Any) -> None:
    data = _json(path)
    change(data)
    path.write_text(json.dumps(data))


def write_distributions(run_dir: Path, flips: tuple[tuple[int, int, int], ...] = FLIPS) -> dict[str, np.ndarray]:
    """distributions.npz as the pipeline writes it (see optimize/reporting/html.py), drawn around the run's own
    numbers: latencies per target, model and shape; per-sample cosine and error; argmax where top-1 is gated."""
    metrics = _json(run_dir / "metrics.json")
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for variant, by_target in metrics["results"].items():
        for target, result in by_target.items():
            for shape, s in result.get("shapes", {}).items():
                arrays[f"latency_ms/{target}/{variant}/{shape}"] = s["p50_ms"] * rng.lognormal(0, 0.2, s["iterations"])
            if variant == "fp32":
                continue
            for output, acc in result["accuracy"]["outputs"].items():
                n = acc["samples"]
                arrays[f"cosine/{target}/{variant}/{output}"] = 1 - np.abs(rng.normal(0, 1e-4, n))
                arrays[f"abs_error/{target}/{variant}/{output}"] = np.abs(rng.normal(0, 1e-3, n))
                if acc.get("top1_agreement") is not None:
                    ref = np.random.default_rng(1).integers(0, 4, n)
                    ref[[i for i, _, _ in flips]] = [a for _, a, _ in flips]
                    got = ref.copy()
                    if variant == "fp16":
                        got[[i for i, _, _ in flips]] = [b for _, _, b in flips]
                    arrays[f"argmax/reference/fp32/{output}"] = ref.astype(np.int64)
                    arrays[f"argmax/{target}/{variant}/{output}"] = got.astype(np.int64)
    write_npz(run_dir / "distributions.npz", arrays)
    return arrays


@pytest.fixture(scope="module")
def report_run(finished_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shared real run with a distributions.npz and its report written."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(finished_run, run_dir)
    write_distributions(run_dir)
    report_html.write(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def old_run(finished_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shared real run as older runs are: no distributions.npz."""
    run_dir = tmp_path_factory.mktemp("old") / "run"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "distributions.npz").unlink(missing_ok=True)
    report_html.write(run_dir)
    return run_dir


# --- reading the page --------------------------------------------------------------------------------


class Page(HTMLParser):
    """The page's structure: balanced tags (problems in `errors`), every tag's attributes, numbers tagged
    `class="num"` with the section they are in, table rows per section, and the visible text per section."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.decls: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.numbers: list[dict[str, str]] = []
        self.rows: dict[str, list[list[str]]] = {}
        self.text: dict[str, list[str]] = {}
        self.styles: list[str] = []
        self._section = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._num: dict[str, str] | None = None
        self._in_style = False
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {self.stack}")

    def handle_decl(self, decl: str) -> None:
        self.decls.append(decl)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag in VOID:
            return
        self.stack.append(tag)
        if tag == "section":
            self._section = a.get("id") or ""
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "span" and "num" in (a.get("class") or "").split():
            self._num = {"key": a.get("data-key") or "", "value": a.get("data-value") or "", "text": ""}
        elif tag == "style":
            self._in_style = True

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.errors.append(f"self-closed <{tag}/>")

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            self.errors.append(f"end tag of void element </{tag}>")
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()
        if tag == "section":
            self._section = ""
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.setdefault(self._section, []).append(self._row)
            self._row = None
        elif tag == "span" and self._num is not None:
            self.numbers.append({**self._num, "section": self._section})
            self._num = None
        elif tag == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.styles.append(data)
            return
        self.text.setdefault(self._section, []).append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._num is not None:
            self._num["text"] += data

    def section_text(self, section: str) -> str:
        return " ".join("".join(self.text.get(section, [])).split())


def _page(run_dir: Path) -> tuple[str, Page]:
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    return text, Page(text)


# --- structure and self-containment ------------------------------------------------------------------


def test_the_page_is_valid_html(report_run: Path) -> None:
    text, page = _page(report_run)
    assert page.errors == []
    assert page.decls == ["DOCTYPE html"]
    names = Counter(t for t, _ in page.tags)
    assert names["html"] == names["head"] == names["body"] == names["title"] == 1
    assert ("meta", {"charset": "utf-8"}) in page.tags
    ids = [a["id"] for _, a in page.tags if a.get("id")]
    assert len(ids) == len(set(ids)), "ids are unique"
    assert "<n>" not in text  # the internal number-cell marker never reaches the page


def test_the_page_is_self_contained(report_run: Path) -> None:
    text, page = _page(report_run)
    assert "http://" not in text and "https://" not in text
    names = {t for t, _ in page.tags}
    assert not names & {"link", "script", "iframe", "object", "embed", "base"}, names
    for tag, attrs in page.tags:
        for attr in ("src", "href", "srcset", "poster", "data", "action", "background"):
            value = attrs.get(attr)
            if value is not None:
                assert value.startswith("data:image/png;base64,") or value.startswith("#"), (tag, attr, value[:80])
        assert not (attrs.get("style") or "").count("url("), (tag, attrs)
    css = "".join(page.styles)
    assert "url(" not in css and "@import" not in css and "@font-face" not in css
    images = [a["src"] for t, a in page.tags if t == "img"]
    assert len(images) >= 4  # latency, accuracy, size/memory, trade-off


def test_plots_are_pngs_written_once_and_embedded_as_the_same_bytes(report_run: Path) -> None:
    text, page = _page(report_run)
    pngs = sorted((report_run / "plots").glob("*.png"))
    assert [p.name for p in pngs] == sorted(
        [f"latency-{TARGET}.png", f"accuracy-{TARGET}.png", "size-memory.png", "tradeoff.png"]
    )
    embedded = {base64.b64decode(a["src"].split(",", 1)[1]) for t, a in page.tags if t == "img"}
    from PIL import Image

    for p in pngs:
        data = p.read_bytes()
        assert data in embedded, f"{p.name} is not the image the page shows"
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.size[0] >= 300 and image.size[1] >= 200
        assert np.asarray(image.convert("L")).std() > 10, f"{p.name} is blank"
    assert f"plots/latency-{TARGET}.png" in text


def test_rewriting_removes_plots_it_no_longer_draws(report_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(report_run, run_dir)
    (run_dir / "distributions.npz").unlink()
    (run_dir / "plots" / "stale.png").write_bytes(b"x")
    assert report_html.write(run_dir) == run_dir / "report.html"
    names = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert names == sorted([f"latency-{TARGET}.png", "size-memory.png", "tradeoff.png"])  # no per-sample data


def test_a_second_report_from_the_same_inputs_reuses_the_plots(report_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(report_run, run_dir)
    report_html.write(run_dir)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run_dir / "plots").glob("*.png")}
    _edit_json(run_dir / "manifest.json", lambda m: m.update(status="done"))  # not an input of the plots
    report_html.write(run_dir)
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run_dir / "plots").glob("*.png")}
    assert after == before, "drawn again from the same inputs"
    assert "run status done" in (run_dir / "report.html").read_text()

    def slower(m: dict[str, Any]) -> None:
        m["results"]["fp16"][TARGET]["shapes"]["batch=1"]["p50_speedup"] = 0.25

    _edit_json(run_dir / "metrics.json", slower)
    report_html.write(run_dir)
    changed = {p.name: p.read_bytes() for p in (run_dir / "plots").glob("*.png")}
    assert changed["tradeoff.png"] != before["tradeoff.png"][1]
    assert changed["size-memory.png"] == before["size-memory.png"][1]  # the same figure drawn again is the same PNG


# --- what the page says ------------------------------------------------------------------------------


def test_verdict_headlines_and_gates_come_first(report_run: Path) -> None:
    text, page = _page(report_run)
    verdict = _json(report_run / "verdict.json")
    order = [text.index(s) for s in ('id="verdict"', 'id="headlines"', 'id="gates"', 'id="latency"')]
    assert order == sorted(order)
    assert re.search(r'<div class="verdict passed" id="verdict">PASSED</div>', text)
    headlines = page.section_text("headlines")
    for variant, status in verdict["variants"].items():
        assert f"{status['status'].upper()} {variant}:" in headlines
    later = ["accuracy", "size-memory", "tradeoff", "stages", "environment"]
    positions = [text.index(f'id="{s}"') for s in later]
    assert positions == sorted(positions) and positions[0] > order[-1]


def test_headline_numbers_are_the_metrics(report_run: Path) -> None:
    _, page = _page(report_run)
    metrics = _json(report_run / "metrics.json")
    shown = {(n["section"], n["key"]): n for n in page.numbers}
    for variant in ("fp16", "fp16-fp32io"):
        result = metrics["results"][variant][TARGET]
        speeds = {k: s["p50_speedup"] for k, s in result["shapes"].items()}
        worst = min(speeds, key=speeds.__getitem__)
        for shape, speed in speeds.items():
            n = shown[("headlines", f"{variant}/{TARGET}/{shape}/p50_speedup")]
            assert float(n["value"]) == speed and n["text"] == f"{speed:.2f}×"
        line = next(li for li in page.section_text("headlines").split("PASSED ") if li.startswith(f"{variant}:"))
        assert line.startswith(f"{variant}: {speeds[worst]:.2f}× p50 speed-up"), line
        assert f"({TARGET}, {worst}" in line
        cos = result["accuracy"]["cosine_min"]
        n = shown[("headlines", f"{variant}/{TARGET}/cosine_min")]
        assert float(n["value"]) == cos and n["text"] == f"{cos:.6f}" and f"cosine min {cos:.6f}" in line
        ratio = result["size"]["ratio"]
        n = shown[("headlines", f"{variant}/{TARGET}/size_ratio")]
        assert float(n["value"]) == ratio and n["text"] == f"{ratio - 1:+.0%}".replace("-", "−")
        top1 = result["accuracy"]["top1_agreement"]
        assert f"top-1 agreement {top1:.2%}" in line


def test_gate_table_is_the_verdict(report_run: Path) -> None:
    _, page = _page(report_run)
    verdict = _json(report_run / "verdict.json")
    head, *rows = page.rows["gates"]
    assert head == ["variant", "target", "gate", "value", "threshold", "FP32 baseline", "delta", "result"]
    assert len(rows) == len(verdict["gates"])
    for row, gate in zip(rows, verdict["gates"], strict=True):
        assert row[:3] == [gate["variant"], gate["target"], gate["check"]]
        value = gate.get("value")
        assert row[3] == ("–" if value is None else f"{value:.6g}")
        assert row[4] == gate["check"].split()[-2].replace(">=", "≥").replace("<=", "≤") + f" {gate['threshold']:g}"
        assert row[7].startswith(gate["status"].upper())
        if gate.get("baseline_value") is not None and value is not None:
            assert row[6].startswith(f"{value - gate['baseline_value']:+.3g}")


def test_latency_and_accuracy_tables_are_the_metrics(report_run: Path) -> None:
    _, page = _page(report_run)
    metrics = _json(report_run / "metrics.json")
    latency = {(r[0], r[1]): r for r in page.rows["latency"][1:]}
    for variant in ("fp32", "fp16", "fp16-fp32io"):
        for shape, s in metrics["results"][variant][TARGET]["shapes"].items():
            row = latency[(variant, shape)]
            assert row[2] == f"{s['p50_ms']:.3f}" and row[4] == f"{s['p99_ms']:.3f}"
            assert row[8] == (f"{s['p50_speedup']:.2f}×" if variant != "fp32" else "baseline")
    accuracy = {(r[0], r[1]): r for r in page.rows["accuracy"] if len(r) == 8 and r[0] != "variant"}
    for variant in ("fp16", "fp16-fp32io"):
        s = metrics["results"][variant][TARGET]["accuracy"]["outputs"]["logits"]
        assert accuracy[(variant, "logits")][3] == f"{s['cosine_min']:.6f}"


def test_confusion_of_disagreements_from_the_argmax_arrays(report_run: Path) -> None:
    _, page = _page(report_run)
    accuracy = page.section_text("accuracy")
    assert f"Top-1 disagreements: fp16 on {TARGET}, output logits" in accuracy
    assert f"{len(FLIPS)} of 64 samples changed class" in accuracy
    assert f"Top-1 disagreements: fp16-fp32io on {TARGET}, output logits 0 of 64 samples changed class" in accuracy
    table = page.rows["accuracy"]
    matrix = [r for r in table if r and r[0] == "FP32 class ↓ / variant class →"]
    assert matrix == [["FP32 class ↓ / variant class →", "2", "3"]]
    body = {r[0]: r[1:] for r in table if r and r[0] in ("0", "1")}
    assert body == {"0": ["", "1"], "1": ["2", ""]}  # 1 → 2 twice, 0 → 3 once


def test_stages_cache_and_lineage_are_on_the_page(report_run: Path) -> None:
    _, page = _page(report_run)
    manifest = _json(report_run / "manifest.json")
    metrics = _json(report_run / "metrics.json")
    stages = [r for r in page.rows["stages"] if len(r) == 5 and r[0] in {s["stage"] for s in manifest["stages"]}]
    assert [r[0] for r in stages] == [s["stage"] for s in manifest["stages"]]
    assert [r[1] for r in stages] == [f"{s['seconds']:.2f}" for s in manifest["stages"]]
    lineage = page.section_text("environment")
    for art in metrics["variants"].values():
        assert art["sha256"] in lineage
    assert manifest["recipe_sha256"] in lineage and manifest["model"]["sha256"] in lineage
    for ds in manifest["datasets"].values():
        assert ds["sha256"] in lineage
    cache = [r for r in page.rows["stages"] if len(r) == 4][1:]
    assert [(r[0], r[1], r[2]) for r in cache] == [
        (c["stage"], c["unit"], "hit" if c["hit"] else "miss") for c in manifest["cache"]
    ]
    for lib, version in manifest["versions"].items():
        assert [lib, str(version)] in page.rows["environment"]


def test_an_older_run_without_distributions_falls_back_to_the_recorded_percentiles(old_run: Path) -> None:
    _, page = _page(old_run)
    assert "no distributions.npz in this run directory" in page.section_text("latency")
    assert "percentiles metrics.json recorded" in page.section_text("latency")
    assert "per-sample plots only where it has them" in page.section_text("accuracy")
    images = [a["alt"] for t, a in page.tags if t == "img"]
    assert images == [f"Latency on {TARGET}", "Size and memory", "Speed-up vs accuracy"]
    assert "Top-1 disagreements" not in page.section_text("accuracy")


def test_fallback_trials_are_listed_and_on_the_tradeoff(finished_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    metrics = _json(run_dir / "metrics.json")
    trials = [
        {"trial": i, "excluded": [f"n{j}" for j in range(2 * i)], "excluded_count": 2 * i, "passed": i > 0,
         "failed_gates": [] if i else ["accuracy.cosine_min >= 0.99"], "seconds": 1.5,
         "accuracy": {"cosine_mean": 0.99 + i / 1000, "cosine_min": 0.95 + i / 100}, "p50_speedup": 1.5 - i / 10}
        for i in range(3)
    ]  # fmt: skip
    metrics["fallback"] = {
        "fp16": {"dataset": "calib", "chosen_trial": 1, "passed": True, "stopped": "passed", "trials": trials}
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    report_html.write(run_dir)
    _, page = _page(run_dir)
    rows = page.rows["fallback"]
    assert [r[0] for r in rows[1:]] == ["0", "1 ✓", "2"]
    assert rows[2][3] == "0.96" and rows[2][4] == "1.4" and rows[1][6].startswith("failed: accuracy.cosine_min")
    assert "fallback trials on their tuning data" in page.section_text("tradeoff")


def test_a_gate_that_failed_makes_the_verdict_red(finished_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    verdict = _json(run_dir / "verdict.json")
    verdict["status"] = "failed"
    verdict["variants"]["fp16"]["status"] = "failed"
    verdict["gates"][0]["status"] = "failed"
    (run_dir / "verdict.json").write_text(json.dumps(verdict))
    report_html.write(run_dir)
    text, page = _page(run_dir)
    assert '<div class="verdict failed" id="verdict">FAILED</div>' in text
    assert page.rows["gates"][1][7].startswith("FAILED")
    assert "FAILED fp16:" in page.section_text("headlines")


def test_a_plot_that_fails_to_draw_is_a_note_not_a_failed_report(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optimize.reporting import plots

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("no room for the legend")

    monkeypatch.setattr(plots, "tradeoff", broken)
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "distributions.npz").unlink(missing_ok=True)
    report_html.write(run_dir)
    _, page = _page(run_dir)
    assert page.errors == []
    assert "plot tradeoff not drawn: no room for the legend" in page.section_text("tradeoff")
    assert sorted(p.name for p in (run_dir / "plots").glob("*.png")) == [f"latency-{TARGET}.png", "size-memory.png"]


def test_a_hand_built_gpu_run_with_skipped_pairs_and_an_engine(tmp_path: Path) -> None:
    """What a CPU box never produces: a GPU target that timed only the variant, a skipped (variant, target)
    pair, an engine, GPU memory; and no distributions.npz, no cache, no registry entry."""
    from test_markdown import _docs

    metrics, verdict, manifest = _docs()
    verdict["targets"]["tensorrt"] = {"status": "ran"}
    gpu = {"p50_ms": 1.5, "p90_ms": 1.6, "p99_ms": 1.9, "mean_ms": 1.55, "cv": 0.02, "items_per_s": 640.0,
           "p50_speedup": 2.0}  # fmt: skip
    metrics["results"]["fp16"]["tensorrt"] = {
        "size": {"bytes": 600_000, "ratio": 0.45},
        "accuracy": {"cosine_min": 0.9991, "outputs": {"emb": {"cosine_mean": 0.9999, "cosine_min": 0.9991}}},
        "shapes": {"batch=1": gpu},
        "memory": {"gpu_peak_mb": 812.0, "gpu_session_mb": 96.5, "engine_device_memory_mb": 12.0},
    }
    metrics["results"]["fp16"]["torch-cpu"] = {"skipped": "INT8 variants are ONNX artifacts"}
    metrics["variants"]["fp16"]["engine"] = {
        "path": "artifacts/engines/demo-fp16.plan",
        "precisions": {"compute": {"fp16": 4}},
        "precision_check": {"status": "passed", "reason": "fp16 carried by 100% of layers"},
        "build_s": 41.25,
        "plan_bytes": 1_250_000,
        "plan_ratio": 0.5625,
    }
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name, doc in (("metrics.json", metrics), ("verdict.json", verdict), ("manifest.json", manifest)):
        (run_dir / name).write_text(json.dumps(doc))
    report_html.write(run_dir)
    text, page = _page(run_dir)
    assert page.errors == [] and '<div class="verdict failed" id="verdict">FAILED</div>' in text
    headline = page.section_text("headlines")
    assert "FAILED fp16: 1.25× p50 speed-up, faster than FP32 (onnxruntime-cpu, batch=1)" in headline
    assert "· cosine min 0.998765 · size −50% (1 MB vs 2 MB)" in headline
    fp16_rows = [r[8] for r in page.rows["latency"] if r[:2] == ["fp16", "batch=1"]]
    assert fp16_rows == ["1.25×", "2.00×"]  # onnxruntime-cpu's table, then tensorrt's
    assert ["fp16", "tensorrt", "0.6 MB", "0.450", "–", "–", "812", "96.5", "12"] in page.rows["size-memory"]
    assert ["fp16", "fp16 4", "passed: fp16 carried by 100% of layers", "41.2", "1.25", "0.562",
            "artifacts/engines/demo-fp16.plan"] in page.rows["engines"]  # fmt: skip
    assert [t for t, _ in page.tags].count("img") == 4  # latency on both targets, size/memory, trade-off
    assert "torch-cpu" not in page.section_text("latency")


# --- the command -------------------------------------------------------------------------------------


def test_optimize_report_regenerates_and_prints_the_path(old_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(old_run, run_dir)
    (run_dir / "report.html").unlink()
    shutil.rmtree(run_dir / "plots")
    proc = cli("report", run_dir, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "run/report.html"
    assert (run_dir / "report.html").read_bytes() == (old_run / "report.html").read_bytes()
    assert sorted(p.name for p in (run_dir / "plots").glob("*.png")) == sorted(
        p.name for p in (old_run / "plots").glob("*.png")
    )

    (run_dir / "metrics.json").unlink()
    proc = cli("report", run_dir, cwd=tmp_path)
    assert proc.returncode == 2
    assert one_error_line(proc).startswith("error: run/metrics.json: missing")
    proc = cli("report", tmp_path / "nowhere", cwd=tmp_path)
    assert proc.returncode == 2 and "no such run directory" in one_error_line(proc)


# --- a real browser ----------------------------------------------------------------------------------


def _render(page: Path, shot: Path, width: int, height: int, profile: Path) -> list[str]:
    """Screenshot `page` in headless Chromium; returns the console messages it logged."""
    proc = subprocess.run(
        [
            chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--force-device-scale-factor=1", f"--window-size={width},{height}", "--enable-logging=stderr", "--v=0",
            f"--user-data-dir={profile}", f"--screenshot={shot}", page.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_chromium_renders_the_report_without_console_errors_and_shows_the_plots(
    report_run: Path, tmp_path: Path
) -> None:
    from PIL import Image

    # The console probe is not blind: a page with an error is seen as one.
    probe = tmp_path / "probe.html"
    probe.write_text('<!DOCTYPE html><html><body><script>console.error("probe"); nope();</script></body></html>')
    messages = _render(probe, tmp_path / "probe.png", 200, 100, tmp_path / "profile")
    assert any('"probe"' in m for m in messages) and any("Uncaught ReferenceError" in m for m in messages)

    shot = tmp_path / "report.png"
    assert _render(report_run / "report.html", shot, 1280, 2000, tmp_path / "profile") == []
    image = Image.open(shot)
    assert image.format == "PNG" and image.size == (1280, 2000)
    pixels = np.asarray(image.convert("RGB")).astype(int)
    first_screen = pixels[:400]
    green = (np.abs(first_screen - [0x1A, 0x7F, 0x37]).sum(axis=2) < 30).sum()
    assert green > 2000, "the PASSED verdict is on the first screen"

    # Each plot as the browser decodes it: the page's own <img> tags at known places, compared with the PNGs.
    _, page = _page(report_run)
    images = [a for t, a in page.tags if t == "img"]
    pngs = [Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1]))).convert("RGB") for a in images]
    top, placed = 0, []
    for png in pngs:
        placed.append(top)
        top += png.size[1] + 10
    body = "".join(
        f'<img src="{a["src"]}" style="position:absolute; left:0; top:{y}px">'
        for a, y in zip(images, placed, strict=True)
    )
    gallery = tmp_path / "gallery.html"
    gallery.write_text(f'<!DOCTYPE html><html><body style="margin:0; background:#fff">{body}</body></html>')
    width = max(p.size[0] for p in pngs)
    assert _render(gallery, tmp_path / "gallery.png", width, top, tmp_path / "profile") == []
    rendered = np.asarray(Image.open(tmp_path / "gallery.png").convert("RGB")).astype(int)
    for png, y, attrs in zip(pngs, placed, images, strict=True):
        w, h = png.size
        region = rendered[y : y + h, :w]
        assert region.std() > 10, f"{attrs['alt']}: blank where the plot should be"
        assert np.abs(region - np.asarray(png).astype(int)).mean() < 3, f"{attrs['alt']}: not the plot's pixels"
