"""Tag names live in optimize/registry/tags.py only: no other module of optimize writes one as a string literal
(where it names a tag: a key of a `tags` mapping, a `tags.<name>` search filter, a tag setter's argument, or any
literal of the distinctive names), and the typed registration result records what the manifest always held."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from optimize.registry import Registration, success_record
from optimize.registry import tags as tag
from optimize.registry.reuse import reused_record

PACKAGE = Path(__file__).resolve().parents[2] / "optimize"
TAGS_FILE = PACKAGE / "registry" / "tags.py"

# Every string constant tags.py defines (tag and alias names, and the patterns of per-alias tags).
NAMES = {v for k, v in vars(tag).items() if k.isupper() and isinstance(v, str)}
TAG_NAMES = NAMES - {tag.CANDIDATE, tag.CANARY, tag.PRODUCTION}
# Names no other string of the code spells by chance: any literal of them is a tag name written twice.
DISTINCTIVE = {n for n in TAG_NAMES if "." in n or "{" in n}
SETTERS = {"set_model_version_tag", "set_registered_model_tag", "delete_model_version_tag", "set_tag"}
FILTER = re.compile(r"tags\.`?([\w.]+)`?")
PER_ALIAS = re.compile(r"alias_history\..+|previous_.+_version")
# `optimize.recipe` is a module as well as a run tag: a string naming one of our modules is a module path.
MODULES = {"optimize." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py")}


def _tags_expr(node: ast.expr) -> bool:
    """`tags`, `mv.tags`, `rm.tags`, `other_tags`: an expression that holds a version's or model's tags."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name == "tags" or name.endswith("_tags")


def literal_tag_names(source: str) -> list[tuple[int, str]]:
    """(line, name) of each tag name `source` writes as a string literal where it names a tag."""
    found = []
    tree = ast.parse(source)
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if (node.value in DISTINCTIVE and node.value not in MODULES) or PER_ALIAS.fullmatch(node.value):
                found.append((node.lineno, node.value))
            found += [(node.lineno, m) for m in FILTER.findall(node.value) if m in TAG_NAMES]
        elif isinstance(node, ast.Subscript) and _tags_expr(node.value):
            key = node.slice
            if isinstance(key, ast.Constant) and key.value in TAG_NAMES:
                found.append((node.lineno, key.value))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            args = [a for a in node.args if isinstance(a, ast.Constant) and a.value in TAG_NAMES]
            if node.func.attr == "get" and _tags_expr(node.func.value):
                found += [(node.lineno, a.value) for a in args[:1] if a is node.args[0]]
            elif node.func.attr in SETTERS:
                found += [(node.lineno, a.value) for a in args]
        elif isinstance(node, ast.Compare) and any(_tags_expr(c) for c in node.comparators):
            if isinstance(node.left, ast.Constant) and node.left.value in TAG_NAMES:
                found.append((node.lineno, node.left.value))
    return sorted(set(found))


def test_the_check_finds_tag_names_written_as_literals() -> None:
    planted = """
tags = {}
a = mv.tags["sha256"]
b = tags.get("verdict")
c = client.search_model_versions(f"name = 'x' AND tags.optimize_run_id = '{i}'")
d = {"optimize.run_id": 1}
client.set_model_version_tag("m", "1", "audit", "[]")
e = "alias_history.canary"
f = "variant" in version_tags
g = row["sha256"]  # a metrics row, not a tags mapping
h = {"previous_version": 1, "module": "optimize.recipe"}
def f():
    '''Found by `search_model_versions("tags.precision = 'fp16'")`: a docstring may name a tag.'''
"""
    assert [n for _, n in literal_tag_names(planted)] == [
        "sha256",
        "verdict",
        "optimize_run_id",
        "optimize.run_id",
        "audit",
        "alias_history.canary",
        "variant",
    ]


def test_no_module_writes_a_tag_name_that_tags_py_defines() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {name!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != TAGS_FILE
        for line, name in literal_tag_names(path.read_text())
    ]
    assert offenders == [], "use optimize.registry.tags:\n" + "\n".join(offenders)


def test_the_commit_is_mlflows_own_tag() -> None:
    mlflow_tags = pytest.importorskip("mlflow.utils.mlflow_tags")
    assert tag.GIT_COMMIT == mlflow_tags.MLFLOW_GIT_COMMIT


def test_registration_records_what_the_manifest_held() -> None:
    """The manifest's `registry` entry (and `optimize run --json`'s source) keeps its keys, their order and
    values: what `publish` returned as a dict before it returned a Registration, after `status`."""
    made = Registration(
        "sqlite:///m.db", "tiny", "candidate", {"fp16": 3}, {"fp16-fp32io": 2}, mlflow_run_id="abc", experiment_id="1"
    )
    before = {
        "status": "registered",
        "tracking_uri": "sqlite:///m.db",
        "experiment_id": "1",
        "run_id": "abc",
        "model_name": "tiny",
        "alias": "candidate",
        "versions": {"fp16": 3},
        "already": {"fp16-fp32io": 2},
    }
    assert json.dumps(made.record()) == json.dumps(before)  # same keys in the same order
    assert success_record(made) == made.record()
    assert made.all_versions == {"fp16-fp32io": 2, "fp16": 3}

    found = reused_record("sqlite:///m.db", "tiny", "candidate", {"fp16": 1})
    assert json.dumps(found.record()) == json.dumps(
        {
            "status": "already registered",
            "tracking_uri": "sqlite:///m.db",
            "experiment_id": None,
            "run_id": None,
            "model_name": "tiny",
            "alias": "candidate",
            "versions": {},
            "already": {"fp16": 1},
        }
    )
    with pytest.raises(AttributeError):
        found.alias = "canary"  # type: ignore[misc]  # frozen
