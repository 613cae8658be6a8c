"""The code stays ruff-clean (lint and format), so CI catches what a reviewer would."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    # The ruff of this environment (the test extra), not whatever ruff is first on PATH.
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_ruff_check() -> None:
    proc = _ruff("check", "optimize", "tests", "benchmarks", "examples")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format() -> None:
    proc = _ruff("format", "--check", "optimize", "tests", "benchmarks", "examples")
    assert proc.returncode == 0, proc.stdout + proc.stderr
