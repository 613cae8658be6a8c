"""INT8 backends on a small two-layer MLP: real ONNX Runtime and ModelOpt quantisation, determinism,
memory-bounded calibration, exclusions, and the accuracy-aware fallback's ranking and search policy."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import conv_proto, mlp_onnx

from optimize.errors import RecipeError, RuntimeMissingError, StageError
from optimize.precision import fallback, int8
from optimize.recipe import FallbackSection, Gate, Int8Variant

WHERE = "precision.variants[0]"


def conv_onnx(path: Path) -> Path:
    """image (N, 1, 8, 8) → Conv → Relu → Conv → Relu → GlobalAveragePool → Flatten → logits (N, 8)."""
    model = conv_proto(channels=1, width=8, scales=(0.5, 0.2))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def image_batches(n: int = 64, size: int = 16, seed: int = 1) -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(seed).random((n, 1, 8, 8)).astype(np.float32)
    return [{"image": x[i : i + size]} for i in range(0, n, size)]


def batches(n: int = 64, size: int = 16, seed: int = 1) -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    return [{"x": x[i : i + size]} for i in range(0, n, size)]


def variant(**kw) -> Int8Variant:
    base = {"name": "int8", "kind": "int8", "backend": "onnxruntime", "calibration": "calib"}
    if kw.get("backend") == "onnxruntime-dynamic":
        base.pop("calibration")
    return Int8Variant(**{**base, **kw})


def run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def mlp(tmp_path: Path) -> Path:
    return mlp_onnx(tmp_path / "fp32.onnx")


BACKENDS = [
    {"backend": "onnxruntime-dynamic"},
    {"backend": "onnxruntime", "method": "minmax"},
    {"backend": "onnxruntime", "method": "entropy"},
    {"backend": "onnxruntime", "method": "percentile", "quant_format": "qoperator"},
    {"backend": "modelopt", "method": "max"},
    {"backend": "modelopt", "method": "entropy"},
]


@pytest.mark.parametrize("options", BACKENDS, ids=lambda o: f"{o['backend']}-{o.get('method', 'dynamic')}")
def test_each_backend_quantises_deterministically_and_stays_close(tmp_path: Path, options) -> None:
    v = variant(**options)
    # ModelOpt places Q/DQ for TensorRT: it leaves a bias-added MatMul MLP alone but quantises convolutions
    convolutional = v.backend == "modelopt"
    model = conv_onnx(tmp_path / "cnn.onnx") if convolutional else mlp_onnx(tmp_path / "mlp.onnx")
    data = image_batches() if convolutional else batches()
    calib = [] if v.backend == "onnxruntime-dynamic" else data
    first = int8.quantize(model, tmp_path / "a" / "q.onnx", v, calib, tmp_path / "wa", WHERE)
    second = int8.quantize(model, tmp_path / "b" / "q.onnx", v, calib, tmp_path / "wb", WHERE)
    assert sha(tmp_path / "a" / "q.onnx") == sha(tmp_path / "b" / "q.onnx"), "same recipe and data, other bytes"
    assert first.quant_ops and first.quant_ops == second.quant_ops
    assert first.backend == v.backend and first.method == v.calibration_method
    feeds = (image_batches if convolutional else batches)(n=32, seed=7)[0]
    ref, got = run(model, feeds), run(tmp_path / "a" / "q.onnx", feeds)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.99
    if v.backend != "onnxruntime-dynamic":
        assert first.calibration["samples"] == 64 and first.calibration["batches"] == 4


def test_entropy_bins_are_exposed_and_not_minmax_in_disguise(mlp: Path, tmp_path: Path) -> None:
    calib = batches()
    minmax = int8.quantize(mlp, tmp_path / "mm.onnx", variant(method="minmax"), calib, tmp_path / "w1", WHERE)
    entropy = int8.quantize(mlp, tmp_path / "en.onnx", variant(method="entropy"), calib, tmp_path / "w2", WHERE)
    assert entropy.calibration["num_bins"] == 2048 and minmax.calibration["method"] == "minmax"
    assert sha(tmp_path / "mm.onnx") != sha(tmp_path / "en.onnx")
    # ONNX Runtime's own default (128 bins, 128 quantised bins) leaves the search one candidate: MinMax's range
    same = variant(method="entropy", bins=128, quantized_bins=128)
    int8.quantize(mlp, tmp_path / "en128.onnx", same, calib, tmp_path / "w3", WHERE)
    assert sha(tmp_path / "en128.onnx") != sha(tmp_path / "en.onnx")


def test_static_backend_needs_calibration_batches(mlp: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="never calibrated on random data"):
        int8.quantize(mlp, tmp_path / "q.onnx", variant(), [], tmp_path / "w", WHERE)
    assert not (tmp_path / "q.onnx").exists()


def test_calibration_streams_in_chunks_under_a_small_budget(mlp: Path, tmp_path: Path, monkeypatch) -> None:
    """With a budget that fits three batches' activations beside the process, the eight batches are calibrated
    in chunks of 3, 3 and 2, and the model still quantises."""
    calib = batches(n=128, size=16)  # 8 batches of 16 rows
    base = 2**30  # what the process holds, fixed: the real RSS moves by more than a batch's activations
    real_rss, real_plan, real_ranges = int8.rss_bytes, int8.plan_chunks, int8.chunk_ranges
    monkeypatch.setattr(int8, "rss_bytes", lambda key="VmRSS": base if key == "VmRSS" else real_rss(key))
    per_batch: list[int] = []
    monkeypatch.setattr(int8, "plan_chunks", lambda size, *a: per_batch.append(size) or real_plan(size, *a))
    chunks: list[list[tuple[int, int]]] = []
    monkeypatch.setattr(int8, "chunk_ranges", lambda b, size: chunks.append(real_ranges(b, size)) or chunks[-1])
    # one batch, under a large budget, measures what a batch's activations take
    int8.quantize(mlp, tmp_path / "probe.onnx", variant(method="entropy"), calib[:1], tmp_path / "w0", WHERE)
    assert per_batch[0] > 0 and chunks == [[(0, 1)]]
    # a chunk of k batches needs 2 × k × per-batch bytes: three fit, four do not
    budget = (base + 2 * 3 * per_batch[0] + per_batch[0]) / 2**30
    res = int8.quantize(
        mlp, tmp_path / "q.onnx", variant(method="entropy", memory_budget_gb=budget), calib, tmp_path / "w", WHERE
    )
    assert per_batch[1] == per_batch[0]
    assert res.calibration["chunk_batches"] == 3 and res.calibration["batches"] == 8
    assert chunks[1] == [(0, 3), (3, 6), (6, 8)]
    assert res.calibration["peak_rss_mb"] > 0
    assert run(tmp_path / "q.onnx", calib[0]).shape == (16, 4)


def test_plan_chunks_fits_the_budget_and_names_the_knobs() -> None:
    assert (
        int8.plan_chunks(100, batches=50, budget_bytes=1000 + 100 * 2 * 10, base_bytes=1000, where=WHERE, dataset="d")
        == 10
    )
    assert int8.plan_chunks(100, batches=5, budget_bytes=10**9, base_bytes=0, where=WHERE, dataset="d") == 5
    with pytest.raises(StageError) as e:
        int8.plan_chunks(2**30, batches=5, budget_bytes=2**30, base_bytes=2**29, where=WHERE, dataset="calib")
    assert f"{WHERE}.memory_budget_gb" in str(e.value) and "data.calib.batch_size" in str(e.value)


def test_chunks_never_mix_shapes() -> None:
    b = [{"x": np.zeros((16, 8))}] * 3 + [{"x": np.zeros((5, 8))}] + [{"x": np.zeros((16, 8))}] * 2
    assert int8.chunk_ranges(b, 2) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert int8.chunk_ranges(b, 10) == [(0, 3), (3, 4), (4, 6)]


def test_unknown_exclusions_list_near_matches(mlp: Path) -> None:
    with pytest.raises(RecipeError) as e:
        int8.check_exclusions(mlp, ["fc3"], [], WHERE)
    assert re.match(
        rf"{re.escape(WHERE)}\.nodes_to_exclude: no node .fc3. in fp32.onnx; near matches: fc\d, fc\d$", str(e.value)
    )
    with pytest.raises(RecipeError, match=r"op_types_to_exclude: no op type 'Matmul'.*near matches: MatMul"):
        int8.check_exclusions(mlp, [], ["Matmul"], WHERE)
    int8.check_exclusions(mlp, ["fc1"], ["Relu"], WHERE)  # names that exist pass


def test_excluded_nodes_stay_float(mlp: Path, tmp_path: Path) -> None:
    v = variant(backend="onnxruntime-dynamic", nodes_to_exclude=["fc2"])
    res = int8.quantize(mlp, tmp_path / "q.onnx", v, [], tmp_path / "w", WHERE)
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert [n.op_type for n in model.graph.node if n.name == "fc2"] == ["MatMul"]
    assert res.quant_ops.get("MatMulInteger") == 1 and res.nodes_excluded == ["fc2"]


def test_a_missing_modelopt_is_exit_4_with_the_install_command(mlp: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(int8, "modelopt_quantization_available", lambda: "nvidia-modelopt is not installed")
    with pytest.raises(RuntimeMissingError) as e:
        int8.quantize(
            mlp, tmp_path / "q.onnx", variant(backend="modelopt", method="max"), batches(), tmp_path / "w", WHERE
        )
    assert "pip install 'optimize[modelopt]'" in str(e.value) and f"{WHERE}.backend" in str(e.value)


# --- fallback --------------------------------------------------------------------------------------


def test_isolated_ranking_puts_the_badly_quantised_node_first(tmp_path: Path) -> None:
    src = mlp_onnx(tmp_path / "fp32.onnx", outlier=60.0)  # one huge fc2 weight: per-tensor INT8 wipes the rest
    v = variant(backend="onnxruntime-dynamic", per_channel=False)
    int8.quantize(src, tmp_path / "q.onnx", v, [], tmp_path / "w", WHERE)
    candidates = fallback.quantised_nodes(onnx.load(str(src)), onnx.load(str(tmp_path / "q.onnx")))
    assert candidates == ["fc1", "fc2"]
    feeds = batches()[:2]
    reference = {"logits": np.concatenate([run(src, f) for f in feeds])}

    def quantise_only(node: str) -> Path:
        return int8.quantize(src, tmp_path / f"{node}.onnx", v, [], tmp_path / "w", WHERE, only=node) and (
            tmp_path / f"{node}.onnx"
        )

    def outputs_of(path: Path) -> dict[str, np.ndarray]:
        return {"logits": np.concatenate([run(path, f) for f in feeds])}

    ranking = fallback.rank_isolated(candidates, quantise_only, outputs_of, reference)
    assert [n for n, _ in ranking] == ["fc2", "fc1"] and ranking[0][1] > 2 * ranking[1][1] > 0
    only_fc1 = onnx.load(str(tmp_path / "fc1.onnx"))
    assert [n.op_type for n in only_fc1.graph.node if n.name == "fc2"] == ["MatMul"], "only the named node is INT8"


def test_quantised_nodes_skips_data_movement_and_keeps_asked_op_types(tmp_path: Path) -> None:
    src = mlp_onnx(tmp_path / "fp32.onnx")
    int8.quantize(src, tmp_path / "q.onnx", variant(op_types=["MatMul", "Relu"]), batches(), tmp_path / "w", WHERE)
    source, quantised = onnx.load(str(src)), onnx.load(str(tmp_path / "q.onnx"))
    # the bias Adds read the shared DequantizeLinear outputs too, but ONNX Runtime's QDQ quantiser does not
    # quantise Add: the backend's op types keep them out; Relu only moves data
    assert fallback.quantised_nodes(source, quantised, int8.candidate_op_types(variant())) == ["fc1", "fc2"]
    assert fallback.quantised_nodes(source, quantised, {"MatMul", "Relu"}) == ["fc1", "fc2"]
    assert fallback.quantised_nodes(source, quantised, {"MatMul", "Add"}) == ["fc1", "fc1_bias", "fc2", "fc2_bias"]
    assert "MatMul" in int8.candidate_op_types(variant(backend="onnxruntime-dynamic"))


def test_output_error_is_relative_over_all_outputs() -> None:
    ref = {"a": np.array([3.0, 4.0]), "b": np.array([0.0])}
    assert fallback.output_error(ref, ref) == 0.0
    assert fallback.output_error(ref, {"a": np.array([3.0, 4.0]), "b": np.array([5.0])}) == pytest.approx(1.0)


def fake_search(passes_at: int, speed_of=lambda n: 1.0, max_trials: int = 8, nodes: int = 20):
    built: list[list[str]] = []
    names = [f"n{i}" for i in range(nodes)]

    def build(i, excluded):
        built.append(list(excluded))
        return Path(f"trial{i}")

    def judge(path):
        n = len(built[-1])
        return {"cosine_mean": 0.9 + 0.01 * n}, ([] if n >= passes_at else [f"cosine with {n} excluded"])

    def speed(path):
        return speed_of(len(built[int(str(path).removeprefix("trial"))]))

    outcome = fallback.search(
        FallbackSection(max_trials=max_trials), build, judge, speed, lambda p: [(n, 1.0) for n in names]
    )
    return outcome, built


def test_search_stops_at_once_when_the_model_as_configured_passes() -> None:
    outcome, built = fake_search(passes_at=0)
    assert built == [[]] and outcome.chosen.index == 0 and outcome.chosen.passed


def test_search_grows_then_bisects_to_the_smallest_passing_exclusion() -> None:
    outcome, built = fake_search(passes_at=5)
    assert [len(b) for b in built] == [0, 1, 2, 4, 8, 6, 5]
    assert outcome.chosen.passed and len(outcome.chosen.excluded) == 5
    assert outcome.chosen.excluded == ["n0", "n1", "n2", "n3", "n4"]  # the most sensitive first


def test_search_keeps_the_fastest_passing_trial_not_the_first() -> None:
    # here more exclusions run faster (say, they remove slow Q/DQ pairs): the 8-node trial wins
    outcome, _ = fake_search(passes_at=5, speed_of=lambda n: 1.0 + n / 10)
    assert len(outcome.chosen.excluded) == 8 and all(t.p50_speedup for t in outcome.trials)


def test_search_reports_every_trial_when_the_budget_runs_out() -> None:
    outcome, built = fake_search(passes_at=100, max_trials=3)
    assert len(built) == 3 and not outcome.chosen.passed and outcome.chosen.index == 2
    assert outcome.stopped == "trial budget (3) used"
    record = outcome.record()
    assert [t["excluded_count"] for t in record["trials"]] == [0, 1, 2]
    assert all(t["failed_gates"] for t in record["trials"])


def test_search_never_excludes_every_quantised_node() -> None:
    outcome, built = fake_search(passes_at=100, nodes=3, max_trials=10)
    assert max(len(b) for b in built) == 2
    assert outcome.stopped == "2 of 3 quantised nodes kept high-precision and the gates still fail"


def test_search_honours_the_time_budget() -> None:
    ticks = iter(range(0, 10_000, 100))
    outcome = fallback.search(
        FallbackSection(max_seconds=250),
        lambda i, ex: Path(f"t{i}"),
        lambda p: ({}, ["fails"]),
        lambda p: 1.0,
        lambda p: [("a", 1.0), ("b", 0.5), ("c", 0.1)],
        clock=lambda: next(ticks),
    )
    assert outcome.stopped == "time budget (250 s) used" and len(outcome.trials) < 3


def test_accuracy_gates_for_a_variant() -> None:
    gates = [
        Gate(check="accuracy.cosine_mean >= 0.99"),
        Gate(check="latency.p50_speedup >= 1.2"),
        Gate(check="accuracy.cosine_min >= 0.9", variants=["other"]),
    ]
    gates.append(Gate(check="accuracy.cosine_min >= 0.95", target="tensorrt"))
    assert [g.check for g in fallback.accuracy_gates(gates, "int8", ["onnxruntime-cpu"])] == [
        "accuracy.cosine_mean >= 0.99"
    ]
    assert len(fallback.accuracy_gates(gates, "int8", ["onnxruntime-cpu", "tensorrt"])) == 2


def test_excluded_nodes_can_keep_int8_weights_with_float_activations(mlp: Path, tmp_path: Path) -> None:
    v = variant(backend="onnxruntime-dynamic", nodes_to_exclude=["fc2"], exclude_as="int8-weights")
    res = int8.quantize(mlp, tmp_path / "a.onnx", v, [], tmp_path / "w", WHERE)
    int8.quantize(mlp, tmp_path / "b.onnx", v, [], tmp_path / "w2", WHERE)
    assert sha(tmp_path / "a.onnx") == sha(tmp_path / "b.onnx")
    model = onnx.load(str(tmp_path / "a.onnx"))
    assert [n.op_type for n in model.graph.node if n.name.startswith("fc2")] == ["MatMulNBits", "Add"]
    assert res.quant_ops["MatMulNBits"] == 1 and res.quant_ops["MatMulInteger"] == 1
    float_kept = variant(backend="onnxruntime-dynamic", nodes_to_exclude=["fc2"])
    int8.quantize(mlp, tmp_path / "f.onnx", float_kept, [], tmp_path / "w3", WHERE)
    feeds = batches()[0]
    ref, got, flt = run(mlp, feeds), run(tmp_path / "a.onnx", feeds), run(tmp_path / "f.onnx", feeds)
    assert np.abs(got - flt).max() < 0.05 * np.abs(ref).max()  # about the accuracy of keeping fc2 float


def _exact(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The model's Q/DQ arithmetic without ONNX Runtime's fused integer kernels: with graph optimisations off,
    QuantizeLinear, DequantizeLinear and MatMul run one by one in float, which is what a CPU whose INT8 kernels
    do not saturate (VNNI, AVX-512 VNNI, AMX) computes."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("reduce_range", [False, True], ids=["8-bit", "reduce_range"])
def test_int8_kernels_equal_the_exact_arithmetic_unless_this_cpu_saturates(
    mlp: Path, tmp_path: Path, reduce_range: bool
) -> None:
    """Why INT8 thresholds in tests hold on every x86 CPU: this machine's fused kernels (its ISA, from
    optimize.cpu) against the exact Q/DQ arithmetic. 7-bit weights give the exact result on every ISA; 8-bit
    weights do only where the CPU has VNNI or AMX, and without them u8×s8 sums saturate."""
    from optimize import cpu

    dest = tmp_path / "q.onnx"
    int8.quantize(mlp, dest, variant(method="minmax", reduce_range=reduce_range), batches(), tmp_path / "w", WHERE)
    feeds = batches(n=64, size=64, seed=7)[0]
    fused, exact = run(dest, feeds), _exact(dest, feeds)
    error = float(np.abs(fused - exact).max() / np.abs(exact).max())
    if reduce_range or not cpu.saturating(cpu.isa()):
        assert error < 1e-5, f"{cpu.isa()['int8_dot']}: fused INT8 kernels differ from the exact arithmetic"
    else:
        assert error > 1e-3, f"{cpu.isa()['int8_dot']} should saturate 8-bit weight products; it did not"
