"""MLflow at the registry boundary: one MLflow run per `optimize run` (params, metrics, report and
manifest), and every variant that passed its gates registered as a new model version (from a
LoggedModel, so engines can follow later) with its evidence in tags and description, and an alias."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from optimize.errors import RecipeError, RegistryUnreachableError, first_line

# Bound every MLflow HTTP call: with the defaults one call hangs for minutes against a stopped server.
HTTP_TIMEOUT_S = 10
HTTP_MAX_RETRIES = 1
REACH_TIMEOUT_S = 5


def resolve_tracking_uri(cli_uri: str | None, recipe_uri: str | None, cwd: Path | None = None) -> str:
    """--tracking-uri, then MLFLOW_TRACKING_URI, then the recipe's, then `sqlite:///<cwd>/mlflow.db`."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or recipe_uri
    if uri:
        return uri
    return f"sqlite:///{((cwd or Path.cwd()) / 'mlflow.db').resolve()}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a local sqlite store, pin artifacts to `mlartifacts/` beside the database file (not the cwd)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def check_reachable(tracking_uri: str) -> None:
    """Fail fast (exit 5) when the tracking store cannot be reached; bounded to a few seconds."""
    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=REACH_TIMEOUT_S) as resp:
                if resp.status >= 500:
                    raise RegistryUnreachableError(f"registry: {url} answered HTTP {resp.status}")
        except urllib.error.HTTPError as e:
            if e.code >= 500:
                raise RegistryUnreachableError(f"registry: {url} answered HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RegistryUnreachableError(f"registry: cannot reach {tracking_uri} ({reason})") from None
    elif tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise RegistryUnreachableError(f"registry: cannot write the sqlite store in {folder}")
    elif "://" not in tracking_uri and not tracking_uri.startswith(("databricks", "file:")):
        raise RecipeError(
            f"registry.tracking_uri: {tracking_uri!r} is not a tracking URI (sqlite:///path, http(s)://host, ...)"
        )


def _bound_http() -> None:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(HTTP_MAX_RETRIES))


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


def publish(run_dir: Path, tracking_uri: str) -> dict[str, Any]:
    """Log the finished run in `run_dir` to MLflow and register the variants that passed.

    Reads only files of the run directory, so a failed registration can be retried from it.
    Returns {"tracking_uri", "experiment_id", "run_id", "versions": {variant: version}}.
    """
    check_reachable(tracking_uri)
    _bound_http()
    try:
        return _publish(run_dir, tracking_uri)
    except RegistryUnreachableError:
        raise
    except Exception as e:
        if _is_connection_error(e):
            raise RegistryUnreachableError(f"registry: lost {tracking_uri} ({first_line(e)})") from None
        raise


def _publish(run_dir: Path, tracking_uri: str) -> dict[str, Any]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    recipe = json.loads((run_dir / "recipe.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    verdict = json.loads((run_dir / "verdict.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    reg = recipe["registry"]
    model_name = reg.get("model_name") or recipe["name"]
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_name = reg.get("experiment") or f"optimize/{recipe['name']}"
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        experiment_id = client.create_experiment(
            experiment_name, artifact_location=default_artifact_location(tracking_uri)
        )
    else:
        experiment_id = exp.experiment_id
    run = client.create_run(
        experiment_id,
        run_name=manifest["run_id"],
        tags={
            "optimize.recipe": recipe["name"],
            "optimize.recipe_sha256": manifest["recipe_sha256"],
            "optimize.verdict": verdict["status"],
            "optimize.run_dir": str(run_dir.resolve()),
            "optimize.version": manifest["versions"].get("optimize", ""),
        },
    )
    run_id = run.info.run_id
    items = [(k, str(v)[:6000]) for k, v in _flatten("", recipe, {}).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
    flat_metrics = []
    now = int(time.time() * 1000)
    for variant, by_target in metrics["results"].items():
        for target, result in by_target.items():
            flat = _flatten(f"{variant}.{target}", result, {})
            for k, v in flat.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    flat_metrics.append(Metric(_metric_key(k), float(v), now, 0))
    for variant, fb in metrics.get("fallback", {}).items():  # one step per INT8 fallback trial
        for t in fb["trials"]:
            values = {**t["accuracy"], "excluded_count": t["excluded_count"], "passed": float(t["passed"])}
            if t.get("p50_speedup") is not None:
                values["p50_speedup"] = t["p50_speedup"]
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    flat_metrics.append(Metric(_metric_key(f"fallback.{variant}.{k}"), float(v), now, t["trial"]))
    for i in range(0, len(flat_metrics), 500):
        client.log_batch(run_id, metrics=flat_metrics[i : i + 500])
    for name in ("report.md", "metrics.json", "verdict.json", "manifest.json", "recipe.yaml", "recipe.lock.yaml"):
        if (run_dir / name).exists():
            client.log_artifact(run_id, str(run_dir / name))
    versions: dict[str, int] = {}
    passed = [v for v, s in verdict["variants"].items() if s["status"] == "passed"]
    if passed:
        try:
            client.create_registered_model(model_name, description=recipe.get("description") or None)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    for variant in passed:
        versions[variant] = _register_variant(
            client, run_dir, experiment_id, run_id, model_name, variant, metrics, verdict, manifest
        )
    alias = reg.get("alias") or "candidate"
    for i, variant in enumerate(passed):
        client.set_registered_model_alias(model_name, f"{alias}-{variant}", versions[variant])
        if i == 0:
            client.set_registered_model_alias(model_name, alias, versions[variant])
    client.set_terminated(run_id, "FINISHED")
    return {
        "tracking_uri": tracking_uri,
        "experiment_id": experiment_id,
        "run_id": run_id,
        "model_name": model_name,
        "alias": alias,
        "versions": versions,
    }


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
) -> int:
    art = metrics["variants"][variant]
    folder = run_dir / "registry" / variant
    tags = {
        "sha256": art["sha256"],
        "precision": art["precision"],
        "target": ",".join(t for t, s in verdict["targets"].items() if s["status"] == "ran"),
        "recipe": manifest["recipe"],
        "recipe_sha256": manifest["recipe_sha256"],
        "verdict": "passed",
        "optimize_run_id": manifest["run_id"],
        "mlflow_run_id": run_id,
        "format": "onnx",
    }
    logged = client.create_logged_model(
        experiment_id, name=f"{model_name}-{variant}", source_run_id=run_id, tags=tags, model_type="onnx"
    )
    client.log_model_artifacts(logged.model_id, str(folder))
    client.finalize_logged_model(logged.model_id, "READY")
    with _process_tracking_uri(client.tracking_uri):
        version = client.create_model_version(
            model_name,
            source=f"models:/{logged.model_id}",
            run_id=run_id,
            tags=tags,
            description=describe(variant, metrics, verdict),
            model_id=logged.model_id,
        )
    return int(version.version)


@contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at `uri` for the block, then put back exactly what was there.

    MLflow's sqlite registry looks up a `models:/<model_id>` version source through the process-wide
    tracking URI, not the client's (a TODO in its SqlAlchemyStore), so registering into any store but the
    default failed with "Logged model ... not found". A plain artifact location as the source avoids the
    lookup but loses the version's link to its LoggedModel, which engines will hang off later.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_global = tracking_utils._tracking_uri
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


def describe(variant: str, metrics: dict[str, Any], verdict: dict[str, Any]) -> str:
    """Markdown summary of a variant's gates for the model version's description."""
    art = metrics["variants"][variant]
    lines = [
        f"**{variant}** ({art['precision']}), {art['size_bytes'] / 1e6:.1f} MB, sha256 `{art['sha256'][:16]}…`",
        "",
        "| gate | target | value | baseline | result |",
        "|---|---|---|---|---|",
    ]
    for row in verdict["gates"]:
        if row["variant"] != variant:
            continue
        value = row.get("value")
        base = row.get("baseline_value")
        lines.append(
            f"| `{row['check']}` | {row['target']} | {_fmt(value)} | {_fmt(base)} | {row['status']}"
            + (f" ({row['reason']})" if row["status"] == "skipped" else "")
            + " |"
        )
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def _is_connection_error(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(s in text for s in ("connection", "max retries", "timed out", "timeout", "unreachable"))
