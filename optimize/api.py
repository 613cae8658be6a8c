"""The Python API (`from optimize import run, load_recipe`) and the result of a run as `optimize run --json` prints
it. Light to import: the pipeline's modules name torch, ONNX Runtime and MLflow through optimize.lazy, so they are
imported when a run first uses them."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimize.console import console_to
from optimize.pipeline import RunOptions
from optimize.pipeline import run as run_pipeline
from optimize.recipe import required_targets
from optimize.registry import Registration
from optimize.reporting.runs import MANIFEST, VariantLine, describe, json_object

# `status` of a command's JSON by exit code: 0 is the command's own word ("passed" for run and smoke, "ok" for the
# others), 1 "failed" (a gate), 130 "interrupted", anything else "error".
FAILED, ERROR, INTERRUPTED = "failed", "error", "interrupted"


def status_of(exit_code: int, ok: str = "ok") -> str:
    """The JSON `status` word for an exit code (see the module's constants)."""
    if exit_code == 0:
        return ok
    return {1: FAILED, 130: INTERRUPTED}.get(exit_code, ERROR)


@dataclass(frozen=True)
class RegisteredVersion:
    """A registered model version that holds a passing variant of the run. `already_registered`: the store held
    this model already (same bytes, same checks; a rerun), so the run reports that version and made no new one."""

    variant: str
    model_name: str
    version: int
    already_registered: bool = False

    @property
    def uri(self) -> str:
        """models:/NAME/VERSION."""
        return f"models:/{self.model_name}/{self.version}"

    def as_json(self) -> dict[str, Any]:
        """A JSON-able dict (with `uri`)."""
        return {
            "variant": self.variant,
            "model_name": self.model_name,
            "version": self.version,
            "uri": self.uri,
            "already_registered": self.already_registered,
        }


@dataclass(frozen=True)
class RunResult:
    """The outcome of a run that reached its gates.

    `status` is "passed" (exit_code 0: no variant failed and at least one passed) or "failed" (exit_code 1).
    `variants` are the verdicts per variant in recipe order, each with its key numbers on the first target that
    ran it (`optimize runs` shows the same). `registered` is empty when registration was off or nothing passed;
    `alias` (e.g. "candidate") points to the first passing variant's version, `alias_uri` is models:/NAME@ALIAS.
    Paths are absolute. A run that stops before a verdict raises instead (see `run`).
    """

    run_dir: Path
    run_id: str
    recipe: str
    recipe_file: Path
    status: str
    exit_code: int
    variants: tuple[VariantLine, ...] = ()
    registered: tuple[RegisteredVersion, ...] = ()
    model_name: str | None = None
    alias: str | None = None
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None

    @property
    def passed(self) -> bool:
        """True when every gate that ran passed (exit code 0)."""
        return self.exit_code == 0

    @property
    def report_html(self) -> Path:
        """The run's report page."""
        return self.run_dir / "report.html"

    @property
    def report_md(self) -> Path:
        """The run's Markdown report."""
        return self.run_dir / "report.md"

    @property
    def alias_uri(self) -> str | None:
        """models:/NAME@ALIAS when something was registered (or found registered), else None."""
        return f"models:/{self.model_name}@{self.alias}" if self.registered and self.alias else None

    @classmethod
    def of(cls, run_dir: Path, status: str, exit_code: int, registered: Registration | None) -> RunResult:
        """The result of the run in `run_dir`, from what the pipeline returned (verdict status, exit code and
        the registration: None when registration was off)."""

        line = describe(run_dir)
        manifest = _manifest(run_dir)
        order = {v.name: i for i, v in enumerate(line.variants)}
        found = [(n, v, False) for n, v in registered.versions.items()] if registered else []
        found += [(n, v, True) for n, v in registered.already.items()] if registered else []
        model = registered.model_name if registered else None
        versions = tuple(
            RegisteredVersion(n, str(model), int(v), already)
            for n, v, already in sorted(found, key=lambda f: (order.get(f[0], len(order)), f[0]))
        )
        return cls(
            run_dir=Path(run_dir).resolve(),
            run_id=line.run_id,
            recipe=line.recipe,
            recipe_file=Path(str(manifest.get("recipe_file") or "")),
            status=status,
            exit_code=exit_code,
            variants=tuple(line.variants),
            registered=versions,
            model_name=model if versions else None,
            alias=registered.alias if registered and versions else None,
            tracking_uri=registered.tracking_uri if registered else None,
            mlflow_run_id=registered.mlflow_run_id if registered else None,
        )

    def as_json(self) -> dict[str, Any]:
        """The object `optimize run --json` prints (see `run_json`)."""
        return {
            **_run_json_skeleton(),
            "recipe": self.recipe,
            "recipe_file": str(self.recipe_file),
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "status": self.status,
            "exit_code": self.exit_code,
            "verdict": self.status,
            "variants": [_variant_json(v) for v in self.variants],
            "registered": [r.as_json() for r in self.registered],
            "model_name": self.model_name,
            "alias": self.alias,
            "alias_uri": self.alias_uri,
            "tracking_uri": self.tracking_uri,
            "mlflow_run_id": self.mlflow_run_id,
            "report_html": str(self.report_html),
            "report_md": str(self.report_md),
        }


def _manifest(run_dir: Path) -> dict[str, Any]:
    """The run's manifest.json, or {} where it cannot be read (a run that failed while writing it)."""

    return json_object(Path(run_dir) / MANIFEST) or {}


def _variant_json(v: VariantLine) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(v)


def _run_json_skeleton() -> dict[str, Any]:
    """Every key of `optimize run --json`, empty: a failed run fills what it got to."""
    return {
        "command": "run",
        "recipe": None,
        "recipe_file": None,
        "run_id": None,
        "run_dir": None,
        "status": None,
        "exit_code": None,
        "error": None,
        "verdict": None,
        "variants": [],
        "registered": [],
        "model_name": None,
        "alias": None,
        "alias_uri": None,
        "tracking_uri": None,
        "mlflow_run_id": None,
        "report_html": None,
        "report_md": None,
    }


def error_json(
    recipe_file: str | Path | None, error: BaseException | None, exit_code: int, message: str
) -> dict[str, Any]:
    """`optimize run --json` for a run that ended without a result: a bad recipe or usage (2, no run directory),
    a missing runtime (4, none either), a failed stage (3), an unreachable or refusing registry (5, 7; the gates
    ran, so `verdict` and `variants` are there), an interrupt (130). `run_dir` and what the run directory holds
    are filled where the run got one (the pipeline puts it on the error as `run_dir`)."""

    out = {
        **_run_json_skeleton(),
        "recipe_file": str(recipe_file) if recipe_file is not None else None,
        "status": status_of(exit_code, "passed"),
        "exit_code": exit_code,
        "error": message,
    }
    run_dir = getattr(error, "run_dir", None)
    if run_dir is None:
        return out
    run_dir = Path(run_dir).resolve()
    line = describe(run_dir)
    manifest = _manifest(run_dir)
    out.update(
        recipe=line.recipe,
        recipe_file=manifest.get("recipe_file") or out["recipe_file"],
        run_id=line.run_id,
        run_dir=str(run_dir),
        verdict=line.verdict,
        variants=[_variant_json(v) for v in line.variants],
        tracking_uri=(manifest.get("registry") or {}).get("tracking_uri"),
        report_html=str(run_dir / "report.html") if (run_dir / "report.html").is_file() else None,
        report_md=str(run_dir / "report.md") if (run_dir / "report.md").is_file() else None,
    )
    return out


def execute(recipe: str | Path, options: RunOptions) -> RunResult:
    """Run `recipe` with the pipeline's options and return its RunResult (the CLI's `optimize run` and `run`)."""

    done = run_pipeline(recipe, options)
    return RunResult.of(done.run_dir, done.status, done.exit_code, done.registered)


def run(
    recipe: str | Path,
    *,
    runs_dir: str | Path = "runs",
    tracking_uri: str | None = None,
    require_targets: Iterable[str] = (),
    register: bool = True,
    cache: bool = True,
    rebench: bool = False,
    progress: bool = False,
) -> RunResult:
    """Build, measure and gate every variant of `recipe`, and register those that pass: `optimize run` from
    Python. The arguments are the command's options (`register=False` is `--no-register`, `cache=False`
    `--no-cache`); `progress=True` shows the stage lines on sys.stderr (warnings are shown either way).

    Returns a RunResult for a run that reached its gates, passed (exit_code 0) or not (1). Raises an
    `optimize.OptimizeError` for anything else, with its `exit_code` as documented for the CLI (2 bad recipe or
    data, 3 a stage failed, 4 a runtime missing, 5 registry unreachable, 7 credentials refused, 130
    interrupted) and `run_dir` set where the run had created its directory (None before that).

    The caller's file descriptors are left alone: what libraries print from Python during a stage goes to the
    stage's log (`logs/<stage>.log`) by replacing sys.stdout and sys.stderr for that stage only, and output of
    native code is not captured (the CLI, which owns its process, redirects fds 1 and 2 instead). Logging
    configuration is not changed."""

    options = RunOptions(
        runs_dir=Path(runs_dir),
        tracking_uri=tracking_uri,
        require_targets=required_targets(require_targets, "require_targets"),
        register=register,
        quiet=not progress,
        cache=cache,
        rebench=rebench,
        capture_fds=False,
    )
    with console_to(sys.stderr):
        return execute(recipe, options)
