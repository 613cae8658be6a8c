"""Gates: the recipe's thresholds applied to the measured metrics, giving a verdict per gate, per variant
and overall. A gate on a target that did not run is `skipped`; a variant passes only when at least one
of its gates passed and none failed, and is `skipped` when all its gates were. The run passes when no
variant failed and at least one passed. An accuracy gate with an `output` judges that output's value; without
one, the worst over the outputs that have the metric. `check_outputs` refuses, once the model's outputs are
known, a gate whose metric does not fit its output's shape. A `serving.*` gate (the load test's numbers) on a
target the load test does not serve is `skipped` there."""

from __future__ import annotations

import math
import operator
from typing import Any

from optimize.errors import RecipeError
from optimize.recipe import (
    METRICS,
    EvaluateSection,
    Gate,
    metric_unfit_reason,
    shape_key,
    unknown_output,
    values_per_sample,
)
from optimize.stage import Context, Done, Stage, Unit

# The targets `optimize run` serves and load-tests (serving.loadtest: true): a `serving.*` gate on another is
# skipped there.
SERVED_PREFIX = "onnxruntime-"
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def metric_value(
    result: dict[str, Any], metric: str, shape: str | None = None, output: str | None = None
) -> float | None:
    """The value of a gate metric in one variant×target result; over shapes, the worst one counts
    (only `shape`, a shape key such as `batch=16,sequence=64`, when given); an accuracy metric is the worst
    over outputs (only `output`'s when given)."""
    family, _, key = metric.partition(".")
    if family == "accuracy" and output is not None:
        return result.get("accuracy", {}).get("outputs", {}).get(output, {}).get(key)
    worst = min if METRICS[metric] == "min" else max
    if family in ("latency", "throughput"):
        field = (
            {"items_per_s": "items_per_s", "speedup": "throughput_speedup"}.get(key, key)
            if family == "throughput"
            else key
        )
        values = [s[field] for k, s in result.get("shapes", {}).items() if field in s and shape in (None, k)]
        return worst(values) if values else None
    return result.get(family, {}).get(key)


def evaluate_gates(
    gates: list[Gate],
    results: dict[str, dict[str, dict[str, Any]]],
    targets: dict[str, dict[str, Any]],
    baseline: str = "fp32",
) -> dict[str, Any]:
    """Apply every gate to every variant × target it covers.

    `results[variant][target]` holds the measured metrics; `targets[target]["status"]` is `ran` or
    `skipped` (with a `reason`). Returns the verdict document (what `verdict.json` holds).
    """
    variants = [v for v in results if v != baseline]
    rows: list[dict[str, Any]] = []
    for index, gate in enumerate(gates):
        covered_targets = [gate.target] if gate.target else [t for t, s in targets.items() if s["status"] == "ran"]
        for variant in gate.variants or variants:
            for target in covered_targets:
                row: dict[str, Any] = {
                    "gate": index,
                    "check": gate.check,
                    "metric": gate.metric,
                    "op": gate.op,
                    "threshold": gate.threshold,
                    "variant": variant,
                    "target": target,
                }
                if gate.shape:
                    row["shape"] = shape_key(gate.shape)
                if gate.output:
                    row["output"] = gate.output
                status = targets.get(target, {"status": "skipped", "reason": "target not in benchmark.targets"})
                if status["status"] != "ran":
                    row.update(status="skipped", reason=status.get("reason", "target did not run"))
                    rows.append(row)
                    continue
                result = results[variant].get(target, {})
                if "skipped" in result:  # this target does not run this variant (INT8 on torch, say)
                    row.update(status="skipped", reason=result["skipped"])
                    rows.append(row)
                    continue
                if gate.metric.startswith("serving.") and not target.startswith(SERVED_PREFIX):
                    row.update(status="skipped", reason=f"the load test serves ONNX Runtime targets only, not {target}")
                    rows.append(row)
                    continue
                shape = shape_key(gate.shape) if gate.shape else None
                value = metric_value(result, gate.metric, shape, gate.output)
                base = metric_value(results.get(baseline, {}).get(target, {}), gate.metric, shape, gate.output)
                row["value"] = value
                row["baseline_value"] = base
                on = f" on output {gate.output!r}" if gate.output else ""
                if value is None:
                    row.update(status="failed", reason=f"{gate.metric} was not measured{on}")
                elif isinstance(value, float) and math.isnan(value):
                    row.update(status="failed", reason=f"{gate.metric}{on} is NaN (non-finite outputs?)")
                elif OPS[gate.op](value, gate.threshold):
                    row["status"] = "passed"
                else:
                    row.update(
                        status="failed",
                        reason=f"{gate.metric}{on} = {value:.6g}, needs {gate.op} {gate.threshold:g}",
                    )
                rows.append(row)
    per_variant: dict[str, Any] = {}
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        failed = [r for r in mine if r["status"] == "failed"]
        passed = [r for r in mine if r["status"] == "passed"]
        skipped = [r for r in mine if r["status"] == "skipped"]
        if failed:
            status, reason = "failed", "; ".join(f"{r['target']}: {r['reason']}" for r in failed)
        elif not passed and skipped:
            # e.g. a TensorRT variant on a CPU box: not judged here, so neither registered nor failing the run
            where = ", ".join(sorted({r["target"] for r in skipped}))
            status, reason = "skipped", f"every gate is on a target that did not run here ({where})"
        elif not passed:
            status, reason = (
                "failed",
                "no gate was evaluated for this variant; add gates for a target that runs",
            )
        else:
            status, reason = "passed", f"{len(passed)} gate(s) passed"
        per_variant[variant] = {
            "status": status,
            "reason": reason,
            "passed": len(passed),
            "failed": len(failed),
            "skipped": len(skipped),
        }
    statuses = [v["status"] for v in per_variant.values()]
    overall = "passed" if "passed" in statuses and "failed" not in statuses else "failed"
    return {"status": overall, "variants": per_variant, "gates": rows, "targets": targets}


def check_outputs(gates: list[Gate], evaluate: EvaluateSection, outputs: dict[str, Any], where: str = "") -> None:
    """Refuse (RecipeError, exit 2) what the model's outputs show a recipe cannot mean: a gate or an
    `evaluate` output list naming an output the model does not have, and an accuracy metric that does not fit
    its output's shape (cosine, top-1 or neighbour agreement of one number per sample). `outputs` maps each
    output's name to its shape (ints, or names for dynamic axes; None when not known); `where`, the recipe
    file, starts each message. The run calls it once the model is exported (or copied from the ONNX given),
    before any variant is built, and `optimize validate` for an ONNX source, from the file. A shape not known
    until the model runs passes here; the evaluation then reports the metric as not measured on it."""
    at = f"{where}: " if where else ""

    def unfit(metric: str, name: str) -> str | None:
        shape = outputs[name] or ()
        last = shape[-1] if len(shape) >= 2 and isinstance(shape[-1], int) else None
        return metric_unfit_reason(metric, values_per_sample(shape), last)

    def shown(name: str) -> str:
        return f"{name!r} (shape [{', '.join(str(d) for d in outputs[name] or ())}])"

    for field in ("top1_outputs", "neighbour_outputs"):
        metric = "top1" if field == "top1_outputs" else "neighbour_agreement"
        for name in getattr(evaluate, field):
            if name not in outputs:
                raise RecipeError(f"{at}evaluate.{field}: {unknown_output(name, outputs)}")
            reason = unfit(metric, name)
            if reason:
                raise RecipeError(f"{at}evaluate.{field}: output {shown(name)} has {reason}; remove it from the list")
    for i, gate in enumerate(gates):
        family, _, key = gate.metric.partition(".")
        if family != "accuracy" or key.startswith("task_metric"):
            continue
        if gate.output is not None:
            if gate.output not in outputs:
                raise RecipeError(f"{at}gates[{i}].output: {unknown_output(gate.output, outputs)}")
            reason = unfit(key, gate.output)
            if reason:
                raise RecipeError(
                    f"{at}gates[{i}]: {gate.metric} does not fit output {shown(gate.output)}: it has "
                    f"{reason}; gate it with accuracy.max_abs_error or accuracy.relative_error"
                )
            continue
        # unscoped: the worst over the outputs that have the metric, so at least one must
        candidates = (
            evaluate.top1_outputs
            if key.startswith("top1")
            else evaluate.neighbour_outputs
            if key == "neighbour_agreement"
            else list(outputs)
        )
        if candidates and all(unfit(key, name) for name in candidates if name in outputs):
            shapes = ", ".join(shown(n) for n in candidates if n in outputs)
            raise RecipeError(
                f"{at}gates[{i}]: {gate.metric} fits none of the model's outputs ({shapes}): "
                f"{unfit(key, candidates[0])}; gate accuracy.max_abs_error or accuracy.relative_error instead"
            )


# --- the gate stage --------------------------------------------------------------------------------------


def _finish(ctx: Context, done: list[tuple[Unit, Done]], rec: dict[str, Any]) -> None:
    ctx.verdict = evaluate_gates(ctx.recipe.gates, ctx.results, ctx.targets)
    rec["detail"] = f"{ctx.verdict['status'].upper()}: " + ", ".join(
        f"{v} {s['status']}" for v, s in ctx.verdict["variants"].items()
    )


STAGE = Stage("gate", lambda ctx: f"{len(ctx.recipe.gates)} gate(s)", _finish, logged=False)
