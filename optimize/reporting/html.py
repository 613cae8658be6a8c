"""`report.html`: one self-contained page per run (inline CSS, plots as data: URIs, no script, no external
URL), built only from the run directory's metrics.json, verdict.json, manifest.json and, when the run wrote
it, distributions.npz. The verdict, a headline per variant and the gate table come first; then latency
distributions, accuracy, size and memory, the speed-up vs accuracy trade-off, stage timings, environment
and lineage. `write(run_dir)` also writes each plot as `plots/<name>.png`.

distributions.npz (optional; keys use `/`):
  latency_ms/<target>/<variant>/<shape>   float64, every timed iteration's latency (ms), in the order timed
  cosine/<target>/<variant>/<output>      float64, per-sample cosine similarity to the FP32 reference
  abs_error/<target>/<variant>/<output>   float64, per-sample max |variant − reference|
  argmax/<target>/<variant>/<output>      int64, per-sample argmax (classifier outputs only)
  argmax/reference/fp32/<output>          int64, the reference's argmax
"""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from html import escape
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optimize.reporting.plots as plots
from optimize import cpu
from optimize.errors import first_line
from optimize.files import write_bytes, write_text
from optimize.lazy import lazy
from optimize.reporting.ci import fmt_number, gate_rows
from optimize.reporting.headlines import (
    BASELINE,
    Headline,
    headlines,
    result_of,
    targets_ran,
    variants_of,
    worst_speedup,
)
from optimize.reporting.plots import Plot
from optimize.reporting.runs import read_run_json

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy("numpy")  # importing the reporting modules (`optimize validate`, `import optimize`) imports no numpy

REPORT = "report.html"
PLOTS_DIR = "plots"
INPUTS_STAMP = ".inputs.sha256"  # in plots/: what the PNGs there were drawn from
DISTRIBUTIONS = "distributions.npz"
RUN_FILES = ("metrics.json", "verdict.json", "manifest.json")
REFERENCE_TARGET = "onnxruntime-cpu"  # every target's accuracy is measured against the FP32 ONNX here


# --- the run's files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFiles:
    """What a report is built from: the three JSON files and the arrays of distributions.npz (empty when the
    run has none; `distributions_note` says why)."""

    run_dir: Path
    metrics: dict[str, Any]
    verdict: dict[str, Any]
    manifest: dict[str, Any]
    distributions: dict[str, np.ndarray] = field(default_factory=dict)
    distributions_note: str | None = None


def load(run_dir: Path) -> RunFiles:
    """Read a run directory's report inputs (RecipeError, exit 2, naming the file when one is missing or is
    not JSON: a run that stopped before its gates has no metrics.json)."""
    run_dir = Path(run_dir)
    docs = read_run_json(
        run_dir,
        RUN_FILES,
        "has no report to build (a run that stopped before its gates has only manifest.json; see its `error`)",
    )
    arrays, note = _distributions(run_dir / DISTRIBUTIONS)
    return RunFiles(run_dir, docs["metrics.json"], docs["verdict.json"], docs["manifest.json"], arrays, note)


def _distributions(path: Path) -> tuple[dict[str, np.ndarray], str | None]:
    if not path.is_file():
        return {}, f"no {DISTRIBUTIONS} in this run directory (a run from before it was written)"
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: np.asarray(npz[k]) for k in npz.files}, None
    except Exception as e:  # a damaged file costs the plots their detail, never the report
        return {}, f"{DISTRIBUTIONS} cannot be read ({first_line(e)})"


# --- number formats (the tests read the page with these) -------------------------------------------


def fmt_speedup(x: float) -> str:
    """1.2644 → "1.26×"."""
    return f"{x:.2f}×"


def fmt_cosine(x: float) -> str:
    """0.99737812 → "0.997378"."""
    return f"{x:.6f}"


def fmt_share(x: float) -> str:
    """0.99666 → "99.67%"."""
    return f"{x:.2%}"


def fmt_size_change(ratio: float) -> str:
    """0.322 → "−68%" (the file's change against FP32)."""
    return f"{ratio - 1:+.0%}".replace("-", "−")


def fmt_mb(n_bytes: float) -> str:
    """52646 → "0.0526 MB"."""
    return f"{n_bytes / 1e6:.3g} MB"


def _num(text: str, key: str, value: Any) -> str:
    """A number on the page, with the exact value and where it comes from in data attributes."""
    return f'<span class="num" data-key="{escape(key)}" data-value="{escape(repr(value))}">{escape(text)}</span>'


# --- the page ----------------------------------------------------------------------------------------


CSS = """
:root { --pass: #1a7f37; --fail: #cf222e; --skip: #9a6700; --ink: #1f2328; --mute: #59636e; --line: #d1d9e0; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       margin: 0 auto; padding: 16px 24px 48px; max-width: 1240px; }
h1 { font-size: 22px; margin: 0; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 16px 0 6px; }
header { display: flex; align-items: center; gap: 20px; flex-wrap: wrap; padding: 10px 0 8px; }
.verdict { font-size: 30px; font-weight: 800; letter-spacing: 1px; color: #fff; padding: 4px 18px; border-radius: 8px; }
.verdict.passed { background: var(--pass); } .verdict.failed { background: var(--fail); }
.verdict.skipped, .verdict.unknown { background: var(--skip); }
.meta { color: var(--mute); }
ul.headlines { list-style: none; padding: 0; margin: 6px 0 10px; }
ul.headlines li { padding: 6px 10px; margin: 4px 0; border-left: 6px solid var(--line); background: #f6f8fa; }
ul.headlines li.passed { border-color: var(--pass); } ul.headlines li.failed { border-color: var(--fail); }
ul.headlines li.skipped { border-color: var(--skip); }
.tag { font-weight: 700; font-size: 12px; padding: 1px 6px; border-radius: 4px; color: #fff; }
.tag.passed { background: var(--pass); } .tag.failed { background: var(--fail); }
.tag.skipped, .tag.unknown { background: var(--skip); }
.big { font-size: 17px; font-weight: 700; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td, tr.worse td, tr.flipped td { background: #ffebe9; } tr.skipped td { color: var(--mute); }
tr.better td { background: #dafbe1; }
code { font-size: 12px; } .note { color: var(--mute); font-style: italic; }
figure { margin: 8px 0 14px; } figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--mute); font-size: 12px; }
.bar { display: inline-block; height: 10px; background: #54aeff; vertical-align: middle; }
"""


class _Figures:
    """The report's plots in page order. A plot an earlier report drew from the same inputs (`reuse`: name →
    PNG bytes) is taken as it is instead of being drawn again."""

    def __init__(self, reuse: dict[str, bytes] | None = None) -> None:
        self.reuse = reuse or {}
        self.plots: list[Plot] = []

    def figure(self, name: str, title: str, draw: Callable[[], Plot], caption: str) -> list[str]:
        """The plot `name` as a <figure>: reused, or drawn by `draw` (whose Plot has this name and title). A plot
        that fails to draw is a note on the page rather than a failed report: every number is in the tables."""
        png = self.reuse.get(name)
        if png is not None:
            plot = Plot(name, title, png)
        else:
            try:
                plot = draw()
            except Exception as e:
                return [f'<p class="note plot-error">plot {escape(name)} not drawn: {escape(first_line(e))}</p>']
        self.plots.append(plot)
        return _img(plot, caption)


def render(run: RunFiles, reuse: dict[str, bytes] | None = None) -> tuple[str, list[Plot]]:
    """The page and its plots (each drawn once; the page embeds the same PNG bytes). `reuse`: PNGs by plot
    name, drawn earlier from the same inputs, taken instead of drawing."""
    m, v, man = run.metrics, run.verdict, run.manifest
    colour = plots.palette([m.get("baseline", BASELINE), *variants_of(m)])
    figures = _Figures(reuse)
    body: list[str] = []
    body += _header(m, v, man)
    body += _gates(v)
    body += _latency(run, colour, figures)
    body += _serving(m, v, colour, figures)
    body += _accuracy(run, colour, figures)
    body += _size_memory(m, v, colour, figures)
    body += _tradeoff(m, v, colour, figures)
    body += _fallback(m)
    body += _engines(m)
    body += _stages(man)
    body += _environment(m, man)
    status = v.get("status", "unknown").upper()
    page = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(str(man.get('recipe', '?')))} — {escape(status)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        *body,
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(page), figures.plots


def write(run_dir: Path) -> Path:
    """(Re)write `run_dir/report.html` and `run_dir/plots/<name>.png` from the run's files, each atomically;
    PNGs of an earlier report that this one no longer draws are removed. Returns the report's path.
    RecipeError (exit 2) when metrics.json, verdict.json or manifest.json is missing or unreadable.

    The plots depend on metrics.json, verdict.json and distributions.npz only: when those (and this code) are
    what the PNGs in plots/ were drawn from (`plots/.inputs.sha256`), they are reused, so the second report of
    a run (the pipeline writes one before registering and one after) costs no drawing."""
    run = load(run_dir)
    folder = run.run_dir / PLOTS_DIR
    key = _inputs_sha256(run.run_dir)
    stamp = folder / INPUTS_STAMP
    reuse: dict[str, bytes] = {}
    if stamp.is_file() and stamp.read_text().strip() == key:
        reuse = {p.stem: p.read_bytes() for p in folder.glob("*.png")}
    else:
        stamp.unlink(missing_ok=True)  # PNGs drawn from other inputs from here on: never reused under an old stamp
    page, figures = render(run, reuse)
    for p in figures:
        if p.name not in reuse:
            write_bytes(folder / f"{p.name}.png", p.png)
    if folder.is_dir():
        keep = {f"{p.name}.png" for p in figures}
        for old in folder.glob("*.png"):
            if old.name not in keep:
                old.unlink(missing_ok=True)
    if figures:
        write_text(stamp, key + "\n")
    path = run.run_dir / REPORT
    write_text(path, page)
    return path


def _inputs_sha256(run_dir: Path) -> str:
    """sha256 over what the plots are drawn from: metrics.json, verdict.json, distributions.npz, and the code
    that draws them (this module, plots.py, headlines.py, the matplotlib version)."""
    h = hashlib.sha256()
    for path in (run_dir / "metrics.json", run_dir / "verdict.json", run_dir / DISTRIBUTIONS):
        h.update(path.name.encode() + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"absent")
    for code in (Path(__file__), Path(plots.__file__), Path(__file__).with_name("headlines.py")):
        h.update(code.read_bytes())
    try:
        h.update(version("matplotlib").encode())
    except PackageNotFoundError:
        pass
    return h.hexdigest()


def _tag(status: str) -> str:
    s = status if status in ("passed", "failed", "skipped") else "unknown"
    return f'<span class="tag {s}">{escape(status.upper())}</span>'


def _img(p: Plot, caption: str) -> list[str]:
    data = base64.b64encode(p.png).decode("ascii")
    return [
        f'<figure id="plot-{escape(p.name)}">',
        f'<img src="data:image/png;base64,{data}" alt="{escape(p.title)}">',
        f"<figcaption>{escape(caption)} (<code>{PLOTS_DIR}/{escape(p.name)}.png</code>)</figcaption>",
        "</figure>",
    ]


def html_table(
    head: Iterable[str], rows: Iterable[Iterable[str]], row_classes: Iterable[str] | None = None
) -> list[str]:
    """An HTML table (lines). Cells are HTML already (escape text first); a cell made by `number_cell` is
    right-aligned."""
    out = ["<table>", "<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr></thead>", "<tbody>"]
    classes = list(row_classes) if row_classes is not None else None
    for i, row in enumerate(rows):
        cls = f' class="{escape(classes[i])}"' if classes and classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(_td(c) for c in row) + "</tr>")
    out += ["</tbody>", "</table>"]
    return out


def _td(cell: str) -> str:
    if cell.startswith("<n>"):  # a right-aligned number cell
        return f'<td class="n">{cell[3:]}</td>'
    return f"<td>{cell}</td>"


def number_cell(html: str) -> str:
    """A right-aligned table cell holding `html`."""
    return "<n>" + html


def _header(m: dict[str, Any], v: dict[str, Any], man: dict[str, Any]) -> list[str]:
    status = v.get("status", "unknown")
    cls = status if status in ("passed", "failed", "skipped") else "unknown"
    when = man.get("started", "")
    out = [
        "<header>",
        f'<h1 id="recipe">{escape(str(man.get("recipe", "?")))}</h1>',
        f'<div class="verdict {cls}" id="verdict">{escape(status.upper())}</div>',
        f'<div class="meta">run <code>{escape(str(man.get("run_id", "?")))}</code> · started {escape(str(when))}'
        f" · run status {escape(str(man.get('status', '?')))} · baseline {escape(m.get('baseline', BASELINE))}</div>",
        "</header>",
        '<section id="headlines">',
        '<ul class="headlines">',
    ]
    for h in headlines(m, v):
        out.append(f'<li class="{escape(h.status)}">' + _headline_html(h) + "</li>")
    out.append("</ul>")
    skipped = {t: s for t, s in v.get("targets", {}).items() if s.get("status") != "ran"}
    for t, s in skipped.items():
        out.append(f'<p class="note">target {escape(t)} did not run here: {escape(s.get("reason", ""))}</p>')
    out.append("</section>")
    return out


def _headline_html(h: Headline) -> str:
    parts = [f"{_tag(h.status)} <b>{escape(h.variant)}</b>:"]
    if h.target is None:
        return " ".join(parts) + f" did not run on any target here ({escape(h.reason)})"
    key = f"{h.variant}/{h.target}"
    if h.p50_speedup is not None:
        speed = _num(fmt_speedup(h.p50_speedup), f"{key}/{h.shape}/p50_speedup", h.p50_speedup)
        how = "faster than FP32" if h.p50_speedup >= 1 else "slower than FP32"
        text = f'<span class="big">{speed}</span> p50 speed-up, {how} ({escape(h.target)}, {escape(str(h.shape))}'
        if h.other_shapes:
            others = ", ".join(
                f"{escape(k)}: {_num(fmt_speedup(s), f'{key}/{k}/p50_speedup', s)}" for k, s in h.other_shapes.items()
            )
            text += f"; the worst of {len(h.other_shapes) + 1} shapes, {others}"
        parts.append(text + ")")
    else:
        parts.append(f"not timed on {escape(h.target)}")
    if h.cosine_min is not None:
        parts.append("· cosine min " + _num(fmt_cosine(h.cosine_min), f"{key}/cosine_min", h.cosine_min))
    if h.top1_agreement is not None:
        parts.append(
            "· top-1 agreement " + _num(fmt_share(h.top1_agreement), f"{key}/top1_agreement", h.top1_agreement)
        )
    if h.neighbour_agreement is not None:
        parts.append(
            "· neighbour agreement "
            + _num(fmt_share(h.neighbour_agreement), f"{key}/neighbour_agreement", h.neighbour_agreement)
        )
    if h.task_metric_drop is not None:
        parts.append(
            "· task metric drop " + _num(f"{h.task_metric_drop:+.4f}", f"{key}/task_metric_drop", h.task_metric_drop)
        )
    if h.size_ratio is not None:
        size = f"· size <b>{_num(fmt_size_change(h.size_ratio), f'{key}/size_ratio', h.size_ratio)}</b>"
        if h.size_bytes is not None and h.baseline_size_bytes:
            size += f" ({escape(fmt_mb(h.size_bytes))} vs {escape(fmt_mb(h.baseline_size_bytes))})"
        parts.append(size)
    return " ".join(parts)


def _gates(v: dict[str, Any]) -> list[str]:
    rows = gate_rows(v)
    out = ['<section id="gates">', "<h2>Gates</h2>"]
    if not rows:
        return [*out, '<p class="note">the recipe has no gates</p>', "</section>"]
    cells = []
    for r in rows:
        result = _tag(r["status"]) + (f" {escape(r['reason'])}" if r["reason"] else "")
        cells.append(
            [
                escape(r["variant"]),
                escape(r["target"]),
                f"<code>{escape(r['gate'])}</code>",
                number_cell(f'<span class="gate-value">{escape(r["value"])}</span>'),
                escape(r["threshold"]),
                number_cell(escape(r["baseline"])),
                number_cell(escape(r["delta"])),
                result,
            ]
        )
    head = ("variant", "target", "gate", "value", "threshold", "FP32 baseline", "delta", "result")
    out += html_table(head, cells, [r["status"] for r in rows])
    return [*out, "</section>"]


def _latency(run: RunFiles, colour: Any, figures: _Figures) -> list[str]:
    m, d = run.metrics, run.distributions
    base = m.get("baseline", BASELINE)
    out = ['<section id="latency">', "<h2>Latency</h2>"]
    coarse = False
    for t in targets_ran(m, run.verdict):
        names = [n for n in [base, *variants_of(m)] if (result_of(m, n, t) or {}).get("shapes")]
        if not names:
            continue
        by_shape: dict[str, list[plots.Latency]] = {}
        for n in names:
            for shape, s in result_of(m, n, t)["shapes"].items():  # type: ignore[index]
                lat = plots.Latency.from_shape(n, s, d.get(f"latency_ms/{t}/{n}/{shape}"))
                coarse |= lat.samples_ms is None
                by_shape.setdefault(shape, []).append(lat)
        out.append(f"<h3>{escape(t)}</h3>")
        caption = f"latency CDF per shape on {t}, every model, FP32 in grey; circles p50, triangles p99"
        out += figures.figure(f"latency-{t}", f"Latency on {t}", partial(plots.latency, t, by_shape, colour), caption)
        out += _latency_table(m, t, names)
    if coarse:
        why = run.distributions_note or f"{DISTRIBUTIONS} lacks some of these series"
        out.insert(
            2,
            f'<p class="note" id="latency-source">{escape(why)}: dashed curves go through the percentiles '
            "metrics.json recorded (min, p50, p90, p95, p99, max), not through every timed run.</p>",
        )
    return [*out, "</section>"]


def _latency_table(m: dict[str, Any], target: str, names: list[str]) -> list[str]:
    rows = []
    for v in names:
        for shape, s in (result_of(m, v, target) or {}).get("shapes", {}).items():
            speed = s.get("p50_speedup")
            rows.append(
                [
                    escape(v),
                    escape(shape),
                    number_cell(f"{s['p50_ms']:.3f}") if "p50_ms" in s else "–",
                    number_cell(f"{s['p90_ms']:.3f}") if "p90_ms" in s else "–",
                    number_cell(f"{s['p99_ms']:.3f}") if "p99_ms" in s else "–",
                    number_cell(f"{s['mean_ms']:.3f}") if "mean_ms" in s else "–",
                    number_cell(f"{s['cv']:.1%}") if "cv" in s else "–",
                    number_cell(f"{s['items_per_s']:.1f}") if "items_per_s" in s else "–",
                    number_cell(_num(fmt_speedup(speed), f"{v}/{target}/{shape}/p50_speedup", speed))
                    if speed is not None
                    else "baseline",
                ]
            )
    if not rows:
        return []
    return html_table(
        ("model", "shape", "p50 ms", "p90 ms", "p99 ms", "mean ms", "CV", "items/s", "p50 speed-up"), rows
    )


def _serving(m: dict[str, Any], v: dict[str, Any], colour: Any, figures: _Figures) -> list[str]:
    """The load tests (`serving.loadtest: true`), per target: latency vs load, and a table of each model's
    highest load within the SLO and the judged step's numbers. Nothing when no model was load-tested."""
    base = m.get("baseline", BASELINE)
    out = ['<section id="serving">', "<h2>Serving under load</h2>"]
    shown = False
    for t in targets_ran(m, v):
        served = {n: r["serving"] for n in [base, *variants_of(m)] if (r := result_of(m, n, t)) and r.get("serving")}
        if not served:
            continue
        shown = True
        slo = next((s["slo"] for s in served.values() if s.get("slo")), None) or {}
        out.append(f"<h3>{escape(t)}</h3>")
        steps = {n: s.get("steps", []) for n, s in served.items()}
        draw = partial(plots.serving, t, steps, slo.get("p99_ms"), colour)
        caption = f"open-loop load test of each model served on 127.0.0.1 ({t}); latency from the intended send time"
        out += figures.figure(f"serving-{t}", f"Serving on {t}", draw, caption)
        rows = []
        for n, s in served.items():
            rps = s.get("max_rps_at_slo")
            rows.append(
                [
                    escape(n),
                    number_cell(_num(fmt_number(rps, 4), f"{n}/{t}/serving/max_rps_at_slo", rps)),
                    number_cell(fmt_number(s.get("rps"), 4)),
                    number_cell(fmt_number(s.get("p99_ms"), 4)),
                    number_cell(fmt_number(s.get("error_rate"), 3)),
                    number_cell(fmt_number(s.get("cpu_utilisation"), 3)),
                    number_cell(fmt_number(s.get("rss_peak_mb"), 4)),
                ]
            )
        head = ("model", "max rps at SLO", "judged rps", "p99 ms", "error rate", "CPU", "peak RSS MB")
        out += html_table(head, rows)
        if slo:
            out.append(
                f'<p class="note">SLO: p99 ≤ {escape(fmt_number(slo.get("p99_ms")))} ms, errors ≤ '
                f"{escape(fmt_number(slo.get('error_rate')))}; judged at the target load, else at max rps at SLO. "
                "Every step: <code>serving/&lt;model&gt;/&lt;target&gt;/loadtest.json</code>.</p>"
            )
    return [*out, "</section>"] if shown else []


def _accuracy(run: RunFiles, colour: Any, figures: _Figures) -> list[str]:
    m, d = run.metrics, run.distributions
    out = ['<section id="accuracy">', "<h2>Accuracy vs FP32</h2>"]
    missing = False
    for t in targets_ran(m, run.verdict):
        rows: list[list[str]] = []
        tasks: list[str] = []
        series: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        for v in _compared_on(m, t):
            r = result_of(m, v, t)
            if not r:
                continue
            for output, s in r.get("accuracy", {}).get("outputs", {}).items():
                rows.append(
                    [
                        escape(v),
                        escape(output),
                        number_cell(fmt_cosine(s["cosine_mean"])) if "cosine_mean" in s else "–",
                        number_cell(_num(fmt_cosine(s["cosine_min"]), f"{v}/{t}/{output}/cosine_min", s["cosine_min"]))
                        if "cosine_min" in s
                        else "–",
                        number_cell(fmt_number(s.get("max_abs_error"), 3)),
                        number_cell(fmt_number(s.get("mean_abs_error"), 3)),
                        number_cell(fmt_share(s["top1_agreement"])) if s.get("top1_agreement") is not None else "–",
                        number_cell(fmt_share(s["neighbour_agreement"]))
                        if s.get("neighbour_agreement") is not None
                        else "–",
                    ]
                )
                for kind in plots.ACCURACY_KINDS:
                    arr = d.get(f"{kind}/{t}/{v}/{output}")
                    if arr is not None and arr.size:
                        series.setdefault(output, {}).setdefault(kind, {})[v] = arr
                    elif kind != "cosine" or "cosine_min" in s:  # one number per sample has no cosine
                        missing = True
            acc = r.get("accuracy", {})
            if "task_metric" in acc:
                tasks.append(
                    f"<li>{escape(v)}: task metric {acc['task_metric']:.4f} "
                    f"(FP32 {acc.get('task_metric_baseline', float('nan')):.4f}, "
                    f"drop {acc.get('task_metric_drop', float('nan')):+.4f})</li>"
                )
        if not rows:
            continue
        out.append(f"<h3>{escape(t)}</h3>")
        if series:
            caption = f"per-sample accuracy of each variant against the FP32 reference on {t}"
            draw = partial(plots.accuracy, t, series, colour)
            out += figures.figure(f"accuracy-{t}", f"Accuracy on {t}", draw, caption)
        head = ("variant", "output", "cosine mean", "cosine min", "max abs err", "mean abs err", "top-1", "neighbour")
        out += html_table(head, rows)
        if tasks:
            out += ["<ul>", *tasks, "</ul>"]
        out += _confusions(run, t)
    if missing:
        why = run.distributions_note or f"{DISTRIBUTIONS} lacks some per-sample series"
        out.insert(
            2, f'<p class="note" id="accuracy-source">{escape(why)}: per-sample plots only where it has them.</p>'
        )
    return [*out, "</section>"]


def _compared_on(m: dict[str, Any], target: str) -> list[str]:
    """The models whose accuracy a target's section shows: the variants, and the FP32 baseline itself on targets
    other than the reference (ONNX Runtime on the CPU), where its own drift is worth seeing."""
    names = variants_of(m)
    return names if target == REFERENCE_TARGET else [m.get("baseline", BASELINE), *names]


def _confusions(run: RunFiles, target: str) -> list[str]:
    """For classifier outputs: the samples whose top-1 class differs from the reference's, as a table of
    reference class (rows) × variant class (columns)."""
    d = run.distributions
    out: list[str] = []
    for v in _compared_on(run.metrics, target):
        r = result_of(run.metrics, v, target)
        for output, s in (r or {}).get("accuracy", {}).get("outputs", {}).items():
            ref, got = d.get(f"argmax/reference/{BASELINE}/{output}"), d.get(f"argmax/{target}/{v}/{output}")
            if s.get("top1_agreement") is None or ref is None or got is None:
                continue
            title = f"Top-1 disagreements: {v} on {target}, output {output}"
            if ref.shape != got.shape:
                shapes = f"{tuple(ref.shape)} vs {tuple(got.shape)}"
                out += [
                    f"<h3>{escape(title)}</h3>",
                    f'<p class="note">argmax shapes differ ({shapes}): not compared</p>',
                ]
                continue
            pairs = Counter(
                (int(a), int(b)) for a, b in zip(ref.ravel().tolist(), got.ravel().tolist(), strict=True) if a != b
            )
            n, wrong = int(ref.size), sum(pairs.values())
            out.append(f'<h3 class="confusion">{escape(title)}</h3>')
            out.append(
                f"<p>{wrong} of {n} samples changed class (agreement {fmt_share(1 - wrong / n if n else 1)}).</p>"
            )
            if not pairs:
                continue
            rows_cls = sorted({a for a, _ in pairs})
            cols_cls = sorted({b for _, b in pairs})
            top = max(pairs.values())
            rows = []
            for a in rows_cls:
                row = [f"<b>{a}</b>"]
                for b in cols_cls:
                    k = pairs.get((a, b), 0)
                    shade = f' style="background: rgba(207,34,46,{0.15 + 0.6 * k / top:.2f})"' if k else ""
                    row.append(f"<n><span{shade}>{k or ''}</span>")
                rows.append(row)
            out += html_table(["FP32 class ↓ / variant class →", *map(str, cols_cls)], rows)
    return out


def _size_memory(m: dict[str, Any], v: dict[str, Any], colour: Any, figures: _Figures) -> list[str]:
    out = ['<section id="size-memory">', "<h2>Size and memory</h2>"]
    names = [m.get("baseline", BASELINE), *variants_of(m)]
    sizes = {n: m["variants"][n]["size_bytes"] / 1e6 for n in names if "size_bytes" in m.get("variants", {}).get(n, {})}
    memory: dict[str, dict[str, float]] = {}
    variant_of: dict[str, str] = {}
    rows = []
    for t in targets_ran(m, v):
        for n in names:
            r = result_of(m, n, t)
            if not r:
                continue
            mem = r.get("memory", {})
            numbers = {k: float(mem[k]) for k in plots.MEMORY_KEYS if isinstance(mem.get(k), (int, float))}
            if numbers:
                label = f"{n} @ {t}"
                memory[label] = numbers
                variant_of[label] = n
            size = r.get("size", {})
            rows.append(
                [
                    escape(n),
                    escape(t),
                    number_cell(_num(fmt_mb(size["bytes"]), f"{n}/{t}/size_bytes", size["bytes"]))
                    if "bytes" in size
                    else "–",
                    number_cell(f"{size['ratio']:.3f}") if "ratio" in size else "–",
                    *(number_cell(fmt_number(mem.get(k), 4)) for k in plots.MEMORY_KEYS),
                ]
            )
    if sizes:
        draw = partial(plots.size_memory, sizes, memory, colour, variant_of)
        caption = "ONNX file size per model; memory per model and target (MB)"
        out += figures.figure("size-memory", "Size and memory", draw, caption)
    head = ("model", "target", "size", "size ratio", *(f"{label} MB" for label in plots.MEMORY_KEYS.values()))
    out += html_table(head, rows)
    return [*out, "</section>"]


def _tradeoff(m: dict[str, Any], v: dict[str, Any], colour: Any, figures: _Figures) -> list[str]:
    base = m.get("baseline", BASELINE)
    points = []
    ran = targets_ran(m, v)
    for t in ran:
        for n in variants_of(m):
            r = result_of(m, n, t)
            speed = worst_speedup(r)[0] if r else None
            cos = (r or {}).get("accuracy", {}).get("cosine_min")
            if speed is not None and cos is not None:
                points.append(plots.TradeoffPoint(n if len(ran) == 1 else f"{n} @ {t}", cos, speed, n))
    if not points:
        return []
    points.append(plots.TradeoffPoint(base, 1.0, 1.0, base, "baseline"))
    for n, fb in (m.get("fallback") or {}).items():
        for trial in fb.get("trials", []):
            cos, speed = trial.get("accuracy", {}).get("cosine_min"), trial.get("p50_speedup")
            if cos is None or speed is None:
                continue
            kind = "chosen-trial" if trial.get("trial") == fb.get("chosen_trial") else "trial"
            points.append(plots.TradeoffPoint(f"{n} trial {trial.get('trial')}", cos, speed, n, kind))
    caption = "p50 speed-up (worst shape) against cosine min (worst output) on the evaluation data"
    if m.get("fallback"):
        caption += "; crosses: INT8 fallback trials on their tuning data, the kept trial ringed"
    figure = figures.figure("tradeoff", "Speed-up vs accuracy", partial(plots.tradeoff, points, colour), caption)
    return ['<section id="tradeoff">', "<h2>Speed-up vs accuracy</h2>", *figure, "</section>"]


def _fallback(m: dict[str, Any]) -> list[str]:
    fallback = m.get("fallback") or {}
    if not fallback:
        return []
    out = ['<section id="fallback">', "<h2>INT8 accuracy-aware fallback</h2>"]
    for variant, fb in fallback.items():
        out.append(
            f"<p><b>{escape(variant)}</b> tuned on <code>{escape(str(fb.get('dataset')))}</code>: kept trial "
            f"{escape(str(fb.get('chosen_trial')))} ({'passed' if fb.get('passed') else 'no trial passed'}); "
            f"search stopped: {escape(str(fb.get('stopped', '')))}.</p>"
        )
        rows = []
        for t in fb.get("trials", []):
            acc = t.get("accuracy", {})
            shown = ", ".join(t.get("excluded", [])[:6]) + (" …" if len(t.get("excluded", [])) > 6 else "")
            result = "passed" if t.get("passed") else "failed: " + "; ".join(t.get("failed_gates", []))
            chosen = " ✓" if t.get("trial") == fb.get("chosen_trial") else ""
            rows.append(
                [
                    escape(f"{t.get('trial')}{chosen}"),
                    escape(f"{t.get('excluded_count', 0)} {shown}".strip()),
                    number_cell(fmt_number(acc.get("cosine_mean"))),
                    number_cell(fmt_number(acc.get("cosine_min"))),
                    number_cell(fmt_number(t.get("p50_speedup"), 3)),
                    number_cell(f"{t.get('seconds', 0):.1f}"),
                    escape(result),
                ]
            )
        head = ("trial", "nodes kept high-precision", "cosine mean", "cosine min", "p50 speed-up", "seconds", "result")
        out += html_table(head, rows)
    return [*out, "</section>"]


def _engines(m: dict[str, Any]) -> list[str]:
    engines = {n: a["engine"] for n, a in m.get("variants", {}).items() if a.get("engine")}
    if not engines:
        return []
    rows = []
    for n, e in engines.items():
        hist = e.get("precisions", {})
        check = e.get("precision_check", {})
        rows.append(
            [
                escape(n),
                escape(", ".join(f"{p} {k}" for p, k in hist.get("compute", {}).items()) or "–"),
                escape(f"{check.get('status')}: {check.get('reason')}"),
                number_cell(f"{e.get('build_s', 0):.1f}"),
                number_cell(fmt_number(e.get("plan_bytes", 0) / 1e6, 4)),
                number_cell(fmt_number(e.get("plan_ratio"), 3)),
                f"<code>{escape(str(e.get('path')))}</code>",
            ]
        )
    head = ("variant", "layer precisions", "precision check", "build s", "plan MB", "plan vs FP32", "plan")
    return ['<section id="engines">', "<h2>TensorRT engines</h2>", *html_table(head, rows), "</section>"]


def _stages(man: dict[str, Any]) -> list[str]:
    stages = man.get("stages", [])
    out = ['<section id="stages">', "<h2>Stage timings</h2>"]
    if not stages:
        return [*out, '<p class="note">no stage recorded</p>', "</section>"]
    longest = max((float(s.get("seconds") or 0) for s in stages), default=0) or 1.0
    rows = []
    total = 0.0
    for s in stages:
        secs = float(s.get("seconds") or 0)
        total += secs
        bar = f'<span class="bar" style="width: {max(1, round(240 * secs / longest))}px"></span>'
        rows.append(
            [
                escape(str(s.get("stage"))),
                number_cell(f"{secs:.2f}"),
                bar,
                escape(str(s.get("status", ""))),
                escape(str(s.get("detail") or s.get("what", ""))),
            ]
        )
    rows.append(["<b>total</b>", number_cell(f"<b>{total:.2f}</b>"), "", "", ""])
    out += html_table(("stage", "seconds", "", "status", "detail"), rows)
    cache = man.get("cache") or []
    if cache:
        hits = sum(1 for c in cache if c.get("hit"))
        out.append(f"<h3>Stage cache: {hits} of {len(cache)} units from the cache</h3>")
        out += html_table(
            ("stage", "unit", "hit", "key"),
            [
                [
                    escape(str(c.get("stage"))),
                    escape(str(c.get("unit"))),
                    "hit" if c.get("hit") else "miss",
                    f"<code>{escape(str(c.get('key', ''))[:16])}…</code>",
                ]
                for c in cache
            ],
        )
    return [*out, "</section>"]


def _environment(m: dict[str, Any], man: dict[str, Any]) -> list[str]:
    out = ['<section id="environment">', "<h2>Environment and lineage</h2>"]
    hw = man.get("hardware", {})
    rows = [
        ["host", escape(f"{hw.get('cpu')} × {hw.get('cores')} cores, {hw.get('memory_gb')} GB")],
        ["CPU instruction sets", escape(cpu.describe(hw.get("cpu_isa")))],
        ["GPU", escape(str(hw.get("gpu") or "none"))],
        ["OS", escape(str(man.get("os", "–")))],
        ["recipe", escape(f"{man.get('recipe')} ({man.get('recipe_file', '')})")],
        ["recipe sha256", f"<code>{escape(str(man.get('recipe_sha256', '–')))}</code>"],
        [
            "model",
            escape(str(man.get("model", {}).get("description", "–")))
            + f" <code>{escape(str(man.get('model', {}).get('sha256', '–')))}</code>",
        ],
    ]
    for name, ds in man.get("datasets", {}).items():
        rows.append(
            [
                f"dataset {escape(name)}",
                escape(str(ds.get("description", ""))) + f" <code>{escape(str(ds.get('sha256')))}</code>",
            ]
        )
    for name, art in m.get("variants", {}).items():
        rows.append(
            [
                f"artifact {escape(name)}",
                f"<code>{escape(str(art.get('path')))}</code> {escape(fmt_mb(art.get('size_bytes', 0)))} "
                f'sha256 <code class="sha256">{escape(str(art.get("sha256")))}</code>',
            ]
        )
    reg = man.get("registry")
    if reg:
        if reg.get("status") in ("registered", "already registered"):
            versions = {**reg.get("already", {}), **reg.get("versions", {})}
            text = ", ".join(f"{reg.get('model_name')} v{n} ({v})" for v, n in versions.items()) or "nothing registered"
            text += (
                f"; MLflow run {reg.get('run_id')} in {reg.get('tracking_uri')}"
                if reg.get("run_id")
                else f"; already in {reg.get('tracking_uri')} (same model bytes, same checks); this run not logged"
            )
        else:
            text = f"{reg.get('status')}: {reg.get('error', '')}"
        rows.append(["registry", escape(text)])
    out += html_table(("what", "value"), rows)
    versions = man.get("versions", {})
    if versions:
        out.append("<h3>Library versions</h3>")
        out += html_table(("library", "version"), [[escape(k), escape(str(x))] for k, x in versions.items()])
    return [*out, "</section>"]
