"""The pipeline's serving stage (`serving.loadtest: true`): after the benchmark, each variant is served on
127.0.0.1 by `optimize serve` in a child process (its CPU and RSS its own) and load-tested with real requests
from the evaluation data; the numbers feed the `serving.*` gates, the report and the registered version.

One cached unit per (variant, ONNX Runtime target the benchmark ran). A load test is a measurement, as the
benchmark is: keyed on the machine, and made anew by `optimize run --rebench`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optimize.gates import SERVED_PREFIX
from optimize.lazy import lazy
from optimize.runtimes import runtime_libraries
from optimize.stage import Context, Done, Stage, Unit, restore

# `optimize serve` and the load generator: imported when a unit runs (`optimize plan` imports neither).
server = lazy("optimize.serving.server")
loadtest = lazy("optimize.serving.loadtest")
requests = lazy("optimize.serving.requests")

LOADTEST = "loadtest.json"
PLOT = "loadtest.png"
RUN_FOLDER = "serving"  # a run's load tests: serving/<variant>/<target>/loadtest.json and loadtest.png
# The libraries the served numbers depend on besides the runtime's: the server's and the load generator's (their
# versions are in the key as optimize.machine.LIBRARIES records them).
SERVING_LIBRARIES = ("starlette", "uvicorn", "prometheus-client")
# What metrics.json keeps of each step (the whole document is loadtest.json).
STEP_KEYS = ("rps", "achieved_rps", "sent", "ok", "error_rate", "within_slo")
LATENCY_KEYS = ("p50", "p90", "p99", "max")
JUDGED_KEYS = ("rps", "p99_ms", "error_rate", "cpu_utilisation", "rss_peak_mb", "memory_utilisation")


def served_targets(ctx: Context) -> list[str]:
    """The targets that run here and whose variants are served: ONNX Runtime's (the server's one runtime)."""
    return [t for t in ctx.ran if t.startswith(SERVED_PREFIX)]


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json keeps of a loadtest.json: the judged step's numbers (the `serving.*` gates read
    them), `max_rps_at_slo`, the SLO, and each step's rate, latency percentiles, error rate and verdict."""
    judged = doc.get("judged") or {}
    steps = []
    for step in doc.get("steps", []):
        row = {k: step.get(k) for k in STEP_KEYS}
        latency = step.get("latency_ms") or {}
        row.update({f"{k}_ms": latency.get(k) for k in LATENCY_KEYS})
        steps.append(row)
    return {
        **{k: judged.get(k) for k in JUDGED_KEYS},
        "max_rps_at_slo": doc.get("max_rps_at_slo"),
        "capacity": doc.get("capacity"),
        "slo": doc.get("slo"),
        "steps": steps,
    }


def run_folder(run_dir: Path, variant: str, target: str) -> Path:
    """Where a run keeps one variant's load test on one target."""
    return Path(run_dir) / RUN_FOLDER / variant / target


def _units(ctx: Context) -> list[Unit]:
    return [_unit(ctx, name, target) for target in served_targets(ctx) for name in ctx.runs_on(target)]


def _unit(ctx: Context, name: str, target: str) -> Unit:
    """Serve one variant's ONNX on `target` (the recipe's serving settings, a child process on 127.0.0.1) and
    load-test it; made anew with `optimize run --rebench`, as the benchmark is."""
    serving = ctx.recipe.serving

    def run(folder: Path) -> dict[str, Any]:
        path = ctx.paths[name]
        inputs, _ = ctx.io_specs(path) if ctx.io_specs else ([], [])
        feeds = requests.requests_from_recipe(ctx.recipe, inputs)
        # the recipe's serving settings, read by `optimize serve --recipe` as every serve reads them
        with server.start_local(path, target=target, recipe=ctx.recipe_file) as local:
            bar = ctx.progress.bar() if ctx.progress is not None else None
            doc = loadtest.run_loadtest(local.url, local.model, feeds, serving.load, serving.slo, local.pid, bar)
        loadtest.write_loadtest(doc, folder / LOADTEST)
        loadtest.plot_latency_vs_load(doc, folder / PLOT)
        return summary(doc)

    def use(done: Done) -> None:
        dest = run_folder(ctx.run_dir, name, target)
        dest.mkdir(parents=True, exist_ok=True)
        restore(done, dest)
        ctx.results.setdefault(name, {}).setdefault(target, {})["serving"] = done.record

    return Unit(
        "serving",
        f"{name}@{target}",
        inputs=ctx.inputs(f"onnx.{name}", f"data.{ctx.eval_name}"),
        config={
            "serving": serving.model_dump(mode="json"),
            "target": target,
            "variant": name,
            "precision": ctx.precision_of(name),
        },
        libraries=(*runtime_libraries(target), *SERVING_LIBRARIES),
        code=("serving.stage", "serving.server", "serving.loadtest", "serving.requests"),
        run=run,
        use=use,
        device=ctx.machine_identity(target),
        refresh=ctx.rebench,
    )


def _finish(ctx: Context, done: list[tuple[Unit, Done]], rec: dict[str, Any]) -> None:
    """The stage's line: each served variant's highest load within the SLO, and its p99 where judged."""
    slo = ctx.recipe.serving.slo
    parts = []
    for unit, d in done:
        s = d.record
        p99 = f", p99 {s['p99_ms']:.1f} ms at {s['rps']:g} rps" if s.get("p99_ms") is not None and s.get("rps") else ""
        parts.append(f"{unit.name} {s.get('max_rps_at_slo') or 0:g} rps within the SLO{p99}")
    rec["detail"] = "; ".join(parts) + f" (p99 ≤ {slo.p99_ms:g} ms, errors ≤ {slo.error_rate:.2%})"


def _title(ctx: Context) -> str:
    n = sum(len(ctx.runs_on(t)) for t in served_targets(ctx))
    return f"{n} model(s) served on 127.0.0.1 and load-tested"


def _when(ctx: Context) -> bool:
    return ctx.recipe.serving.loadtest and bool(served_targets(ctx))


STAGE = Stage("serving", _title, _finish, units=_units, when=_when)
