"""`optimize runs`: the run directories under a runs folder (`<runs>/<recipe>/<run-id>/`), newest first, with
status, verdict, each variant's key numbers and where the report is. Half-written and failed runs are listed
with what they have; a missing or damaged file never stops the listing."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from optimize.console import stdout_console
from optimize.errors import RecipeError, first_line
from optimize.files import display_path
from optimize.reporting.headlines import headlines

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class VariantLine:
    """A variant's verdict and key numbers, on the first target that ran it; `reason` says why (the failed
    gates, or how many passed)."""

    name: str
    status: str
    target: str | None
    p50_speedup: float | None
    shape: str | None
    cosine_min: float | None
    reason: str = ""


@dataclass(frozen=True)
class RunLine:
    """One run directory as `optimize runs` shows it. `status` is the manifest's (running, measured, done,
    failed) or "incomplete" where the manifest is missing or unreadable; `verdict` is verdict.json's status."""

    run_id: str
    recipe: str
    path: str
    started: str | None
    status: str
    verdict: str | None
    variants: list[VariantLine] = field(default_factory=list)
    report_html: str | None = None
    report_md: str | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """A JSON-able dict (`optimize runs --json`)."""
        return asdict(self)


def json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None where it is missing, unreadable or not an object (a half-written run)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_dirs(runs_dir: Path) -> list[Path]:
    """Every `<runs_dir>/<recipe>/<run-id>/` folder (with or without a manifest)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return [d for recipe in runs_dir.iterdir() if recipe.is_dir() for d in recipe.iterdir() if d.is_dir()]


def describe(run_dir: Path) -> RunLine:
    """What a run directory says about itself, from whatever of manifest.json, metrics.json and verdict.json it
    has."""
    run_dir = Path(run_dir)
    manifest = json_object(run_dir / MANIFEST)
    metrics = json_object(run_dir / "metrics.json")
    verdict = json_object(run_dir / "verdict.json")
    variants: list[VariantLine] = []
    if metrics is not None and verdict is not None:
        try:
            variants = [
                VariantLine(h.variant, h.status, h.target, h.p50_speedup, h.shape, h.cosine_min, h.reason)
                for h in headlines(metrics, verdict)
            ]
        except Exception:  # a damaged metrics.json shows as a run without numbers
            variants = []
    elif manifest is not None:
        # A run that stopped before its gates: the variants its precision stage recorded, no numbers.
        stage = next((s for s in manifest.get("stages", []) if s.get("stage") == "precision"), {})
        variants = [VariantLine(v, "not gated", None, None, None, None) for v in stage.get("variants") or {}]
    report = run_dir / "report.html"
    md = run_dir / "report.md"
    man = manifest or {}
    return RunLine(
        run_id=str(man.get("run_id") or run_dir.name),
        recipe=str(man.get("recipe") or run_dir.parent.name),
        path=display_path(run_dir),
        started=man.get("started"),
        status=str(man.get("status") or "incomplete") if manifest is not None else "incomplete",
        verdict=(verdict or {}).get("status"),
        variants=variants,
        report_html=display_path(report) if report.is_file() else None,
        report_md=display_path(md) if md.is_file() else None,
        error=man.get("error") if manifest is not None else f"no readable {MANIFEST}",
    )


def list_runs(runs_dir: Path) -> list[RunLine]:
    """Every run under `runs_dir`, newest first (by the manifest's start time, else the run id, which starts
    with the time)."""
    lines = [describe(d) for d in run_dirs(runs_dir)]
    return sorted(lines, key=lambda r: (r.started or "", r.run_id), reverse=True)


def render(lines: list[RunLine]) -> None:
    """The runs as a table on stdout."""
    table = Table(show_lines=False, pad_edge=False, box=None)
    for col in ("started", "recipe", "run id", "status", "verdict", "variants", "report"):
        # paths and ids stay whole (copyable); the variants column wraps
        table.add_column(col, overflow="fold", no_wrap=col != "variants" and col != "status")
    colour = {"passed": "green", "failed": "red", "skipped": "yellow"}
    for r in lines:
        parts = []
        for v in r.variants:
            numbers = []
            if v.p50_speedup is not None:
                numbers.append(f"p50 {v.p50_speedup:.2f}×")
            if v.cosine_min is not None:
                numbers.append(f"cos min {v.cosine_min:.6f}")
            where = f" on {v.target}" if v.target and numbers else ""
            c = colour.get(v.status)
            status = f"[{c}]{escape(v.status)}[/]" if c else escape(v.status)
            parts.append(f"{escape(v.name)} {status}" + (f" ({escape(', '.join(numbers) + where)})" if numbers else ""))
        verdict = r.verdict or "–"
        vc = colour.get(verdict)
        status = r.status + (f": {r.error}" if r.error and r.status in ("failed", "incomplete") else "")
        table.add_row(
            escape((r.started or "–").replace("T", " ").removesuffix("+00:00")),
            escape(r.recipe),
            escape(r.run_id),
            f"[red]{escape(status)}[/]" if r.status in ("failed", "incomplete") else escape(status),
            f"[{vc}]{escape(verdict)}[/]" if vc else escape(verdict),
            "\n".join(parts) or "–",
            escape(r.report_html or r.report_md or "–"),
        )
    stdout_console().print(table)


def read_run_json(run_dir: Path, names: tuple[str, ...], missing: str) -> dict[str, dict[str, Any]]:
    """The JSON objects `names` of a run directory, by file name. A run directory that is not there, a file
    that is missing (`missing` says what that means to the caller) or one that is not a JSON object is a
    one-line RecipeError (exit 2) naming it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RecipeError(
            f"{display_path(run_dir)}: no such run directory; pass a run directory (runs/<recipe>/<run-id>)"
        )
    docs: dict[str, dict[str, Any]] = {}
    for name in names:
        path = run_dir / name
        if not path.is_file():
            raise RecipeError(f"{display_path(path)}: missing, so {display_path(run_dir)} {missing}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RecipeError(f"{display_path(path)}: cannot be read ({first_line(e)})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{display_path(path)}: not a JSON object")
        docs[name] = data
    return docs
