"""Whether a registration has anything to do: the store's live versions that are the same model as a run's
passing variants (`same_models`, by the identity tags) and where the model's aliases point, read through MLflow's
client or, for a local sqlite store, straight from its file without importing MLflow (`already_registered`: the
fast path of a cached rerun); and where a registration's aliases go (`alias_targets`, `aliases_to_move`)."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optimize.registry import tags as tag
from optimize.registry.connection import quoted, sqlite_file
from optimize.registry.record import Registration, check_finished_run

# The tags that make two versions the same model (see optimize.registry.tags.IDENTITY).
IDENTITY_TAGS = tag.IDENTITY


def identity_tags(
    run_dir: Path, variant: str, metrics: dict[str, Any], verdict: dict[str, Any], manifest: dict[str, Any]
) -> dict[str, str]:
    """The tags of `IDENTITY_TAGS` a version of `variant` gets: sha256, precision, targets, recipe name,
    verdict, and GPU architecture, GPU and TensorRT version where an engine was built."""
    art = metrics["variants"][variant]
    rows = [r for r in verdict.get("gates", []) if r["variant"] == variant and r["status"] != "skipped"]
    targets = list(dict.fromkeys(r["target"] for r in rows)) or [
        t for t, s in verdict["targets"].items() if s["status"] == "ran"
    ]
    tags = {
        tag.VARIANT: variant,
        tag.SHA256: art["sha256"],
        tag.PRECISION: art["precision"],
        tag.TARGET: ",".join(targets),
        tag.RECIPE: manifest["recipe"],
        tag.VERDICT: verdict["variants"][variant]["status"],
        tag.FORMAT: "onnx",
    }
    engine = art.get("engine")
    if engine:
        sidecar_path = run_dir / Path(engine["path"]).with_suffix(".json")
        sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
        capability = sidecar.get("compute_capability") or engine.get("compute_capability")
        if capability:
            tags[tag.GPU_SM] = "sm" + str(capability).replace(".", "")
        if sidecar.get("gpu"):
            tags[tag.GPU] = sidecar["gpu"]
        trt = sidecar.get("tensorrt") or manifest.get("versions", {}).get("tensorrt")
        if trt:
            tags[tag.TENSORRT] = str(trt)
    return tags


def identity_of(tags: dict[str, str]) -> tuple[str | None, ...]:
    """The `IDENTITY_TAGS` values of a version's tags: equal for versions that are the same model."""
    return tuple(tags.get(k) for k in IDENTITY_TAGS)


def already_registered(run_dir: Path, tracking_uri: str) -> Registration | None:
    """What `publish(run_dir, tracking_uri, reuse=True)` would return without logging anything, when a local
    sqlite store already holds every passing variant of the finished run as the same model with the run's
    aliases there or later (a rerun with nothing changed); else None, also when this cannot be read here
    (another kind of store, MLflow workspaces, a schema not known): `publish` then decides through MLflow.

    Reads the store's file directly, read-only, without importing MLflow: MLflow's import and the opening of
    its store are most of a cached rerun's time. The decision is `publish`'s own (`registered_copies`)."""
    db = sqlite_file(tracking_uri)
    workspaces = os.environ.get("MLFLOW_WORKSPACE") or os.environ.get("MLFLOW_ENABLE_WORKSPACES")
    if db is None or not db.is_file() or workspaces:
        return None
    files = check_finished_run(run_dir)
    try:
        if sqlite_schema(db) not in SQLITE_SCHEMAS:
            return None
        return registered_copies(run_dir, files, tracking_uri, lambda name, _shas: _sqlite_view(db, name))[1]
    except sqlite3.Error:
        return None


def registered_copies(
    run_dir: Path,
    files: dict[str, dict[str, Any]],
    tracking_uri: str,
    view: Callable[[str, set[str]], tuple[dict[int, dict[str, str]], dict[str, int]]],
) -> tuple[dict[str, int], Registration | None]:
    """Per passing variant of the run, the newest live version that is the same model (`same_models`), from
    `view(model_name, sha256s)`: the store's versions (number: tags) and aliases. Second, `publish`'s result
    without logging anything when that covers every passing variant and no alias would move (`aliases_to_move`);
    else None."""
    recipe, metrics, verdict, manifest = files["recipe"], files["metrics"], files["verdict"], files["manifest"]
    model_name, alias = model_and_alias(recipe)
    passed = [v for v, s in verdict["variants"].items() if s["status"] == "passed"]
    if not passed:
        return {}, None
    wanted = {v: identity_tags(run_dir, v, metrics, verdict, manifest) for v in passed}
    versions, aliases = view(model_name, {t[tag.SHA256] for t in wanted.values()})
    same = same_models(wanted, versions)
    if len(same) < len(passed) or aliases_to_move(alias_targets(same, passed, alias), aliases):
        return same, None
    return same, reused_record(tracking_uri, model_name, alias, same)


def same_models(wanted: dict[str, dict[str, str]], versions: dict[int, dict[str, str]]) -> dict[str, int]:
    """Per variant, the newest of the live `versions` (number: tags) with the identity tags in `wanted`
    (variant: tags); variants with none are left out."""
    out: dict[str, int] = {}
    for variant, tags in wanted.items():
        same = [n for n, have in versions.items() if identity_of(have) == identity_of(tags)]
        if same:
            out[variant] = max(same)
    return out


def alias_targets(numbers: dict[str, int], passed: list[str], alias: str) -> dict[str, int]:
    """Where a registration points its aliases: `alias` at the first passing variant's version and
    `alias-<variant>` at each variant's (`numbers`: variant: version)."""
    return {alias: numbers[passed[0]], **{tag.variant_alias(alias, v): numbers[v] for v in passed}}


def aliases_to_move(targets: dict[str, int], current: dict[str, int]) -> dict[str, int]:
    """The aliases of `targets` (alias: version, one registration's) to set so that all of them point at this
    registration's versions, given where the model's aliases point now (`current`). None moves when one of them
    already points at a version newer than any of this registration's (a later registration owns them: a retry
    that comes late must not move them back), so the aliases move together and end on one registration's
    versions, never mixed."""
    if max((current.get(a, 0) for a in targets), default=0) > max(targets.values(), default=0):
        return {}
    return {a: n for a, n in targets.items() if current.get(a) != n}


def reused_record(tracking_uri: str, model_name: str, alias: str, found: dict[str, int]) -> Registration:
    """`publish`'s result when nothing was logged: every passing variant was registered already."""
    return Registration(tracking_uri, model_name, alias, versions={}, already=found)


def model_and_alias(recipe: dict[str, Any]) -> tuple[str, str]:
    """The registered model a run's recipe (recipe.json) registers into, and the alias it gives."""
    reg = recipe.get("registry", {})
    return reg.get("model_name") or recipe["name"], reg.get("alias") or tag.CANDIDATE


def client_view(client: Any, model_name: str, shas: set[str]) -> tuple[dict[int, dict[str, str]], dict[str, int]]:
    """The live versions of `model_name` with one of the sha256 tags `shas` (number: tags), and the model's
    aliases (alias: version), through MLflow."""
    versions: dict[int, dict[str, str]] = {}
    for sha in sorted(shas):
        for mv in client.search_model_versions(
            f"name = {quoted(model_name, 'registry.model_name')} AND tags.{tag.SHA256} = {quoted(sha, tag.SHA256)}"
        ):
            if mv.status == "READY":
                versions[int(mv.version)] = dict(mv.tags)
    if not versions:
        return versions, {}
    return versions, {a: int(n) for a, n in client.get_registered_model(model_name).aliases.items()}


# The revisions of MLflow's SQL schema (alembic_version.version_num) whose tables `_sqlite_view` was tested on
# (tests/test_registry_reuse.py): a store at any other revision is read through MLflow's client.
SQLITE_SCHEMAS = {"dc11669786a5": "MLflow 3.17"}


def sqlite_schema(db: Path) -> str | None:
    """The revision of MLflow's schema in the sqlite file `db` (its `alembic_version` table), None without one."""
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'").fetchone():
            return None
        row = con.execute("SELECT version_num FROM alembic_version").fetchone()
    finally:
        con.close()
    return str(row[0]) if row else None


def _sqlite_view(db: Path, model_name: str) -> tuple[dict[int, dict[str, str]], dict[str, int]]:
    """`client_view` read from MLflow's sqlite file (read-only), for every live version of `model_name`:
    MLflow's SQL schema (`model_versions`, `model_version_tags`, `registered_model_aliases`; a deleted
    version keeps its row with stage `Deleted_Internal`; `workspace` columns since 3.x, ours `default`).
    A store without these tables holds nothing; another schema is a sqlite3.Error."""
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        columns = {row[1] for row in con.execute("PRAGMA table_info(model_versions)")}
        if not columns:
            return {}, {}
        # With workspace columns, both sides of the join and the model are in the default workspace.
        same_ws, in_ws = (
            ("AND t.workspace = v.workspace", "AND v.workspace = 'default'") if "workspace" in columns else ("", "")
        )
        keys = ", ".join("?" * len(IDENTITY_TAGS))
        rows = con.execute(
            "SELECT v.version, t.key, t.value FROM model_versions v JOIN model_version_tags t "
            f"ON t.name = v.name AND t.version = v.version {same_ws} "
            f"WHERE v.name = ? {in_ws} AND v.status = 'READY' AND v.current_stage != 'Deleted_Internal' "
            f"AND t.key IN ({keys})",
            (model_name, *IDENTITY_TAGS),
        ).fetchall()
        versions: dict[int, dict[str, str]] = {}
        for number, key, value in rows:
            versions.setdefault(int(number), {})[key] = value
        alias_rows = con.execute(
            f"SELECT alias, version FROM registered_model_aliases v WHERE v.name = ? {in_ws}", (model_name,)
        ).fetchall()
    finally:
        con.close()
    return versions, {a: int(n) for a, n in alias_rows}
