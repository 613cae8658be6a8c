"""Dataset readers: the recipe's named datasets become batches of numpy feeds keyed by ONNX input name."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optimize.errors import RecipeError
from optimize.files import sha256_file
from optimize.recipe import NpzDataset, TextDataset


@dataclass(frozen=True)
class Batches:
    """A dataset ready to feed: batches keyed by input name, optional labels, and its identity."""

    name: str
    batches: list[dict[str, np.ndarray]]
    labels: np.ndarray | None
    sample_count: int
    sha256: str
    description: str

    def record(self) -> dict[str, Any]:
        """What the manifest keeps of this dataset."""
        return {"samples": self.sample_count, "sha256": self.sha256, "description": self.description}


def _select(total: int, samples: int | None, seed: int, where: str, path: Path) -> np.ndarray:
    if samples is None:
        return np.arange(total)
    if samples > total:
        raise RecipeError(f"{where}.samples: asked for {samples}, {path} has {total}; lower `samples` or add data")
    return np.sort(np.random.default_rng(seed).choice(total, size=samples, replace=False))


def _batched(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i : i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]


def read_text_lines(path: Path, where: str) -> list[str]:
    """Non-blank lines of a UTF-8 text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{where}.path: {path}: file not found") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{where}.path: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise RecipeError(f"{where}.path: {path}: no text lines")
    return lines


def load_text(name: str, spec: TextDataset, tokenizer_dir: Path | None, input_names: list[str]) -> Batches:
    """Tokenise text lines with the model's tokenizer into fixed-length (or longest) padded batches."""
    where = f"data.{name}"
    lines = read_text_lines(spec.path, where)
    index = _select(len(lines), spec.samples, spec.seed, where, spec.path)
    chosen = [lines[i] for i in index]
    folder = spec.tokenizer or tokenizer_dir
    if folder is None:
        raise RecipeError(f"{where}.tokenizer: a text dataset needs a tokenizer folder for this model source")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise RecipeError(f"{where}.tokenizer: cannot load a tokenizer from {folder}: {e}") from None
    batches = []
    for i in range(0, len(chosen), spec.batch_size):
        enc = tokenizer(
            chosen[i : i + spec.batch_size],
            padding=spec.padding,
            truncation=True,
            max_length=spec.max_length,
            return_tensors="np",
        )
        missing = [n for n in input_names if n not in enc]
        if missing:
            raise RecipeError(f"{where}: the tokenizer does not produce input(s) {', '.join(missing)}")
        batches.append({n: np.asarray(enc[n], dtype=np.int64) for n in input_names})
    return Batches(
        name,
        batches,
        None,
        len(chosen),
        sha256_file(spec.path),
        f"text {spec.path.name}: {len(chosen)} of {len(lines)} lines, padding={spec.padding}, "
        f"max_length={spec.max_length}, batch_size={spec.batch_size}",
    )


def load_npz(name: str, spec: NpzDataset, input_names: list[str]) -> Batches:
    """Arrays keyed by input name from a .npz file, sampled and cut into batches."""
    where = f"data.{name}"
    if not spec.path.is_file():
        raise RecipeError(f"{where}.path: {spec.path}: file not found")
    try:
        with np.load(spec.path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as e:
        raise RecipeError(f"{where}.path: {spec.path}: not a readable .npz file ({e})") from None
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise RecipeError(
            f"{where}.path: {spec.path.name} has no array {', '.join(map(repr, missing))} "
            f"(it has {', '.join(arrays) or 'none'}); keys must be the model's input names"
        )
    if spec.labels is not None and spec.labels not in arrays:
        raise RecipeError(f"{where}.labels: {spec.path.name} has no array {spec.labels!r}")
    used = [*input_names, *([spec.labels] if spec.labels else [])]
    lengths = {k: arrays[k].shape[0] if arrays[k].ndim else 0 for k in used}
    if len(set(lengths.values())) != 1:
        shown = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise RecipeError(f"{where}.path: {spec.path.name}: arrays differ in sample count ({shown})")
    total = next(iter(lengths.values()))
    if total == 0:
        raise RecipeError(f"{where}.path: {spec.path.name}: the arrays hold no samples")
    index = _select(total, spec.samples, spec.seed, where, spec.path)
    feeds = {n: arrays[n][index] for n in input_names}
    labels = arrays[spec.labels][index] if spec.labels else None
    return Batches(
        name,
        _batched(feeds, spec.batch_size),
        labels,
        len(index),
        sha256_file(spec.path),
        f"npz {spec.path.name}: {len(index)} of {total} samples, batch_size={spec.batch_size}",
    )


def load_dataset(name: str, spec: Any, input_names: list[str], tokenizer_dir: Path | None) -> Batches:
    """Load a named dataset of the recipe for a model with these input names."""
    if isinstance(spec, TextDataset):
        return load_text(name, spec, tokenizer_dir, input_names)
    return load_npz(name, spec, input_names)


def check_against_inputs(ds: Batches, inputs: list[Any]) -> None:
    """Fail with a clear message when a dataset's arrays do not fit the model's inputs (dtype, rank, static dims)."""
    where = f"data.{ds.name}"
    first = ds.batches[0]
    for spec in inputs:
        arr = first[spec.name]
        if arr.dtype != np.dtype(spec.dtype):
            raise RecipeError(
                f"{where}: array {spec.name!r} has dtype {arr.dtype}, the model's input wants {spec.dtype}; "
                "convert the data"
            )
        if arr.ndim != len(spec.shape):
            raise RecipeError(
                f"{where}: array {spec.name!r} has shape {list(arr.shape)} (batch first), the model's input "
                f"has rank {len(spec.shape)} {list(spec.shape)}"
            )
        for axis, (have, want) in enumerate(zip(arr.shape, spec.shape, strict=True)):
            if isinstance(want, int) and want > 0 and have != want:
                hint = ""
                if axis == 0:
                    hint = f"; set {where}.batch_size to {want} or give the model a dynamic batch axis"
                raise RecipeError(
                    f"{where}: array {spec.name!r} has shape {list(arr.shape)}, the model's input wants "
                    f"{list(spec.shape)} (axis {axis}: {have} != {want}){hint}"
                )
