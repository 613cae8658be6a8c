"""`optimize plan`: every unit a run would make, hit or miss against the real stage cache, and why it misses,
made from the same declarations the run executes; without torch, ONNX Runtime or MLflow."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import merge, tiny_recipe
from rich.console import Console

from optimize import plan
from optimize.errors import RecipeError
from optimize.export import export_onnx
from optimize.models import LoadedModel
from optimize.pipeline import RunOptions, run
from optimize.recipe import ExportSection


@pytest.fixture()
def onnx_recipe(tiny_dir: Path) -> Path:
    """The tiny model given as ONNX (its identities are all in files), with an FP16 and a calibrated INT8
    variant."""
    sys.path.insert(0, str(tiny_dir))
    try:
        import tinynet

        module, inputs = tinynet.build()
    finally:
        sys.path.remove(str(tiny_dir))
        sys.modules.pop("tinynet", None)
    spec = ExportSection(output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    export_onnx(LoadedModel(module, inputs), spec, tiny_dir / "tiny.onnx")
    variants = [
        {"name": "fp16", "kind": "fp16", "backend": "onnxruntime"},
        {"name": "int8", "kind": "int8", "backend": "onnxruntime", "calibration": "calib", "reduce_range": True},
    ]
    recipe = merge(
        tiny_recipe(),
        {
            "model": {"source": "onnx", "path": "tiny.onnx", "entry_point": None, "python_path": None},
            "precision": {"variants": variants},
            "data": {"calib": {"kind": "npz", "path": "tiny-calib.npz", "batch_size": 16}},
            # a task metric: its module's source is in the keys, found by the plan without importing it
            "evaluate": {"task_metric": "tinynet:accuracy", "task_metric_python_path": ["."]},
            "gates": ["accuracy.cosine_min >= 0.8", "size.ratio <= 2.0"],
        },
    )
    path = tiny_dir / "onnx.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _by_unit(made: plan.Plan) -> dict[str, plan.PlannedUnit]:
    return {f"{u.stage}:{u.unit}": u for u in made.units}


UNITS = [
    "precision:fp16",
    "precision:int8",
    "evaluate:fp32@onnxruntime-cpu",
    "evaluate:fp16@onnxruntime-cpu",
    "evaluate:int8@onnxruntime-cpu",
    "benchmark:onnxruntime-cpu",
]


def _run(recipe: Path) -> dict[str, Any]:
    result = run(recipe, RunOptions(runs_dir=recipe.parent / "runs", quiet=True, register=False))
    return json.loads((result.run_dir / "manifest.json").read_text())


def test_plan_lists_every_unit_a_run_makes_and_then_takes_from_the_cache(onnx_recipe: Path) -> None:
    before = _by_unit(plan.make(onnx_recipe))
    assert list(before) == UNITS  # an ONNX source has no export unit
    assert before["precision:int8"].status == "miss" and before["precision:int8"].why == [
        "never made in this stage cache"
    ]
    assert before["evaluate:int8@onnxruntime-cpu"].status == "after"
    assert before["evaluate:int8@onnxruntime-cpu"].why == ["onnx.int8 is made by precision int8, which is not cached"]

    manifest = _run(onnx_recipe)
    made = {f"{e['stage']}:{e['unit']}": e for e in manifest["cache"]}
    assert list(made) == UNITS  # the plan's units are the run's units, in the run's order
    after = plan.make(onnx_recipe)
    assert [u.status for u in after.units] == ["hit"] * len(UNITS) and after.to_make == []
    for name, u in _by_unit(after).items():
        assert u.key == made[name]["key"]  # the plan's key is the key the run used
        assert u.last_s == made[name]["seconds"] and u.last_s > 0


def test_a_changed_calibration_file_is_named_as_the_cause(onnx_recipe: Path, tiny_dir: Path) -> None:
    manifest = _run(onnx_recipe)
    seconds = {f"{e['stage']}:{e['unit']}": e["seconds"] for e in manifest["cache"]}
    rng = np.random.default_rng(7)
    np.savez(tiny_dir / "tiny-calib.npz", x=rng.standard_normal((64, 8)).astype(np.float32))
    made = plan.make(onnx_recipe)
    units = _by_unit(made)
    assert units["precision:int8"].status == "miss"
    assert units["precision:int8"].why == ["input data.calib changed"]
    assert units["evaluate:int8@onnxruntime-cpu"].why == ["onnx.int8 is made by precision int8, which is not cached"]
    assert units["benchmark:onnxruntime-cpu"].status == "after"
    hits = [n for n, u in units.items() if u.status == "hit"]
    assert hits == ["precision:fp16", "evaluate:fp32@onnxruntime-cpu", "evaluate:fp16@onnxruntime-cpu"]
    # the estimate: what the units to make took last time
    expected = sum(seconds[n] for n in ("precision:int8", "evaluate:int8@onnxruntime-cpu", "benchmark:onnxruntime-cpu"))
    assert made.estimate_s == pytest.approx(expected)


def test_a_changed_setting_library_or_code_is_named(onnx_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _run(onnx_recipe)
    recipe = yaml.safe_load(onnx_recipe.read_text())
    recipe["precision"]["variants"][1]["method"] = "entropy"
    onnx_recipe.write_text(yaml.safe_dump(recipe))
    assert _by_unit(plan.make(onnx_recipe))["precision:int8"].why == ["config variant.method: unset → entropy"]

    assert plan.explain(
        {"format": 2, "inputs": {}, "versions": {"onnx": "1.2"}, "code": {"export.py": "b", "stage.py": "s"}},
        {"format": 2, "inputs": {}, "versions": {"onnx": "1.1"}, "code": {"export.py": "a", "stage.py": "s"}},
    ) == ["onnx 1.1 → 1.2", "code changed: optimize/export.py"]


def test_an_entry_point_model_is_unknown_until_a_run_builds_it(write_recipe) -> None:
    made = plan.make(write_recipe())
    reason = "the model's identity is its built module's state dict (known once a run builds it)"
    assert made.units[0].stage == "export" and made.units[0].status == "unknown"
    assert made.units[0].why == [reason]  # the model, and the data tokenised or checked with it: said once
    assert {u.status for u in made.units[1:]} == {"unknown"}
    assert made.to_make == [] and len(made.unknown) == len(made.units)
    out = io.StringIO()
    plan.summarise(made, Console(file=out, width=200))
    assert out.getvalue().splitlines() == [
        f"plan tiny: 0 of {len(made.units)} units cached, 0 to make, {len(made.units)} known only when the run "
        "builds the model or data",
        f"  unknown: {reason}",
    ]


def test_plan_imports_no_torch_onnxruntime_or_mlflow_and_prints_json(onnx_recipe: Path) -> None:
    """`optimize plan --json` in a fresh process: the same units as the Python API, and none of the heavy
    libraries imported on the way."""
    code = (
        "import json, sys\n"
        "from optimize.cli import app\n"
        "try:\n"
        "    app(['plan', sys.argv[1], '--json'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'mlflow', 'transformers') if m in sys.modules]\n"
        "print(json.dumps(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(onnx_recipe)],
        capture_output=True,
        text=True,
        cwd=onnx_recipe.parent,
        env={**os.environ},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == []
    shown = json.loads("\n".join(lines[:-1]))
    assert [f"{u['stage']}:{u['unit']}" for u in shown["units"]] == UNITS
    assert shown["hits"] == 0 and shown["to_make"] == len(UNITS) and shown["recipe"] == "tiny"


def test_optimize_run_prints_the_plan_summary_first(onnx_recipe: Path) -> None:
    _run(onnx_recipe)
    out = subprocess.run(
        [sys.executable, "-m", "optimize", "run", str(onnx_recipe), "--no-register", "--runs-dir", "runs"],
        capture_output=True,
        text=True,
        cwd=onnx_recipe.parent,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    first = out.stderr.splitlines()[0]
    assert first == "plan tiny: 6 of 6 units cached, 0 to make", out.stderr


def test_plan_of_a_recipe_whose_data_is_missing_is_exit_2(write_recipe) -> None:
    with pytest.raises(RecipeError, match="data.eval.path: nope.npz: file not found"):
        plan.make(write_recipe({"data": {"eval": {"path": "nope.npz"}}}))
