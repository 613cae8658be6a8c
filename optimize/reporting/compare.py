"""`optimize compare`: what changed between two runs, or between a run and a registered model version (whose
MLflow run holds the same evidence files): metrics per variant, target and shape with deltas, gates that
flipped, hashes, library versions, hardware and recipe. Read as "from BEFORE to AFTER": `compare A B` goes from
run A to run B; `compare A --vs models:/NAME@ALIAS` from the registered version to run A."""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import yaml
from rich.markup import escape as escape_markup
from rich.table import Table

from optimize.console import stdout_console
from optimize.errors import RecipeError, first_line
from optimize.files import display_path
from optimize.registry import tags as tag
from optimize.registry.connection import http_status, is_connection_error, session
from optimize.registry.smoke import resolve_version
from optimize.reporting.ci import gate_label
from optimize.reporting.html import CSS, html_table, number_cell
from optimize.reporting.runs import read_run_json

# The files `optimize compare` reads; the registry logs them with every MLflow run (registry/publish.py).
EVIDENCE = ("metrics.json", "verdict.json", "manifest.json")
RECIPE_FILES = ("recipe.json", "recipe.yaml")
SHAPE_METRICS = (("p50_ms", "p50 ms", "lower"), ("p99_ms", "p99 ms", "lower"), ("items_per_s", "items/s", "higher"))
SPEEDUP = ("p50_speedup", "p50 speed-up", "higher")
RESULT_METRICS = (
    ("accuracy.cosine_min", "cosine min", "higher"),
    ("accuracy.top1_agreement", "top-1 agreement", "higher"),
    ("size.bytes", "size MB", "lower"),
    ("memory.rss_peak_mb", "peak RSS MB", "lower"),
    ("memory.rss_session_mb", "session RSS MB", "lower"),
    ("memory.gpu_peak_mb", "GPU peak MB", "lower"),
    ("memory.gpu_session_mb", "GPU session MB", "lower"),
)


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a label for people, and the run's metrics, verdict, manifest and recipe."""

    label: str
    metrics: dict[str, Any]
    verdict: dict[str, Any]
    manifest: dict[str, Any]
    recipe: dict[str, Any] | None
    detail: str = ""


@dataclass(frozen=True)
class MetricRow:
    """One number on both sides: `delta` is after − before, `change` that over |before| (None where undefined);
    `better` says whether the change is good for this metric (None: no change or unknown)."""

    variant: str
    target: str
    shape: str
    metric: str
    before: float | None
    after: float | None
    delta: float | None
    change: float | None
    better: bool | None


@dataclass(frozen=True)
class GateRow:
    """A gate row (variant, target, gate) on both sides: status and value; `flipped` when the status differs."""

    variant: str
    target: str
    gate: str
    before_status: str
    before_value: Any
    after_status: str
    after_value: Any

    @property
    def flipped(self) -> bool:
        return self.before_status != self.after_status


@dataclass(frozen=True)
class Difference:
    """A value that differs (hash, library version, hardware, recipe key); "–" where one side lacks it."""

    section: str
    key: str
    before: str
    after: str


@dataclass(frozen=True)
class Comparison:
    before: Side
    after: Side
    metrics: list[MetricRow] = field(default_factory=list)
    gates: list[GateRow] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)

    def section(self, name: str) -> list[Difference]:
        """The differences of one section: "hashes", "versions", "hardware" or "recipe"."""
        return [d for d in self.differences if d.section == name]


# --- loading the two sides ---------------------------------------------------------------------------


def _read_recipe(folder: Path) -> dict[str, Any] | None:
    for name in RECIPE_FILES:
        path = folder / name
        if path.is_file():
            try:
                if name.endswith(".json"):
                    return json.loads(path.read_text(encoding="utf-8"))
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
                return data if isinstance(data, dict) else None
            except Exception:  # a recipe we cannot read leaves the recipe section empty, nothing else
                return None
    return None


def load_run(run_dir: Path, label: str | None = None, detail: str = "") -> Side:
    """A run directory's side (exit 2 naming the file when it is not a finished run)."""
    run_dir = Path(run_dir)
    docs = read_run_json(run_dir, EVIDENCE, "is not a finished run (its gates never ran)")
    return Side(
        label or display_path(run_dir),
        docs["metrics.json"],
        docs["verdict.json"],
        docs["manifest.json"],
        _read_recipe(run_dir),
        detail,
    )


@contextmanager
def registered(uri: str, tracking_uri: str) -> Iterator[Side]:
    """The side of a registered model version `uri`: the evidence files of the MLflow run that registered it,
    downloaded into a temporary folder for the block. An unknown model, alias or version, or a version whose
    run lacks the files, is a one-line RecipeError (exit 2); an unreachable registry exit 5."""
    with tempfile.TemporaryDirectory(prefix="optimize-compare-") as tmp:
        with session(tracking_uri) as client:
            mv = resolve_version(client, uri, tracking_uri, command="compare")
            tags = dict(mv.tags or {})
            run_id = mv.run_id or tags.get(tag.MLFLOW_RUN_ID)
            if not run_id:
                raise RecipeError(f"compare: {uri}: version {mv.version} names no MLflow run to read its evidence from")
            for name in (*EVIDENCE, *RECIPE_FILES):
                try:
                    client.download_artifacts(run_id, name, tmp)
                except Exception as e:
                    if http_status(e) is not None or is_connection_error(e):
                        raise
                    if name in EVIDENCE:
                        raise RecipeError(
                            f"compare: {uri}: version {mv.version}'s MLflow run {run_id} has no {name} "
                            f"({first_line(e, 200)}); it was not registered by `optimize run`"
                        ) from None
        detail = (
            f"version {mv.version} ({tags.get(tag.VARIANT, '?')}), MLflow run {run_id}, "
            f"optimize run {tags.get(tag.OPTIMIZE_RUN_ID, '?')}"
        )
        side = load_run(Path(tmp), label=uri, detail=detail)
        yield side


# --- the comparison ----------------------------------------------------------------------------------


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)  # type: ignore[assignment]
    return d


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(float(x)) else None


def _scaled(x: Any, scale: float) -> Any:
    n = _number(x)
    return None if n is None else n * scale


def _row(variant: str, target: str, shape: str, metric: str, a: Any, b: Any, direction: str) -> MetricRow | None:
    before, after = _number(a), _number(b)
    if before is None and after is None:
        return None
    delta = after - before if before is not None and after is not None else None
    change = delta / abs(before) if delta is not None and before else None
    better = None
    if delta:
        better = (delta > 0) == (direction == "higher")
    return MetricRow(variant, target, shape, metric, before, after, delta, change, better)


def _ordered_union(*keys: Any) -> list[Any]:
    out: list[Any] = []
    for ks in keys:
        for k in ks:
            if k not in out:
                out.append(k)
    return out


def _metric_rows(a: dict[str, Any], b: dict[str, Any]) -> list[MetricRow]:
    ra, rb = a.get("results", {}), b.get("results", {})
    rows: list[MetricRow] = []
    for variant in _ordered_union(ra, rb):
        ta, tb = ra.get(variant, {}), rb.get(variant, {})
        for target in _ordered_union(ta, tb):
            x, y = ta.get(target) or {}, tb.get(target) or {}
            for dotted, label, direction in RESULT_METRICS:
                scale = 1e-6 if dotted == "size.bytes" else 1.0
                row = _row(
                    variant,
                    target,
                    "",
                    label,
                    _scaled(_get(x, dotted), scale),
                    _scaled(_get(y, dotted), scale),
                    direction,
                )
                if row:
                    rows.append(row)
            sx, sy = x.get("shapes", {}), y.get("shapes", {})
            for shape in _ordered_union(sx, sy):
                for key, label, direction in (*SHAPE_METRICS, SPEEDUP):
                    row = _row(
                        variant, target, shape, label, sx.get(shape, {}).get(key), sy.get(shape, {}).get(key), direction
                    )
                    if row:
                        rows.append(row)
    return rows


def _gate_rows(a: dict[str, Any], b: dict[str, Any]) -> list[GateRow]:
    """Gate rows matched by variant, target, metric, comparison, shape and output, so a gate whose threshold
    changed is one row (shown with both checks), and its status can flip."""

    def index(v: dict[str, Any]) -> dict[tuple[str, ...], dict[str, Any]]:
        out: dict[tuple[str, ...], dict[str, Any]] = {}
        for row in v.get("gates", []):
            metric = row.get("metric") or row.get("check", "?")
            key = (
                row.get("variant", "?"),
                row.get("target", "?"),
                metric,
                row.get("op", ""),
                str(row.get("shape", "")),
                str(row.get("output", "")),
            )
            out.setdefault(key, row)
        return out

    def label(row: dict[str, Any]) -> str:
        return gate_label({"check": "?", **row})

    ia, ib = index(a), index(b)
    rows = []
    for key in _ordered_union(ia, ib):
        x, y = ia.get(key, {}), ib.get(key, {})
        gate = label(x) if x else label(y)
        if x and y and label(x) != label(y):
            gate = f"{label(x)} → {label(y)}"
        rows.append(
            GateRow(
                key[0],
                key[1],
                gate,
                x.get("status", "absent"),
                x.get("value"),
                y.get("status", "absent"),
                y.get("value"),
            )
        )
    return rows


def _text(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, (dict, list)):
        return json.dumps(x, sort_keys=True)
    return str(x)


def _differ(section: str, a: dict[str, Any], b: dict[str, Any]) -> list[Difference]:
    return [
        Difference(section, k, _text(a.get(k)), _text(b.get(k)))
        for k in _ordered_union(a, b)
        if _text(a.get(k)) != _text(b.get(k))
    ]


def _hashes(side: Side) -> dict[str, Any]:
    man = side.manifest
    out: dict[str, Any] = {
        "recipe sha256": man.get("recipe_sha256"),
        "model sha256": man.get("model", {}).get("sha256"),
    }
    for name, ds in man.get("datasets", {}).items():
        out[f"dataset {name} sha256"] = ds.get("sha256")
    for name, art in side.metrics.get("variants", {}).items():
        out[f"artifact {name} sha256"] = art.get("sha256")
    return out


def _hardware(side: Side) -> dict[str, Any]:
    return {**side.manifest.get("hardware", {}), "os": side.manifest.get("os")}


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj
    return out


def compare(before: Side, after: Side) -> Comparison:
    """Everything that differs from `before` to `after`."""
    diffs = _differ("hashes", _hashes(before), _hashes(after))
    diffs += _differ("versions", before.manifest.get("versions", {}), after.manifest.get("versions", {}))
    diffs += _differ("hardware", _hardware(before), _hardware(after))
    if before.recipe is not None and after.recipe is not None:
        diffs += _differ("recipe", _flatten("", before.recipe, {}), _flatten("", after.recipe, {}))
    return Comparison(
        before, after, _metric_rows(before.metrics, after.metrics), _gate_rows(before.verdict, after.verdict), diffs
    )


# --- rendering ---------------------------------------------------------------------------------------


def fmt_value(x: float | None) -> str:
    """A number as the comparison shows it (4 significant digits)."""
    return "–" if x is None else f"{x:.4g}"


def fmt_delta(row: MetricRow) -> str:
    """ "+0.12 (+3.4%)"; "–" where one side has no value."""
    if row.delta is None:
        return "–"
    text = f"{row.delta:+.3g}"
    return text + (f" ({row.change:+.1%})" if row.change is not None and row.delta else "")


def default_html_name(other: str) -> str:
    """compare-<other>.html, `other` (a run id or a models:/ URI) made into a file name."""
    stem = other.removeprefix("models:/").rstrip("/")
    stem = re.sub(r"[^A-Za-z0-9._@-]+", "-", stem).strip("-.") or "other"
    return f"compare-{stem}.html"


def as_json(c: Comparison) -> dict[str, Any]:
    """The comparison as `optimize compare --json` prints it: each side's label, detail, recipe, run id and
    verdict, then every metric row, every gate row (with `flipped`) and every difference."""

    def side(s: Side) -> dict[str, Any]:
        return {
            "label": s.label,
            "detail": s.detail,
            "recipe": s.manifest.get("recipe"),
            "run_id": s.manifest.get("run_id"),
            "verdict": s.verdict.get("status"),
        }

    return {
        "before": side(c.before),
        "after": side(c.after),
        "metrics": [asdict(r) for r in c.metrics],
        "gates": [{**asdict(g), "flipped": g.flipped} for g in c.gates],
        "differences": [asdict(d) for d in c.differences],
    }


def print_table(c: Comparison) -> None:
    """The comparison on the terminal (stdout): metrics with deltas, flipped gates, differences."""
    con = stdout_console()
    con.print(f"before: {c.before.label}" + (f" — {c.before.detail}" if c.before.detail else ""), markup=False)
    con.print(f"after:  {c.after.label}" + (f" — {c.after.detail}" if c.after.detail else ""), markup=False)
    table = Table(title="Metrics (after − before)", title_justify="left")
    for col in ("variant", "target", "shape", "metric", "before", "after", "delta"):
        table.add_column(col, justify="right" if col in ("before", "after", "delta") else "left")
    for r in c.metrics:
        style = "" if r.better is None else ("green" if r.better else "red")
        delta = fmt_delta(r)
        table.add_row(
            r.variant, r.target, r.shape, r.metric, fmt_value(r.before), fmt_value(r.after),
            f"[{style}]{escape_markup(delta)}[/]" if style else escape_markup(delta),
        )  # fmt: skip
    con.print(table)
    flipped = [g for g in c.gates if g.flipped]
    gates = Table(title=f"Gates: {len(flipped)} of {len(c.gates)} flipped", title_justify="left")
    for col in ("variant", "target", "gate", "before", "after"):
        gates.add_column(col)
    for g in flipped:
        gates.add_row(
            g.variant, g.target, escape_markup(g.gate), _gate_cell(g.before_status, g.before_value),
            _gate_cell(g.after_status, g.after_value),
        )  # fmt: skip
    con.print(gates)
    for section, title in SECTIONS:
        rows = c.section(section)
        t = Table(title=f"{title}: {len(rows)} differ" if rows else f"{title}: the same", title_justify="left")
        if rows:
            for col in ("key", "before", "after"):
                t.add_column(col, overflow="fold")
            for d in rows:
                t.add_row(escape_markup(d.key), escape_markup(d.before), escape_markup(d.after))
            con.print(t)
        else:
            con.print(f"[bold]{title}[/]: the same")


SECTIONS = (
    ("hashes", "Hashes (recipe, model, datasets, artifacts)"),
    ("versions", "Library versions"),
    ("hardware", "Hardware and OS"),
    ("recipe", "Recipe"),
)


def _gate_cell(status: str, value: Any) -> str:
    colour = {"passed": "green", "failed": "red"}.get(status, "yellow")
    shown = f" {value:.6g}" if isinstance(value, float) else (f" {value}" if value is not None else "")
    return f"[{colour}]{status}[/]{escape_markup(shown)}"


def html(c: Comparison) -> str:
    """The comparison as one self-contained HTML page (the report's style, no plots, no script)."""

    def side(s: Side) -> str:
        return f"<code>{escape(s.label)}</code>" + (f" — {escape(s.detail)}" if s.detail else "")

    recipes = f"{c.before.manifest.get('recipe', '?')} → {c.after.manifest.get('recipe', '?')}"
    verdicts = f"{c.before.verdict.get('status', '?')} → {c.after.verdict.get('status', '?')}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>compare {escape(c.before.label)} → {escape(c.after.label)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{escape(recipes)}</h1>",
        f"<p>before: {side(c.before)}<br>after: {side(c.after)}<br>verdict: {escape(verdicts)}</p>",
        '<section id="metrics">',
        "<h2>Metrics (after − before)</h2>",
    ]
    rows = [
        [
            escape(r.variant),
            escape(r.target),
            escape(r.shape),
            escape(r.metric),
            number_cell(fmt_value(r.before)),
            number_cell(fmt_value(r.after)),
            number_cell(escape(fmt_delta(r))),
        ]
        for r in c.metrics
    ]
    classes = ["" if r.better is None else ("better" if r.better else "worse") for r in c.metrics]
    out += html_table(("variant", "target", "shape", "metric", "before", "after", "delta"), rows, classes)
    out.append("</section>")
    flipped = [g for g in c.gates if g.flipped]
    out += ['<section id="gates">', f"<h2>Gates: {len(flipped)} of {len(c.gates)} flipped</h2>"]
    if flipped:
        rows = [
            [
                escape(g.variant),
                escape(g.target),
                f"<code>{escape(g.gate)}</code>",
                escape(f"{g.before_status} {_text(g.before_value)}"),
                escape(f"{g.after_status} {_text(g.after_value)}"),
            ]
            for g in flipped
        ]
        out += html_table(("variant", "target", "gate", "before", "after"), rows, ["flipped"] * len(rows))
    out.append("</section>")
    for section, title in SECTIONS:
        diffs = c.section(section)
        count = f"{len(diffs)} differ" if diffs else "the same"
        out += [f'<section id="{section}">', f"<h2>{escape(title)}: {count}</h2>"]
        if diffs:
            rows = [
                [escape(d.key), f"<code>{escape(d.before)}</code>", f"<code>{escape(d.after)}</code>"] for d in diffs
            ]
            out += html_table(("key", "before", "after"), rows)
        out.append("</section>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
