"""MLflow at the registry boundary: one MLflow run per `optimize run` (params, metrics, report and
manifest), and every variant that passed its gates registered once as a model version (from a
LoggedModel, so engines can follow later) with its evidence in tags and description, and an alias.
Publishing is idempotent on the optimize run id and bounded in time, so a registration that failed
(registry down, exit 5) is retried from the run directory by `optimize register RUN_DIR`."""

from __future__ import annotations

import functools
import json
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from optimize.errors import OptimizeError, RecipeError, first_line
from optimize.files import display_path
from optimize.lazy import lazy
from optimize.registry import tags as tag
from optimize.registry.connection import (
    UPSERT_PAUSE_S,
    as_registry_error,
    bounded_http,
    check_reachable,
    default_artifact_location,
    process_tracking_uri,
    quoted,
    registry_timeout_s,
    resolve_tracking_uri,
    retrying_upsert,
    store_lock,
)
from optimize.registry.description import PLOTS_DIR, describe, run_plots, served
from optimize.registry.record import (
    Registration,
    check_finished_run,
    failure_record,
    retry_command,
    success_record,
    update_manifest,
)
from optimize.registry.reuse import (
    alias_targets,
    aliases_to_move,
    already_registered,
    client_view,
    identity_of,
    identity_tags,
    model_and_alias,
    registered_copies,
)

mlflow = lazy("mlflow")
mlflow_entities = lazy("mlflow.entities")
mlflow_exceptions = lazy("mlflow.exceptions")

# The run's evidence logged with its MLflow run (what `optimize compare --vs models:/...` reads back), and the
# report's plots, under plots/ (linked from each version's description).
RUN_ARTIFACTS = (
    "report.md",
    "report.html",
    "metrics.json",
    "verdict.json",
    "manifest.json",
    "recipe.json",
    "recipe.yaml",
    "recipe.lock.yaml",
)


def register_run(run_dir: Path, tracking_uri: str | None) -> Registration:
    """`optimize register RUN_DIR`: publish a finished run (idempotently, see `publish`) and record the
    outcome as the manifest's `registry` entry and status.

    The store is `tracking_uri`, else MLFLOW_TRACKING_URI, else the run's recipe, else ./mlflow.db.
    """
    run_dir = Path(run_dir)
    recipe = check_finished_run(run_dir)["recipe"]
    uri = resolve_tracking_uri(tracking_uri, recipe.get("registry", {}).get("tracking_uri"))
    try:
        reg = publish(run_dir, uri)
    except OptimizeError as e:
        if not isinstance(e, RecipeError):
            update_manifest(run_dir, failure_record(uri, e), status="failed", error=first_line(e, 2000))
        raise
    update_manifest(run_dir, success_record(reg), status="done", error=None)
    return reg


def publish(run_dir: Path, tracking_uri: str, timeout_s: float | None = None, *, reuse: bool = False) -> Registration:
    """Log the finished run in `run_dir` to MLflow and register the variants that passed, once.

    With `reuse` (the pipeline's registration), a passing variant the store already holds as the same model
    (`tags.IDENTITY`: same bytes, targets and verdict) is not registered again: its newest such version is
    reported under "already" and gets the aliases. When that holds for every passing variant and the aliases
    already point there (or later), nothing is logged at all (`run_id` None). Without it (`optimize register`),
    every passing variant of a run gets its own version.

    Reads only files of the run directory, so a failed registration can be retried from it. Idempotent on
    the optimize run id (manifest `run_id`): the MLflow run, LoggedModels and versions of an earlier attempt
    for the same run are found by tag and reused, never made twice. A registered model this call created is
    deleted again if no version could be created in it. Each request waits at most `timeout_s` (default:
    `registry_timeout_s` of the run's recipe) with no retries; a registry that cannot be reached or does not
    answer is exit 5, and every registry error ends with the command that retries.

    Returns the `Registration`: its `versions` ({variant: version}) made by this call, `already` ({variant:
    version}) found from an earlier attempt or, with `reuse`, the same model registered before.
    """
    run_dir = Path(run_dir)
    files = check_finished_run(run_dir)
    reg = files["recipe"].get("registry", {})
    budget = timeout_s if timeout_s is not None else registry_timeout_s(reg.get("timeout_s"))
    try:
        check_reachable(tracking_uri, budget)
        with bounded_http(budget):
            return _publish(run_dir, tracking_uri, files, reuse, budget)
    except Exception as e:
        error = as_registry_error(e, tracking_uri, budget)
        if error is None or isinstance(error, RecipeError):
            raise
        retry = retry_command(run_dir, tracking_uri, reg.get("tracking_uri"))
        reported = type(error)(f"{first_line(error)}; the run is kept in {display_path(run_dir)}; retry: {retry}")
        reported.retry = retry  # type: ignore[attr-defined]  # for the manifest, see `failure_record`
        raise reported from (None if error is e else e)


def _publish(
    run_dir: Path, tracking_uri: str, files: dict[str, dict[str, Any]], reuse: bool, wait_s: float
) -> Registration:
    recipe, manifest = files["recipe"], files["manifest"]
    model_name, alias = model_and_alias(recipe)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    same: dict[str, int] = {}
    if reuse:
        same, nothing_to_do = registered_copies(run_dir, files, tracking_uri, functools.partial(client_view, client))
        if nothing_to_do:
            return nothing_to_do
    experiment = recipe["registry"].get("experiment") or f"optimize/{recipe['name']}"
    experiment_id = _experiment_id(client, experiment, tracking_uri)
    run_id, plots = _log_run(client, run_dir, files, experiment_id)
    passed = [v for v, s in files["verdict"]["variants"].items() if s["status"] == "passed"]
    versions: dict[str, int] = {}
    already: dict[str, int] = {}
    created_model = bool(passed) and _create_registered_model(client, model_name, recipe.get("description"))
    try:
        # Check, create and move the aliases as one step: under the store's lock on sqlite; through a server
        # (no lock), create, then look again and keep the lowest of the copies made at once (`_converge`), and
        # take the other variants from the registration that made the kept copy, once it has finished.
        with store_lock(tracking_uri, "registration") as locked:
            view = functools.partial(client_view, client)
            if reuse and passed:  # again under the lock: a concurrent run may have registered the same model
                same = registered_copies(run_dir, files, tracking_uri, view)[0]
            for variant in passed:
                found = _find_version(client, model_name, manifest["run_id"], variant)
                if found is None:
                    found = same.get(variant)
                if found is None:
                    ids = (experiment_id, run_id, model_name)
                    found, new = _new_version(client, run_dir, files, ids, variant, plots, reuse=reuse, locked=locked)
                    if new:
                        versions[variant] = found
                        continue
                already[variant] = found
                if not locked and reuse and _waited_for_its_registration(client, model_name, found, run_id, wait_s):
                    same = registered_copies(run_dir, files, tracking_uri, view)[0]
            if passed:
                _move_aliases(client, model_name, alias_targets({**already, **versions}, passed, alias), locked)
    except BaseException:
        if created_model:
            _delete_if_empty(client, model_name)
        raise
    client.set_terminated(run_id, "FINISHED")
    return Registration(tracking_uri, model_name, alias, versions, already, run_id, experiment_id)


def _new_version(
    client: Any,
    run_dir: Path,
    files: dict[str, dict[str, Any]],
    ids: tuple[str, str, str],
    variant: str,
    plots: list[str],
    *,
    reuse: bool,
    locked: bool,
) -> tuple[int, bool]:
    """Register `variant` as a new version (`ids`: experiment id, MLflow run id, model name) and keep it; through a
    server (not `locked`), a copy a concurrent registration made at the same time may be kept instead
    (`_converge`). Returns the version kept and whether it is the one made here."""
    experiment_id, run_id, model_name = ids
    metrics, verdict, manifest = files["metrics"], files["verdict"], files["manifest"]
    number, model_id = _register_variant(
        client, run_dir, experiment_id, run_id, model_name, variant, metrics, verdict, manifest, plots
    )
    if locked:
        return number, True
    identity = identity_tags(run_dir, variant, metrics, verdict, manifest) if reuse else None
    found = _converge(client, model_name, (number, model_id), identity, manifest["run_id"], variant)
    return found, found == number


def _log_run(client: Any, run_dir: Path, files: dict[str, dict[str, Any]], experiment_id: str) -> tuple[str, list[str]]:
    """Log the optimize run as one MLflow run (tags, the recipe as params, metrics.json as metrics, the run's
    files and plots as artifacts), finishing an earlier attempt's run where there is one; returns the MLflow run
    id and the plots' artifact paths."""
    recipe, metrics, verdict, manifest = files["recipe"], files["metrics"], files["verdict"], files["manifest"]
    optimize_run_id = manifest["run_id"]
    run_tags = {
        tag.RUN_ID: optimize_run_id,
        tag.RUN_RECIPE: recipe["name"],
        tag.RUN_RECIPE_SHA256: manifest["recipe_sha256"],
        tag.RUN_VERDICT: verdict["status"],
        tag.RUN_DIR: str(run_dir.resolve()),
        tag.RUN_OPTIMIZE_VERSION: manifest["versions"].get("optimize", ""),
    }
    commit = run_commit(manifest)
    if commit:
        run_tags[tag.GIT_COMMIT] = commit
    previous = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{tag.RUN_ID}` = {quoted(optimize_run_id, 'manifest.json: run_id')}",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if previous:  # an earlier, partial attempt for this run: finish it rather than start a second MLflow run
        run_id = previous[0].info.run_id
        client.log_batch(run_id, tags=[mlflow_entities.RunTag(k, v) for k, v in run_tags.items()])
        have_params, have_metrics = set(previous[0].data.params), set(previous[0].data.metrics)
    else:
        run_id = client.create_run(experiment_id, run_name=optimize_run_id, tags=run_tags).info.run_id
        have_params, have_metrics = set(), set()
    items = [(k, str(v)[:6000]) for k, v in _flatten("", recipe, {}).items() if k not in have_params]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=[mlflow_entities.Param(k, v) for k, v in items[i : i + 100]])
    flat_metrics = [m for m in _run_metrics(metrics) if m.key not in have_metrics]
    for i in range(0, len(flat_metrics), 500):
        client.log_batch(run_id, metrics=flat_metrics[i : i + 500])
    for name in RUN_ARTIFACTS:
        if (run_dir / name).exists():
            client.log_artifact(run_id, str(run_dir / name))
    # Logging a file again overwrites it at the same artifact path, so a retry adds nothing.
    plots = run_plots(run_dir)
    for png in plots:
        client.log_artifact(run_id, str(run_dir / png), artifact_path=PLOTS_DIR)
    return run_id, plots


def publish_new(run_dir: Path, tracking_uri: str) -> Registration:
    """The registration of `optimize run`: `publish(reuse=True)`, which registers no copy of a model the store
    holds, after asking the local sqlite file whether there is anything to do at all (`already_registered`)."""
    return already_registered(run_dir, tracking_uri) or publish(run_dir, tracking_uri, reuse=True)


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, list):
        out[prefix] = json.dumps(obj)
    else:
        out[prefix] = obj
    return out


def _metric_key(key: str) -> str:
    # MLflow metric names allow alphanumerics, _ - . / and spaces; shape keys use = and ,
    return key.replace("=", "").replace(",", "_")


def _run_metrics(metrics: dict[str, Any]) -> list[Any]:
    """Every number of metrics.json as an MLflow metric (one step per INT8 fallback trial)."""
    out = []
    now = int(time.time() * 1000)
    for variant, by_target in metrics["results"].items():
        for target, result in by_target.items():
            for k, v in _flatten(f"{variant}.{target}", result, {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.append(mlflow_entities.Metric(_metric_key(k), float(v), now, 0))
    for variant, fb in metrics.get("fallback", {}).items():
        for t in fb["trials"]:
            values = {**t["accuracy"], "excluded_count": t["excluded_count"], "passed": float(t["passed"])}
            if t.get("p50_speedup") is not None:
                values["p50_speedup"] = t["p50_speedup"]
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    out.append(
                        mlflow_entities.Metric(_metric_key(f"fallback.{variant}.{k}"), float(v), now, t["trial"])
                    )
    return out


def _experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """The experiment's id, created on first use (a concurrent creator's experiment is taken as ours)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri))
        except mlflow_exceptions.MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        raise RecipeError(
            f"registry.experiment: {name!r} is deleted in {tracking_uri}; restore it (mlflow experiments restore) "
            "or name another experiment"
        )
    return exp.experiment_id


def _create_registered_model(client: Any, name: str, description: str | None) -> bool:
    """Create the registered model; False when it already exists (made earlier or by a concurrent run)."""
    try:
        client.create_registered_model(name, description=description or None)
    except mlflow_exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return False
    return True


def _delete_if_empty(client: Any, name: str) -> None:
    """Delete a registered model that has no version (the one this call created before it failed)."""
    try:
        if not client.search_model_versions(f"name = {quoted(name, 'registry.model_name')}", max_results=1):
            client.delete_registered_model(name)
    except Exception:  # the registry went away: the retry fills the model; the original error is raised
        pass


def _find_version(client: Any, model_name: str, optimize_run_id: str, variant: str) -> int | None:
    """The version an earlier attempt registered for this run and variant (tags `optimize_run_id`, `variant`)."""
    found = client.search_model_versions(
        f"name = {quoted(model_name, 'registry.model_name')}"
        f" AND tags.{tag.OPTIMIZE_RUN_ID} = {quoted(optimize_run_id, 'manifest.json: run_id')}"
        f" AND tags.{tag.VARIANT} = {quoted(variant, 'precision.variants')}"
    )
    return min(int(v.version) for v in found) if found else None


ALIAS_ROUNDS = 3


def _move_aliases(client: Any, model_name: str, targets: dict[str, int], locked: bool) -> None:
    """Point the aliases of `targets` (alias: version) at this registration's versions, all or none
    (`aliases_to_move`). Under the store lock one pass is exact. Through a server (no lock, no compare-and-set)
    they are read back and set again while another registration's writes mixed them, a few rounds."""
    for _ in range(1 if locked else ALIAS_ROUNDS):
        current = {a: int(n) for a, n in client.get_registered_model(model_name).aliases.items()}
        moves = aliases_to_move(targets, current)
        if not moves:
            return
        for a, n in moves.items():
            # two registrations setting an alias's first value at once: the loser writes again
            retrying_upsert(client.set_registered_model_alias, model_name, a, str(n))
        if not locked:
            time.sleep(random.uniform(*UPSERT_PAUSE_S))


def _find_logged_model(client: Any, experiment_id: str, name: str, optimize_run_id: str) -> Any | None:
    """A LoggedModel an earlier attempt made for this run and variant, unless it failed."""
    found = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"name = {quoted(name, 'registry.model_name')}"
        f" AND tags.{tag.OPTIMIZE_RUN_ID} = {quoted(optimize_run_id, 'manifest.json: run_id')}",
    )
    usable = [
        m
        for m in found
        if m.status in (mlflow_entities.LoggedModelStatus.READY, mlflow_entities.LoggedModelStatus.PENDING)
    ]
    return usable[0] if usable else None


def _register_variant(
    client: Any,
    run_dir: Path,
    experiment_id: str,
    run_id: str,
    model_name: str,
    variant: str,
    metrics: dict[str, Any],
    verdict: dict[str, Any],
    manifest: dict[str, Any],
    plots: list[str],
) -> tuple[int, str]:
    """Register `variant` as a new version from its LoggedModel (one made by an earlier attempt, else a new one);
    returns the version's number and the LoggedModel's id (a ModelVersion read over REST has no model_id)."""
    tags = version_tags(run_dir, variant, metrics, verdict, manifest, run_id)
    name = f"{model_name}-{variant}"
    logged = _find_logged_model(client, experiment_id, name, manifest["run_id"])
    if logged is None:
        logged = client.create_logged_model(
            experiment_id, name=name, source_run_id=run_id, tags=tags, model_type="onnx"
        )
    if logged.status != mlflow_entities.LoggedModelStatus.READY:
        client.log_model_artifacts(logged.model_id, str(run_dir / "registry" / variant))
        client.finalize_logged_model(logged.model_id, "READY")
    with process_tracking_uri(client.tracking_uri):
        version = client.create_model_version(
            model_name,
            source=f"models:/{logged.model_id}",
            run_id=run_id,
            tags=tags,
            description=describe(
                variant,
                metrics,
                verdict,
                run_id=run_id,
                experiment_id=experiment_id,
                tracking_uri=client.tracking_uri,
                plots=plots,
                report_html=(run_dir / "report.html").is_file(),
            ),
            model_id=logged.model_id,
        )
    return int(version.version), logged.model_id


def _converge(
    client: Any,
    model_name: str,
    made: tuple[int, str],
    identity: dict[str, str] | None,
    optimize_run_id: str,
    variant: str,
) -> int:
    """After creating version `made` (number, LoggedModel id) without a lock: the lowest live version that is the
    same registration, the same model (`identity`, when copies are reused) or else the same optimize run and
    variant. When that is another version, `made` is a copy that a concurrent registration made at the same
    time: it is deleted (with its LoggedModel) and the other one returned. Version numbers grow with creation
    and each registration looks only after its own version exists, so every registration that made a copy
    sees the lowest, and all agree."""
    number, model_id = made
    if identity is None:
        lowest = _find_version(client, model_name, optimize_run_id, variant)
    else:
        live, _aliases = client_view(client, model_name, {identity[tag.SHA256]})
        lowest = min((n for n, tags in live.items() if identity_of(tags) == identity_of(identity)), default=None)
    if lowest is None or lowest >= number:
        return number
    client.delete_model_version(model_name, str(number))
    try:
        client.delete_logged_model(model_id)
    except Exception:  # the version is what counts; a LoggedModel left behind holds no version
        pass
    return lowest


IN_FLIGHT_S = 600  # a registration's MLflow run still RUNNING after this long is taken as abandoned


def _waited_for_its_registration(client: Any, model_name: str, version: int, own_run_id: str, wait_s: float) -> bool:
    """Through a server, before taking `version`, a copy of the same model, for one variant: whether another
    registration made it. When that one is still running (its MLflow run RUNNING, started within IN_FLIGHT_S),
    first wait up to `wait_s` for it to finish, so that the caller, looking again, takes the other variants from
    it too instead of making them a second time, and the aliases end on one run's versions."""
    source_run = client.get_model_version(model_name, str(version)).run_id
    if not source_run or source_run == own_run_id:
        return False
    deadline = time.monotonic() + wait_s
    while True:
        info = client.get_run(source_run).info
        recent = time.time() * 1000 - (info.start_time or 0) < IN_FLIGHT_S * 1000
        if info.status != "RUNNING" or not recent or time.monotonic() >= deadline:
            return True
        time.sleep(0.2)


def version_tags(
    run_dir: Path,
    variant: str,
    metrics: dict[str, Any],
    verdict: dict[str, Any],
    manifest: dict[str, Any],
    mlflow_run_id: str,
) -> dict[str, str]:
    """What a model version is found by (`search_model_versions("tags.precision = 'fp16'")`): its identity
    (`identity_tags`) and its provenance: recipe hash, git commit of the recipe's repository and the optimize
    and MLflow run ids."""
    tags = identity_tags(run_dir, variant, metrics, verdict, manifest)
    tags.update(serving_tags(metrics, variant))
    tags[tag.RECIPE_SHA256] = manifest["recipe_sha256"]
    tags[tag.OPTIMIZE_RUN_ID] = manifest["run_id"]
    tags[tag.MLFLOW_RUN_ID] = mlflow_run_id
    commit = run_commit(manifest)
    if commit:
        tags[tag.GIT_COMMIT] = commit
    return tags


def serving_tags(metrics: dict[str, Any], variant: str) -> dict[str, str]:
    """A load-tested version's serving numbers as tags (`tags.LOADTEST_*`); none when it was not load-tested."""
    found = served(metrics, variant)
    if found is None:
        return {}
    target, s = found
    values = {
        tag.LOADTEST_TARGET: target,
        tag.LOADTEST_MAX_RPS_AT_SLO: s.get("max_rps_at_slo"),
        tag.LOADTEST_RPS: s.get("rps"),
        tag.LOADTEST_P99_MS: s.get("p99_ms"),
        tag.LOADTEST_ERROR_RATE: s.get("error_rate"),
        tag.LOADTEST_SLO_P99_MS: (s.get("slo") or {}).get("p99_ms"),
        tag.LOADTEST_CPU_CORES: (s.get("capacity") or {}).get("cpu_cores"),
        tag.LOADTEST_RSS_PEAK_MB: (s.get("capacity") or {}).get("rss_peak_mb"),
    }
    return {k: v if isinstance(v, str) else f"{v:.6g}" for k, v in values.items() if v is not None}


def run_commit(manifest: dict[str, Any]) -> str | None:
    """The git commit a run was made from: the manifest's `git_commit`, else that of the recipe's checkout."""
    return manifest.get("git_commit") or (
        git_commit(Path(manifest["recipe_file"]).parent) if manifest.get("recipe_file") else None
    )


def git_commit(folder: Path) -> str | None:
    """HEAD of the git checkout `folder` is in, with `-dirty` when it has changes; None when it is not in
    one (or git is missing)."""
    if not shutil.which("git") or not Path(folder).is_dir():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = status.returncode != 0 or bool(status.stdout.strip())
    return head.stdout.strip() + ("-dirty" if dirty else "")
