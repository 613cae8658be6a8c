"""Gates: thresholds on measured metrics → a verdict per gate row, per variant and overall."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from optimize.gates import evaluate_gates, metric_value
from optimize.recipe import METRICS, Gate

CPU = "onnxruntime-cpu"
RAN = {CPU: {"status": "ran"}}
TARGETS = {CPU: {"status": "ran"}, "tensorrt": {"status": "skipped", "reason": "TensorRT is not installed"}}


def result(
    cosine_min: float = 0.9995,
    p50: tuple[float, float] = (1.2, 0.8),
    p99_ms: tuple[float, float] = (3.0, 9.0),
    items: tuple[float, float] = (500.0, 2000.0),
    tput_speedup: tuple[float, float] = (1.1, 0.9),
) -> dict[str, Any]:
    return {
        "size": {"bytes": 1000, "ratio": 0.5},
        "accuracy": {"cosine_min": cosine_min, "cosine_mean": 0.9999, "max_abs_error": 0.01},
        "shapes": {
            key: {
                "p50_ms": p50_ms,
                "p99_ms": p99_ms[i],
                "p50_speedup": p50[i],
                "items_per_s": items[i],
                "throughput_speedup": tput_speedup[i],
            }
            for i, (key, p50_ms) in enumerate([("batch=1", 2.0), ("batch=8", 4.0)])
        },
        "memory": {"rss_peak_mb": 120.0, "rss_session_mb": 40.0, "shape": "batch=8"},
    }


def baseline() -> dict[str, Any]:
    r = result(cosine_min=1.0, p99_ms=(4.0, 10.0), items=(400.0, 1600.0))
    for s in r["shapes"].values():
        del s["p50_speedup"], s["throughput_speedup"]
    r["size"] = {"bytes": 2000, "ratio": 1.0}
    r["memory"]["rss_peak_mb"] = 150.0
    return r


def results(**variants: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    out = {"fp32": {CPU: baseline()}}
    out.update({name: {CPU: r} for name, r in (variants or {"fp16": result()}).items()})
    return out


def gate(check: str, **kw: Any) -> Gate:
    return Gate(check=check, **kw)


def one_row(verdict: dict[str, Any]) -> dict[str, Any]:
    assert len(verdict["gates"]) == 1, verdict["gates"]
    return verdict["gates"][0]


# --- metric lookup ---------------------------------------------------------------------------------


def test_every_gate_metric_has_a_direction() -> None:
    assert set(METRICS.values()) == {"min", "max"}


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("accuracy.cosine_min", 0.9995),
        ("accuracy.max_abs_error", 0.01),
        ("size.bytes", 1000),
        ("size.ratio", 0.5),
        ("memory.rss_peak_mb", 120.0),
        ("memory.rss_session_mb", 40.0),
        ("latency.p50_speedup", 0.8),  # worst shape: the smallest speed-up
        ("latency.p99_ms", 9.0),  # worst shape: the largest latency
        ("latency.p50_ms", 4.0),
        ("throughput.items_per_s", 500.0),  # worst shape: the lowest throughput
        ("throughput.speedup", 0.9),  # reads throughput_speedup
        ("accuracy.top1_agreement", None),  # not measured
        ("latency.mean_speedup", None),  # no shape has it
    ],
)
def test_metric_value_takes_the_worst_shape(metric: str, expected: float | None) -> None:
    assert metric_value(result(), metric) == expected


def test_metric_value_on_an_empty_result_is_none() -> None:
    assert metric_value({}, "latency.p50_speedup") is None
    assert metric_value({}, "accuracy.cosine_min") is None


# --- each op ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "status"),
    [
        ("size.ratio >= 0.5", "passed"),
        ("size.ratio >= 0.51", "failed"),
        ("size.ratio > 0.5", "failed"),
        ("size.ratio > 0.49", "passed"),
        ("size.ratio <= 0.5", "passed"),
        ("size.ratio <= 0.49", "failed"),
        ("size.ratio < 0.5", "failed"),
        ("size.ratio < 0.51", "passed"),
    ],
)
def test_each_op(check: str, status: str) -> None:
    row = one_row(evaluate_gates([gate(check)], results(), RAN))
    assert row["status"] == status
    assert row["value"] == 0.5 and row["baseline_value"] == 1.0
    assert row["metric"] == "size.ratio" and row["op"] == check.split()[1]
    assert row["threshold"] == float(check.split()[2])
    assert row["variant"] == "fp16" and row["target"] == CPU and row["gate"] == 0


def test_failed_gate_reason_names_value_and_threshold() -> None:
    row = one_row(evaluate_gates([gate("accuracy.cosine_min >= 0.9999")], results(), RAN))
    assert row["status"] == "failed"
    assert row["reason"] == "accuracy.cosine_min = 0.9995, needs >= 0.9999"
    assert row["value"] == 0.9995 and row["baseline_value"] == 1.0


# --- latency / throughput / memory -----------------------------------------------------------------


def test_latency_speedup_gate_uses_the_slowest_shape() -> None:
    # batch=1 is 1.2x, batch=8 is 0.8x: a 1.0x gate must fail on batch=8
    row = one_row(evaluate_gates([gate("latency.p50_speedup >= 1.0")], results(), RAN))
    assert row["status"] == "failed" and row["value"] == 0.8
    assert row["baseline_value"] is None  # the baseline has no speed-up of its own
    assert one_row(evaluate_gates([gate("latency.p50_speedup >= 0.8")], results(), RAN))["status"] == "passed"


def test_latency_ms_gate_uses_the_largest_p99() -> None:
    row = one_row(evaluate_gates([gate("latency.p99_ms <= 5")], results(), RAN))
    assert row["status"] == "failed" and row["value"] == 9.0 and row["baseline_value"] == 10.0
    assert one_row(evaluate_gates([gate("latency.p99_ms <= 9")], results(), RAN))["status"] == "passed"


def test_throughput_gates() -> None:
    v = evaluate_gates([gate("throughput.items_per_s >= 1000"), gate("throughput.speedup >= 0.9")], results(), RAN)
    ips, speed = v["gates"]
    assert ips["status"] == "failed" and ips["value"] == 500.0 and ips["baseline_value"] == 400.0
    assert speed["status"] == "passed" and speed["value"] == 0.9


def test_memory_and_size_gates() -> None:
    v = evaluate_gates(
        [gate("memory.rss_peak_mb <= 128"), gate("size.bytes < 1000"), gate("memory.rss_session_mb < 50")],
        results(),
        RAN,
    )
    assert [(r["status"], r["value"], r["baseline_value"]) for r in v["gates"]] == [
        ("passed", 120.0, 150.0),
        ("failed", 1000, 2000),
        ("passed", 40.0, 40.0),
    ]


# --- skipped / unmeasured --------------------------------------------------------------------------


def test_gate_on_a_skipped_target_is_skipped_with_its_reason() -> None:
    v = evaluate_gates(
        [gate("accuracy.cosine_min >= 0.999"), gate("latency.p50_speedup >= 1.5", target="tensorrt")],
        results(),
        TARGETS,
    )
    cpu, trt = v["gates"]
    assert cpu["status"] == "passed"
    assert trt["status"] == "skipped" and trt["reason"] == "TensorRT is not installed"
    assert trt["target"] == "tensorrt" and "value" not in trt
    assert v["variants"]["fp16"] == {
        "status": "passed",
        "reason": "1 gate(s) passed",
        "passed": 1,
        "failed": 0,
        "skipped": 1,
    }
    assert v["status"] == "passed" and v["targets"] == TARGETS


def test_gate_on_a_target_not_benchmarked_is_skipped() -> None:
    row = one_row(evaluate_gates([gate("size.ratio <= 1", target="onnxruntime-cuda")], results(), RAN))
    assert row["status"] == "skipped" and row["reason"] == "target not in benchmark.targets"


def test_unscoped_gate_covers_only_targets_that_ran() -> None:
    targets = {**TARGETS, "onnxruntime-cuda": {"status": "ran"}}
    res = results()
    res["fp16"]["onnxruntime-cuda"] = result(cosine_min=0.9)
    res["fp32"]["onnxruntime-cuda"] = baseline()
    v = evaluate_gates([gate("accuracy.cosine_min >= 0.99")], res, targets)
    assert [(r["target"], r["status"]) for r in v["gates"]] == [
        (CPU, "passed"),
        ("onnxruntime-cuda", "failed"),
    ]
    assert v["variants"]["fp16"]["reason"] == "onnxruntime-cuda: accuracy.cosine_min = 0.9, needs >= 0.99"


def test_gate_on_an_unmeasured_metric_fails_with_a_reason() -> None:
    row = one_row(evaluate_gates([gate("accuracy.top1_agreement >= 0.99")], results(), RAN))
    assert row["status"] == "failed"
    assert row["reason"] == "accuracy.top1_agreement was not measured"
    assert row["value"] is None


def test_gate_on_a_nan_metric_fails() -> None:
    row = one_row(evaluate_gates([gate("accuracy.cosine_min >= 0.99")], results(fp16=result(math.nan)), RAN))
    assert row["status"] == "failed" and row["reason"] == "accuracy.cosine_min is NaN (non-finite outputs?)"


# --- variants and overall --------------------------------------------------------------------------


def test_gate_variants_filter() -> None:
    res = results(a=result(), b=result(cosine_min=0.5))
    v = evaluate_gates([gate("accuracy.cosine_min >= 0.999", variants=["a"]), gate("size.ratio <= 0.5")], res, RAN)
    assert [(r["gate"], r["variant"]) for r in v["gates"]] == [(0, "a"), (1, "a"), (1, "b")]
    assert v["variants"]["a"]["status"] == "passed" and v["variants"]["a"]["passed"] == 2
    # b's bad cosine is never gated, only its size
    assert v["variants"]["b"]["status"] == "passed" and v["variants"]["b"]["passed"] == 1


def test_a_variant_whose_gates_are_all_skipped_is_skipped_and_alone_fails_the_run() -> None:
    v = evaluate_gates([gate("latency.p50_speedup >= 1.5", target="tensorrt")], results(), TARGETS)
    fp16 = v["variants"]["fp16"]
    assert fp16["status"] == "skipped" and fp16["skipped"] == 1 and fp16["passed"] == 0
    assert fp16["reason"] == "every gate is on a target that did not run here (tensorrt)"
    assert v["status"] == "failed", "a run in which nothing passed does not pass"


def test_a_skipped_variant_beside_a_passing_one_does_not_fail_the_run() -> None:
    gates = [gate("size.ratio <= 0.6", variants=["cpu"]), gate("latency.p50_speedup >= 2", target="tensorrt")]
    v = evaluate_gates(gates, results(cpu=result(), trt=result()), TARGETS)
    assert v["variants"]["cpu"]["status"] == "passed" and v["variants"]["trt"]["status"] == "skipped"
    assert v["status"] == "passed"
    assert v["targets"] == TARGETS


def test_a_variant_without_gates_fails() -> None:
    v = evaluate_gates([gate("size.ratio <= 0.5", variants=["a"])], results(a=result(), b=result()), RAN)
    assert v["variants"]["a"]["status"] == "passed"
    assert v["variants"]["b"]["status"] == "failed" and "no gate was evaluated" in v["variants"]["b"]["reason"]
    assert v["status"] == "failed"


def test_one_failed_gate_fails_the_variant_and_the_run() -> None:
    res = results(a=result(), b=result(cosine_min=0.9))
    v = evaluate_gates([gate("accuracy.cosine_min >= 0.99"), gate("size.ratio <= 0.5")], res, RAN)
    assert v["variants"]["a"] == {
        "status": "passed",
        "reason": "2 gate(s) passed",
        "passed": 2,
        "failed": 0,
        "skipped": 0,
    }
    b = v["variants"]["b"]
    assert (b["status"], b["passed"], b["failed"]) == ("failed", 1, 1)
    assert b["reason"] == f"{CPU}: accuracy.cosine_min = 0.9, needs >= 0.99"
    assert v["status"] == "failed"


def test_overall_passes_when_every_variant_passes() -> None:
    v = evaluate_gates([gate("accuracy.cosine_min >= 0.99")], results(a=result(), b=result()), RAN)
    assert v["status"] == "passed"
    assert set(v["variants"]) == {"a", "b"}  # the baseline is not a variant


def test_no_variants_is_a_failed_run() -> None:
    v = evaluate_gates([gate("size.ratio <= 1")], {"fp32": {CPU: baseline()}}, RAN)
    assert v["status"] == "failed" and v["variants"] == {} and v["gates"] == []


def test_evaluate_gates_does_not_modify_its_inputs() -> None:
    res, targets = results(), copy.deepcopy(TARGETS)
    before = copy.deepcopy(res), copy.deepcopy(targets)
    evaluate_gates([gate("latency.p50_speedup >= 1"), gate("size.ratio <= 1", target="tensorrt")], res, targets)
    assert (res, targets) == before


def test_a_gate_scoped_to_one_shape_judges_that_shape_only() -> None:
    assert metric_value(result(), "latency.p50_speedup", "batch=1") == 1.2
    assert metric_value(result(), "latency.p50_speedup", "batch=4") is None
    row = one_row(evaluate_gates([gate("latency.p50_speedup >= 1.0", shape={"batch": 1})], results(), TARGETS))
    assert row["status"] == "passed" and row["value"] == 1.2 and row["shape"] == "batch=1"
    worst = one_row(evaluate_gates([gate("latency.p50_speedup >= 1.0")], results(), TARGETS))
    assert worst["status"] == "failed" and worst["value"] == 0.8 and "shape" not in worst
