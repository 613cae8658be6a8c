"""constraints/cpu.txt is the lock of the CPU environment (ci/lock.sh writes it): what CI tests is what a fresh
clone installs, and pyproject's lower bounds are versions that were tested, not guesses."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK = REPO / "constraints" / "cpu.txt"
# Not in the CPU lock: the GPU stage's extra installs only where NVIDIA's hosts are reachable.
UNLOCKED_EXTRAS = {"gpu"}


def _lock() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version and not re.search(r"[<>~!; ]", version), f"{LOCK}: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra, items in project["optional-dependencies"].items():
        if extra not in UNLOCKED_EXTRAS:
            reqs += [Requirement(r) for r in items if not r.startswith("optimize[")]
    return reqs


def _over_system_site_packages() -> bool:
    cfg = Path(sys.prefix) / "pyvenv.cfg"
    return cfg.exists() and re.search(r"include-system-site-packages\s*=\s*true", cfg.read_text()) is not None


def test_the_lock_pins_every_package_of_this_environment_at_the_version_installed() -> None:
    if _over_system_site_packages():
        pytest.skip("a GPU runner's venv over its image's packages: not the CPU lock's environment")
    pins = _lock()
    stale = []
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in ("optimize", "pip", "setuptools", "wheel"):
            continue
        installed = Version(dist.version)
        locked = pins.get(name)
        if locked is None or locked.public != installed.public:
            stale.append(f"{name} {installed} (lock: {locked or 'absent'})")
    assert not stale, f"{LOCK} is not what is installed; run `bash ci/lock.sh`, then the suite: " + ", ".join(stale)


def test_every_requirement_has_a_lower_bound_that_the_lock_tests() -> None:
    pins = _lock()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"pyproject.toml: {req} is not in {LOCK.name}; run `bash ci/lock.sh`"
        floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert len(floors) == 1, f"pyproject.toml: {req} needs one lower bound (>=)"
        locked = pins[name]
        assert req.specifier.contains(locked, prereleases=True), f"pyproject.toml: {req} excludes the locked {locked}"
        # the floor is the tested release line (a 0.x package's tested release): a lower one promises versions
        # nobody ran
        line = 3 if locked.major == 0 else 2
        assert floors[0].release[:line] == locked.release[:line], (
            f"pyproject.toml: {req}: the suite runs {name} {locked}; "
            f"raise the floor to >={'.'.join(map(str, locked.release[:line]))}"
        )
