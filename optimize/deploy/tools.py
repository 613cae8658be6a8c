"""Finding the external programs the deploy checks run (promtool, prometheus, node): on PATH, else beside the Python
that runs optimize, where `ci/setup.sh` puts them (the virtual environment's bin/, also when it is not activated)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def find_tool(name: str) -> Path | None:
    """The executable `name`: from PATH, else from the directory of sys.executable; None where neither has it."""
    found = shutil.which(name)
    if found:
        return Path(found)
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    return None
