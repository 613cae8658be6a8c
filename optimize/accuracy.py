"""Accuracy of a variant against the FP32 baseline on the same inputs: per output and aggregated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from optimize.errors import StageError


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


def per_sample(
    baseline: dict[str, np.ndarray], variant: dict[str, np.ndarray], top1_outputs: list[str]
) -> dict[str, dict[str, np.ndarray]]:
    """Per output, one value per sample: `cosine` and `abs_error` (the largest |variant − baseline|) against
    the baseline, and for classifier outputs `argmax` of both (`argmax_reference` is the baseline's) — what
    the report plots as distributions and a confusion of disagreements."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, ref in baseline.items():
        got = variant[name].astype(np.float64)
        ref64 = ref.astype(np.float64)
        err = np.abs(got - ref64).reshape(len(ref64), -1)
        values = {
            "cosine": per_sample_cosine(got, ref64),
            "abs_error": err.max(axis=1) if err.shape[1] else np.zeros(len(ref64)),
        }
        if name in top1_outputs:
            values["argmax"] = got.argmax(axis=-1).astype(np.int64).reshape(len(ref64), -1)[:, 0]
            values["argmax_reference"] = ref64.argmax(axis=-1).astype(np.int64).reshape(len(ref64), -1)[:, 0]
        out[name] = values
    return out


def compare_outputs(
    baseline: dict[str, np.ndarray],
    variant: dict[str, np.ndarray],
    top1_outputs: list[str],
    neighbour_outputs: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Per output: cosine mean/min, max/mean abs error, top-1 agreement for classifier outputs,
    nearest-neighbour agreement for embedding outputs.

    The aggregate keys (`cosine_min`, ...) take the worst output, so one gate covers a multi-output model.
    """
    per_output: dict[str, dict[str, float]] = {}
    for name, ref in baseline.items():
        if name not in variant or variant[name].shape != ref.shape:
            # numpy would broadcast mismatched shapes into meaningless errors and cosines
            have = f"shape {list(variant[name].shape)}" if name in variant else "no such output"
            raise StageError(f"evaluate: output {name!r}: the variant has {have}, the baseline {list(ref.shape)}")
        got = variant[name].astype(np.float64)
        ref64 = ref.astype(np.float64)
        cos = per_sample_cosine(got, ref64)
        err = np.abs(got - ref64)
        stats = {
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "max_abs_error": float(err.max(initial=0.0)),
            "mean_abs_error": float(err.mean()) if err.size else 0.0,
            "samples": int(len(ref)),
        }
        if name in top1_outputs:
            agree = float((got.argmax(axis=-1) == ref64.argmax(axis=-1)).mean())
            stats["top1_agreement"] = agree
            stats["top1_agreement_drop"] = 1.0 - agree
        if name in neighbour_outputs:
            stats["neighbour_agreement"] = neighbour_agreement(ref64, got)
        per_output[name] = stats
    agg: dict[str, Any] = {
        "cosine_mean": min(s["cosine_mean"] for s in per_output.values()),
        "cosine_min": min(s["cosine_min"] for s in per_output.values()),
        "max_abs_error": max(s["max_abs_error"] for s in per_output.values()),
        "mean_abs_error": max(s["mean_abs_error"] for s in per_output.values()),
    }
    top1 = [s for s in per_output.values() if "top1_agreement" in s]
    if top1:
        agg["top1_agreement"] = min(s["top1_agreement"] for s in top1)
        agg["top1_agreement_drop"] = max(s["top1_agreement_drop"] for s in top1)
    nn = [s["neighbour_agreement"] for s in per_output.values() if "neighbour_agreement" in s]
    if nn:
        agg["neighbour_agreement"] = min(nn)
    agg["outputs"] = per_output
    return agg


def task_metric(
    fn: Callable[..., Any], baseline: dict[str, np.ndarray], variant: dict[str, np.ndarray], labels: Any
) -> dict[str, float]:
    """The user's task metric (higher is better) on baseline and variant outputs, and the drop between them."""
    base = float(fn(baseline, labels))
    var = float(fn(variant, labels))
    return {"task_metric": var, "task_metric_baseline": base, "task_metric_drop": base - var}
