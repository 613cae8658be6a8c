"""Moving MLflow aliases safely: `promote` a gated, sha256-verified model version to an alias, `rollback` an
alias to where it pointed before, and `canary_manifest` describes what an alias points to for a deployment step."""

from __future__ import annotations

import difflib
import getpass
import json
import os
import random
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from optimize.errors import (
    GateFailedError,
    IntegrityError,
    OptimizeError,
    RecipeError,
    first_line,
)
from optimize.lazy import lazy
from optimize.onnx_files import onnx_files, onnx_sha256
from optimize.registry import tags as tag
from optimize.registry.connection import registry_failure, retrying_upsert, session, store_lock

mlflow_artifacts = lazy("mlflow.artifacts")
mlflow_exceptions = lazy("mlflow.exceptions")

# How alias moves are recorded (MLflow aliases are bare pointers: no history, no compare-and-swap).
#
# - Registered-model tag `alias_history.<alias>`: the alias's timeline, a JSON list of moves, newest last:
#   {"version": N, "from": M or null, "action": "promote" | "rollback", "at": UTC ISO, "id": ...}.
#   `rollback` reads only this tag. Its last entry must be the version the alias points to now, else the
#   alias was moved outside `optimize` and rollback refuses rather than guess.
# - Version tag `previous_<alias>_version`: written by `promote` only, on the promoted version: the version
#   the alias left at that version's latest promotion (the `from` of that history entry), or removed when
#   the alias was unset. It is what a reader of the version page needs; rollback never writes it and never
#   steers by it, since a version promoted twice or reached by a rollback would make it point the wrong way.
# - Version tag `audit`: JSON list, newest last, of who moved which alias from/to which version, when, from
#   which optimize/MLflow run and CI build. A rollback writes a line on both versions it touches.
#
# Rollback undoes the last promotion: it moves the alias to that promotion's `from`. It is idempotent: when
# the last entry is itself a rollback, a second rollback changes nothing and says "already rolled back"
# (a retried CI step must not go two versions back). To go further back, promote the version you want;
# a later rollback then returns to the version that promotion replaced.
#
# Concurrent moves: on a sqlite store a file lock beside the database serialises them (read the alias, tag,
# move, record), so racing promotions form one chain. A tracking server offers no lock: the alias ends on the
# last writer, each move merges its entry into the history and reads it back until it stays (the entry of the
# move that holds the alias last), and racers that read the alias before any of them moved it all record the
# same `from`.

MODEL_FILE = "model.onnx"  # the file of a version's artifacts whose sha256 is the version tag `sha256`
HISTORY_MAX_ENTRIES = 30
HISTORY_MAX_CHARS = 5000  # registered_model_tags.value is VARCHAR(5000) in MLflow's SQL stores
AUDIT_MAX_ENTRIES = 20
AUDIT_MAX_CHARS = 10_000  # model_version_tags.value is TEXT (MLflow validates up to 100 000)
MERGE_ROUNDS = 12
MERGE_PAUSE_S = (0.05, 0.3)
_ALIAS_NAME = re.compile(r"^[\w-]{1,255}$")  # MLflow: alphanumerics, underscores and dashes
_RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)


def promote(
    model: str, to_alias: str, *, version: int | None = None, from_alias: str | None = None, tracking_uri: str
) -> dict[str, Any]:
    """Move `to_alias` of `model` to `version` (or to the version `from_alias` points to) after checking that
    the version passed its gates (tag `verdict`) and that its downloaded `model.onnx` has the sha256 of tag
    `sha256`; record the move (history, `previous_<alias>_version`, audit). Nothing moves on any error.

    Returns {"model", "alias", "version", "previous", "sha256"} (+ "unchanged": True when the alias already
    pointed to the version).
    """
    _check_target_alias(to_alias)
    if (version is None) == (from_alias is None):
        raise RecipeError("promote: give exactly one of --version N and --from ALIAS")
    with session(tracking_uri) as client:
        rm = _registered_model(client, model, tracking_uri)
        if from_alias is not None:
            number = _aliases(rm).get(from_alias)
            if number is None:
                raise RecipeError(f"--from {from_alias}: {model} has no alias {from_alias!r}; {_alias_list(rm)}")
            context = f"--from {from_alias}"
        else:
            number = int(version)  # type: ignore[arg-type]
            context = f"--version {number}"
        mv = _model_version(client, rm, number, context)
        sha256 = _verify(client, model, mv, tracking_uri)
        with store_lock(tracking_uri, "registry alias moves") as locked:
            before = _aliases(client.get_registered_model(model)).get(to_alias)
            done = {"model": model, "alias": to_alias, "version": number, "previous": before, "sha256": sha256}
            if before == number:
                return {**done, "unchanged": True}
            previous_tag = tag.previous_version(to_alias)
            if before is not None:
                retrying_upsert(client.set_model_version_tag, model, str(number), previous_tag, str(before))
            elif previous_tag in mv.tags:  # left from an earlier promotion: it would name a wrong predecessor
                client.delete_model_version_tag(model, str(number), previous_tag)
            retrying_upsert(client.set_registered_model_alias, model, to_alias, str(number))
            _record_history(client, model, to_alias, _history_entry("promote", number, before), locked)
            _record_audit(client, model, number, _audit_entry("promote", to_alias, before, number, mv.tags), locked)
        return done


def rollback(model: str, alias: str, *, tracking_uri: str) -> dict[str, Any]:
    """Move `alias` back to the version its last promotion replaced, verified as `promote` verifies.

    Idempotent: when the alias's last move was a rollback, nothing moves and the result has
    "already_rolled_back": True and "rolled_back_from". Returns {"model", "alias", "version" (now),
    "previous" (before this call), "sha256"}.
    """
    with session(tracking_uri) as client:
        _registered_model(client, model, tracking_uri)
        with store_lock(tracking_uri, "registry alias moves") as locked:
            rm = client.get_registered_model(model)
            current = _aliases(rm).get(alias)
            if current is None:
                raise RecipeError(f"rollback: {model} has no alias {alias!r}, nothing to roll back; {_alias_list(rm)}")
            history = _json_list(rm.tags.get(tag.alias_history(alias)))
            fix = f"move it with `optimize promote {model} --to {alias} --version N`"
            if not history:
                raise RecipeError(
                    f"rollback: {model}@{alias} (version {current}) has no move recorded by `optimize promote` "
                    f"(registered-model tag {tag.alias_history(alias)}), nothing to roll back to; {fix}"
                )
            last = history[-1]
            if last.get("version") != current:
                raise RecipeError(
                    f"rollback: {model}@{alias} is at version {current} but its last recorded move was to version "
                    f"{last.get('version')}: it was moved outside `optimize promote`; {fix}"
                )
            if last.get("action") == "rollback":
                sha256 = _verify(client, model, _model_version(client, rm, current, "rollback"), tracking_uri)
                return {
                    "model": model,
                    "alias": alias,
                    "version": current,
                    "previous": current,
                    "sha256": sha256,
                    "already_rolled_back": True,
                    "rolled_back_from": last.get("from"),
                }
            target = last.get("from")
            if target is None:
                raise RecipeError(
                    f"rollback: nothing to roll back to: version {current} was the first version promoted to "
                    f"{model}@{alias}; {fix}"
                )
            target_mv = _model_version(client, rm, target, f"rollback of {model}@{alias} to version {target}")
            sha256 = _verify(client, model, target_mv, tracking_uri)
            current_mv = client.get_model_version(model, str(current))
            retrying_upsert(client.set_registered_model_alias, model, alias, str(target))
            _record_history(client, model, alias, _history_entry("rollback", target, current), locked)
            _record_audit(
                client, model, target, _audit_entry("rollback", alias, current, target, target_mv.tags), locked
            )
            _record_audit(
                client, model, current, _audit_entry("rolled-back", alias, current, target, current_mv.tags), locked
            )
        return {"model": model, "alias": alias, "version": target, "previous": current, "sha256": sha256}


def canary_manifest(model: str, alias: str = tag.CANARY, *, tracking_uri: str) -> dict[str, Any]:
    """What a deployment step needs about the version `alias` points to, as a JSON-able dict: URIs, version,
    sha256, format, precision, targets, GPU architecture and TensorRT version (null when the version has no
    such tags), recipe, gate rows (from the version's MLflow run's verdict.json), `previous_version` (where the
    alias pointed before, from its history; null when unknown) and `rolled_back` (it got here by a rollback).
    Refuses a version whose gates did not pass (exit 1)."""
    with session(tracking_uri) as client:
        rm = _registered_model(client, model, tracking_uri)
        number = _aliases(rm).get(alias)
        if number is None:
            raise RecipeError(f"canary-manifest: {model} has no alias {alias!r}; {_alias_list(rm)}")
        mv = client.get_model_version(model, str(number))
        tags = mv.tags
        if tags.get(tag.VERDICT) != "passed":
            raise GateFailedError(
                f"canary-manifest: {model}@{alias} is version {number}, whose gate verdict is "
                f"{tags.get(tag.VERDICT)!r} (tag verdict), not 'passed': not deployable"
            )
        history = _json_list(rm.tags.get(tag.alias_history(alias)))
        # Only a history that ends at this version knows what came before (an alias moved by hand has none).
        last = history[-1] if history and history[-1].get("version") == number else None
        variant = tags.get(tag.VARIANT) or _variant_of(client, mv, tracking_uri)
        return {
            "model": model,
            "alias": alias,
            "version": number,
            "model_uri": f"models:/{model}@{alias}",
            "version_uri": f"models:/{model}/{number}",
            "source": mv.source,
            "file": MODEL_FILE,
            "sha256": tags.get(tag.SHA256),
            "format": tags.get(tag.FORMAT),
            "precision": tags.get(tag.PRECISION),
            "variant": variant,
            "targets": [t for t in (tags.get(tag.TARGET) or "").split(",") if t],
            "gpu_sm": tags.get(tag.GPU_SM),
            "tensorrt": tags.get(tag.TENSORRT),
            "recipe": {"name": tags.get(tag.RECIPE), "sha256": tags.get(tag.RECIPE_SHA256)},
            "optimize_run_id": tags.get(tag.OPTIMIZE_RUN_ID),
            "mlflow_run_id": tags.get(tag.MLFLOW_RUN_ID),
            "verdict": "passed",
            "gates": _gate_rows(client, tags.get(tag.MLFLOW_RUN_ID), variant),
            "previous_version": last.get("from") if last else None,
            "rolled_back": bool(last and last.get("action") == "rollback"),
        }


# --- checks ------------------------------------------------------------------------------------------


def _check_target_alias(alias: str) -> None:
    if _RESERVED_ALIAS.match(alias):
        meaning = "the newest version" if alias.lower() == "latest" else f"version {alias[1:]}"
        raise RecipeError(
            f"--to {alias}: {alias!r} is reserved by MLflow (it always means {meaning}); "
            "choose another alias, e.g. canary or production"
        )
    if not _ALIAS_NAME.match(alias):
        raise RecipeError(
            f"--to {alias!r}: an MLflow alias has 1 to 255 letters, digits, underscores (_) and dashes (-)"
        )


def _verify(client: Any, model: str, mv: Any, tracking_uri: str) -> str:
    """Refuse a version whose gates did not pass (exit 1) or whose downloaded `model.onnx` is not the file
    that was gated (exit 6); return its sha256."""
    number, tags = int(mv.version), mv.tags
    if tags.get(tag.VERDICT) != "passed":
        raise GateFailedError(
            f"{model} version {number}: gate verdict is {tags.get(tag.VERDICT)!r} (tag verdict), not 'passed'; "
            "only a version that passed its gates can take an alias. No alias moved"
        )
    expected = tags.get(tag.SHA256)
    if not expected:
        raise IntegrityError(
            f"{model} version {number} has no tag sha256: its {MODEL_FILE} cannot be checked. No alias moved"
        )
    uri = client.get_model_version_download_uri(model, str(number)).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="optimize-verify-") as tmp:
        try:
            local = mlflow_artifacts.download_artifacts(
                artifact_uri=f"{uri}/{MODEL_FILE}", dst_path=tmp, tracking_uri=tracking_uri
            )
            for data in onnx_files(Path(local), unreadable_ok=True)[1:]:  # model.onnx.data: part of the identity
                mlflow_artifacts.download_artifacts(
                    artifact_uri=f"{uri}/{data.name}", dst_path=tmp, tracking_uri=tracking_uri
                )
        except Exception as e:
            if _registry_failure(e):
                raise
            raise IntegrityError(
                f"{model} version {number}: cannot read {MODEL_FILE} from {uri} ({first_line(e)}). No alias moved"
            ) from None
        actual = onnx_sha256(Path(local))
    if actual != expected:
        raise IntegrityError(
            f"{model} version {number}: {MODEL_FILE} downloaded from {uri} has sha256 {actual[:16]}…, the gated "
            f"file had {expected[:16]}… (tag sha256): the stored artifact changed. No alias moved"
        )
    return expected


def _registered_model(client: Any, model: str, tracking_uri: str) -> Any:
    try:
        return client.get_registered_model(model)
    except mlflow_exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    names = _model_names(client)
    near = [n for n in names if n.lower() == model.lower()]
    near += [n for n in difflib.get_close_matches(model, names, n=3, cutoff=0.6) if n not in near]
    if near:
        hint = f"did you mean {', '.join(near)}?"
    elif names:
        hint = f"registered: {', '.join(names[:10])}" + (" …" if len(names) > 10 else "")
    else:
        hint = "it has no registered models"
    raise RecipeError(f"registry: no registered model {model!r} in {tracking_uri}; {hint}")


def _model_names(client: Any, max_pages: int = 5) -> list[str]:
    names: list[str] = []
    token = None
    for _ in range(max_pages):
        page = client.search_registered_models(max_results=1000, page_token=token)
        names += [m.name for m in page]
        token = page.token
        if not token:
            break
    return sorted(names)


def _model_version(client: Any, rm: Any, number: int, context: str) -> Any:
    try:
        return client.get_model_version(rm.name, str(number))
    except mlflow_exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    newest = max((int(v.version) for v in rm.latest_versions or []), default=None)
    known = f"its newest is version {newest}" if newest is not None else "it has no versions"
    raise RecipeError(f"{context}: {rm.name} has no version {number}; {known}")


def _aliases(rm: Any) -> dict[str, int]:
    # int over sqlite, str over REST
    return {a: int(v) for a, v in (rm.aliases or {}).items()}


def _alias_list(rm: Any) -> str:
    aliases = _aliases(rm)
    if not aliases:
        return "it has no aliases"
    return "its aliases: " + ", ".join(f"{a} (version {v})" for a, v in sorted(aliases.items()))


# --- records -----------------------------------------------------------------------------------------


def _history_entry(action: str, version: int, before: int | None) -> dict[str, Any]:
    return {"version": version, "from": before, "action": action, "at": _now(), "id": secrets.token_hex(6)}


def _audit_entry(action: str, alias: str, before: int | None, after: int, tags: dict[str, str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"at": _now(), "by": _user(), "action": action, "alias": alias}
    entry.update({"from": before, "to": after})
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        entry["mlflow_user"] = os.environ["MLFLOW_TRACKING_USERNAME"]
    for name in (tag.OPTIMIZE_RUN_ID, tag.MLFLOW_RUN_ID):
        if tags.get(name):
            entry[name] = tags[name]
    build = build_url()
    if build:
        entry["build_url"] = build
    entry["id"] = secrets.token_hex(6)
    return entry


def build_url(env: dict[str, str] | None = None) -> str | None:
    """The CI build this process runs in, when the environment says: Jenkins `BUILD_URL`, GitHub Actions
    `GITHUB_SERVER_URL/GITHUB_REPOSITORY/actions/runs/GITHUB_RUN_ID`, GitLab `CI_JOB_URL`."""
    env = os.environ if env is None else env
    if env.get("BUILD_URL"):
        return env["BUILD_URL"]
    github = [env.get(k) for k in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID")]
    if all(github):
        return f"{github[0]}/{github[1]}/actions/runs/{github[2]}"
    return env.get("CI_JOB_URL") or None


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no USER/LOGNAME and no passwd entry (some containers)
        return os.environ.get("USER") or "unknown"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _record_history(client: Any, model: str, alias: str, entry: dict[str, Any], locked: bool) -> None:
    """Add `entry` to the alias's history so that the history ends at the version the alias points to."""
    key = tag.alias_history(alias)

    def read() -> tuple[list[dict[str, Any]], int | None]:
        rm = client.get_registered_model(model)
        return _json_list(rm.tags.get(key)), _aliases(rm).get(alias)

    def place(history: list[dict[str, Any]], live: int | None) -> list[dict[str, Any]]:
        others = [e for e in history if e.get("id") != entry["id"]]
        if len(others) < len(history) and (live != entry["version"] or history[-1].get("version") == live):
            # Recorded, and the history ends where the alias is (or ending it there is the live move's job):
            # a move that lost the alias never reorders, so two racers cannot keep swapping places.
            return _bounded(history, HISTORY_MAX_ENTRIES, HISTORY_MAX_CHARS)
        if live != entry["version"] and others and others[-1].get("version") == live:
            placed = [*others[:-1], entry, others[-1]]  # a concurrent move set the alias after ours: it stays last
        else:
            placed = [*others, entry]
        return _bounded(placed, HISTORY_MAX_ENTRIES, HISTORY_MAX_CHARS)

    def write(value: str) -> None:
        retrying_upsert(client.set_registered_model_tag, model, key, value)

    _merge_tag(read, write, place, locked, key)


def _record_audit(client: Any, model: str, version: int, entry: dict[str, Any], locked: bool) -> None:
    def read() -> tuple[list[dict[str, Any]], None]:
        value = client.get_model_version(model, str(version)).tags.get(tag.AUDIT)
        entries = _json_list(value)
        if value and not entries:  # a hand-written tag: keep its text as the oldest line
            entries = [{"note": value[:1000]}]
        return entries, None

    def place(entries: list[dict[str, Any]], _: None) -> list[dict[str, Any]]:
        if any(e.get("id") == entry["id"] for e in entries):
            return entries
        return _bounded([*entries, entry], AUDIT_MAX_ENTRIES, AUDIT_MAX_CHARS)

    def write(value: str) -> None:
        retrying_upsert(client.set_model_version_tag, model, str(version), tag.AUDIT, value)

    _merge_tag(read, write, place, locked, f"{tag.AUDIT} of version {version}")


def _merge_tag(
    read: Callable[[], tuple[list[dict[str, Any]], Any]],
    write: Callable[[str], None],
    place: Callable[[list[dict[str, Any]], Any], list[dict[str, Any]]],
    locked: bool,
    what: str,
) -> None:
    """Read a JSON-list tag, place our entry, write it. MLflow tags have no compare-and-swap: without the store
    lock, a concurrent writer that read before our write can overwrite it, so we read again after random pauses
    until two reads in a row show the entry placed (a write older than both pauses could still undo it)."""
    confirmed = 0
    for _ in range(MERGE_ROUNDS):
        current, context = read()
        wanted = place(current, context)
        if wanted == current:
            confirmed += 1
            if locked or confirmed == 2:
                return
        else:
            confirmed = 0
            write(json.dumps(wanted, separators=(",", ":")))
            if locked:
                return
        time.sleep(random.uniform(*MERGE_PAUSE_S))
    raise OptimizeError(
        f"registry: the alias moved, but tag {what} did not settle after {MERGE_ROUNDS} tries (concurrent alias "
        "moves); check it before a rollback"
    )


def _bounded(entries: list[dict[str, Any]], max_entries: int, max_chars: int) -> list[dict[str, Any]]:
    """The newest entries that fit in `max_entries` and `max_chars` of JSON (always the newest one)."""
    kept = entries[-max_entries:]
    while len(kept) > 1 and len(json.dumps(kept, separators=(",", ":"))) > max_chars:
        kept = kept[1:]
    return kept


def _json_list(value: str | None) -> list[dict[str, Any]]:
    try:
        data = json.loads(value or "[]")
    except ValueError:
        return []
    return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []


# --- manifest helpers --------------------------------------------------------------------------------


def _variant_of(client: Any, mv: Any, tracking_uri: str) -> str | None:
    """The recipe variant a version was built from: `optimize.json` among the version's artifacts."""
    uri = client.get_model_version_download_uri(mv.name, str(mv.version)).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="optimize-manifest-") as tmp:
        try:
            local = mlflow_artifacts.download_artifacts(
                artifact_uri=f"{uri}/optimize.json", dst_path=tmp, tracking_uri=tracking_uri
            )
            return json.loads(Path(local).read_text()).get("variant")
        except Exception as e:
            if _registry_failure(e):
                raise
            return None


def _gate_rows(client: Any, run_id: str | None, variant: str | None) -> list[dict[str, Any]]:
    """This variant's rows of verdict.json in the version's MLflow run ([] when the run has none)."""
    if not run_id or not variant:
        return []
    with tempfile.TemporaryDirectory(prefix="optimize-manifest-") as tmp:
        try:
            verdict = json.loads(Path(client.download_artifacts(run_id, "verdict.json", tmp)).read_text())
        except Exception as e:
            if _registry_failure(e):
                raise
            return []
    rows = []
    for row in verdict.get("gates", []):
        if row.get("variant") != variant:
            continue
        out = {k: row.get(k) for k in ("check", "target", "value")}
        out.update(baseline=row.get("baseline_value"), status=row.get("status"))
        if row.get("reason"):
            out["reason"] = row["reason"]
        rows.append(out)
    return rows


# --- the registry connection ---------------------------------------------------------------------------


def _registry_failure(e: BaseException) -> bool:
    """Refused credentials or a lost registry: let `session` report it (exit 7 / 5)."""
    return registry_failure(e) is not None
