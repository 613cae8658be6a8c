"""The Python API names of real TensorRT releases, for tests that check our code against them.

The lists in tests/data/tensorrt/ were read from the compiled bindings wheels by
tools/tensorrt_api_names.py: bare names (classes, functions, methods, properties, enum members) and
dotted `Class.member` lines, e.g. `BuilderFlag.FP16`, `ILogger.Severity.WARNING`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data" / "tensorrt"


@cache
def _load(major: int) -> frozenset[str]:
    path = DATA / f"api-{major}.txt"
    if not path.is_file():
        known = sorted(p.stem.removeprefix("api-") for p in DATA.glob("api-*.txt"))
        raise ValueError(f"no TensorRT API list for major version {major} (have {', '.join(known)}): {path}")
    lines = (line.strip() for line in path.read_text().splitlines())
    return frozenset(line for line in lines if line and not line.startswith("#"))


def tensorrt_api(major: int) -> set[str]:
    """The names TensorRT `major` (10: 10.16, 11: 11.4) exports, bare and `Class.member`, as a fresh set."""
    return set(_load(major))


def tensorrt_source(major: int) -> str:
    """The header line naming the wheel a list was read from (version, file name, sha256)."""
    return (DATA / f"api-{major}.txt").read_text().splitlines()[0].removeprefix("# ").strip()
