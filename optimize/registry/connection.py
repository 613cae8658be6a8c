"""The registry connection: which store (tracking URI resolution), reaching it, the one bounded session every
registry command uses (timeouts, no retries, the sqlite store's lock), and the one mapping of MLflow's failures
to our exit codes (refused credentials 7, a lost or silent registry 5), decided by exception types and HTTP
statuses, never by message text."""

from __future__ import annotations

import math
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
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
from optimize.files import file_lock
from optimize.lazy import lazy

mlflow = lazy("mlflow")
mlflow_exceptions = lazy("mlflow.exceptions")
tracking_utils = lazy("mlflow.tracking._tracking_service.utils")
requests = lazy("requests")
urllib3 = lazy("urllib3")
sqlalchemy_exc = lazy("sqlalchemy.exc")

# Bound every MLflow HTTP call: with the defaults one call hangs for minutes against a stopped server.
DEFAULT_TIMEOUT_S = 30.0


TIMEOUT_ENV = "OPTIMIZE_REGISTRY_TIMEOUT_S"


REACH_TIMEOUT_S = 5


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
        try:
            yield mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        except Exception as e:
            error = as_registry_error(e, tracking_uri, budget)
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
    db = sqlite_file(tracking_uri)
    if db is None:
        yield False
        return
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


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (None for other stores)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri.removeprefix("sqlite:///").split("?")[0]
    return Path(path) if path and path != ":memory:" else None


def quoted(value: str, what: str) -> str:
    """`value` as a quoted MLflow filter literal (its search grammar has no escape we can rely on)."""
    if "'" in value:
        raise RecipeError(f"{what}: {value!r} contains a single quote, which MLflow's search filters cannot hold")
    return f"'{value}'"


def as_registry_error(e: Exception, tracking_uri: str, timeout_s: float) -> OptimizeError | None:
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
    if isinstance(e, mlflow_exceptions.MlflowException):
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
    timeout = (TimeoutError, requests.exceptions.Timeout, urllib3.exceptions.TimeoutError)
    # urllib3 2 makes a refused connection (NewConnectionError) a ConnectTimeoutError too, for compatibility.
    return isinstance(x, timeout) and not isinstance(x, urllib3.exceptions.NewConnectionError)


def _is_lost(x: BaseException) -> bool:
    """A connection refused, reset or lost (requests, urllib3, urllib or the OS), or requests giving up after
    server errors (RetryError)."""
    lost = (
        ConnectionError,
        requests.exceptions.ConnectionError,
        requests.exceptions.RetryError,
        urllib3.exceptions.ProtocolError,
        urllib3.exceptions.NewConnectionError,
        urllib3.exceptions.MaxRetryError,
    )
    return isinstance(x, lost) or (isinstance(x, urllib.error.URLError) and not isinstance(x, urllib.error.HTTPError))


UPSERT_PAUSE_S = (0.05, 0.3)


def retrying_upsert(write: Callable[..., Any], *args: Any) -> Any:
    """Call an MLflow upsert, again after a pause when it lost a race: MLflow upserts an alias or tag by reading
    then inserting, and two concurrent first writes of one key fail the loser's insert (UNIQUE constraint)."""
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
    return any(
        isinstance(x, sqlalchemy_exc.IntegrityError)
        or (isinstance(x, mlflow_exceptions.RestException) and x.error_code == "BAD_REQUEST")
        for x in exception_chain(e)
    )


@contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at `uri` for the block, then put back exactly what was there.

    MLflow's sqlite registry looks up a `models:/<model_id>` version source through the process-wide
    tracking URI, not the client's (a TODO in its SqlAlchemyStore), so registering into any store but the
    default failed with "Logged model ... not found". A plain artifact location as the source avoids the
    lookup but loses the version's link to its LoggedModel, which engines will hang off later.
    """
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
        saved = getattr(tracking_utils, "_tracking_uri", None)
    except ImportError:
        return None
    return saved if isinstance(saved, str) else None
