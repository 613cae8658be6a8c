"""Runs the stages of one recipe and owns the run directory and its manifest.

    load → export → precision → evaluate → benchmark → gate → report → register

Every file in the run directory is written atomically; the manifest says how far the run got.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from optimize import __version__
from optimize.console import Progress, capture_output, console
from optimize.errors import OptimizeError, RecipeError, RuntimeMissingError
from optimize.files import display_path, sha256_file, write_json, write_npz, write_text, write_with
from optimize.recipe import OnnxModel, Recipe, load_recipe, recipe_hash, to_plain
from optimize.runtimes import unavailable_reason

LIBRARIES = (
    "torch",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "mlflow",
    "numpy",
    "transformers",
    "nvidia-modelopt",
)


@dataclass(frozen=True)
class RunOptions:
    """What the command line adds to a recipe."""

    runs_dir: Path = Path("runs")
    tracking_uri: str | None = None
    require_targets: tuple[str, ...] = ()
    register: bool = True
    quiet: bool = False


@dataclass(frozen=True)
class RunResult:
    """The outcome of one run: where it is, the verdict, what was registered, the exit code."""

    run_dir: Path
    status: str
    exit_code: int
    registered: dict[str, Any] = field(default_factory=dict)


def resolve_targets(recipe: Recipe, require: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Which targets run here. A required one that is missing is exit 4; an optional one is `skipped`."""
    bench = recipe.benchmark
    required = list(dict.fromkeys([*bench.targets, *require]))
    out: dict[str, dict[str, Any]] = {}
    for target in required:
        reason = unavailable_reason(target)
        if reason:
            source = "--require-target" if target in require and target not in bench.targets else "benchmark.targets"
            raise RuntimeMissingError(f"{source}: {target} is required but not available: {reason}")
        out[target] = {"status": "ran"}
    for target in bench.optional_targets:
        if target not in out:
            reason = unavailable_reason(target)
            out[target] = {"status": "skipped", "reason": reason} if reason else {"status": "ran"}
    return out


def make_run_dir(runs_dir: Path, name: str) -> tuple[Path, str]:
    """Create `runs/<recipe>/<run-id>/` (exit 2 with the reason when it cannot be created or written)."""
    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    run_dir = Path(runs_dir) / name / run_id
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RecipeError(
            f"--runs-dir: cannot write the run directory {run_dir} ({e.strerror}); pass a writable --runs-dir"
        ) from None
    return run_dir.resolve(), run_id


def environment() -> dict[str, Any]:
    """Library versions, hardware and OS for the manifest."""
    versions = {"python": platform.python_version(), "optimize": __version__}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    mem_gb = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            gpu = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            gpu = None
    return {
        "versions": versions,
        "hardware": {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb, "gpu": gpu},
        "os": f"{platform.system()} {platform.release()} ({platform.platform()})",
    }


class _Run:
    """State of one run while its stages execute (the pipeline's own bookkeeping, not a stage)."""

    def __init__(self, recipe: Recipe, recipe_path: Path, options: RunOptions) -> None:
        self.recipe = recipe
        self.options = options
        self.targets = resolve_targets(recipe, options.require_targets)
        from optimize.registry import resolve_tracking_uri

        self.tracking_uri = resolve_tracking_uri(options.tracking_uri, recipe.registry.tracking_uri)
        self.run_dir, self.run_id = make_run_dir(options.runs_dir, recipe.name)
        self.progress = Progress(quiet=options.quiet)
        self.manifest: dict[str, Any] = {
            "run_id": self.run_id,
            "recipe": recipe.name,
            "recipe_file": str(recipe_path.resolve()),
            "recipe_sha256": recipe_hash(recipe),
            "status": "running",
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **environment(),
            "stages": self.progress.timings,
        }
        plain = to_plain(recipe)
        write_text(self.run_dir / "recipe.yaml", yaml.safe_dump(plain, sort_keys=False))
        write_json(self.run_dir / "recipe.json", plain)
        self.save_manifest()

    def save_manifest(self) -> None:
        write_json(self.run_dir / "manifest.json", self.manifest)

    def log(self, stage: str) -> Any:
        return capture_output(self.run_dir / "logs" / f"{stage}.log")


def run(recipe_path: str | Path, options: RunOptions = RunOptions()) -> RunResult:
    """Run a recipe end to end; returns the run's result (exit code 0 passed, 1 a gate failed)."""
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    state = _Run(recipe, recipe_path, options)
    try:
        result = _execute(state)
    except BaseException as e:
        state.manifest["status"] = "failed"
        state.manifest["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        state.save_manifest()
        if isinstance(e, OptimizeError):
            e.args = (f"{e.args[0] if e.args else ''} (run directory: {display_path(state.run_dir)})",)
        raise
    return result


def _execute(state: _Run) -> RunResult:
    from optimize import accuracy, bench, data, export, gates, registry, report
    from optimize.models import import_entry_point, load_model
    from optimize.precision import fp16
    from optimize.runtimes import open_runner

    recipe, run_dir, stage = state.recipe, state.run_dir, state.progress.stage
    art_dir = run_dir / "artifacts"
    baseline_path = art_dir / "fp32.onnx"

    with stage("load", "model and data") as rec, state.log("load"):
        loaded = load_model(recipe.model)
        if isinstance(recipe.model, OnnxModel):
            with open_runner("onnxruntime-cpu", loaded.onnx_path) as r:
                input_names = [i.name for i in r.inputs]
        else:
            input_names = export.input_names_for(loaded, recipe.export)
        used = {recipe.evaluate.dataset, *(v.reference_data for v in recipe.precision.variants if v.reference_data)}
        datasets = {
            name: data.load_dataset(name, spec, input_names, loaded.tokenizer_dir)
            for name, spec in recipe.data.items()
            if name in used
        }
        eval_ds = datasets[recipe.evaluate.dataset]
        state.manifest["model"] = {"description": loaded.description, "sha256": loaded.content_sha256}
        state.manifest["datasets"] = {n: d.record() for n, d in datasets.items()}
        rec["detail"] = f"{loaded.description}; {eval_ds.description}"

    with stage("export", "torch → ONNX, checked against torch") as rec, state.log("export"):
        if loaded.module is None:
            write_with(baseline_path, lambda tmp: shutil.copyfile(loaded.onnx_path, tmp))
            with open_runner("onnxruntime-cpu", baseline_path) as r:
                data.check_against_inputs(eval_ds, r.inputs)
            rec["detail"] = f"ONNX given ({loaded.onnx_path.name}); export skipped"
        else:
            export.export_onnx(loaded, recipe.export, baseline_path)
            with open_runner("onnxruntime-cpu", baseline_path) as r:
                data.check_against_inputs(eval_ds, r.inputs)
                check = export.check_export(loaded, r, eval_ds.batches, recipe.export)
            rec["check"] = check.record()
            worst = max(check.max_abs_error.values())
            rec["detail"] = f"opset {recipe.export.opset}, max |torch − ORT| {worst:.2g} on {check.shapes[0]}"

    paths = {"fp32": baseline_path}
    precisions = {"fp32": "fp32"}
    with (
        stage("precision", ", ".join(v.name for v in recipe.precision.variants)) as rec,
        state.log("precision"),
    ):
        records = {}
        for variant in recipe.precision.variants:
            dest = art_dir / f"{variant.name}.onnx"
            reference_dir = None
            if variant.reference_data and fp16.choose_backend(variant) == "modelopt":
                reference_dir = art_dir / f"{variant.name}-reference"
                for k, batch in enumerate(datasets[variant.reference_data].batches[: variant.reference_batches]):
                    write_npz(reference_dir / f"batch{k:04d}.npz", batch)
            result = fp16.convert_fp16(baseline_path, dest, variant, reference_dir)
            with open_runner("onnxruntime-cpu", dest) as r:
                feeds = eval_ds.batches[0]
                fp16.check_finite(dest, r.run(feeds), feeds, f"precision.{variant.name}")
            paths[variant.name] = dest
            precisions[variant.name] = variant.kind
            records[variant.name] = {
                **result.record(),
                "reference_data": variant.reference_data if reference_dir else None,
            }
        rec["variants"] = records
        rec["detail"] = ", ".join(f"{n} via {r['backend']}" for n, r in records.items())

    ran = [t for t, s in state.targets.items() if s["status"] == "ran"]
    baseline_size = baseline_path.stat().st_size
    variants_meta = {
        name: {
            "precision": precisions[name],
            "path": str(p.relative_to(run_dir)),
            "size_bytes": p.stat().st_size,
            "sha256": sha256_file(p),
        }
        for name, p in paths.items()
    }
    results: dict[str, dict[str, dict[str, Any]]] = {
        name: {t: {"size": {"bytes": meta["size_bytes"], "ratio": meta["size_bytes"] / baseline_size}} for t in ran}
        for name, meta in variants_meta.items()
    }
    golden: dict[str, dict[str, np.ndarray]] = {}

    with (
        stage("evaluate", f"accuracy on {eval_ds.name} ({eval_ds.sample_count} samples)") as rec,
        state.log("evaluate"),
    ):
        metric_fn = None
        if recipe.evaluate.task_metric:
            metric_fn = import_entry_point(
                recipe.evaluate.task_metric, recipe.evaluate.task_metric_python_path, "evaluate.task_metric"
            )
        for target in ran:
            outputs = {}
            for name, p in paths.items():
                with open_runner(target, p, recipe.benchmark.threads) as r:
                    outputs[name] = accuracy.run_all(r, eval_ds.batches)
            for name in paths:
                acc = accuracy.compare_outputs(outputs["fp32"], outputs[name], recipe.evaluate.top1_outputs)
                if metric_fn is not None:
                    acc.update(accuracy.task_metric(metric_fn, outputs["fp32"], outputs[name], eval_ds.labels))
                results[name][target]["accuracy"] = acc
            if target == ran[0]:
                n = len(eval_ds.batches[0][input_names[0]])
                golden = {name: {k: v[:n] for k, v in outs.items()} for name, outs in outputs.items()}
        rec["detail"] = "; ".join(
            f"{n} cosine min {results[n][t]['accuracy']['cosine_min']:.6f} on {t}"
            for n in paths
            if n != "fp32"
            for t in ran
        )

    b = recipe.benchmark
    with (
        stage("benchmark", f"{len(b.shapes)} shape(s) × {len(paths)} models, {b.iterations} iterations") as rec,
        state.log("benchmark"),
    ):
        for target in ran:
            runners = {name: open_runner(target, p, b.threads) for name, p in paths.items()}
            try:
                inputs = runners["fp32"].inputs
                per_shape = bench.run_shapes(runners, b, eval_ds.batches[0], baseline="fp32")
            finally:
                for r in runners.values():
                    r.close()
            for name, shapes in per_shape.items():
                results[name][target]["shapes"] = shapes
            largest = max(b.shapes, key=lambda s: int(np.prod(list(s.values()))))
            feeds = bench.make_feeds(inputs, largest, eval_ds.batches[0], "benchmark.shapes")
            for name, p in paths.items():
                results[name][target]["memory"] = {
                    **bench.measure_memory(target, p, feeds, b.threads),
                    "shape": bench.shape_key(largest),
                }
        noisy = [
            f"{n}@{t}:{k}"
            for n in results
            for t in ran
            for k, s in results[n][t].get("shapes", {}).items()
            if s["cv_warning"]
        ]
        if noisy:
            console().print(
                f"[yellow]warning[/]: latency CV above {b.cv_warn:.0%} for {', '.join(noisy)}; the machine is noisy",
                markup=True,
                highlight=False,
            )
        rec["detail"] = "; ".join(
            f"{n} p50 speed-up {min(s['p50_speedup'] for s in results[n][t]['shapes'].values()):.2f}× on {t}"
            for n in paths
            if n != "fp32"
            for t in ran
        )

    metrics = {"baseline": "fp32", "variants": variants_meta, "results": results}
    with stage("gate", f"{len(recipe.gates)} gate(s)") as rec:
        verdict = gates.evaluate_gates(recipe.gates, results, state.targets)
        rec["detail"] = f"{verdict['status'].upper()}: " + ", ".join(
            f"{v} {s['status']}" for v, s in verdict["variants"].items()
        )

    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "verdict.json", verdict)
    _write_registry_folders(run_dir, paths, variants_meta, verdict, golden, eval_ds, recipe)
    state.manifest["status"] = "measured"
    state.save_manifest()
    write_text(run_dir / "report.md", report.markdown(metrics, verdict, state.manifest))

    registered: dict[str, Any] = {}
    if state.options.register and recipe.registry.enabled:
        with stage("register", f"MLflow at {state.tracking_uri}") as rec, state.log("register"):
            registered = registry.publish(run_dir, state.tracking_uri)
            state.manifest["registry"] = registered
            versions = registered["versions"]
            rec["detail"] = (
                ", ".join(f"{registered['model_name']} v{v} ({n})" for n, v in versions.items())
                + f", alias {registered['alias']}"
                if versions
                else "run logged; nothing passed, nothing registered"
            )
    state.manifest["status"] = "done"
    state.manifest["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    state.save_manifest()
    write_text(run_dir / "report.md", report.markdown(metrics, verdict, state.manifest))
    return RunResult(run_dir, verdict["status"], 0 if verdict["status"] == "passed" else 1, registered)


def _write_registry_folders(
    run_dir: Path,
    paths: dict[str, Path],
    meta: dict[str, Any],
    verdict: dict[str, Any],
    golden: dict[str, dict[str, np.ndarray]],
    eval_ds: Any,
    recipe: Recipe,
) -> None:
    """What a registered version carries: the model, sample inputs, golden outputs and their metadata."""
    for name, status in verdict["variants"].items():
        if status["status"] != "passed":
            continue
        folder = run_dir / "registry" / name
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / "model.onnx"
        if not dest.exists():
            try:
                os.link(paths[name], dest)
            except OSError:
                write_with(dest, lambda tmp, src=paths[name]: shutil.copyfile(src, tmp))
        sample = eval_ds.batches[0]
        write_npz(folder / "sample_inputs.npz", sample)
        write_npz(folder / "golden_outputs.npz", golden[name])
        write_json(
            folder / "optimize.json",
            {
                "variant": name,
                "precision": meta[name]["precision"],
                "sha256": meta[name]["sha256"],
                "inputs": list(sample),
                "tolerance": recipe.export.tolerance.model_dump(),
                "recipe": recipe.name,
            },
        )
