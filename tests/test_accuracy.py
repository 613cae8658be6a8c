"""Accuracy of a variant against the baseline: per-sample cosine, per-output stats, the worst-output
aggregate, top-1 agreement, the task metric, and running every batch through a runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import unary_onnx

from optimize.accuracy import compare_outputs, per_sample_cosine, run_all, task_metric
from optimize.errors import StageError
from optimize.runtimes import open_runner

RNG = np.random.default_rng(0)

# --- per_sample_cosine -----------------------------------------------------------------------------


def test_identical_samples_are_one() -> None:
    a = RNG.standard_normal((5, 7)).astype(np.float32)
    np.testing.assert_allclose(per_sample_cosine(a, a), np.ones(5), rtol=0, atol=1e-12)


def test_opposite_samples_are_minus_one() -> None:
    a = RNG.standard_normal((4, 3))
    np.testing.assert_allclose(per_sample_cosine(a, -a), -np.ones(4), rtol=0, atol=1e-12)


def test_scale_does_not_matter_and_orthogonal_is_zero() -> None:
    a = np.array([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]])
    b = np.array([[10.0, 20.0, 30.0], [0.0, 5.0, 0.0]])
    np.testing.assert_allclose(per_sample_cosine(a, b), [1.0, 0.0], atol=1e-12)


def test_known_angle() -> None:
    a = np.array([[1.0, 0.0]])
    b = np.array([[1.0, 1.0]])
    assert per_sample_cosine(a, b)[0] == pytest.approx(1 / np.sqrt(2))


def test_zero_vectors() -> None:
    zero = np.zeros((1, 4))
    one = np.ones((1, 4))
    assert per_sample_cosine(zero, zero).tolist() == [1.0]  # both zero: they agree
    assert per_sample_cosine(zero, one).tolist() == [0.0]  # one zero: no agreement
    assert per_sample_cosine(one, zero).tolist() == [0.0]


def test_zero_rows_only_affect_their_own_sample() -> None:
    a = np.array([[0.0, 0.0], [1.0, 2.0], [3.0, 0.0]])
    b = np.array([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]])
    np.testing.assert_allclose(per_sample_cosine(a, b), [1.0, 1.0, 0.0], atol=1e-12)


def test_multi_dim_samples_are_flattened() -> None:
    a = RNG.standard_normal((3, 2, 4, 5))
    b = a + 0.3 * RNG.standard_normal((3, 2, 4, 5))
    got = per_sample_cosine(a, b)
    assert got.shape == (3,)
    flat_a, flat_b = a.reshape(3, -1), b.reshape(3, -1)
    expected = [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(flat_a, flat_b, strict=True)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # not the mean of per-row cosines: one cosine over all 40 values of a sample
    assert not np.allclose(got, per_sample_cosine(a.reshape(-1, 5), b.reshape(-1, 5)).reshape(3, 8).mean(1))


def test_fp16_inputs_are_computed_in_float64() -> None:
    # in float16 the squared norm (8 * 300**2) would overflow to inf and the cosine to NaN/0
    a = np.full((1, 8), 300.0, dtype=np.float16)
    assert per_sample_cosine(a, a)[0] == pytest.approx(1.0)


# --- compare_outputs -------------------------------------------------------------------------------


def outputs(n: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "embedding": rng.standard_normal((n, 16)).astype(np.float32),
        "logits": rng.standard_normal((n, 4)).astype(np.float32),
    }


def test_identical_outputs() -> None:
    base = outputs()
    acc = compare_outputs(base, {k: v.copy() for k, v in base.items()}, ["logits"])
    assert acc["cosine_min"] == pytest.approx(1.0) and acc["cosine_mean"] == pytest.approx(1.0)
    assert acc["max_abs_error"] == 0.0 and acc["mean_abs_error"] == 0.0
    assert acc["top1_agreement"] == 1.0 and acc["top1_agreement_drop"] == 0.0
    assert set(acc["outputs"]) == {"embedding", "logits"}
    assert acc["outputs"]["embedding"]["samples"] == 8


def test_per_output_stats() -> None:
    base = {"y": np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)}
    var = {"y": np.array([[1.0, 0.5], [0.0, 2.0]], dtype=np.float32)}
    stats = compare_outputs(base, var, [])["outputs"]["y"]
    cos0 = 1.0 / np.sqrt(1.25)
    assert stats["cosine_min"] == pytest.approx(cos0)
    assert stats["cosine_mean"] == pytest.approx((cos0 + 1.0) / 2)
    assert stats["max_abs_error"] == pytest.approx(0.5)
    assert stats["mean_abs_error"] == pytest.approx(0.5 / 4)
    assert stats["samples"] == 2
    assert "top1_agreement" not in stats


def test_aggregate_takes_the_worst_output() -> None:
    base = outputs()
    base["logits"] = base["logits"] * 100  # large logits: one error of 3 barely turns them
    var = {k: v.copy() for k, v in base.items()}
    noise = np.random.default_rng(2).standard_normal((8, 16)).astype(np.float32)
    var["embedding"] = var["embedding"] + 0.5 * noise
    var["logits"][0, 0] += 3.0  # a large error in a single value of the other output
    acc = compare_outputs(base, var, [])
    emb, log = acc["outputs"]["embedding"], acc["outputs"]["logits"]
    assert emb["cosine_min"] < log["cosine_min"] and emb["cosine_mean"] < log["cosine_mean"]
    assert log["max_abs_error"] > emb["max_abs_error"]
    assert emb["mean_abs_error"] > log["mean_abs_error"]
    assert acc["cosine_min"] == emb["cosine_min"]
    assert acc["cosine_mean"] == emb["cosine_mean"]
    assert acc["max_abs_error"] == log["max_abs_error"]
    assert acc["mean_abs_error"] == emb["mean_abs_error"]


def test_top1_only_for_top1_outputs() -> None:
    base = {"logits": np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0], [2.0, 1.0, 0.0]])}
    # row 1 flips from class 1 to class 2
    var = {"logits": np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 0.0, 5.0], [2.0, 1.0, 0.0]])}
    acc = compare_outputs(base, var, ["logits"])
    assert acc["outputs"]["logits"]["top1_agreement"] == 0.75
    assert acc["outputs"]["logits"]["top1_agreement_drop"] == 0.25
    assert acc["top1_agreement"] == 0.75 and acc["top1_agreement_drop"] == 0.25
    plain = compare_outputs(base, var, [])
    assert "top1_agreement" not in plain and "top1_agreement_drop" not in plain
    assert "top1_agreement" not in plain["outputs"]["logits"]
    # a top-1 output that the model does not have adds nothing
    assert "top1_agreement" not in compare_outputs(base, var, ["other"])


def test_top1_aggregate_takes_the_worst_classifier() -> None:
    a = np.eye(4)
    b = np.eye(4)[[0, 1, 3, 2]]  # two of four rows disagree
    c = np.eye(4)[[0, 1, 2, 0]]  # one of four
    acc = compare_outputs({"a": a, "b": a, "c": a}, {"a": a, "b": b, "c": c}, ["a", "b", "c"])
    assert [acc["outputs"][k]["top1_agreement"] for k in "abc"] == [1.0, 0.5, 0.75]
    assert acc["top1_agreement"] == 0.5 and acc["top1_agreement_drop"] == 0.5


def test_top1_over_the_last_axis() -> None:
    base = np.zeros((2, 3, 5))
    base[..., 1] = 1.0  # every token predicts class 1
    var = base.copy()
    var[0, 0, 4] = 9.0  # one of six tokens flips
    acc = compare_outputs({"t": base}, {"t": var}, ["t"])
    assert acc["top1_agreement"] == pytest.approx(5 / 6)


def test_extra_variant_outputs_are_ignored() -> None:
    base = outputs()
    acc = compare_outputs({"logits": base["logits"]}, base, [])
    assert set(acc["outputs"]) == {"logits"}


def test_missing_variant_output_is_a_stage_error() -> None:
    base = outputs()
    with pytest.raises(StageError, match="'logits': the variant has no such output"):
        compare_outputs(base, {"embedding": base["embedding"]}, [])


def test_shape_mismatch_is_a_stage_error_not_a_broadcast() -> None:
    base = {"y": np.ones((4,), np.float32)}
    with pytest.raises(StageError, match=r"'y': the variant has shape \[4, 1\], the baseline \[4\]"):
        compare_outputs(base, {"y": np.ones((4, 1), np.float32)}, [])


# --- task metric -----------------------------------------------------------------------------------


def test_task_metric_baseline_variant_drop() -> None:
    labels = np.array([0, 1, 2, 0])
    base = {"logits": np.eye(3)[[0, 1, 2, 0]]}  # 4/4 right
    var = {"logits": np.eye(3)[[0, 1, 1, 1]]}  # 2/4 right
    seen: list[Any] = []

    def accuracy(out: dict[str, np.ndarray], lab: np.ndarray) -> np.floating:
        seen.append(lab)
        return (out["logits"].argmax(-1) == lab).mean()  # a numpy scalar, as user code returns

    m = task_metric(accuracy, base, var, labels)
    assert m == {"task_metric": 0.5, "task_metric_baseline": 1.0, "task_metric_drop": 0.5}
    assert all(type(v) is float for v in m.values())
    assert all(x is labels for x in seen) and len(seen) == 2


def test_task_metric_improvement_is_a_negative_drop() -> None:
    m = task_metric(lambda out, _: out["s"].sum(), {"s": np.array([1.0])}, {"s": np.array([1.5])}, None)
    assert m["task_metric_drop"] == pytest.approx(-0.5)


def test_task_metric_errors_propagate() -> None:
    def broken(out: dict[str, np.ndarray], labels: Any) -> float:
        raise ValueError("bad labels")

    with pytest.raises(ValueError, match="bad labels"):
        task_metric(broken, {}, {}, None)


# --- run_all ---------------------------------------------------------------------------------------


class EchoRunner:
    """Test double: returns the batch doubled under `y` and its row sums under `s`, records the calls."""

    def __init__(self) -> None:
        self.calls: list[dict[str, np.ndarray]] = []

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(feeds)
        return {"y": feeds["x"] * 2, "s": feeds["x"].sum(axis=1)}


def test_run_all_concatenates_batches_in_order() -> None:
    x = np.arange(21, dtype=np.float32).reshape(7, 3)
    batches = [{"x": x[:3]}, {"x": x[3:6]}, {"x": x[6:]}]  # a short last batch
    runner = EchoRunner()
    out = run_all(runner, batches)
    assert len(runner.calls) == 3 and all(c is b for c, b in zip(runner.calls, batches, strict=True))
    assert list(out) == ["y", "s"]
    np.testing.assert_array_equal(out["y"], x * 2)
    np.testing.assert_array_equal(out["s"], x.sum(axis=1))


def test_run_all_no_batches() -> None:
    assert run_all(EchoRunner(), []) == {}


def test_run_all_on_a_real_onnx_runner(tmp_path: Path) -> None:
    path = unary_onnx(tmp_path / "neg.onnx", "Neg", ["batch", 2])
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    with open_runner("onnxruntime-cpu", path) as r:
        out = run_all(r, [{"x": x[:2]}, {"x": x[2:]}])
    np.testing.assert_array_equal(out["y"], -x)
    acc = compare_outputs(out, {"y": out["y"].copy()}, [])
    assert acc["outputs"]["y"]["samples"] == 5 and acc["max_abs_error"] == 0.0


def test_neighbour_agreement_counts_samples_whose_nearest_other_sample_changed() -> None:
    from optimize.accuracy import nearest_neighbours, neighbour_agreement

    base = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert list(nearest_neighbours(base)) == [1, 0, 3, 2]
    assert list(nearest_neighbours(base, block=1)) == [1, 0, 3, 2]  # blocks of rows give the same answer
    assert neighbour_agreement(base, base * 3.0) == 1.0  # cosine ignores scale
    moved = base.copy()
    moved[1] = [0.2, 0.95]  # sample 1 now sits next to sample 3; sample 0 keeps sample 1 as nearest
    assert list(nearest_neighbours(moved)) == [1, 3, 3, 1]
    assert neighbour_agreement(base, moved) == 0.5


def test_compare_outputs_reports_neighbour_agreement_for_named_outputs_only() -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((20, 8))
    acc = compare_outputs({"e": emb, "f": emb}, {"e": emb, "f": emb}, [], ["e"])
    assert acc["neighbour_agreement"] == 1.0
    assert "neighbour_agreement" in acc["outputs"]["e"] and "neighbour_agreement" not in acc["outputs"]["f"]
    assert "neighbour_agreement" not in compare_outputs({"e": emb}, {"e": emb}, [])
