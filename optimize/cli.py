"""The `optimize` command line. Thin: parse, call, render. Heavy libraries (torch, onnxruntime, mlflow, numpy)
are named through optimize.lazy and imported only when a command uses them, so `--help`, `validate` and `plan`
stay fast."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from optimize import __version__
from optimize.cache import StageCache, cache_root, format_size, parse_age, parse_size
from optimize.console import Progress, Say, console, stdout_console
from optimize.errors import GateFailedError, OptimizeError, RecipeError, RuntimeMissingError
from optimize.files import append_text, display_path, write_bytes, write_text
from optimize.lazy import lazy

# The modules behind the commands, named here and imported when a command first uses one: `optimize --help`
# imports none of them (the recipe models alone cost 0.2 s of pydantic), `validate` the recipe and preflight.
api = lazy("optimize.api")
doctor_mod = lazy("optimize.doctor")
pipeline = lazy("optimize.pipeline")
plan_mod = lazy("optimize.plan")
preflight = lazy("optimize.preflight")
recipe_mod = lazy("optimize.recipe")
registry = lazy("optimize.registry")
promotion = lazy("optimize.registry.promotion")
smoke_mod = lazy("optimize.registry.smoke")
ci = lazy("optimize.reporting.ci")
cmp = lazy("optimize.reporting.compare")
html = lazy("optimize.reporting.html")
runs_mod = lazy("optimize.reporting.runs")
serving = lazy("optimize.serving.server")
loadtest_mod = lazy("optimize.serving.loadtest")
deploy_render_mod = lazy("optimize.deploy.render")
deploy_validate_mod = lazy("optimize.deploy.validate")
analyze_mod = lazy("optimize.deploy.analyze")

if TYPE_CHECKING:
    from optimize.api import RunResult
    from optimize.cache import PruneResult

app = typer.Typer(
    name="optimize",
    help="Recipe-driven model optimisation: export → FP16/INT8 → TensorRT engines → evaluate → benchmark → gate "
    "→ register.\n\n"
    "Exit codes: 0 every gate that ran passed; 1 a gate failed (or nothing passed); 2 bad recipe or usage; "
    "3 a stage failed; 4 a required runtime or device is missing; 5 the registry is unreachable; "
    "6 an artifact is not what was gated (sha256 or golden outputs); 7 the registry refused the credentials.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# `json_error`: set by a command given --json; builds the JSON object `main` prints on stdout when it fails.
_state: dict[str, Any] = {"debug": False, "json_error": None}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"optimize {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug
    _state["json_error"] = None


_JSON_HELP = (
    "Print the outcome as one JSON object on stdout, and nothing else there (progress stays on stderr); a "
    "failure prints one too, with status, exit_code and error."
)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", help="The recipe YAML file.")],
    runs_dir: Annotated[
        Path, typer.Option("--runs-dir", metavar="DIR", help="Where run directories are created.")
    ] = Path("runs"),
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            metavar="URI",
            help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, the recipe's, else sqlite:///./mlflow.db).",
        ),
    ] = None,
    require_target: Annotated[
        list[str] | None,
        typer.Option(
            "--require-target",
            metavar="TARGET",
            help="Fail with exit 4 instead of skipping when this target is missing (repeatable): "
            "onnxruntime-cpu, onnxruntime-cuda, tensorrt, torch-cpu, torch-cuda.",
        ),
    ] = None,
    register: Annotated[
        bool,
        typer.Option(
            "--register/--no-register",
            help="Log the run to MLflow and register what passed; a variant the store holds already as the same "
            "model (bytes and checks) is not registered again.",
        ),
    ] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    rebench: Annotated[
        bool,
        typer.Option(
            "--rebench", help="Measure latency and memory, and load-test, again instead of taking them from the cache."
        ),
    ] = False,
    cache: Annotated[
        bool,
        typer.Option(
            "--cache/--no-cache",
            help="Reuse stage results (export, precision, evaluate, benchmark) from the stage cache "
            "($OPTIMIZE_CACHE_DIR, else ~/.cache/optimize) and store new ones there.",
        ),
    ] = True,
    junit: Annotated[
        Path | None,
        typer.Option(
            "--junit",
            metavar="FILE",
            help="Also write JUnit XML here: one test case per gate per variant and target; a run that "
            "stops before its gates gives one <error> case with the reason.",
        ),
    ] = None,
    summary: Annotated[
        Path | None,
        typer.Option(
            "--summary",
            metavar="FILE",
            help="Append the Markdown gate table to FILE (e.g. $GITHUB_STEP_SUMMARY), or the error.",
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help=_JSON_HELP + " Keys: command, recipe, recipe_file, run_id, run_dir, status (passed, failed, error, "
            "interrupted), exit_code, error, verdict, variants (name, status, target, p50_speedup, shape, "
            "cosine_min, reason), registered (variant, model_name, version, uri, already_registered), model_name, "
            "alias, alias_uri, tracking_uri, mlflow_run_id, report_html, report_md; null or empty where the run "
            "did not get that far (no run_dir for a bad recipe).",
        ),
    ] = False,
) -> None:
    """Build, measure and gate every variant of RECIPE; register those that pass. Progress goes to stderr, after
    the plan's summary (`optimize plan`: what the stage cache holds, what will be made and why); the outcome
    (failed and skipped gates, the verdict, the report, what was registered) to stdout."""

    if as_json:
        _state["json_error"] = lambda e, code, line: api.error_json(recipe, e, code, line)
    required = _required_targets(require_target)

    options = pipeline.RunOptions(runs_dir, tracking_uri, required, register, quiet, cache=cache, rebench=rebench)
    try:
        with _stdout_to_stderr(as_json):
            if cache and not quiet:
                _plan_summary(recipe, required, rebench)
            result = api.execute(recipe, options)
    except Exception as e:
        _ci_error_files(junit, summary, recipe, e)
        raise
    _ci_files(junit, summary, result.run_dir)
    if as_json:
        _state["json_error"] = None
        typer.echo(json.dumps(result.as_json(), indent=2))
    else:
        _print_run(result)
    raise typer.Exit(result.exit_code)


def _plan_summary(recipe: Path, required: tuple[str, ...], rebench: bool) -> None:
    """The plan's summary before a run: what is cached, what will be made and why. A recipe, data or target
    the plan cannot take is left to the run, whose checks go further and whose error it reports."""
    try:
        made = plan_mod.make(recipe, required, rebench=rebench)
    except OptimizeError:
        return
    plan_mod.summarise(made, console())


def _print_run(result: RunResult) -> None:
    """`optimize run`'s outcome on stdout: gates that failed or were skipped, the verdict and the report, what was
    registered and where the alias points."""
    from rich.markup import escape

    con = stdout_console()
    colour = "green" if result.passed else "red"
    verdict = json.loads((result.run_dir / "verdict.json").read_text())
    for row in verdict["gates"]:
        if row["status"] != "passed":
            mark = "[red]✗ failed[/] " if row["status"] == "failed" else "[yellow]- skipped[/]"
            con.print(
                f"{mark} " + escape(f"{row['variant']} @ {row['target']}: {row['check']} — {row.get('reason', '')}"),
                soft_wrap=True,
            )
    con.print(
        f"[bold {colour}]{result.status.upper()}[/]  report: {escape(display_path(result.report_html))}", soft_wrap=True
    )
    for r in result.registered:
        if not r.already_registered:
            con.print(escape(f"registered {r.model_name} version {r.version} ({r.variant}) → {r.uri}"), soft_wrap=True)
    same = ", ".join(f"v{r.version} ({r.variant})" for r in result.registered if r.already_registered)
    if same:
        con.print(
            escape(f"already registered: {result.model_name} {same} (the same model bytes, verified the same way)"),
            soft_wrap=True,
        )
        if result.mlflow_run_id is None:
            recipe_uri = (
                json.loads((result.run_dir / "recipe.json").read_text()).get("registry", {}).get("tracking_uri")
            )
            retry = registry.retry_command(result.run_dir, str(result.tracking_uri), recipe_uri)
            con.print(
                escape(f"nothing new logged to MLflow; `{retry}` registers this run as new versions"), soft_wrap=True
            )
    if result.alias_uri:
        con.print(escape(f"alias {result.alias} → {result.alias_uri}  (store: {result.tracking_uri})"), soft_wrap=True)


@contextmanager
def _stdout_to_stderr(on: bool) -> Iterator[None]:
    """With --json, fd 1 and sys.stdout point to stderr while the command works, so that nothing but the JSON
    object reaches stdout (a library printing between stages included). The CLI owns its process; the Python
    API never does this."""
    if not on:
        yield
        return
    import os
    from contextlib import redirect_stdout

    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@app.command()
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe YAML files.")],
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON list: per recipe its name, registered model, variants, targets and gate count, "
            "or its errors.",
        ),
    ] = False,
) -> None:
    """Check recipes and the files they name without running them: model and data files, npz keys, dtypes and
    shapes against the model's inputs (an ONNX source's read from the file), tokenizer folders (no torch, ONNX
    Runtime or MLflow import). `optimize run` makes the same checks before its first stage."""

    failed = 0
    described = []
    for path in recipes:
        try:
            r = recipe_mod.load_recipe(path)
            preflight.check(r, path)
        except RecipeError as e:
            failed += 1
            described.append({"path": str(path), "ok": False, "errors": str(e).splitlines()})
            if not as_json:
                for line in str(e).splitlines():
                    typer.echo(line, err=True)
            continue
        described.append(
            {
                "path": str(path),
                "ok": True,
                "name": r.name,
                "model_name": r.registry.model_name or r.name,
                "variants": [{"name": v.name, "kind": v.kind} for v in r.precision.variants],
                "targets": list(r.benchmark.targets),
                "optional_targets": list(r.benchmark.optional_targets),
                "gates": len(r.gates),
            }
        )
        if not as_json:
            variants = ", ".join(f"{v.name} ({v.kind})" for v in r.precision.variants)
            typer.echo(f"{path}: ok — {r.name}: fp32 baseline + {variants}; {len(r.gates)} gate(s)")
    if as_json:
        typer.echo(json.dumps(described, indent=2))
    if failed:
        raise typer.Exit(2)


@app.command()
def plan(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    require_target: Annotated[
        list[str] | None,
        typer.Option("--require-target", metavar="TARGET", help="As `optimize run --require-target`."),
    ] = None,
    rebench: Annotated[
        bool, typer.Option("--rebench", help="As `optimize run --rebench`: benchmarks count as misses.")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON object: recipe, targets, units (stage, unit, status, key, why, last_s), hits, "
            "unknown, to_make, estimate_s.",
        ),
    ] = False,
) -> None:
    """What `optimize run RECIPE` would make and what it would take from the stage cache: every unit of cached
    work (export, fusion, precision per variant, engine per variant, evaluate per variant and target, benchmark
    per target) with its cache key, hit or miss, why it misses (the input, config field, library version, device or
    code that changed since that unit last ran) and its time then. Builds nothing; imports no torch, ONNX
    Runtime or MLflow. Status: hit, miss, after (waits for a miss upstream), unknown (an entry point's model or
    data is identified by running it)."""
    made = plan_mod.make(recipe, _required_targets(require_target), rebench=rebench)
    if as_json:
        typer.echo(json.dumps(made.as_json(), indent=2))
    else:
        plan_mod.render(made, stdout_console())


@app.command()
def schema() -> None:
    """Print the JSON schema of the recipe format (with every field's description)."""

    typer.echo(json.dumps(recipe_mod.json_schema(), indent=2))


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    require_target: Annotated[
        list[str] | None,
        typer.Option(
            "--require-target",
            metavar="TARGET",
            help="After the report, exit 4 when this target cannot run here (repeatable): "
            "onnxruntime-cpu, onnxruntime-cuda, tensorrt, torch-cpu, torch-cuda.",
        ),
    ] = None,
) -> None:
    """Report what this machine can run: GPUs and driver, torch, TensorRT, ONNX Runtime, ModelOpt, MLflow,
    and whether each recipe target is available (and why not)."""
    required = _required_targets(require_target)

    report = doctor_mod.diagnose()
    typer.echo(json.dumps(report, indent=2) if as_json else doctor_mod.render(report), nl=as_json)
    missing = [(t, report["targets"][t]["reason"]) for t in required if report["targets"][t]["reason"]]
    if missing:
        raise RuntimeMissingError("; ".join(f"required target {t} is not available: {reason}" for t, reason in missing))


_TRACKING = typer.Option(
    "--tracking-uri",
    metavar="URI",
    help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db).",
)


def _tracking(uri: str | None) -> str:

    return registry.resolve_tracking_uri(uri, None)


@app.command()
def register(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A finished run directory (runs/<recipe>/<id>).")],
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            metavar="URI",
            help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, the run's recipe, else sqlite:///./mlflow.db).",
        ),
    ] = None,
) -> None:
    """Register a finished run: one whose registration failed (registry down), or one that `optimize run`
    found registered already (same model bytes, same checks), as new versions. Never a second version for the
    same run, never an empty registered model."""

    reg = registry.register_run(run_dir, tracking_uri)
    for variant, version in reg.versions.items():
        typer.echo(f"registered {reg.model_name} version {version} ({variant}) → models:/{reg.model_name}/{version}")
    if reg.already:
        typer.echo(f"already registered: {', '.join(f'{v} v{n}' for v, n in reg.already.items())}")
    if not reg.versions and not reg.already:
        typer.echo("run logged; nothing passed, nothing registered")


@app.command()
def promote(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Registered model name.")],
    to: Annotated[str, typer.Option("--to", metavar="ALIAS", help="The alias to move, e.g. canary, production.")],
    version: Annotated[int | None, typer.Option("--version", metavar="N", help="The version to promote.")] = None,
    from_alias: Annotated[
        str | None, typer.Option("--from", metavar="ALIAS", help="Promote the version this alias points to.")
    ] = None,
    tracking_uri: Annotated[str | None, _TRACKING] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help=_JSON_HELP + " Keys: command, model, alias, uri, version, previous, sha256, unchanged, status (ok, "
            "failed, error), exit_code, error.",
        ),
    ] = False,
) -> None:
    """Move ALIAS to a version that passed its gates, after verifying its artifact's sha256; the version
    the alias left is recorded for `optimize rollback`."""
    if as_json:
        _state["json_error"] = _json_outcome("promote", model=model, alias=to, uri=f"models:/{model}@{to}")
    if (version is None) == (from_alias is None):
        raise _usage("promote: give exactly one of --version N and --from ALIAS")

    done = promotion.promote(model, to, version=version, from_alias=from_alias, tracking_uri=_tracking(tracking_uri))
    if as_json:
        _print_json("promote", {"uri": f"models:/{model}@{to}", "unchanged": False, **done})
        return
    before = f" (was version {done['previous']})" if done.get("previous") else ""
    typer.echo(f"{model}@{to} → version {done['version']}{before}; sha256 verified")


@app.command()
def rollback(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Registered model name.")],
    alias: Annotated[str, typer.Option("--alias", metavar="ALIAS", help="The alias to move back.")],
    tracking_uri: Annotated[str | None, _TRACKING] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help=_JSON_HELP + " Keys: command, model, alias, uri, version (now), previous (before this call), sha256, "
            "already_rolled_back, rolled_back_from, status (ok, error), exit_code, error.",
        ),
    ] = False,
) -> None:
    """Move ALIAS back to the version it pointed to before its last promotion (verified the same way)."""
    if as_json:
        _state["json_error"] = _json_outcome("rollback", model=model, alias=alias, uri=f"models:/{model}@{alias}")

    done = promotion.rollback(model, alias, tracking_uri=_tracking(tracking_uri))
    if as_json:
        extra = {"uri": f"models:/{model}@{alias}", "already_rolled_back": False, "rolled_back_from": None}
        _print_json("rollback", {**extra, **done})
        return
    if done.get("already_rolled_back"):
        typer.echo(
            f"{model}@{alias} already rolled back from version {done['rolled_back_from']}; "
            f"still version {done['version']}"
        )
    else:
        typer.echo(f"{model}@{alias} → version {done['version']} (was version {done['previous']}); sha256 verified")


@app.command()
def smoke(
    uri: Annotated[str, typer.Argument(metavar="URI", help="models:/NAME@ALIAS or models:/NAME/VERSION.")],
    target: Annotated[
        str | None,
        typer.Option("--target", metavar="TARGET", help="Runtime to load it on (default: the first it was gated on)."),
    ] = None,
    tracking_uri: Annotated[str | None, _TRACKING] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help=_JSON_HELP + " Keys: command, uri, model, version, target, sha256, max_abs_error, worst_output, "
            "golden_target, p50_ms, budget_ms, budget_source, latency_shape, latency_check, status (passed, "
            "failed: over the latency budget, error), exit_code, error.",
        ),
    ] = False,
) -> None:
    """Load a registered model on this machine, run its stored sample inputs, compare with its golden outputs
    within the recorded tolerance and its latency with the recipe's budget; non-zero exit with the reason."""
    if as_json:
        _state["json_error"] = _json_outcome("smoke", "passed", uri=uri, target=target)

    result = smoke_mod.smoke(uri, tracking_uri=_tracking(tracking_uri), target=target)
    if as_json:
        _print_json("smoke", result, ok="passed")
        return
    typer.echo(
        f"{uri}: ok on {result['target']} — max |diff| {result['max_abs_error']:.3g} within tolerance, "
        f"p50 {result['p50_ms']:.3f} ms"
        + (f" (budget {result['budget_ms']:.3f} ms)" if result.get("budget_ms") else "")
    )


@app.command()
def serve(
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE",
            help="models:/NAME@ALIAS, models:/NAME/VERSION, a run folder of `optimize run` (with --variant) or an "
            ".onnx file.",
        ),
    ],
    variant: Annotated[
        str | None,
        typer.Option("--variant", metavar="V", help="The run folder's variant (default: its one passing variant)."),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            metavar="TARGET",
            help="onnxruntime-cpu or onnxruntime-cuda (default: the first the version was gated on that runs here, "
            "else onnxruntime-cpu).",
        ),
    ] = None,
    host: Annotated[str, typer.Option("--host", metavar="HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="PORT", min=0, help="Port; 0: the OS picks one.")] = 8000,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            metavar="RECIPE",
            help="Take the serving settings from this recipe's `serving:` section (default: the recipe recorded "
            "with the version or run, else the defaults).",
        ),
    ] = None,
    tracking_uri: Annotated[str | None, _TRACKING] = None,
    ready_file: Annotated[
        Path | None,
        typer.Option(
            "--ready-file",
            metavar="FILE",
            help="Once ready, write JSON here (atomically): url, pid, model, version, sha256, variant, target, "
            "drain_s.",
        ),
    ] = None,
    max_batch_size: Annotated[
        int | None, typer.Option("--max-batch-size", metavar="N", help="Overrides serving.max_batch_size.")
    ] = None,
    max_queue_delay_ms: Annotated[
        float | None,
        typer.Option("--max-queue-delay-ms", metavar="MS", help="Overrides serving.max_queue_delay_ms."),
    ] = None,
    max_queue: Annotated[
        int | None, typer.Option("--max-queue", metavar="N", help="Overrides serving.max_queue.")
    ] = None,
) -> None:
    """Serve a model over HTTP with the Open Inference Protocol (KServe v2, as Triton speaks it; JSON and binary
    tensors): /v2/health/live and /ready, /v2/models/NAME[/versions/V][/ready|/infer], /metrics (Prometheus).
    A registered version's model.onnx is verified against its sha256 first (exit 6). Requests are batched
    dynamically; a full queue or a request that cannot start within its deadline gets 503 with Retry-After at
    once. Ready (200) once loaded and warmed. SIGTERM or Ctrl-C: readiness goes 503, what is queued or running is
    answered, exit 0 within serving.drain_s."""
    overrides = {"max_batch_size": max_batch_size, "max_queue_delay_ms": max_queue_delay_ms, "max_queue": max_queue}
    serving.main(
        source,
        variant=variant,
        target=target,
        host=host,
        port=port,
        recipe=recipe,
        tracking_uri=tracking_uri,
        ready_file=ready_file,
        overrides=overrides,
    )


@app.command()
def loadtest(
    target: Annotated[
        str,
        typer.Argument(
            metavar="URL|MODEL_URI",
            help="A running server (http://127.0.0.1:PORT), or models:/NAME@ALIAS or models:/NAME/VERSION to serve on "
            "127.0.0.1 for the test (`optimize serve` in a child process, stopped after).",
        ),
    ],
    recipe: Annotated[
        Path,
        typer.Option(
            "--recipe",
            metavar="RECIPE",
            help="Its evaluation dataset gives the requests (real inputs), `serving.load` the steps, `serving.slo` "
            "the budgets.",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", metavar="FILE", help="Where the results go (JSON, written atomically).")
    ] = Path("loadtest.json"),
    plot: Annotated[
        Path | None, typer.Option("--plot", metavar="PNG", help="Also draw p50 and p99 against the load here.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", metavar="NAME", help="The served model (default: the one the server's /metrics names)."
        ),
    ] = None,
    tracking_uri: Annotated[str | None, _TRACKING] = None,
    server_pid: Annotated[
        int | None,
        typer.Option(
            "--server-pid",
            metavar="PID",
            help="The server's process on this machine, for its CPU utilisation and peak RSS (with models:/, the "
            "child's own); without it they are not measured nor gated.",
        ),
    ] = None,
    allow_remote: Annotated[
        bool,
        typer.Option(
            "--allow-remote", help="Send load to a host that is not loopback (refused otherwise: this is a test tool)."
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help=_JSON_HELP + " Keys: command, url, model, max_rps_at_slo, judged, steps, out, status (passed, failed: "
            "the judged step broke the SLO, error), exit_code, error.",
        ),
    ] = False,
) -> None:
    """Load-test a KServe v2 server with open-loop, constant-arrival-rate steps (latency from each request's due
    time, wrk2's method) built from the recipe's evaluation data; find max_rps_at_slo by a bounded step search; write
    --out (and --plot). Exit 1 when the judged step (serving.load.target_rps, else max_rps_at_slo) breaks
    serving.slo: p99, error rate, and the server's CPU and memory utilisation where measured."""
    if as_json:
        _state["json_error"] = _json_outcome("loadtest", "passed", url=target)
    rec = recipe_mod.load_recipe(recipe)
    progress, say = Progress(quiet), Say(quiet)

    def on_step(step: dict[str, Any]) -> None:
        say.line(loadtest_mod.step_line(step))

    with _stdout_to_stderr(as_json), progress.stage("loadtest", target) as record:
        if target.startswith("models:/"):
            with serving.start_local(target, recipe=recipe, tracking_uri=_tracking(tracking_uri)) as local:
                doc = loadtest_mod.loadtest_server(
                    local.url, rec, model=local.model, server_pid=local.pid, progress=progress.bar(), on_step=on_step
                )
        else:
            doc = loadtest_mod.loadtest_server(
                target, rec, model=model, server_pid=server_pid, allow_remote=allow_remote, progress=progress.bar(),
                on_step=on_step,
            )  # fmt: skip
        record["detail"] = f"{target}: max_rps_at_slo {doc['max_rps_at_slo']:g}"
    loadtest_mod.write_loadtest(doc, out)
    if plot is not None:
        loadtest_mod.plot_latency_vs_load(doc, plot)
    shown = {k: doc[k] for k in ("url", "model", "max_rps_at_slo", "judged", "steps")} | {"out": display_path(out)}
    failures = loadtest_mod.judge(doc, rec.serving.slo)
    if failures:
        if as_json:
            _state["json_error"] = _json_outcome("loadtest", "passed", **shown)
        raise GateFailedError(f"loadtest {doc['url']}: {'; '.join(failures)} (see {display_path(out)})")
    if as_json:
        _print_json("loadtest", shown, ok="passed")
        return
    typer.echo(loadtest_mod.summary_text(doc))


@app.command("canary-manifest")
def canary_manifest(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Registered model name.")],
    alias: Annotated[str, typer.Option("--alias", metavar="ALIAS", help="The alias to describe.")] = "canary",
    tracking_uri: Annotated[str | None, _TRACKING] = None,
) -> None:
    """Print, as JSON, what a deployment step needs: model URI, version, sha256, runtime, target, GPU
    architecture, recipe and gates of the version ALIAS points to."""

    typer.echo(json.dumps(promotion.canary_manifest(model, alias, tracking_uri=_tracking(tracking_uri)), indent=2))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory (runs/<recipe>/<run-id>).")],
) -> None:
    """(Re)write RUN_DIR/report.html (one self-contained page: verdict, gates, plots, lineage) and its plots as
    RUN_DIR/plots/*.png, from the run's metrics.json, verdict.json, manifest.json and distributions.npz (when
    the run has one); print the report's path. Works for older runs too."""

    typer.echo(display_path(html.write(run_dir)))


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(metavar="RUN_A", help="A finished run directory.")],
    run_b: Annotated[
        Path | None, typer.Argument(metavar="RUN_B", help="Another finished run directory (or give --vs).")
    ] = None,
    vs: Annotated[
        str | None,
        typer.Option(
            "--vs",
            metavar="URI",
            help="Compare RUN_A with a registered version instead: models:/NAME@ALIAS or models:/NAME/VERSION "
            "(its MLflow run's metrics.json, verdict.json, manifest.json and recipe).",
        ),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html",
            metavar="FILE",
            help="Where to write the HTML page (default: RUN_A/compare-<RUN_B's run id>.html, or "
            "RUN_A/compare-<NAME@ALIAS>.html, RUN_A/compare-<NAME-VERSION>.html with --vs).",
        ),
    ] = None,
    tracking_uri: Annotated[str | None, _TRACKING] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help=_JSON_HELP + " Keys: command, before and after (label, detail, recipe, run_id, verdict), metrics "
            "(variant, target, shape, metric, before, after, delta, change, better), gates (variant, target, gate, "
            "before_status, before_value, after_status, after_value, flipped), differences (section, key, before, "
            "after), html, status (ok, error), exit_code, error. The HTML page is written as without --json.",
        ),
    ] = False,
) -> None:
    """What changed between two runs: metrics per variant, target and shape (p50, p99, throughput, speed-up,
    cosine min, top-1, size, memory) with delta and % change, gates that flipped, hashes, library versions,
    hardware, recipe. Deltas go from the first to the second: RUN_A → RUN_B, and with --vs from the registered
    version to RUN_A (what RUN_A changes against, say, production). Prints tables and writes an HTML page."""
    if as_json:
        _state["json_error"] = _json_outcome(
            "compare", run_a=str(run_a), run_b=str(run_b) if run_b is not None else None, vs=vs
        )
    if (run_b is None) == (vs is None):
        raise _usage("compare: give either RUN_B or --vs models:/NAME@ALIAS")
    from contextlib import ExitStack

    with ExitStack() as stack:
        if run_b is not None:
            before, after = cmp.load_run(run_a), cmp.load_run(run_b)
            other = str(after.manifest.get("run_id") or run_b.name)
        else:
            after = cmp.load_run(run_a)
            before = stack.enter_context(cmp.registered(vs, _tracking(tracking_uri)))  # type: ignore[arg-type]
            other = str(vs)
        result = cmp.compare(before, after)
    if not as_json:
        cmp.print_table(result)
    page = html or run_a / cmp.default_html_name(other)
    write_text(page, cmp.html(result))
    if as_json:
        _print_json("compare", {**cmp.as_json(result), "html": str(page.resolve())})
    else:
        typer.echo(f"html: {display_path(page)}")


@app.command()
def runs(
    runs_dir: Annotated[
        Path, typer.Option("--runs-dir", metavar="DIR", help="The folder `optimize run` writes to.")
    ] = Path("runs"),
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON list: per run its run_id, recipe, path, started, status, verdict, variants "
            "(name, status, target, p50_speedup, shape, cosine_min, reason), report_html, report_md and error.",
        ),
    ] = False,
) -> None:
    """List the runs in DIR (runs/<recipe>/<run-id>), newest first: recipe, run id, status (running,
    measured, done, failed; incomplete without a readable manifest), verdict, per variant its p50 speed-up
    (worst shape) and cosine min on the first target that ran, and where its report is."""

    lines = runs_mod.list_runs(runs_dir)
    if as_json:
        typer.echo(json.dumps([r.as_json() for r in lines], indent=2))
    elif lines:
        runs_mod.render(lines)
    else:
        typer.echo(f"no runs in {runs_dir}")


cache_app = typer.Typer(
    help="The stage cache: entries under $OPTIMIZE_CACHE_DIR/stages (default ~/.cache/optimize/stages). "
    "The TensorRT timing caches beside it (tensorrt/) are never listed or removed by these commands.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls(
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON list: per entry its stage, key, path, size_bytes, created, last_used (UTC) and "
            "description.",
        ),
    ] = False,
) -> None:
    """List the cache entries (stage, key, size, created, last used, device and library versions), then the
    total size and the cache root. Listing reads entry.json only; files are verified when a run looks them up."""

    root = cache_root()
    infos = sorted(StageCache(root).entries(), key=lambda i: (i.stage, -i.last_used))
    if as_json:
        typer.echo(json.dumps([i.as_json() for i in infos], indent=2))
        return
    if infos:
        rows = [("STAGE", "KEY", "SIZE", "CREATED", "LAST USED", "DESCRIPTION")]
        for i in infos:
            size, created, used = format_size(i.size_bytes), _local_time(i.created), _local_time(i.last_used)
            rows.append((i.stage, i.key[:12], size, created, used, i.description))
        widths = [max(len(row[c]) for row in rows) for c in range(5)]
        for row in rows:
            typer.echo("  ".join(row[c].ljust(widths[c]) for c in range(5)) + "  " + row[5])
    total = sum(i.size_bytes for i in infos)
    typer.echo(f"{len(infos)} entr{'y' if len(infos) == 1 else 'ies'}, {format_size(total)} in {root / 'stages'}")


@cache_app.command("prune")
def cache_prune(
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than",
            metavar="AGE",
            help="Remove entries not used within AGE: a number and s, m, h, d or w (90s, 30m, 12h, 7d, 2w).",
        ),
    ] = None,
    max_size: Annotated[
        str | None,
        typer.Option(
            "--max-size",
            metavar="SIZE",
            help="Then remove least recently used entries until the entries total at most SIZE: 500MB, 20GB, "
            "1.5G (1 GB = 10^9 bytes; KiB, MiB, GiB are binary; a plain number is bytes).",
        ),
    ] = None,
) -> None:
    """Remove stage cache entries by age and/or total size (give at least one option). Entries that a running
    process holds are kept; temporary folders left by killed runs are removed too."""
    if older_than is None and max_size is None:
        raise _usage("cache prune: give --older-than AGE, --max-size SIZE or both")

    age_s = parse_age(older_than, what="--older-than") if older_than is not None else None
    size_bytes = parse_size(max_size, what="--max-size") if max_size is not None else None
    result = StageCache(cache_root()).prune(older_than_s=age_s, max_bytes=size_bytes)
    for i in result.removed:
        typer.echo(
            f"removed {i.stage} {i.key[:12]} ({format_size(i.size_bytes)}, last used {_local_time(i.last_used)})"
        )
    typer.echo(_prune_summary(result))


@cache_app.command("clear")
def cache_clear() -> None:
    """Remove every stage cache entry (except those a running process holds) and the temporary folders left by
    killed runs. The TensorRT timing caches are kept."""

    typer.echo(_prune_summary(StageCache(cache_root()).clear()))


def _prune_summary(result: PruneResult) -> str:
    """One line: what prune or clear removed and freed, and what it kept because it is in use."""

    n = len(result.removed)
    line = f"removed {n} entr{'y' if n == 1 else 'ies'}"
    if result.stale_removed:
        line += f" and {result.stale_removed} stale temporary folder(s)"
    line += f", freed {format_size(result.freed_bytes)}"
    if result.skipped_in_use:
        line += f"; kept {result.skipped_in_use} entr{'y' if result.skipped_in_use == 1 else 'ies'} in use"
    return line


deploy_app = typer.Typer(
    help="The production rollout of a registered version: Kubernetes Deployments, Service, autoscaling and "
    "disruption budget; the Istio canary (weighted routes, timeouts, retries, circuit breaking); Argo Rollouts "
    "with its Prometheus analysis; Prometheus alert rules; a Triton model repository. Derived from the recipe's "
    "`serving:` and `rollout:` sections and the version's measured load test, and checked with the tools those "
    "systems use.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("render")
def deploy_render(
    canary: Annotated[
        str, typer.Argument(metavar="MODEL_URI", help="The canary: models:/NAME@canary or models:/NAME/VERSION.")
    ],
    image: Annotated[
        str, typer.Option("--image", metavar="IMAGE", help="The container image with optimize installed.")
    ],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="The folder to write (replaced whole).")],
    stable: Annotated[
        str | None,
        typer.Option(
            "--stable",
            metavar="MODEL_URI",
            help="The version in production (default: the model's `production` alias, when it has one; none: a "
            "first rollout, the canary takes all traffic).",
        ),
    ] = None,
    formats: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            metavar="FORMAT",
            help="kubernetes (kubernetes/, argo-rollouts/, monitoring/) and/or triton (triton/NAME/: config.pbtxt "
            "and the verified model); repeatable; default kubernetes.",
        ),
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            metavar="RECIPE",
            help="Take `serving:` and `rollout:` from this recipe (default: the recipe recorded with the version).",
        ),
    ] = None,
    engine: Annotated[
        Path | None,
        typer.Option(
            "--engine",
            metavar="PLAN",
            help="A TensorRT plan built for the serving GPU: the Triton repository serves it (tensorrt_plan) "
            "instead of the ONNX model.",
        ),
    ] = None,
    cluster_tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--cluster-tracking-uri",
            metavar="URI",
            help="The MLflow tracking URI the pods download their version from (default: --tracking-uri's).",
        ),
    ] = None,
    prometheus: Annotated[
        str,
        typer.Option("--prometheus", metavar="URL", help="The Prometheus the Argo Rollouts analysis queries."),
    ] = "http://prometheus.monitoring:9090",
    tracking_uri: Annotated[str | None, _TRACKING] = None,
) -> None:
    """Write the rollout of MODEL_URI as plain YAML into DIR (apply with `kubectl apply -f DIR/kubernetes` or
    `-f DIR/argo-rollouts`, and `-f DIR/monitoring/prometheusrule.yaml`): pods sized from the version's load test
    (loadtest.* tags; else rollout.cpu and rollout.memory_mb), the canary weights of rollout.steps, alerts and
    analysis from serving.slo. The canary's model.onnx is verified against its sha256 first (exit 6). DIR/render.json
    records the versions, the numbers and how each size was derived. Check the result with `optimize deploy
    validate DIR`."""
    deploy_render_mod.main(
        canary,
        stable_uri=stable,
        image=image,
        out=out,
        formats=tuple(formats or ("kubernetes",)),
        tracking_uri=tracking_uri,
        recipe=recipe,
        engine=engine,
        cluster_tracking_uri=cluster_tracking_uri,
        prometheus_address=prometheus,
        echo=typer.echo,
    )


@deploy_app.command("validate")
def deploy_validate(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="A folder `optimize deploy render` wrote.")],
    allow_missing: Annotated[
        bool,
        typer.Option(
            "--allow-missing",
            help="Report a validator whose tool is not installed (promtool, node with the CRD schemas, "
            "tritonclient) as skipped instead of failing with exit 4.",
        ),
    ] = False,
) -> None:
    """Check a rendered folder: every Kubernetes object against the Kubernetes schemas from 1.29 to the newest
    kubernetes-validate ships (strict: unknown fields are errors); Istio, Argo Rollouts and PrometheusRule objects
    against their published schemas (node, OPTIMIZE_NODE_MODULES); the wiring (weights sum to 100, routes name
    existing subsets, hosts match the Service, autoscalers target what exists, queries read metrics the server
    exports); the alert rules with `promtool check rules` and `promtool test rules`; a Triton repository with
    Triton's own config protobuf against its model. Exit 1 on any error, 4 when a validator's tool is missing."""
    report = deploy_validate_mod.validate_folder(folder, allow_missing=allow_missing)
    typer.echo(deploy_validate_mod.format_report(report))
    if report.errors:
        raise GateFailedError(f"deploy validate: {folder}: {len(report.errors)} error(s); see above")
    if report.skipped and not allow_missing:
        missing = ", ".join(f"{name} ({why})" for name, why in report.skipped)
        raise RuntimeMissingError(f"deploy validate: {folder}: not checked: {missing}; install it or --allow-missing")


canary_app = typer.Typer(
    help="Judge a running canary from Prometheus (for pipelines that step the rollout themselves, not Argo).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(canary_app, name="canary")


@canary_app.command("analyze")
def canary_analyze(
    model: Annotated[str, typer.Argument(metavar="NAME", help="Registered model name.")],
    prometheus: Annotated[
        str, typer.Option("--prometheus", metavar="URL", help="The Prometheus that scrapes the servers.")
    ],
    tracking_uri: Annotated[str | None, _TRACKING] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            metavar="RECIPE",
            help="Take serving.slo and rollout.analysis from this recipe (default: the recipe recorded with the "
            "canary version, else the defaults).",
        ),
    ] = None,
    canary_alias: Annotated[str, typer.Option("--canary-alias", metavar="ALIAS", help="The canary.")] = "canary",
    stable_alias: Annotated[
        str,
        typer.Option(
            "--stable-alias",
            metavar="ALIAS",
            help="The version in production to compare with (when the model has no such alias: the SLO only).",
        ),
    ] = "production",
    once: Annotated[
        bool, typer.Option("--once", help="One measurement, now, instead of rollout.analysis.count.")
    ] = False,
    no_rollback: Annotated[
        bool, typer.Option("--no-rollback", help="On failure, exit 1 without moving the canary alias back.")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help=_JSON_HELP + " Keys: command, model, prometheus, canary, stable, budgets, measurements (each with its "
            "numbers, verdict and reasons), decision (promote, rollback, not-enough-data), rollback, rollback_error, "
            "status (passed, failed, error), exit_code, error.",
        ),
    ] = False,
) -> None:
    """Measure the canary every rollout.analysis.interval_s, up to rollout.analysis.count times, over the last
    window_s: its request count, p99 against serving.slo.p99_ms, error ratio against serving.slo.error_rate, and
    p99 against the stable version's (max_p99_ratio); the same PromQL as the Argo Rollouts analysis. Exit 0:
    promote (the measurements passed); 1: it failed beyond rollout.analysis.failure_limit and the canary alias was
    rolled back (`optimize rollback`); 2: not enough data; 3: Prometheus could not be queried."""
    if as_json:
        _state["json_error"] = _json_outcome("canary analyze", "passed", model=model, prometheus=prometheus)
    say = Say(False)  # measurement lines on stderr, with --json too
    doc = analyze_mod.analyze(
        model,
        prometheus=prometheus,
        tracking_uri=_tracking(tracking_uri),
        recipe=recipe,
        canary_alias=canary_alias,
        stable_alias=stable_alias,
        once=once,
        rollback=not no_rollback,
        on_measurement=lambda _m, line: say.line(line),
    )
    error = analyze_mod.decision_error(doc)
    if error is not None:
        if as_json:
            _state["json_error"] = lambda _e, code, line: {
                "command": "canary analyze", **doc, "status": api.status_of(code, "passed"), "exit_code": code,
                "error": line,
            }  # fmt: skip
        raise error
    if as_json:
        _print_json("canary analyze", doc, ok="passed")
        return
    typer.echo(analyze_mod.promote_line(doc, stable_alias))


def _local_time(epoch_s: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(epoch_s).strftime("%Y-%m-%d %H:%M")


def _ci_files(junit: Path | None, summary: Path | None, run_dir: Path) -> None:
    """`--junit` and `--summary` after a run that reached its gates: the run directory's junit.xml and
    summary.md, which the pipeline wrote last."""

    if junit:
        write_bytes(junit, (run_dir / "junit.xml").read_bytes())
    if summary:
        append_text(summary, (run_dir / "summary.md").read_text(encoding="utf-8"))


def _ci_error_files(junit: Path | None, summary: Path | None, recipe: Path, error: Exception) -> None:
    """`--junit` and `--summary` for a run that stopped before its gates (the error is re-raised after)."""
    if not (junit or summary):
        return

    code = error.exit_code if isinstance(error, OptimizeError) else 3
    if junit:
        write_text(junit, ci.junit_error_xml(str(recipe), error, code))
    if summary:
        append_text(summary, ci.summary_error_markdown(str(recipe), error, code))


def _required_targets(values: list[str] | None) -> tuple[str, ...]:
    """`--require-target` values, each a known target (exit 2 otherwise)."""

    return recipe_mod.required_targets(values, "--require-target")


def _usage(msg: str) -> OptimizeError:

    return RecipeError(msg)


def main() -> None:
    """Console entry point: run the app; an OptimizeError becomes one line on stderr and its exit code (and, for a
    command given --json, its JSON object on stdout)."""
    debug = "--debug" in sys.argv[1:]
    try:
        rc = app(standalone_mode=False)
    except OptimizeError as e:
        if debug:
            traceback.print_exc()
        lines = str(e).splitlines() or [type(e).__name__]
        head = (
            lines[0]
            if len(lines) == 1
            else f"{lines[0]} (and {len(lines) - 1} more problem(s); see `optimize validate`)"
        )
        _fail(e.exit_code, head, e)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort as e:
        _fail(130, "aborted", e)
    except (KeyboardInterrupt, EOFError) as e:
        _fail(130, "interrupted; the run directory keeps what was finished", e)
    except Exception as e:  # click usage errors and anything unexpected
        # recent typer vendors click as typer._click; typer.BadParameter's module is the click in use
        click_exceptions = sys.modules[typer.BadParameter.__module__]
        if isinstance(e, click_exceptions.UsageError):
            _fail(2, e.format_message(), e)
        if isinstance(e, click_exceptions.ClickException):
            _fail(e.exit_code, e.format_message(), e)
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (rerun with --debug for the traceback)"
        _fail(3, f"internal error {type(e).__name__}: {e}{hint}", e)
    sys.exit(rc if isinstance(rc, int) else 0)


# The commands that take --json for their outcome: a failure prints a JSON object too.
_JSON_COMMANDS = ("run", "promote", "rollback", "smoke", "compare", "loadtest", "canary analyze")


def _fail(code: int, line: str, error: BaseException) -> NoReturn:
    """End with exit `code`: with --json, the command's JSON object for the failure on stdout; then `error: LINE`
    on stderr."""
    build = _state["json_error"] or _usage_error_json()
    _state["json_error"] = None
    if build is not None:
        print(json.dumps(build(error, code, line), indent=2), flush=True)
    print(f"error: {line}", file=sys.stderr)
    sys.exit(code)


def _print_json(command: str, outcome: dict[str, Any], ok: str = "ok") -> None:
    """A --json command's outcome on stdout: the command, `outcome`, and status, exit_code 0, error null."""
    _state["json_error"] = None
    payload = {"command": command, **outcome, "status": ok, "exit_code": 0, "error": None}
    typer.echo(json.dumps(payload, indent=2))


def _usage_error_json() -> Callable[[BaseException | None, int, str], dict] | None:
    """For a failure before the command's body ran (a usage error such as an unknown option): the JSON builder
    of a command that was given --json, else None."""
    args = sys.argv[1:]
    words = [a for a in args if not a.startswith("-")]
    command = " ".join(words[:2]) if words[:1] == ["canary"] else next(iter(words), None)  # a sub-app's command
    if command not in _JSON_COMMANDS or "--json" not in args:
        return None
    if command == "run":
        return lambda e, code, line: api.error_json(None, e, code, line)
    return _json_outcome(command)


def _json_outcome(command: str, ok: str = "ok", **context: Any) -> Callable[[BaseException | None, int, str], dict]:
    """The JSON object of a failed --json command (other than run): the command, what it was given (`context`),
    status, exit_code and error."""

    return lambda _e, code, line: {
        "command": command,
        **context,
        "status": api.status_of(code, ok),
        "exit_code": code,
        "error": line,
    }
