"""The docs stay a map a newcomer can follow: a short README that links every page under docs/, relative links
that lead somewhere, and a module map in docs/DESIGN.md that names every module of the package and no module
that is not there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
DESIGN = DOCS / "DESIGN.md"
PACKAGE = REPO / "optimize"
README_MAX_LINES = 160

# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...
# A module-map line: an indented name ending in .py or /, then (optionally) what it owns. Continuation lines
# of a description are indented deeper than any name and are not read as names.
_MAP_ENTRY = re.compile(r"^(?P<indent> *)(?P<name>[A-Za-z_][\w]*(?:\.py|/))(?:\s{2,}.*)?$")
_MAX_NAME_INDENT = 12


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def relative_links(page: Path) -> list[str]:
    """The link targets of a Markdown page that point into the repository (no scheme, not a bare #anchor)."""
    text = page.read_text(encoding="utf-8")
    return [t for t in _LINK.findall(text) if not _EXTERNAL.match(t) and not t.startswith("#")]


def module_map(design: Path = DESIGN) -> set[str]:
    """The module files named by the code block under "## Module map" in DESIGN.md, as paths relative to the
    repository (`optimize/registry/tags.py`); folders are read from indentation."""
    text = design.read_text(encoding="utf-8")
    match = re.search(r"^## Module map\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"{design}: no '## Module map' section"
    block = [line[4:] for line in match.group(1).splitlines() if line.startswith("    ")]
    assert block, f"{design}: the module map has no indented code block"
    names: set[str] = set()
    folders: list[tuple[int, str]] = []  # (indent, path) of the folders open at this point
    for line in block:
        entry = _MAP_ENTRY.match(line)
        if entry is None or len(entry["indent"]) > _MAX_NAME_INDENT:
            continue
        indent, name = len(entry["indent"]), entry["name"]
        while folders and folders[-1][0] >= indent:
            folders.pop()
        path = f"{folders[-1][1]}/{name.rstrip('/')}" if folders else name.rstrip("/")
        if name.endswith("/"):
            folders.append((indent, path))
        else:
            names.add(path)
    return names


def package_modules() -> set[str]:
    return {str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"


def test_readme_links_every_docs_page() -> None:
    linked = {(REPO / t.split("#")[0]).resolve() for t in relative_links(README)}
    missing = [str(p.relative_to(REPO)) for p in doc_pages() if p.resolve() not in linked]
    assert doc_pages(), "docs/ has no pages"
    assert not missing, f"README.md does not link {missing}"


def test_readme_keeps_the_two_commands() -> None:
    """The install-and-run command and the test command (which .ci/run runs) stay as they are."""
    text = README.read_text(encoding="utf-8")
    run = (
        "python3 -m venv .venv && .venv/bin/pip install -c constraints/cpu.txt -e . && "
        ".venv/bin/optimize run recipes/fp16.yaml"
    )
    tests = "bash ci/setup.sh cpu && .venv/bin/python -m pytest"
    assert run in text
    assert tests in text
    assert tests in (REPO / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize("page", [README, *doc_pages()], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_to_files(page: Path) -> None:
    broken = [t for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not broken, f"{page.relative_to(REPO)}: links to missing files {broken}"


def test_module_map_reads_nested_folders(tmp_path: Path) -> None:
    """The map's parser follows indentation and ignores description lines, so the checks below can fail."""
    design = tmp_path / "DESIGN.md"
    design.write_text(
        "# x\n\n## Module map\n\n"
        "    optimize/\n"
        "      cli.py             the CLI\n"
        "                         export.py is named in a description, not a module\n"
        "      registry/          MLflow\n"
        "        tags.py          names\n"
        "      api.py             the API\n\n"
        "## Next\n\n    optimize/\n      other.py   not in the map\n"
    )
    assert module_map(design) == {"optimize/cli.py", "optimize/registry/tags.py", "optimize/api.py"}


def test_every_module_is_in_the_design_map() -> None:
    missing = sorted(package_modules() - module_map())
    assert not missing, f"docs/DESIGN.md's module map does not name {missing}"


def test_every_module_in_the_design_map_exists() -> None:
    gone = sorted(module_map() - package_modules())
    assert not gone, f"docs/DESIGN.md's module map names modules that do not exist: {gone}"
