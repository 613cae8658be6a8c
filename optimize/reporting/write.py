"""A finished run's reports, written into its run directory: report.md and report.html (with plots/*.png) for
people, junit.xml and summary.md (the gate table) for CI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optimize.reporting.ci as ci
import optimize.reporting.html as html
from optimize.files import display_path, write_text
from optimize.reporting.markdown import markdown


def write_reports(run_dir: Path, metrics: dict[str, Any], verdict: dict[str, Any], manifest: dict[str, Any]) -> None:
    """report.md and report.html (with its plots/*.png) for people; junit.xml and summary.md (the gate
    table) for CI. Each file is written atomically; junit.xml and summary.md name report.html as the user
    would type its path."""
    run_dir = Path(run_dir)
    write_text(run_dir / "report.md", markdown(metrics, verdict, manifest))
    where = display_path(html.write(run_dir))
    write_text(run_dir / "junit.xml", ci.junit_xml(verdict, manifest, where))
    write_text(run_dir / "summary.md", ci.summary_markdown(verdict, manifest, where))
