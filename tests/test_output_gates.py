"""Gates scoped to one output of a multi-output model, and metrics that do not fit an output's shape: a model
with a one-number-per-sample `score` (N,) beside an `embedding` (N, 16), as an ONNX graph and as a torch
module. Cosine of one number is only its sign, so it is not computed there, and a gate asking for it is a
recipe error (exit 2) before any variant is built."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from optimize.accuracy import compare_outputs, per_sample
from optimize.errors import OptimizeError, RecipeError
from optimize.gates import check_outputs, evaluate_gates, metric_value
from optimize.pipeline import RunOptions, run
from optimize.precision import fallback
from optimize.recipe import EvaluateSection, Gate, load_recipe, metric_unfit_reason, values_per_sample
from optimize.reporting.ci import gate_table, junit_xml

CPU = "onnxruntime-cpu"


def two_outputs(n: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "score": rng.standard_normal(n).astype(np.float32),
        "embedding": rng.standard_normal((n, 16)).astype(np.float32),
    }


# --- accuracy: what is computed per output ----------------------------------------------------------


def test_a_scalar_output_has_errors_but_no_cosine() -> None:
    base = two_outputs()
    var = {k: v.copy() for k, v in base.items()}
    var["score"][0] = -base["score"][0]  # one sign flip: per-sample cosine would have said -1
    var["embedding"] += 0.01
    acc = compare_outputs(base, var, [])
    score, emb = acc["outputs"]["score"], acc["outputs"]["embedding"]
    assert "cosine_min" not in score and "cosine_mean" not in score
    assert score["max_abs_error"] == pytest.approx(2 * abs(base["score"][0]))
    expected = np.linalg.norm(var["score"] - base["score"]) / np.linalg.norm(base["score"])
    assert score["relative_error"] == pytest.approx(expected)
    assert emb["cosine_min"] > 0.99 and emb["relative_error"] > 0
    # the unscoped cosine is the embedding's alone; the errors are the worst over both outputs
    assert acc["cosine_min"] == emb["cosine_min"] and acc["cosine_mean"] == emb["cosine_mean"]
    assert acc["max_abs_error"] == score["max_abs_error"]
    assert acc["relative_error"] == max(score["relative_error"], emb["relative_error"])
    samples = per_sample(base, var, [])
    assert set(samples["score"]) == {"abs_error"} and set(samples["embedding"]) == {"cosine", "abs_error"}


def test_one_value_per_sample_in_any_rank_has_no_cosine_top1_or_neighbours() -> None:
    base = {"s": np.arange(1, 7, dtype=np.float32).reshape(6, 1, 1)}
    acc = compare_outputs(base, {"s": base["s"] * 1.5}, ["s"], ["s"])
    assert set(acc["outputs"]["s"]) == {"max_abs_error", "mean_abs_error", "relative_error", "samples"}
    assert acc["relative_error"] == pytest.approx(0.5)
    assert "cosine_min" not in acc and "top1_agreement" not in acc and "neighbour_agreement" not in acc


def test_a_model_with_only_scalar_outputs_still_gets_errors() -> None:
    acc = compare_outputs({"s": np.ones(4)}, {"s": np.ones(4)}, [])
    assert acc["max_abs_error"] == 0.0 and acc["relative_error"] == 0.0 and "cosine_min" not in acc


def test_relative_error_of_an_all_zero_reference_is_the_absolute_l2_error() -> None:
    acc = compare_outputs({"s": np.zeros(4)}, {"s": np.array([0.0, 3.0, 4.0, 0.0])}, [])
    assert acc["relative_error"] == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("shape", "per"),
    [
        (("batch",), 1),
        (("batch", 1), 1),
        (("batch", 16), 16),
        ((4, 2, 3), 6),
        (("batch", "seq", 8), None),
        ((), None),
        (None, None),
    ],
)
def test_values_per_sample(shape: tuple[Any, ...], per: int | None) -> None:
    assert values_per_sample(shape) == per


def test_which_metrics_fit_which_shapes() -> None:
    assert metric_unfit_reason("cosine_min", 1, None) and metric_unfit_reason("neighbour_agreement", 1, None)
    assert metric_unfit_reason("top1_agreement", 1, None) and metric_unfit_reason("top1_agreement", 4, 1)
    assert metric_unfit_reason("cosine_min", None, None) is None  # not known before it runs: judged then
    assert metric_unfit_reason("top1_agreement", 12, 3) is None and metric_unfit_reason("cosine_mean", 2, 2) is None
    for metric in ("max_abs_error", "mean_abs_error", "relative_error"):
        assert metric_unfit_reason(metric, 1, None) is None


# --- gates: scoped to an output ---------------------------------------------------------------------


def _results(acc: dict[str, Any]) -> dict[str, Any]:
    base = compare_outputs(two_outputs(), two_outputs(), [])
    return {"fp32": {CPU: {"accuracy": base}}, "int8": {CPU: {"accuracy": acc}}}


def test_a_gate_with_an_output_judges_that_outputs_value_and_shows_it() -> None:
    base = two_outputs()
    var = {"score": base["score"] + 0.079, "embedding": base["embedding"] * 0.5 + 0.3}
    acc = compare_outputs(base, var, [])
    emb_cos = acc["outputs"]["embedding"]["cosine_min"]
    assert metric_value({"accuracy": acc}, "accuracy.max_abs_error", output="score") == pytest.approx(0.079, abs=1e-6)
    assert metric_value({"accuracy": acc}, "accuracy.max_abs_error") == acc["outputs"]["embedding"]["max_abs_error"]
    assert metric_value({"accuracy": acc}, "accuracy.cosine_min", output="score") is None
    gates = [
        Gate(check="accuracy.max_abs_error <= 0.1", output="score"),
        Gate(check="accuracy.max_abs_error <= 0.1"),  # the worst output: the embedding's 0.3+
        Gate(check=f"accuracy.cosine_min >= {emb_cos + 0.001:.6f}", output="embedding"),
    ]
    verdict = evaluate_gates(gates, _results(acc), {CPU: {"status": "ran"}})
    rows = verdict["gates"]
    assert [r["status"] for r in rows] == ["passed", "failed", "failed"]
    assert rows[0]["output"] == "score" and "output" not in rows[1]
    assert rows[0]["baseline_value"] == 0.0
    assert rows[2]["reason"].startswith("accuracy.cosine_min on output 'embedding' = ")
    table = "\n".join(gate_table(verdict))
    assert "`accuracy.max_abs_error <= 0.1 on output score`" in table
    junit = junit_xml(verdict, {"recipe": "two", "stages": []})
    assert 'name="accuracy.max_abs_error &lt;= 0.1 on output score [onnxruntime-cpu]"' in junit
    assert "accuracy.cosine_min &gt;= " in junit and "on output embedding failed" in junit


def test_a_scoped_gate_whose_output_lacks_the_metric_fails_naming_the_output() -> None:
    acc = compare_outputs(two_outputs(), two_outputs(seed=1), [])
    verdict = evaluate_gates(
        [Gate(check="accuracy.cosine_min >= 0.5", output="score")], _results(acc), {CPU: {"status": "ran"}}
    )
    row = verdict["gates"][0]
    assert row["status"] == "failed" and row["reason"] == "accuracy.cosine_min was not measured on output 'score'"


def test_compare_matches_gate_rows_per_output() -> None:
    from optimize.reporting.compare import _gate_rows

    acc = compare_outputs(two_outputs(), two_outputs(seed=1), [])
    gates = [
        Gate(check="accuracy.max_abs_error <= 100", output="score"),
        Gate(check="accuracy.max_abs_error <= 100", output="embedding"),
    ]
    before = evaluate_gates(gates, _results(acc), {CPU: {"status": "ran"}})
    after = evaluate_gates([gates[0], Gate(check="accuracy.max_abs_error <= 0.001", output="embedding")],
                           _results(acc), {CPU: {"status": "ran"}})  # fmt: skip
    rows = _gate_rows(before, after)
    assert [(r.gate, r.flipped) for r in rows] == [
        ("accuracy.max_abs_error <= 100 on output score", False),
        (
            "accuracy.max_abs_error <= 100 on output embedding → accuracy.max_abs_error <= 0.001 on output embedding",
            True,
        ),
    ]


# --- recipe errors ------------------------------------------------------------------------------------


def _gate_error(write_recipe, gate: dict[str, Any], **over: Any) -> str:
    path = write_recipe({"gates": [gate], **over})
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.exit_code == 2
    assert len(str(info.value).splitlines()) == 1, str(info.value)
    return str(info.value)


def test_the_recipe_refuses_an_output_it_can_tell_is_wrong(write_recipe) -> None:
    msg = _gate_error(write_recipe, {"check": "accuracy.max_abs_error <= 1", "output": "logit"})
    assert msg.endswith(
        "recipe.yaml: gates[0].output: unknown output 'logit'; did you mean 'logits'? (the model's outputs: logits)"
    )
    msg = _gate_error(write_recipe, {"check": "latency.p50_ms <= 5", "output": "logits"})
    assert "gates[0].output: `output` applies to accuracy gates only (latency.p50_ms); remove it" in msg
    msg = _gate_error(
        write_recipe,
        {"check": "accuracy.task_metric_drop <= 0.01", "output": "logits"},
        evaluate={"task_metric": "tinynet:accuracy", "task_metric_python_path": ["."]},
    )
    assert "gates[0].output: a task metric judges the model as a whole; remove `output`" in msg
    msg = _gate_error(
        write_recipe,
        {"check": "accuracy.neighbour_agreement >= 0.9", "output": "emb"},
        evaluate={"neighbour_outputs": ["logits"]},
        export={"output_names": ["logits", "emb"]},
    )
    assert "gates[0].output: accuracy.neighbour_agreement is measured on `evaluate.neighbour_outputs` (logits)" in msg
    msg = _gate_error(
        write_recipe,
        {"check": "accuracy.top1_agreement >= 0.9", "output": "emb"},
        export={"output_names": ["logits", "emb"]},
    )
    assert "gates[0].output: accuracy.top1_agreement is measured on `evaluate.top1_outputs` (logits) only" in msg
    ok = load_recipe(write_recipe({"gates": [{"check": "accuracy.relative_error <= 0.1", "output": "logits"}]}))
    assert ok.gates[0].output == "logits"


def test_check_outputs_refuses_metrics_that_do_not_fit_the_shapes() -> None:
    outputs = {"score": ["batch"], "embedding": ["batch", 16]}
    ev = EvaluateSection(dataset="eval")

    def refused(gates: list[Gate], evaluate: EvaluateSection = ev) -> str:
        with pytest.raises(RecipeError) as info:
            check_outputs(gates, evaluate, outputs, "r.yaml")
        assert len(str(info.value).splitlines()) == 1
        return str(info.value)

    msg = refused([Gate(check="accuracy.max_abs_error <= 1"), Gate(check="accuracy.cosine_min >= 0.9", output="score")])
    assert msg.startswith("r.yaml: gates[1]: accuracy.cosine_min does not fit output 'score' (shape [batch]): it has 1")
    assert "gate it with accuracy.max_abs_error or accuracy.relative_error" in msg
    msg = refused([Gate(check="accuracy.max_abs_error <= 1", output="scores")])
    assert msg == (
        "r.yaml: gates[0].output: unknown output 'scores'; did you mean 'score'? "
        "(the model's outputs: score, embedding)"
    )
    msg = refused([], EvaluateSection(dataset="eval", top1_outputs=["score"]))
    assert msg.startswith("r.yaml: evaluate.top1_outputs: output 'score' (shape [batch]) has fewer than 2 classes")
    msg = refused([], EvaluateSection(dataset="eval", neighbour_outputs=["nope"]))
    assert msg.startswith("r.yaml: evaluate.neighbour_outputs: unknown output 'nope'")
    with pytest.raises(RecipeError, match=r"gates\[0\]: accuracy.cosine_mean fits none of the model's outputs"):
        check_outputs([Gate(check="accuracy.cosine_mean >= 0.9")], ev, {"score": ["batch", 1]}, "r.yaml")
    # what fits passes: an unscoped cosine judges the embedding, errors fit any shape, a dynamic size waits
    check_outputs(
        [
            Gate(check="accuracy.cosine_min >= 0.9"),
            Gate(check="accuracy.relative_error <= 0.1", output="score"),
            Gate(check="accuracy.cosine_min >= 0.9", output="tokens"),
            Gate(check="latency.p50_ms <= 9"),
        ],
        ev,
        {**outputs, "tokens": ["batch", "sequence"]},
        "r.yaml",
    )


# --- the fallback tunes on the gates it will be judged by -------------------------------------------------


def test_fallback_gates_keep_their_output_and_are_judged_on_the_cpu() -> None:
    gates = [
        Gate(check="accuracy.relative_error <= 0.01", output="score"),
        Gate(check="accuracy.cosine_min >= 0.9", output="embedding", target="onnxruntime-cuda"),
        Gate(check="accuracy.relative_error <= 0.01", output="score", target=CPU),  # the same once judged on CPU
        Gate(check="accuracy.cosine_min >= 0.9", target="tensorrt"),  # tensorrt does not run here
    ]
    judged = fallback.accuracy_gates(gates, "int8", [CPU, "onnxruntime-cuda"])
    assert [(g.check, g.output, g.target, g.variants) for g in judged] == [
        ("accuracy.relative_error <= 0.01", "score", None, ["int8"]),
        ("accuracy.cosine_min >= 0.9", "embedding", None, ["int8"]),
    ]
    assert fallback.judged_outputs(judged) == ["embedding", "score"]
    assert fallback.judged_outputs([*judged, Gate(check="accuracy.max_abs_error <= 1")]) is None


def test_the_sensitivity_ranking_measures_the_gated_outputs() -> None:
    ref = {"score": np.array([1.0, 1.0]), "embedding": np.array([[3.0, 4.0], [3.0, 4.0]])}
    worse_score = {"score": np.array([0.0, 0.0]), "embedding": ref["embedding"]}
    assert fallback.output_error(ref, worse_score, ["score"]) == pytest.approx(1.0)
    assert fallback.output_error(ref, worse_score, ["embedding"]) == 0.0
    assert fallback.output_error(ref, worse_score) == pytest.approx((2 / 52) ** 0.5)


# --- through the pipeline -------------------------------------------------------------------------------


def two_output_onnx(path: Path, outlier: float = 0.0) -> Path:
    """x (N, 8) → MatMul `emb` → embedding (N, 16); x → MatMul `head` → Reshape → score (N,). `outlier` is
    added to head's weight for x[:, 0] (a feature the test data hold at 0): per-tensor INT8 then rounds every
    other head weight to 0, and the score to 0, whichever CPU kernel runs it."""
    rng = np.random.default_rng(0)
    w_emb = rng.standard_normal((8, 16)).astype(np.float32) * 0.5
    w_head = rng.uniform(0.3, 1.0, (8, 1)).astype(np.float32)
    w_head[0, 0] += outlier
    nodes = [
        helper.make_node("MatMul", ["x", "w_emb"], ["embedding"], name="emb"),
        helper.make_node("MatMul", ["x", "w_head"], ["s2"], name="head"),
        helper.make_node("Reshape", ["s2", "flat"], ["score"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 16]),
        ],
        [
            numpy_helper.from_array(w_emb, "w_emb"),
            numpy_helper.from_array(w_head, "w_head"),
            numpy_helper.from_array(np.array([-1], np.int64), "flat"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _data(folder: Path) -> dict[str, Any]:
    for name, seed in (("eval.npz", 0), ("tune.npz", 1)):
        x = np.random.default_rng(seed).uniform(0.5, 1.5, (32, 8)).astype(np.float32)
        x[:, 0] = 0.0
        np.savez(folder / name, x=x)
    return {
        "eval": {"kind": "npz", "path": "eval.npz", "batch_size": 8},
        "tune": {"kind": "npz", "path": "tune.npz", "batch_size": 8},
    }


def _onnx_recipe(folder: Path, gates: list[Any], variant: dict[str, Any], outlier: float = 0.0) -> Path:
    two_output_onnx(folder / "two.onnx", outlier)
    recipe = {
        "name": "two",
        "model": {"source": "onnx", "path": "two.onnx"},
        "precision": {"variants": [variant]},
        "data": _data(folder),
        "evaluate": {"dataset": "eval"},
        "benchmark": {"shapes": [{"batch": 4}], "warmup": 1, "iterations": 5},
        "gates": gates,
    }
    path = folder / "two.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


FP16 = {"name": "fp16", "kind": "fp16", "backend": "onnxruntime"}
DYNAMIC = {"name": "int8", "kind": "int8", "backend": "onnxruntime-dynamic", "per_channel": False}


def _options(tmp_path: Path) -> RunOptions:
    return RunOptions(runs_dir=tmp_path / "runs", quiet=True, register=False)


def _refused(recipe: Path, tmp_path: Path) -> str:
    with pytest.raises(OptimizeError) as info:
        run(recipe, _options(tmp_path))
    assert info.value.exit_code == 2, str(info.value)
    assert len(str(info.value).splitlines()) == 1
    (run_dir,) = (tmp_path / "runs" / "two").iterdir()
    built = sorted(p.name for p in (run_dir / "artifacts").iterdir())
    assert built == ["fp32.onnx"], "refused before any variant is built"
    return str(info.value)


def test_an_onnx_source_refuses_cosine_on_its_scalar_output_and_unknown_outputs(tmp_path: Path) -> None:
    # the file's outputs are read from its graph before anything runs: validate and run refuse alike
    gates = ["accuracy.cosine_min >= 0.99", {"check": "accuracy.cosine_min >= 0.99", "output": "score"}]
    recipe = _onnx_recipe(tmp_path, gates, FP16)
    expected = (
        "two.yaml: gates[1]: accuracy.cosine_min does not fit output 'score' (shape [batch]): it has 1 value per "
        "sample, and the cosine of one number is only its sign (1, 0 or -1); gate it with accuracy.max_abs_error "
        "or accuracy.relative_error"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "optimize", "validate", "two.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.strip() == expected and "Traceback" not in proc.stderr
    with pytest.raises(OptimizeError) as info:
        run(recipe, _options(tmp_path))
    assert info.value.exit_code == 2 and str(info.value) == expected
    assert not (tmp_path / "runs").exists(), "refused before a run directory, let alone a variant"
    recipe = _onnx_recipe(tmp_path, [{"check": "accuracy.max_abs_error <= 1", "output": "scor"}], FP16)
    with pytest.raises(OptimizeError) as info:
        run(recipe, _options(tmp_path))
    assert str(info.value) == (
        "two.yaml: gates[0].output: unknown output 'scor'; did you mean 'score'? "
        "(the model's outputs: score, embedding)"
    )


def test_fallback_tunes_on_the_scoped_gate_and_the_evaluation_agrees(tmp_path: Path) -> None:
    # per-tensor INT8 of `head` zeroes the score (relative error 1) while the embedding stays close; the
    # gate on the score is what the fallback must meet, so it keeps `head` in FP32 (score exact again)
    gates = [
        {"check": "accuracy.relative_error <= 0.01", "output": "score"},
        {"check": "accuracy.cosine_min >= 0.9", "output": "embedding"},
    ]
    variant = {**DYNAMIC, "fallback": {"dataset": "tune"}}
    path = _onnx_recipe(tmp_path, gates, variant, outlier=500.0)
    # a task metric needs labels, which the tuning data lack: the fallback says it did not tune on that gate
    (tmp_path / "metric.py").write_text("def mean_score(outputs, labels):\n    return float(outputs['score'].mean())\n")
    with np.load(tmp_path / "eval.npz") as z:
        np.savez(tmp_path / "eval.npz", x=z["x"], label=np.zeros(len(z["x"]), np.int64))
    recipe = yaml.safe_load(path.read_text())
    recipe["data"]["eval"]["labels"] = "label"
    recipe["evaluate"].update(task_metric="metric:mean_score", task_metric_python_path=["."])
    recipe["gates"].append("accuracy.task_metric_drop <= 1000")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = run(path, _options(tmp_path))
    assert result.exit_code == 0, (result.run_dir / "report.md").read_text()
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    fb = metrics["fallback"]["int8"]
    assert fb["not_tuned_on"] == ["accuracy.task_metric_drop <= 1000"]
    assert [t["passed"] for t in fb["trials"]] == [False, True]
    assert fb["trials"][0]["failed_gates"][0].startswith(
        "accuracy.relative_error <= 0.01: accuracy.relative_error on output 'score' = "
    )
    assert fb["excluded"] == ["head"] and fb["ranking"][0]["node"] == "head"
    acc = metrics["results"]["int8"][CPU]["accuracy"]["outputs"]
    assert acc["score"]["relative_error"] == 0.0 and "cosine_min" not in acc["score"]
    verdict = json.loads((result.run_dir / "verdict.json").read_text())
    assert [(r.get("output"), r["status"]) for r in verdict["gates"]] == [
        ("score", "passed"),
        ("embedding", "passed"),
        (None, "passed"),
    ]
    assert "on output score" in (result.run_dir / "junit.xml").read_text()
    report = (result.run_dir / "report.md").read_text()
    assert "| int8 | onnxruntime-cpu | score | – | – |" in report
    assert "Not tuned on (the tuning data have no labels): `accuracy.task_metric_drop <= 1000`." in report


TWO_HEADS = textwrap.dedent(
    '''
    """A torch model with a score (N,) and an embedding (N, 16)."""
    import torch


    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Linear(8, 16)
            self.head = torch.nn.Linear(8, 1)

        def forward(self, x):
            return self.head(x).squeeze(-1), self.emb(x)


    def build():
        torch.manual_seed(0)
        return TwoHeads().eval(), {"x": torch.randn(2, 8)}
    '''
)


def test_a_torch_source_is_checked_after_its_export_also_from_the_cache(tmp_path: Path) -> None:
    (tmp_path / "twoheads.py").write_text(TWO_HEADS)
    data = _data(tmp_path)
    recipe = {
        "name": "two",
        "model": {"source": "entry_point", "entry_point": "twoheads:build", "python_path": ["."]},
        "export": {
            "input_names": ["x"],
            "output_names": ["score", "embedding"],
            "dynamic_axes": {"x": {0: "batch"}, "score": {0: "batch"}, "embedding": {0: "batch"}},
        },
        "precision": {"variants": [FP16]},
        "data": {"eval": data["eval"]},
        "evaluate": {"dataset": "eval"},
        "benchmark": {"shapes": [{"batch": 4}], "warmup": 1, "iterations": 5},
        "gates": [{"check": "accuracy.cosine_mean >= 0.9", "output": "score"}],
    }
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    msg = _refused(path, tmp_path)
    assert msg.startswith("two.yaml: gates[0]: accuracy.cosine_mean does not fit output 'score' (shape [")
    recipe["gates"] = [
        {"check": "accuracy.max_abs_error <= 0.05", "output": "score"},
        {"check": "accuracy.cosine_min >= 0.99", "output": "embedding"},
        "accuracy.cosine_min >= 0.99",
    ]
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = run(path, _options(tmp_path))  # the export comes from the cache, with its output shapes
    assert result.exit_code == 0, (result.run_dir / "report.md").read_text()
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    export = next(s for s in manifest["stages"] if s["stage"] == "export")
    assert export["cache"] == "hit" and export["outputs"]["embedding"][1] == 16
    verdict = json.loads((result.run_dir / "verdict.json").read_text())
    assert [r.get("output") for r in verdict["gates"]] == ["score", "embedding", None]
    assert all(r["status"] == "passed" for r in verdict["gates"])
