"""What a run tells people and CI, built only from its run directory's files (metrics.json, verdict.json,
manifest.json, distributions.npz):

    markdown.py   report.md
    html.py       report.html, self-contained, and plots/*.png (drawn by plots.py with matplotlib's Agg)
    headlines.py  per variant its key numbers (speed-up, accuracy, size): report.html's and `optimize runs`'
    ci.py         junit.xml and the gate table for a CI job summary (summary.md); one gate-row formatter for all
    compare.py    `optimize compare`: two runs, or a run and a registered version's MLflow run
    runs.py       `optimize runs`: the run directories, newest first; the run directory's JSON readers

`write_reports(run_dir, metrics, verdict, manifest)` writes a finished run's report.md, report.html (with
plots/*.png), junit.xml and summary.md.
"""

from __future__ import annotations

from optimize.reporting.write import write_reports

__all__ = ["write_reports"]
