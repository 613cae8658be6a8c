"""MLflow at the registry boundary: one MLflow run per `optimize run` (params, metrics, report and
manifest), and every variant that passed its gates registered once as a model version (from a
LoggedModel, so engines can follow later) with its evidence in tags and description, and an alias.
Publishing is idempotent on the optimize run id and bounded in time, so a registration that failed
(registry down, exit 5) is retried from the run directory by `optimize register RUN_DIR`."""

from __future__ import annotations

import functools
import json
import math
import os
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from optimize.errors import (
    NotAuthorisedError,
    OptimizeError,
    RecipeError,
    RegistryUnreachableError,
    StageError,
    exception_chain,
    first_line,
)
from optimize.results import delta_text

# Bound every MLflow HTTP call: with the defaults one call hangs for minutes against a stopped server.
DEFAULT_TIMEOUT_S = 30.0
TIMEOUT_ENV = "OPTIMIZE_REGISTRY_TIMEOUT_S"
REACH_TIMEOUT_S = 5

# What a finished run directory holds before anything can be registered from it.
RUN_FILES = ("manifest.json", "recipe.json", "metrics.json", "verdict.json")
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
PLOTS_DIR = "plots"


def resolve_tracking_uri(cli_uri: str | None, recipe_uri: str | None, cwd: Path | None = None) -> str:
    """--tracking-uri, then MLFLOW_TRACKING_URI, then the recipe's, then `sqlite:///<cwd>/mlflow.db`."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or recipe_uri
    if uri:
        return uri
    return f"sqlite:///{((cwd or Path.cwd()) / 'mlflow.db').resolve()}"


def registry_timeout_s(recipe_value: float | None = None) -> float:
    """How long registration waits for a registry that does not answer: OPTIMIZE_REGISTRY_TIMEOUT_S, else the
    recipe's `registry.timeout_s`, else 30 s (exit 2 when the variable is not a number of seconds > 0)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise RecipeError(f"{TIMEOUT_ENV}: {raw!r} is not a number of seconds > 0")
        return value
    return float(recipe_value) if recipe_value else DEFAULT_TIMEOUT_S


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a local sqlite store, pin artifacts to `mlartifacts/` beside the database file (not the cwd)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def check_reachable(tracking_uri: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Fail fast (exit 5) when the tracking store cannot be reached or does not answer within `timeout_s`."""
    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                if resp.status >= 500:
                    raise RegistryUnreachableError(f"registry: {url} answered HTTP {resp.status}")
        except urllib.error.HTTPError as e:
            if e.code >= 500:
                raise RegistryUnreachableError(f"registry: {url} answered HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                raise RegistryUnreachableError(
                    f"registry: {tracking_uri} did not answer within {timeout_s:g} s"
                    f" (registry.timeout_s or {TIMEOUT_ENV})"
                ) from None
            raise RegistryUnreachableError(f"registry: cannot reach {tracking_uri} ({reason})") from None
    elif tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise RegistryUnreachableError(f"registry: cannot write the sqlite store in {folder}")
    elif "://" not in tracking_uri and not tracking_uri.startswith(("databricks", "file:")):
        raise RecipeError(
            f"registry.tracking_uri: {tracking_uri!r} is not a tracking URI (sqlite:///path, http(s)://host, ...)"
        )


@contextmanager
def bounded_http(timeout_s: float) -> Iterator[None]:
    """Within the block, an MLflow HTTP request that gets no answer within `timeout_s` fails, and none is
    retried: a retried POST whose first answer was only late would register a second version. The two
    MLFLOW_HTTP_REQUEST_* variables are put back as they were afterwards."""
    with _environ(
        MLFLOW_HTTP_REQUEST_TIMEOUT=str(max(1, math.ceil(timeout_s))),  # MLflow reads it as an int
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
    ):
        yield


@contextmanager
def session(tracking_uri: str, timeout_s: float | None = None) -> Iterator[Any]:
    """An MlflowClient on `tracking_uri` for the block, as every registry command uses it: the store reachable
    (a sqlite file must exist: MLflow would create an empty one), each request bounded by the registry
    timeout with no retries, no progress bars (stderr carries one line, the error), and MLflow's failures
    mapped to our exit codes: refused credentials 7, a lost or silent registry 5. The environment is put
    back afterwards."""
    budget = timeout_s if timeout_s is not None else registry_timeout_s()
    check_reachable(tracking_uri, budget)
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
        if not db.is_file():
            raise RecipeError(
                f"registry: {db} does not exist, so it holds no registered model; "
                "pass --tracking-uri or set MLFLOW_TRACKING_URI to the store the model was registered in"
            )
    with bounded_http(budget), _environ(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        from mlflow import MlflowClient

        try:
            yield MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        except Exception as e:
            error = _as_registry_error(e, tracking_uri, budget)
            if error is None or error is e:
                raise
            raise error from None


STORE_LOCK_TIMEOUT_S = 120


@contextmanager
def store_lock(tracking_uri: str, what: str) -> Iterator[bool]:
    """Serialise a registry write that reads, then decides, then writes (a registration's check-create-alias
    step, a promotion's alias move) on a sqlite store, with a file lock beside the database: every writer of
    that file shares its folder. Yields whether a lock is held: other stores have no lock to take. Exit 5 when
    it stays taken for STORE_LOCK_TIMEOUT_S."""
    db = _sqlite_file(tracking_uri)
    if db is None:
        yield False
        return
    from optimize.files import file_lock

    with ExitStack() as stack:
        try:
            stack.enter_context(file_lock(db.with_name(f".{db.name}.aliases.lock"), STORE_LOCK_TIMEOUT_S, what))
        except TimeoutError as e:
            raise RegistryUnreachableError(
                f"registry: {e} (another registration, promotion or rollback holds it)"
            ) from None
        yield True


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_finished_run(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The run's recipe, manifest, metrics and verdict, once `run_dir` is shown to be a finished run: its
    gates ran and every passing variant has its `registry/<variant>/` folder (exit 2 naming what is missing)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RecipeError(f"{run_dir}: no such run directory; pass a run directory (runs/<recipe>/<run-id>)")
    loaded: dict[str, dict[str, Any]] = {}
    for name in RUN_FILES:
        path = run_dir / name
        if not path.is_file():
            raise RecipeError(
                f"{path}: missing, so {run_dir} is not a finished run (its gates never ran); "
                "finish it with `optimize run` before registering it"
            )
        try:
            loaded[name.removesuffix(".json")] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RecipeError(f"{path}: cannot be read ({first_line(e)})") from None
    if not loaded["manifest"].get("run_id"):
        raise RecipeError(f"{run_dir / 'manifest.json'}: run_id: missing; this is not a run directory of optimize")
    for variant, status in loaded["verdict"].get("variants", {}).items():
        if status.get("status") != "passed":
            continue
        model = run_dir / "registry" / variant / "model.onnx"
        if not model.is_file():
            raise RecipeError(f"{model}: missing; variant {variant} passed but its registry folder is incomplete")
        from optimize.onnx_files import onnx_files

        for data in onnx_files(model)[1:]:  # model.onnx.data, logged with the folder
            if not data.is_file():
                raise RecipeError(f"{data}: missing; variant {variant} passed but its registry folder is incomplete")
    return loaded


def retry_command(run_dir: Path, tracking_uri: str, recipe_uri: str | None) -> str:
    """The command that retries this registration from the run directory (with --tracking-uri only when the
    store does not follow from the environment and the recipe)."""
    from optimize.files import display_path

    same = tracking_uri == resolve_tracking_uri(None, recipe_uri)
    flag = "" if same else f"--tracking-uri {shlex.quote(tracking_uri)} "
    return f"optimize register {flag}{shlex.quote(display_path(run_dir))}"


def register_run(run_dir: Path, tracking_uri: str | None) -> dict[str, Any]:
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
            _update_manifest(run_dir, failure_record(uri, e), status="failed", error=first_line(e, 2000))
        raise
    _update_manifest(run_dir, success_record(reg), status="done", error=None)
    return reg


def success_record(reg: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `registry` entry after a registration: what `publish` returned, with `status:
    registered`, or `already registered` when the store held every passing variant already and nothing was
    logged (`run_id` None)."""
    return {"status": "registered" if reg.get("run_id") else "already registered", **reg}


def failure_record(tracking_uri: str, error: BaseException) -> dict[str, Any]:
    """The manifest's `registry` entry after a failed registration: where, why, and the command that retries."""
    retry = getattr(error, "retry", None)  # set by `publish` on the errors it reports
    return {"status": "failed", "tracking_uri": tracking_uri, "error": first_line(error, 2000), "retry": retry}


def _update_manifest(run_dir: Path, entry: dict[str, Any], status: str, error: str | None) -> None:
    from optimize.files import write_json

    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["registry"] = entry
    manifest["status"] = status
    if error is None:
        manifest.pop("error", None)
    else:
        manifest["error"] = error
    write_json(path, manifest)


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


def _quoted(value: str, what: str) -> str:
    """`value` as a quoted MLflow filter literal (its search grammar has no escape we can rely on)."""
    if "'" in value:
        raise RecipeError(f"{what}: {value!r} contains a single quote, which MLflow's search filters cannot hold")
    return f"'{value}'"


def publish(run_dir: Path, tracking_uri: str, timeout_s: float | None = None, *, reuse: bool = False) -> dict[str, Any]:
    """Log the finished run in `run_dir` to MLflow and register the variants that passed, once.

    With `reuse` (the pipeline's registration), a passing variant the store already holds as the same model
    (`IDENTITY_TAGS`: same bytes, targets and verdict) is not registered again: its newest such version is
    reported under "already" and gets the aliases. When that holds for every passing variant and the aliases
    already point there (or later), nothing is logged at all (`run_id` None). Without it (`optimize register`),
    every passing variant of a run gets its own version.

    Reads only files of the run directory, so a failed registration can be retried from it. Idempotent on
    the optimize run id (manifest `run_id`): the MLflow run, LoggedModels and versions of an earlier attempt
    for the same run are found by tag and reused, never made twice. A registered model this call created is
    deleted again if no version could be created in it. Each request waits at most `timeout_s` (default:
    `registry_timeout_s` of the run's recipe) with no retries; a registry that cannot be reached or does not
    answer is exit 5, and every registry error ends with the command that retries.

    Returns {"tracking_uri", "experiment_id", "run_id", "model_name", "alias", "versions": {variant: version}
    made by this call, "already": {variant: version} found from an earlier attempt}.
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
        error = _as_registry_error(e, tracking_uri, budget)
        if error is None or isinstance(error, RecipeError):
            raise
        from optimize.files import display_path

        retry = retry_command(run_dir, tracking_uri, reg.get("tracking_uri"))
        reported = type(error)(f"{first_line(error)}; the run is kept in {display_path(run_dir)}; retry: {retry}")
        reported.retry = retry  # type: ignore[attr-defined]  # for the manifest, see `failure_record`
        raise reported from (None if error is e else e)


def _as_registry_error(e: Exception, tracking_uri: str, timeout_s: float) -> OptimizeError | None:
    """The OptimizeError a failure at the registry is reported as (None: not a registry failure, re-raise),
    decided by the types and HTTP statuses in the exception's chain (`registry_failure`), never by its text."""
    if isinstance(e, OptimizeError):
        return e
    kind = registry_failure(e)
    if kind == "timeout":
        url = _request_url(e)
        path = f" to {urllib.parse.urlsplit(url).path}" if url else ""
        return RegistryUnreachableError(
            f"registry: {tracking_uri} did not answer a request{path} within {timeout_s:g} s"
            f" (registry.timeout_s or {TIMEOUT_ENV})"
        )
    if kind == "unreachable":
        return RegistryUnreachableError(f"registry: lost {tracking_uri} ({first_line(e)})")
    if kind == "refused":
        status = http_status(e)
        fix = (
            "set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
            if status == 401
            else "the user in MLFLOW_TRACKING_USERNAME lacks the permission for this change"
        )
        said = first_line(e, 200)
        return NotAuthorisedError(f"registry: {tracking_uri} refused the request (HTTP {status}: {said}); {fix}")
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        return StageError(f"registry: {tracking_uri}: {first_line(e)}")
    return None


# MLflow's error codes for the HTTP statuses it maps them to (mlflow.exceptions.ERROR_CODE_TO_HTTP_STATUS): a
# REST error carries the server's code, and a non-JSON answer gets the code of its status.
REFUSED_CODES = {"UNAUTHENTICATED": 401, "CUSTOMER_UNAUTHORIZED": 401, "PERMISSION_DENIED": 403}
# 503 is also what MLflow's SQL stores answer for a database they cannot use (OperationalError: locked, down).
UNAVAILABLE_CODES = {"TEMPORARILY_UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
UNAVAILABLE_STATUSES = (502, 503, 504)


def registry_failure(e: BaseException) -> str | None:
    """What kind of registry failure `e` is, from the exceptions in its chain (MLflow wraps requests' errors):
    "timeout" (a request got no answer in time), "unreachable" (a refused or lost connection, a server that
    answers 502/503/504 or only server errors, a database it cannot use), "refused" (HTTP 401/403: the
    credentials), else None."""
    chain = list(exception_chain(e))
    if any(_is_timeout(x) for x in chain):
        return "timeout"
    if http_status(e) is not None:
        return "refused"
    if any(_is_lost(x) or _status(x) in UNAVAILABLE_STATUSES for x in chain):
        return "unreachable"
    return None


def is_connection_error(e: BaseException) -> bool:
    """A registry that cannot be reached or does not answer (`registry_failure`: timeout or unreachable)."""
    return registry_failure(e) in ("timeout", "unreachable")


def http_status(e: BaseException) -> int | None:
    """401 or 403 when the registry refused the credentials: from MLflow's error code of a REST answer, or
    from the status of an HTTP error (an artifact download's requests.HTTPError, urllib's); else None."""
    for x in exception_chain(e):
        status = _status(x)
        if status in (401, 403):
            return status
    return None


def _status(x: BaseException) -> int | None:
    """The HTTP status one exception stands for, where it carries one."""
    if isinstance(x, urllib.error.HTTPError):
        return int(x.code)
    code = getattr(getattr(x, "response", None), "status_code", None)  # requests.HTTPError
    if isinstance(code, int):
        return code
    error_code = getattr(x, "error_code", None)  # MlflowException
    if isinstance(error_code, str):
        return REFUSED_CODES.get(error_code) or UNAVAILABLE_CODES.get(error_code)
    return None


def _request_url(e: BaseException) -> str | None:
    """The URL of the request that failed: requests' exceptions carry the request, urllib3's the URL."""
    for x in exception_chain(e):
        url = getattr(getattr(x, "request", None), "url", None) or getattr(x, "url", None)
        if isinstance(url, str) and url:
            return url
    return None


def _is_timeout(x: BaseException) -> bool:
    import requests
    import urllib3

    timeout = (TimeoutError, requests.exceptions.Timeout, urllib3.exceptions.TimeoutError)
    # urllib3 2 makes a refused connection (NewConnectionError) a ConnectTimeoutError too, for compatibility.
    return isinstance(x, timeout) and not isinstance(x, urllib3.exceptions.NewConnectionError)


def _is_lost(x: BaseException) -> bool:
    """A connection refused, reset or lost (requests, urllib3, urllib or the OS), or requests giving up after
    server errors (RetryError)."""
    import requests
    import urllib3

    lost = (
        ConnectionError,
        requests.exceptions.ConnectionError,
        requests.exceptions.RetryError,
        urllib3.exceptions.ProtocolError,
        urllib3.exceptions.NewConnectionError,
        urllib3.exceptions.MaxRetryError,
    )
    return isinstance(x, lost) or (isinstance(x, urllib.error.URLError) and not isinstance(x, urllib.error.HTTPError))


def _publish(
    run_dir: Path, tracking_uri: str, files: dict[str, dict[str, Any]], reuse: bool, wait_s: float
) -> dict[str, Any]:
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    recipe, metrics, verdict, manifest = files["recipe"], files["metrics"], files["verdict"], files["manifest"]
    reg = recipe["registry"]
    model_name = reg.get("model_name") or recipe["name"]
    alias = reg.get("alias") or "candidate"
    optimize_run_id = manifest["run_id"]
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    passed = [v for v, s in verdict["variants"].items() if s["status"] == "passed"]
    same: dict[str, int] = {}
    if reuse:
        same, nothing_to_do = _registered_copies(run_dir, files, tracking_uri, functools.partial(_client_view, client))
        if nothing_to_do:
            return nothing_to_do
    experiment_id = _experiment_id(client, reg.get("experiment") or f"optimize/{recipe['name']}", tracking_uri)
    run_tags = {
        "optimize.run_id": optimize_run_id,
        "optimize.recipe": recipe["name"],
        "optimize.recipe_sha256": manifest["recipe_sha256"],
        "optimize.verdict": verdict["status"],
        "optimize.run_dir": str(run_dir.resolve()),
        "optimize.version": manifest["versions"].get("optimize", ""),
    }
    previous = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`optimize.run_id` = {_quoted(optimize_run_id, 'manifest.json: run_id')}",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if previous:  # an earlier, partial attempt for this run: finish it rather than start a second MLflow run
        run_id = previous[0].info.run_id
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in run_tags.items()])
        have_params, have_metrics = set(previous[0].data.params), set(previous[0].data.metrics)
    else:
        run_id = client.create_run(experiment_id, run_name=optimize_run_id, tags=run_tags).info.run_id
        have_params, have_metrics = set(), set()
    items = [(k, str(v)[:6000]) for k, v in _flatten("", recipe, {}).items() if k not in have_params]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
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

    versions: dict[str, int] = {}
    already: dict[str, int] = {}
    created_model = bool(passed) and _create_registered_model(client, model_name, recipe.get("description"))
    try:
        # Check, create and move the aliases as one step: under the store's lock on sqlite; through a server
        # (no lock), create, then look again and keep the lowest of the copies made at once (`_converge`), and
        # take the other variants from the registration that made the kept copy, once it has finished.
        with store_lock(tracking_uri, "registration") as locked:
            view = functools.partial(_client_view, client)
            if reuse and passed:  # again under the lock: a concurrent run may have registered the same model
                same = _registered_copies(run_dir, files, tracking_uri, view)[0]
            for variant in passed:
                found = _find_version(client, model_name, optimize_run_id, variant)
                if found is None:
                    found = same.get(variant)
                if found is None:
                    number, model_id = _register_variant(
                        client, run_dir, experiment_id, run_id, model_name, variant, metrics, verdict, manifest, plots
                    )
                    identity = identity_tags(run_dir, variant, metrics, verdict, manifest) if reuse else None
                    found = (
                        number
                        if locked
                        else _converge(client, model_name, (number, model_id), identity, optimize_run_id, variant)
                    )
                    if found == number:
                        versions[variant] = number
                        continue
                already[variant] = found
                if not locked and reuse and _waited_for_its_registration(client, model_name, found, run_id, wait_s):
                    same = _registered_copies(run_dir, files, tracking_uri, view)[0]
            if passed:
                _move_aliases(client, model_name, alias_targets({**already, **versions}, passed, alias), locked)
    except BaseException:
        if created_model:
            _delete_if_empty(client, model_name)
        raise
    client.set_terminated(run_id, "FINISHED")
    return {
        "tracking_uri": tracking_uri,
        "experiment_id": experiment_id,
        "run_id": run_id,
        "model_name": model_name,
        "alias": alias,
        "versions": versions,
        "already": already,
    }


def publish_new(run_dir: Path, tracking_uri: str) -> dict[str, Any]:
    """The registration of `optimize run`: `publish(reuse=True)`, which registers no copy of a model the store
    holds, after asking the local sqlite file whether there is anything to do at all (`already_registered`)."""
    return already_registered(run_dir, tracking_uri) or publish(run_dir, tracking_uri, reuse=True)


def already_registered(run_dir: Path, tracking_uri: str) -> dict[str, Any] | None:
    """What `publish(run_dir, tracking_uri, reuse=True)` would return without logging anything, when a local
    sqlite store already holds every passing variant of the finished run as the same model with the run's
    aliases there or later (a rerun with nothing changed); else None, also when this cannot be read here
    (another kind of store, MLflow workspaces, a schema not known): `publish` then decides through MLflow.

    Reads the store's file directly, read-only, without importing MLflow: MLflow's import and the opening of
    its store are most of a cached rerun's time. The decision is `publish`'s own (`_registered_copies`)."""
    db = _sqlite_file(tracking_uri)
    workspaces = os.environ.get("MLFLOW_WORKSPACE") or os.environ.get("MLFLOW_ENABLE_WORKSPACES")
    if db is None or not db.is_file() or workspaces:
        return None
    import sqlite3

    files = check_finished_run(run_dir)
    try:
        if sqlite_schema(db) not in SQLITE_SCHEMAS:
            return None
        return _registered_copies(run_dir, files, tracking_uri, lambda name, _shas: _sqlite_view(db, name))[1]
    except sqlite3.Error:
        return None


def _registered_copies(
    run_dir: Path,
    files: dict[str, dict[str, Any]],
    tracking_uri: str,
    view: Callable[[str, set[str]], tuple[dict[int, dict[str, str]], dict[str, int]]],
) -> tuple[dict[str, int], dict[str, Any] | None]:
    """Per passing variant of the run, the newest live version that is the same model (`same_models`), from
    `view(model_name, sha256s)`: the store's versions (number: tags) and aliases. Second, `publish`'s result
    without logging anything when that covers every passing variant and no alias would move (`aliases_to_move`);
    else None."""
    recipe, metrics, verdict, manifest = files["recipe"], files["metrics"], files["verdict"], files["manifest"]
    reg = recipe.get("registry", {})
    model_name, alias = reg.get("model_name") or recipe["name"], reg.get("alias") or "candidate"
    passed = [v for v, s in verdict["variants"].items() if s["status"] == "passed"]
    if not passed:
        return {}, None
    wanted = {v: identity_tags(run_dir, v, metrics, verdict, manifest) for v in passed}
    versions, aliases = view(model_name, {t["sha256"] for t in wanted.values()})
    same = same_models(wanted, versions)
    if len(same) < len(passed) or aliases_to_move(alias_targets(same, passed, alias), aliases):
        return same, None
    return same, reused_record(tracking_uri, model_name, alias, same)


def same_models(wanted: dict[str, dict[str, str]], versions: dict[int, dict[str, str]]) -> dict[str, int]:
    """Per variant, the newest of the live `versions` (number: tags) with the identity tags in `wanted`
    (variant: tags); variants with none are left out."""
    out: dict[str, int] = {}
    for variant, tags in wanted.items():
        same = [n for n, have in versions.items() if _identity(have) == _identity(tags)]
        if same:
            out[variant] = max(same)
    return out


def alias_targets(numbers: dict[str, int], passed: list[str], alias: str) -> dict[str, int]:
    """Where a registration points its aliases: `alias` at the first passing variant's version and
    `alias-<variant>` at each variant's (`numbers`: variant: version)."""
    return {alias: numbers[passed[0]], **{f"{alias}-{v}": numbers[v] for v in passed}}


def reused_record(tracking_uri: str, model_name: str, alias: str, found: dict[str, int]) -> dict[str, Any]:
    """`publish`'s result when nothing was logged: every passing variant was registered already."""
    return {
        "tracking_uri": tracking_uri,
        "experiment_id": None,
        "run_id": None,
        "model_name": model_name,
        "alias": alias,
        "versions": {},
        "already": found,
    }


def _client_view(client: Any, model_name: str, shas: set[str]) -> tuple[dict[int, dict[str, str]], dict[str, int]]:
    """The live versions of `model_name` with one of the sha256 tags `shas` (number: tags), and the model's
    aliases (alias: version), through MLflow."""
    versions: dict[int, dict[str, str]] = {}
    for sha in sorted(shas):
        for mv in client.search_model_versions(
            f"name = {_quoted(model_name, 'registry.model_name')} AND tags.sha256 = {_quoted(sha, 'sha256')}"
        ):
            if mv.status == "READY":
                versions[int(mv.version)] = dict(mv.tags)
    if not versions:
        return versions, {}
    return versions, {a: int(n) for a, n in client.get_registered_model(model_name).aliases.items()}


def _sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (None for other stores)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri.removeprefix("sqlite:///").split("?")[0]
    return Path(path) if path and path != ":memory:" else None


# The revisions of MLflow's SQL schema (alembic_version.version_num) whose tables `_sqlite_view` was tested on
# (tests/test_registry_reuse.py): a store at any other revision is read through MLflow's client.
SQLITE_SCHEMAS = {"dc11669786a5": "MLflow 3.17"}


def sqlite_schema(db: Path) -> str | None:
    """The revision of MLflow's schema in the sqlite file `db` (its `alembic_version` table), None without one."""
    import sqlite3

    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'").fetchone():
            return None
        row = con.execute("SELECT version_num FROM alembic_version").fetchone()
    finally:
        con.close()
    return str(row[0]) if row else None


def _sqlite_view(db: Path, model_name: str) -> tuple[dict[int, dict[str, str]], dict[str, int]]:
    """`_client_view` read from MLflow's sqlite file (read-only), for every live version of `model_name`:
    MLflow's SQL schema (`model_versions`, `model_version_tags`, `registered_model_aliases`; a deleted
    version keeps its row with stage `Deleted_Internal`; `workspace` columns since 3.x, ours `default`).
    A store without these tables holds nothing; another schema is a sqlite3.Error."""
    import sqlite3

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


def _run_metrics(metrics: dict[str, Any]) -> list[Any]:
    """Every number of metrics.json as an MLflow metric (one step per INT8 fallback trial)."""
    from mlflow.entities import Metric

    out = []
    now = int(time.time() * 1000)
    for variant, by_target in metrics["results"].items():
        for target, result in by_target.items():
            for k, v in _flatten(f"{variant}.{target}", result, {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.append(Metric(_metric_key(k), float(v), now, 0))
    for variant, fb in metrics.get("fallback", {}).items():
        for t in fb["trials"]:
            values = {**t["accuracy"], "excluded_count": t["excluded_count"], "passed": float(t["passed"])}
            if t.get("p50_speedup") is not None:
                values["p50_speedup"] = t["p50_speedup"]
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    out.append(Metric(_metric_key(f"fallback.{variant}.{k}"), float(v), now, t["trial"]))
    return out


def _experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """The experiment's id, created on first use (a concurrent creator's experiment is taken as ours)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri))
        except MlflowException as e:
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
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=description or None)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return False
    return True


def _delete_if_empty(client: Any, name: str) -> None:
    """Delete a registered model that has no version (the one this call created before it failed)."""
    try:
        if not client.search_model_versions(f"name = {_quoted(name, 'registry.model_name')}", max_results=1):
            client.delete_registered_model(name)
    except Exception:  # the registry went away: the retry fills the model; the original error is raised
        pass


def _find_version(client: Any, model_name: str, optimize_run_id: str, variant: str) -> int | None:
    """The version an earlier attempt registered for this run and variant (tags `optimize_run_id`, `variant`)."""
    found = client.search_model_versions(
        f"name = {_quoted(model_name, 'registry.model_name')}"
        f" AND tags.optimize_run_id = {_quoted(optimize_run_id, 'manifest.json: run_id')}"
        f" AND tags.variant = {_quoted(variant, 'precision.variants')}"
    )
    return min(int(v.version) for v in found) if found else None


def aliases_to_move(targets: dict[str, int], current: dict[str, int]) -> dict[str, int]:
    """The aliases of `targets` (alias: version, one registration's) to set so that all of them point at this
    registration's versions, given where the model's aliases point now (`current`). None moves when one of them
    already points at a version newer than any of this registration's (a later registration owns them: a retry
    that comes late must not move them back), so the aliases move together and end on one registration's
    versions, never mixed."""
    if max((current.get(a, 0) for a in targets), default=0) > max(targets.values(), default=0):
        return {}
    return {a: n for a, n in targets.items() if current.get(a) != n}


ALIAS_ROUNDS = 3


def _move_aliases(client: Any, model_name: str, targets: dict[str, int], locked: bool) -> None:
    """Point the aliases of `targets` (alias: version) at this registration's versions, all or none
    (`aliases_to_move`). Under the store lock one pass is exact. Through a server (no lock, no compare-and-set)
    they are read back and set again while another registration's writes mixed them, a few rounds."""
    import random

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


UPSERT_PAUSE_S = (0.05, 0.3)


def retrying_upsert(write: Callable[..., Any], *args: Any) -> Any:
    """Call an MLflow upsert, again after a pause when it lost a race: MLflow upserts an alias or tag by reading
    then inserting, and two concurrent first writes of one key fail the loser's insert (UNIQUE constraint)."""
    import random

    for attempt in range(3):
        try:
            return write(*args)
        except Exception as e:
            if attempt == 2 or not _lost_insert_race(e):
                raise
            time.sleep(random.uniform(*UPSERT_PAUSE_S))


def _lost_insert_race(e: BaseException) -> bool:
    """A write that broke a unique constraint: SQLAlchemy's IntegrityError in a local store, or through a server
    its answer BAD_REQUEST, which MLflow's SQL stores give every database error but a lost connection (their
    own validation says INVALID_PARAMETER_VALUE)."""
    import sqlalchemy.exc
    from mlflow.exceptions import RestException

    return any(
        isinstance(x, sqlalchemy.exc.IntegrityError) or (isinstance(x, RestException) and x.error_code == "BAD_REQUEST")
        for x in exception_chain(e)
    )


def _find_logged_model(client: Any, experiment_id: str, name: str, optimize_run_id: str) -> Any | None:
    """A LoggedModel an earlier attempt made for this run and variant, unless it failed."""
    from mlflow.entities import LoggedModelStatus

    found = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"name = {_quoted(name, 'registry.model_name')}"
        f" AND tags.optimize_run_id = {_quoted(optimize_run_id, 'manifest.json: run_id')}",
    )
    usable = [m for m in found if m.status in (LoggedModelStatus.READY, LoggedModelStatus.PENDING)]
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
    from mlflow.entities import LoggedModelStatus

    tags = version_tags(run_dir, variant, metrics, verdict, manifest, run_id)
    name = f"{model_name}-{variant}"
    logged = _find_logged_model(client, experiment_id, name, manifest["run_id"])
    if logged is None:
        logged = client.create_logged_model(
            experiment_id, name=name, source_run_id=run_id, tags=tags, model_type="onnx"
        )
    if logged.status != LoggedModelStatus.READY:
        client.log_model_artifacts(logged.model_id, str(run_dir / "registry" / variant))
        client.finalize_logged_model(logged.model_id, "READY")
    with _process_tracking_uri(client.tracking_uri):
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
        live, _aliases = _client_view(client, model_name, {identity["sha256"]})
        lowest = min((n for n, tags in live.items() if _identity(tags) == _identity(identity)), default=None)
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


def _identity(tags: dict[str, str]) -> tuple[str | None, ...]:
    """The `IDENTITY_TAGS` values of a version's tags: equal for versions that are the same model."""
    return tuple(tags.get(k) for k in IDENTITY_TAGS)


# A version is the same model as another when these tags are equal: the same bytes, verified on the same
# targets (GPU and TensorRT included) with the same verdict. Which run registered it (optimize and MLflow run
# ids, the recipe's hash, the git commit) is provenance: a new gate threshold makes no new model.
IDENTITY_TAGS = ("variant", "sha256", "precision", "target", "recipe", "verdict", "format", "gpu_sm", "gpu", "tensorrt")


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
        "variant": variant,
        "sha256": art["sha256"],
        "precision": art["precision"],
        "target": ",".join(targets),
        "recipe": manifest["recipe"],
        "verdict": verdict["variants"][variant]["status"],
        "format": "onnx",
    }
    engine = art.get("engine")
    if engine:
        sidecar_path = run_dir / Path(engine["path"]).with_suffix(".json")
        sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
        capability = sidecar.get("compute_capability") or engine.get("compute_capability")
        if capability:
            tags["gpu_sm"] = "sm" + str(capability).replace(".", "")
        if sidecar.get("gpu"):
            tags["gpu"] = sidecar["gpu"]
        trt = sidecar.get("tensorrt") or manifest.get("versions", {}).get("tensorrt")
        if trt:
            tags["tensorrt"] = str(trt)
    return tags


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
    tags.update(
        recipe_sha256=manifest["recipe_sha256"], optimize_run_id=manifest["run_id"], mlflow_run_id=mlflow_run_id
    )
    commit = manifest.get("git_commit") or (
        git_commit(Path(manifest["recipe_file"]).parent) if manifest.get("recipe_file") else None
    )
    if commit:
        tags["git_commit"] = commit
    return tags


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


@contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at `uri` for the block, then put back exactly what was there.

    MLflow's sqlite registry looks up a `models:/<model_id>` version source through the process-wide
    tracking URI, not the client's (a TODO in its SqlAlchemyStore), so registering into any store but the
    default failed with "Logged model ... not found". A plain artifact location as the source avoids the
    lookup but loses the version's link to its LoggedModel, which engines will hang off later.
    """
    import mlflow

    saved_global = _global_tracking_uri()
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_global)  # None clears it (and the environment variable it set)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _global_tracking_uri() -> str | None:
    """The tracking URI set process-wide by `mlflow.set_tracking_uri` (None: none set, the environment or the
    default applies). MLflow keeps it in a private variable; where that is gone or holds something else (another
    MLflow), None, and the caller's block ends with none set, as before it unless a URI had been set."""
    try:
        from mlflow.tracking._tracking_service import utils as tracking_utils
    except ImportError:
        return None
    saved = getattr(tracking_utils, "_tracking_uri", None)
    return saved if isinstance(saved, str) else None


def describe(
    variant: str,
    metrics: dict[str, Any],
    verdict: dict[str, Any],
    *,
    run_id: str | None = None,
    experiment_id: str | None = None,
    tracking_uri: str | None = None,
    plots: Sequence[str] = (),
    report_html: bool = False,
) -> str:
    """Markdown summary of a variant's gates for the model version's description: per gate the baseline,
    the variant's value, their difference and the result; then where the run's report is, and the report's
    plots (`plots`: artifact paths of the run, plots/<name>.png) as images.

    The images and report.html are linked through the MLflow server's `get-artifact?path=…&run_uuid=…`, relative
    to the UI's page, so they show in the UI of whichever server serves this store (its Markdown sanitiser
    keeps `<img src>`); `runs:/<run id>/<path>` is printed beside them for clients."""
    art = metrics["variants"][variant]
    status = verdict["variants"][variant]
    lines = [
        f"**{variant}** ({art['precision']}), {art['size_bytes'] / 1e6:.1f} MB, sha256 `{art['sha256'][:16]}…`",
        f"Gates {status['status'].upper()}: {status.get('reason', '')}",
        "",
        "| gate | target | baseline | value | Δ | result |",
        "|---|---|---|---|---|---|",
    ]
    for row in verdict["gates"]:
        if row["variant"] != variant:
            continue
        value = row.get("value")
        base = row.get("baseline_value")
        lines.append(
            f"| `{row['check']}` | {row['target']} | {_fmt(base)} | {_fmt(value)} | {delta_text(value, base)} "
            f"| {row['status']}" + (f" ({row['reason']})" if row["status"] == "skipped" else "") + " |"
        )
    if run_id:
        report = f"Report: `runs:/{run_id}/report.md`"
        if report_html:
            report += f" · [report.html]({artifact_link(run_id, 'report.html')}) (`runs:/{run_id}/report.html`)"
        lines += ["", report]
        if tracking_uri and tracking_uri.startswith(("http://", "https://")) and experiment_id:
            lines.append(f"MLflow run: {tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}")
        if plots:
            lines += ["", f"Plots (`runs:/{run_id}/{PLOTS_DIR}/`):", ""]
            for p in plots:  # one paragraph each: the UI shows them one under the other
                lines += [f"![{Path(p).stem}]({artifact_link(run_id, p)})", ""]
    return "\n".join(lines)


def artifact_link(run_id: str, path: str) -> str:
    """A relative URL to a run's artifact as the MLflow UI fetches it (`get-artifact`, served by every MLflow
    server beside its UI)."""
    return "get-artifact?" + urllib.parse.urlencode({"path": path, "run_uuid": run_id})


def run_plots(run_dir: Path) -> list[str]:
    """The report's plots in `run_dir` as artifact paths (plots/<name>.png), in the report's order: trade-off,
    latency, accuracy, size and memory, then any other."""
    folder = Path(run_dir) / PLOTS_DIR
    if not folder.is_dir():
        return []
    order = ("tradeoff", "latency-", "accuracy-", "size-memory")

    def rank(p: Path) -> tuple[int, str]:
        return next((i for i, o in enumerate(order) if p.stem.startswith(o)), len(order)), p.name

    return [f"{PLOTS_DIR}/{p.name}" for p in sorted(folder.glob("*.png"), key=rank) if p.is_file()]


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)
