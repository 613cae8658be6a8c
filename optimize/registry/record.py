"""A registration's run directory and its outcome: what a finished run must hold to be registered
(`check_finished_run`), the typed result of a registration (`Registration`), and the manifest's `registry` entry
written back (`success_record`, `failure_record`) with the command that retries a failed one."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimize.errors import RecipeError, first_line
from optimize.files import display_path, write_json
from optimize.onnx_files import onnx_files
from optimize.registry.connection import resolve_tracking_uri

# What a finished run directory holds before anything can be registered from it.
RUN_FILES = ("manifest.json", "recipe.json", "metrics.json", "verdict.json")


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
        for data in onnx_files(model)[1:]:  # model.onnx.data, logged with the folder
            if not data.is_file():
                raise RecipeError(f"{data}: missing; variant {variant} passed but its registry folder is incomplete")
    return loaded


def retry_command(run_dir: Path, tracking_uri: str, recipe_uri: str | None) -> str:
    """The command that retries this registration from the run directory (with --tracking-uri only when the
    store does not follow from the environment and the recipe)."""
    same = tracking_uri == resolve_tracking_uri(None, recipe_uri)
    flag = "" if same else f"--tracking-uri {shlex.quote(tracking_uri)} "
    return f"optimize register {flag}{shlex.quote(display_path(run_dir))}"


@dataclass(frozen=True)
class Registration:
    """What one registration did, in MLflow's words: the registered model `model_name`, the `alias` its first
    passing variant's version got (each variant's version also gets `<alias>-<variant>`), the versions created
    (`versions`: variant → version) and those the store held already and that were taken instead (`already`),
    and the MLflow run the optimize run was logged as (`mlflow_run_id`, `experiment_id`; both None when nothing
    was logged because the store held every passing variant already)."""

    tracking_uri: str
    model_name: str
    alias: str
    versions: dict[str, int] = field(default_factory=dict)
    already: dict[str, int] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    experiment_id: str | None = None

    @property
    def all_versions(self) -> dict[str, int]:
        """Every passing variant's version, found or created (variant → version)."""
        return {**self.already, **self.versions}

    @property
    def status(self) -> str:
        """`registered`, or `already registered` when nothing was logged (the store held every passing variant)."""
        return "registered" if self.mlflow_run_id else "already registered"

    def as_json(self) -> dict[str, Any]:
        """The registration as the manifest and `--json` have always spelt it (`run_id` is the MLflow run's)."""
        return {
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "run_id": self.mlflow_run_id,
            "model_name": self.model_name,
            "alias": self.alias,
            "versions": dict(self.versions),
            "already": dict(self.already),
        }

    def record(self) -> dict[str, Any]:
        """The manifest's `registry` entry after this registration: `status` first, then `as_json`."""
        return {"status": self.status, **self.as_json()}


def success_record(reg: Registration) -> dict[str, Any]:
    """The manifest's `registry` entry after a registration (`Registration.record`): what `publish` did, with
    `status: registered`, or `already registered` when the store held every passing variant already and nothing
    was logged (`run_id` None)."""
    return reg.record()


def failure_record(tracking_uri: str, error: BaseException) -> dict[str, Any]:
    """The manifest's `registry` entry after a failed registration: where, why, and the command that retries."""
    retry = getattr(error, "retry", None)  # set by `publish` on the errors it reports
    return {"status": "failed", "tracking_uri": tracking_uri, "error": first_line(error, 2000), "retry": retry}


def update_manifest(run_dir: Path, entry: dict[str, Any], status: str, error: str | None) -> None:
    """Write the run's registration outcome into its manifest.json: the `registry` entry, `status` and `error`."""
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["registry"] = entry
    manifest["status"] = status
    if error is None:
        manifest.pop("error", None)
    else:
        manifest["error"] = error
    write_json(path, manifest)
