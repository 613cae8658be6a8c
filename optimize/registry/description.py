"""The description of a registered model version: a Markdown summary of its gates, a link to the run's report
and the report's plots as images, linked so that they show in the MLflow UI of whichever server serves the store."""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optimize.reporting.ci import delta_text

# The report's plots are logged under plots/ of the MLflow run and shown from there in each version's description.
PLOTS_DIR = "plots"


def describe(
    variant: str,
    metrics: dict[str, Any],
    verdict: dict[str, Any],
    *,
    run_id: str | None = None,
    experiment_id: str | None = None,
    tracking_uri: str | None = None,
    plots: Sequence[str] = (),
    report_html: bool = False,
) -> str:
    """Markdown summary of a variant's gates for the model version's description: per gate the baseline,
    the variant's value, their difference and the result; then where the run's report is, and the report's
    plots (`plots`: artifact paths of the run, plots/<name>.png) as images.

    The images and report.html are linked through the MLflow server's `get-artifact?path=…&run_uuid=…`, relative
    to the UI's page, so they show in the UI of whichever server serves this store (its Markdown sanitiser
    keeps `<img src>`); `runs:/<run id>/<path>` is printed beside them for clients."""
    art = metrics["variants"][variant]
    status = verdict["variants"][variant]
    lines = [
        f"**{variant}** ({art['precision']}), {art['size_bytes'] / 1e6:.1f} MB, sha256 `{art['sha256'][:16]}…`",
        f"Gates {status['status'].upper()}: {status.get('reason', '')}",
        "",
        "| gate | target | baseline | value | Δ | result |",
        "|---|---|---|---|---|---|",
    ]
    line = serving_line(metrics, variant)
    if line:
        lines[2:2] = [line]
    for row in verdict["gates"]:
        if row["variant"] != variant:
            continue
        value = row.get("value")
        base = row.get("baseline_value")
        lines.append(
            f"| `{row['check']}` | {row['target']} | {_fmt(base)} | {_fmt(value)} | {delta_text(value, base)} "
            f"| {row['status']}" + (f" ({row['reason']})" if row["status"] == "skipped" else "") + " |"
        )
    if run_id:
        report = f"Report: `runs:/{run_id}/report.md`"
        if report_html:
            report += f" · [report.html]({artifact_link(run_id, 'report.html')}) (`runs:/{run_id}/report.html`)"
        lines += ["", report]
        if tracking_uri and tracking_uri.startswith(("http://", "https://")) and experiment_id:
            lines.append(f"MLflow run: {tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}")
        if plots:
            lines += ["", f"Plots (`runs:/{run_id}/{PLOTS_DIR}/`):", ""]
            for p in plots:  # one paragraph each: the UI shows them one under the other
                lines += [f"![{Path(p).stem}]({artifact_link(run_id, p)})", ""]
    return "\n".join(lines)


def served(metrics: dict[str, Any], variant: str) -> tuple[str, dict[str, Any]] | None:
    """The target and load-test summary (metrics.json `results[variant][target]["serving"]`) a version's serving
    numbers come from: its first load-tested target; None when it was not load-tested."""
    for target, result in metrics.get("results", {}).get(variant, {}).items():
        if isinstance(result, dict) and result.get("serving"):
            return target, result["serving"]
    return None


def serving_line(metrics: dict[str, Any], variant: str) -> str | None:
    """One line of a version's description: its load test on 127.0.0.1 (highest load within the SLO, and the
    judged step's p99, errors, CPU and peak RSS); None when it was not load-tested."""
    found = served(metrics, variant)
    if found is None:
        return None
    target, s = found
    slo = s.get("slo") or {}
    line = f"Serving on {target}: {s.get('max_rps_at_slo') or 0:g} req/s within the SLO"
    if slo.get("p99_ms") is not None:
        line += f" (p99 ≤ {slo['p99_ms']:g} ms, errors ≤ {slo.get('error_rate', 0):.2%})"
    judged = [
        f"p99 {s['p99_ms']:.1f} ms" if s.get("p99_ms") is not None else None,
        f"errors {s['error_rate']:.2%}" if s.get("error_rate") is not None else None,
        f"CPU {s['cpu_utilisation']:.0%}" if s.get("cpu_utilisation") is not None else None,
        f"peak RSS {s['rss_peak_mb']:.0f} MB" if s.get("rss_peak_mb") is not None else None,
    ]
    shown = [j for j in judged if j]
    if s.get("rps") and shown:
        line += f"; at {s['rps']:g} req/s: " + ", ".join(shown)
    return line


def artifact_link(run_id: str, path: str) -> str:
    """A relative URL to a run's artifact as the MLflow UI fetches it (`get-artifact`, served by every MLflow
    server beside its UI)."""
    return "get-artifact?" + urllib.parse.urlencode({"path": path, "run_uuid": run_id})


def run_plots(run_dir: Path) -> list[str]:
    """The report's plots in `run_dir` as artifact paths (plots/<name>.png), in the report's order: trade-off,
    latency, serving under load, accuracy, size and memory, then any other."""
    folder = Path(run_dir) / PLOTS_DIR
    if not folder.is_dir():
        return []
    order = ("tradeoff", "latency-", "serving-", "accuracy-", "size-memory")

    def rank(p: Path) -> tuple[int, str]:
        return next((i for i, o in enumerate(order) if p.stem.startswith(o)), len(order)), p.name

    return [f"{PLOTS_DIR}/{p.name}" for p in sorted(folder.glob("*.png"), key=rank) if p.is_file()]


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)
