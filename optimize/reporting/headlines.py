"""A run's key numbers as data: per variant its speed-up (worst shape on the first target that ran it),
accuracy and size, read from metrics.json and verdict.json. report.html's headlines and `optimize runs` show
these; both read them here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BASELINE = "fp32"


@dataclass(frozen=True)
class Headline:
    """One variant in one line: how much faster (worst shape on its first target), how accurate, how small."""

    variant: str
    status: str
    reason: str
    target: str | None
    p50_speedup: float | None
    shape: str | None
    other_shapes: dict[str, float]
    cosine_min: float | None
    top1_agreement: float | None
    neighbour_agreement: float | None
    task_metric_drop: float | None
    size_ratio: float | None
    size_bytes: int | None
    baseline_size_bytes: int | None


def targets_ran(metrics: dict[str, Any], verdict: dict[str, Any]) -> list[str]:
    """The targets that ran, in the recipe's order (verdict.json), then any other target with results."""
    ran = [t for t, s in verdict.get("targets", {}).items() if s.get("status") == "ran"]
    for by_target in metrics.get("results", {}).values():
        for t, r in by_target.items():
            if t not in ran and "skipped" not in r and t not in verdict.get("targets", {}):
                ran.append(t)
    return ran


def result_of(metrics: dict[str, Any], variant: str, target: str) -> dict[str, Any] | None:
    """results[variant][target] of metrics.json, or None where it is missing or was skipped."""
    r = metrics.get("results", {}).get(variant, {}).get(target)
    return r if isinstance(r, dict) and "skipped" not in r else None


def variants_of(metrics: dict[str, Any]) -> list[str]:
    """The variants other than the FP32 baseline, in recipe order."""
    base = metrics.get("baseline", BASELINE)
    names = list(metrics.get("variants", {})) or list(metrics.get("results", {}))
    return [v for v in names if v != base]


def worst_speedup(result: dict[str, Any]) -> tuple[float | None, str | None, dict[str, float]]:
    """(the lowest p50 speed-up over the shapes, its shape, every shape's speed-up)."""
    speeds = {k: float(s["p50_speedup"]) for k, s in result.get("shapes", {}).items() if "p50_speedup" in s}
    if not speeds:
        return None, None, {}
    shape = min(speeds, key=speeds.__getitem__)
    return speeds[shape], shape, speeds


def headlines(metrics: dict[str, Any], verdict: dict[str, Any]) -> list[Headline]:
    """A headline per variant, measured on the first target that ran it."""
    out = []
    ran = targets_ran(metrics, verdict)
    base = metrics.get("baseline", BASELINE)
    base_size = metrics.get("variants", {}).get(base, {}).get("size_bytes")
    for v in variants_of(metrics):
        status = verdict.get("variants", {}).get(v, {})
        target = next((t for t in ran if result_of(metrics, v, t) is not None), None)
        r = result_of(metrics, v, target) if target else None
        speed, shape, speeds = worst_speedup(r) if r else (None, None, {})
        acc = (r or {}).get("accuracy", {})
        size = (r or {}).get("size", {})
        art = metrics.get("variants", {}).get(v, {})
        out.append(
            Headline(
                variant=v,
                status=status.get("status", "unknown"),
                reason=status.get("reason", ""),
                target=target,
                p50_speedup=speed,
                shape=shape,
                other_shapes={k: s for k, s in speeds.items() if k != shape},
                cosine_min=acc.get("cosine_min"),
                top1_agreement=acc.get("top1_agreement"),
                neighbour_agreement=acc.get("neighbour_agreement"),
                task_metric_drop=acc.get("task_metric_drop"),
                size_ratio=size.get("ratio"),
                size_bytes=size.get("bytes", art.get("size_bytes")),
                baseline_size_bytes=base_size,
            )
        )
    return out
