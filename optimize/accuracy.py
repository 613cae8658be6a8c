"""Accuracy of a variant against the FP32 baseline on the same inputs: per output and aggregated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from optimize.errors import StageError
from optimize.lazy import lazy
from optimize.recipe import METRICS, metric_unfit_reason, values_per_sample

np = lazy("numpy")


def run_all(runner: Any, batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Run every batch and concatenate each output along the sample axis."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        for name, value in runner.run(batch).items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values, axis=0) for name, values in parts.items()}


def per_sample_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample (first axis), the rest flattened; two zero vectors count as 1."""
    a2 = a.reshape(len(a), -1).astype(np.float64)
    b2 = b.reshape(len(b), -1).astype(np.float64)
    dot = (a2 * b2).sum(axis=1)
    norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    both_zero = (np.linalg.norm(a2, axis=1) == 0) & (np.linalg.norm(b2, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, cos)


def nearest_neighbours(x: np.ndarray, block: int = 1024) -> np.ndarray:
    """For each sample (row, the rest flattened), the index of its most cosine-similar other sample."""
    v = x.reshape(len(x), -1).astype(np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = v / np.where(norms > 0, norms, 1.0)
    out = np.empty(len(v), dtype=np.int64)
    for start in range(0, len(v), block):  # blocks of rows keep memory at block × n
        sim = v[start : start + block] @ v.T
        rows = np.arange(sim.shape[0])
        sim[rows, start + rows] = -np.inf
        out[start : start + block] = sim.argmax(axis=1)
    return out


def neighbour_agreement(baseline: np.ndarray, variant: np.ndarray) -> float:
    """Share of samples whose nearest other sample is the same under the variant as under the baseline."""
    if len(baseline) < 2:
        return 1.0
    return float((nearest_neighbours(baseline) == nearest_neighbours(variant)).mean())


def _runtime_unfit(metric: str, value: np.ndarray) -> str | None:
    per = values_per_sample(value.shape)
    return metric_unfit_reason(metric, per, value.shape[-1] if value.ndim >= 2 else None)


def relative_error(reference: np.ndarray, value: np.ndarray) -> float:
    """‖value − reference‖₂ / ‖reference‖₂ over every number of an output (all samples): defined for any
    shape, a scalar per sample included; the absolute L2 error when the reference is all zeros."""
    num = float(np.sum((value.astype(np.float64) - reference.astype(np.float64)) ** 2))
    den = float(np.sum(reference.astype(np.float64) ** 2))
    return (num / den) ** 0.5 if den > 0 else num**0.5


def per_sample(
    baseline: dict[str, np.ndarray], variant: dict[str, np.ndarray], top1_outputs: list[str]
) -> dict[str, dict[str, np.ndarray]]:
    """Per output, one value per sample: `cosine` (outputs with 2 or more values per sample) and `abs_error`
    (the largest |variant − baseline|) against the baseline, and for classifier outputs `argmax` of both
    (`argmax_reference` is the baseline's) — what the report plots as distributions and a confusion of
    disagreements."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, ref in baseline.items():
        got = variant[name].astype(np.float64)
        ref64 = ref.astype(np.float64)
        err = np.abs(got - ref64).reshape(len(ref64), -1)
        values = {"abs_error": err.max(axis=1) if err.shape[1] else np.zeros(len(ref64))}
        if _runtime_unfit("cosine", ref64) is None:
            values["cosine"] = per_sample_cosine(got, ref64)
        if name in top1_outputs and _runtime_unfit("top1", ref64) is None:
            values["argmax"] = got.argmax(axis=-1).astype(np.int64).reshape(len(ref64), -1)[:, 0]
            values["argmax_reference"] = ref64.argmax(axis=-1).astype(np.int64).reshape(len(ref64), -1)[:, 0]
        out[name] = values
    return out


# Per-output metrics whose aggregate (what an unscoped gate judges) is the worst over the outputs that have it,
# in the direction the gate metric of the same name has.
PER_OUTPUT = (
    "cosine_mean",
    "cosine_min",
    "max_abs_error",
    "mean_abs_error",
    "relative_error",
    "top1_agreement",
    "top1_agreement_drop",
    "neighbour_agreement",
)


def compare_outputs(
    baseline: dict[str, np.ndarray],
    variant: dict[str, np.ndarray],
    top1_outputs: list[str],
    neighbour_outputs: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Per output: max/mean absolute error and relative error (always); cosine mean/min where a sample holds
    2 or more values (the cosine of one number is its sign: 1, 0 or −1); top-1 agreement for classifier
    outputs, nearest-neighbour agreement for embedding outputs.

    The aggregate keys (`cosine_min`, ...) take the worst over the outputs that have the metric, so one gate
    covers a multi-output model; `outputs` holds each output's own (what a gate with `output:` judges).
    """
    per_output: dict[str, dict[str, float]] = {}
    for name, ref in baseline.items():
        if name not in variant or variant[name].shape != ref.shape:
            # numpy would broadcast mismatched shapes into meaningless errors and cosines
            have = f"shape {list(variant[name].shape)}" if name in variant else "no such output"
            raise StageError(f"evaluate: output {name!r}: the variant has {have}, the baseline {list(ref.shape)}")
        got = variant[name].astype(np.float64)
        ref64 = ref.astype(np.float64)
        err = np.abs(got - ref64)
        stats: dict[str, float] = {}
        if _runtime_unfit("cosine", ref64) is None:
            cos = per_sample_cosine(got, ref64)
            stats["cosine_mean"] = float(cos.mean())
            stats["cosine_min"] = float(cos.min())
        stats["max_abs_error"] = float(err.max(initial=0.0))
        stats["mean_abs_error"] = float(err.mean()) if err.size else 0.0
        stats["relative_error"] = relative_error(ref64, got)
        stats["samples"] = int(len(ref))
        if name in top1_outputs and _runtime_unfit("top1", ref64) is None:
            agree = float((got.argmax(axis=-1) == ref64.argmax(axis=-1)).mean())
            stats["top1_agreement"] = agree
            stats["top1_agreement_drop"] = 1.0 - agree
        if name in neighbour_outputs and _runtime_unfit("neighbour_agreement", ref64) is None:
            stats["neighbour_agreement"] = neighbour_agreement(ref64, got)
        per_output[name] = stats
    agg: dict[str, Any] = {}
    for key in PER_OUTPUT:
        values = [s[key] for s in per_output.values() if key in s]
        if values:
            agg[key] = min(values) if METRICS[f"accuracy.{key}"] == "min" else max(values)
    agg["outputs"] = per_output
    return agg


def task_metric(
    fn: Callable[..., Any], baseline: dict[str, np.ndarray], variant: dict[str, np.ndarray], labels: Any
) -> dict[str, float]:
    """The user's task metric (higher is better) on baseline and variant outputs, and the drop between them."""
    base = float(fn(baseline, labels))
    var = float(fn(variant, labels))
    return {"task_metric": var, "task_metric_baseline": base, "task_metric_drop": base - var}
