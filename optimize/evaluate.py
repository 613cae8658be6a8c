"""The evaluate stage: one unit per (variant, target), the variant's outputs on the evaluation data compared
with one reference for every target, the FP32 ONNX on ONNX Runtime's CPU provider (computed only when some
unit is not cached). A unit keeps the per-sample metrics (for the report's plots), and the variant's outputs
on the first batch with that batch: what a registered version carries for its smoke check."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from optimize import accuracy
from optimize.files import read_npz, write_npz
from optimize.models import import_entry_point
from optimize.recipe import to_plain
from optimize.runtimes import open_runner, runtime_libraries
from optimize.stage import Context, Done, Stage, Unit


def _units(ctx: Context) -> list[Unit]:
    recipe = ctx.recipe

    @functools.cache
    def reference() -> dict[str, Any]:
        with open_runner("onnxruntime-cpu", ctx.paths["fp32"], recipe.benchmark.threads) as r:
            return accuracy.run_all(r, ctx.datasets[ctx.eval_name].batches)

    @functools.cache
    def metric_fn() -> Any:
        evaluate = recipe.evaluate
        if not evaluate.task_metric:
            return None
        return import_entry_point(evaluate.task_metric, evaluate.task_metric_python_path, "evaluate.task_metric")

    config = {
        "evaluate": to_plain(recipe.evaluate),
        "task_metric_code": ctx.task_metric_code(),
        "threads": recipe.benchmark.threads,
    }
    return [
        _unit(ctx, target, name, reference, metric_fn, config) for target in ctx.ran for name in ctx.runs_on(target)
    ]


def _unit(ctx: Context, target: str, name: str, reference: Any, metric_fn: Any, config: dict[str, Any]) -> Unit:
    evaluate = ctx.recipe.evaluate

    def run(folder: Path) -> dict[str, Any]:
        eval_ds = ctx.datasets[ctx.eval_name]
        if target == "onnxruntime-cpu" and name == "fp32":
            outs = reference()
        else:
            with open_runner(target, ctx.artifacts[target][name], ctx.recipe.benchmark.threads) as r:
                outs = accuracy.run_all(r, eval_ds.batches)
        ref = reference()
        acc = accuracy.compare_outputs(ref, outs, evaluate.top1_outputs, evaluate.neighbour_outputs)
        if metric_fn() is not None:
            acc.update(accuracy.task_metric(metric_fn(), ref, outs, eval_ds.labels))
        per_sample = {
            f"{kind}/{output}": values
            for output, by_kind in accuracy.per_sample(ref, outs, evaluate.top1_outputs).items()
            for kind, values in by_kind.items()
        }
        write_npz(folder / "per_sample.npz", per_sample)
        sample = eval_ds.batches[0]
        n_golden = len(next(iter(sample.values())))
        write_npz(folder / "golden.npz", {k: v[:n_golden] for k, v in outs.items()})
        write_npz(folder / "inputs.npz", sample)
        return {"accuracy": acc}

    def use(done: Done) -> None:
        golden = ctx.golden.setdefault(target, {})[name] = read_npz(done.path("golden.npz"))
        ctx.sample_inputs = ctx.sample_inputs or read_npz(done.path("inputs.npz"))
        ctx.results[name][target]["accuracy"] = done.record["accuracy"]
        for k, values in read_npz(done.path("per_sample.npz")).items():
            kind, output = k.split("/", 1)
            if kind == "argmax_reference":
                ctx.distributions[f"argmax/reference/fp32/{output}"] = values
            else:
                ctx.distributions[f"{kind}/{target}/{name}/{output}"] = values
        if target != "onnxruntime-cpu":  # what a later smoke check on this target compares with
            write_npz(ctx.run_dir / "golden" / target / f"{name}.npz", golden)

    return Unit(
        "evaluate",
        f"{name}@{target}",
        inputs=ctx.inputs(ctx.artifact_source(target, name), "onnx.fp32", f"data.{ctx.eval_name}"),
        config={**config, "target": target, "precision": ctx.precision_of(name)},
        libraries=runtime_libraries(target),
        code=("evaluate",),
        run=run,
        use=use,
        device=ctx.device_identity(target),
    )


def _finish(ctx: Context, done: list[tuple[Unit, Done]], rec: dict[str, Any]) -> None:
    results = ctx.results
    rec["detail"] = "; ".join(
        f"{n} cosine min {results[n][t]['accuracy']['cosine_min']:.6f} on {t}"
        if "cosine_min" in results[n][t]["accuracy"]
        else f"{n} relative error {results[n][t]['accuracy']['relative_error']:.3g} on {t}"
        for n in ctx.paths
        if n != "fp32"
        for t in ctx.ran
        if "accuracy" in results[n][t]
    )


def _title(ctx: Context) -> str:
    name = ctx.eval_name
    count = ctx.datasets[name].sample_count if name in ctx.datasets else "?"
    return f"accuracy on {name} ({count} samples)"


STAGE = Stage("evaluate", _title, _finish, units=_units)
