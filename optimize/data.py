"""Dataset readers: the recipe's named datasets become batches of numpy feeds keyed by ONNX input name."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from optimize import models
from optimize.errors import RecipeError, first_line
from optimize.files import sha256_file
from optimize.lazy import lazy
from optimize.preflight import (
    check_channels,
    check_feed_specs,
    check_sample_count,
    hw,
    image_files,
    image_input,
    read_text_lines,
)
from optimize.recipe import EntryPointDataset, ImageFolderDataset, NpzDataset, TextDataset

np = lazy("numpy")

Image = lazy("PIL.Image")  # image folders only

Feeds = list[dict[str, "np.ndarray"]]  # a string: naming the alias imports no numpy


@dataclass(frozen=True)
class Batches:
    """A dataset ready to feed: batches keyed by input name, optional labels, and its identity.

    `sample_hashes` holds one content hash per selected sample, in order; `sha256` is the hash of
    those (so another subset of the same file has another hash); `file_sha256` identifies the
    source the samples were taken from (the file, or for an image folder its file listing; None
    for an entry point).

    `source` is the batches, or what makes them: a text dataset is identified at once and tokenised on
    first use of `batches` (a run whose stages are all cached never tokenises). `check`, when set, is run
    on the batches once they are made (see `checked`).
    """

    name: str
    source: Feeds | Callable[[], Feeds]
    labels: np.ndarray | None
    sample_count: int
    sha256: str
    description: str
    sample_hashes: tuple[str, ...] = ()
    file_sha256: str | None = None
    check: Callable[[str, Feeds], None] | None = None

    @cached_property
    def made(self) -> Feeds:
        """The batches, made on first use, before `check` has run on them."""
        return self.source() if callable(self.source) else self.source

    @cached_property
    def batches(self) -> Feeds:
        if self.check is not None:
            self.check(self.name, self.made)
        return self.made

    def checked(self, check: Callable[[str, Feeds], None]) -> Batches:
        """This dataset with `check(name, batches)` run once its batches are made (its batches kept if made)."""
        return dataclasses.replace(self, source=self.__dict__.get("made", self.source), check=check)

    def record(self) -> dict[str, Any]:
        """What the manifest keeps of this dataset."""
        return {
            "samples": self.sample_count,
            "sha256": self.sha256,
            "file_sha256": self.file_sha256,
            "description": self.description,
        }


# --- identity --------------------------------------------------------------------------------------


def samples_sha256(sample_hashes: tuple[str, ...] | list[str]) -> str:
    """The hash of a selection of samples: sha256 of their hex hashes, one per line, in order."""
    return hashlib.sha256("".join(f"{h}\n" for h in sample_hashes).encode("ascii")).hexdigest()


def text_sample_hash(text: str) -> str:
    """A text sample's hash: sha256 of its UTF-8 bytes after `strip()`."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


def array_sample_hashes(arrays: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """One hash per sample (first axis) over the arrays in sorted name order: name, dtype, shape, bytes."""
    names = sorted(arrays)
    count = len(arrays[names[0]]) if names else 0
    out = []
    for i in range(count):
        h = hashlib.sha256()
        for n in names:
            row = np.ascontiguousarray(arrays[n][i])
            h.update(f"{n}\0{row.dtype.str}\0{','.join(map(str, row.shape))}\0".encode())
            h.update(row.tobytes())
        out.append(h.hexdigest())
    return tuple(out)


def check_disjoint(a: Batches, b: Batches) -> None:
    """Fail when `a` and `b` share a sample (by content hash), e.g. calibration data that is also evaluated on."""
    if a.name == b.name:
        raise RecipeError(
            f"data.{a.name}: the same dataset serves for calibration and evaluation; "
            "calibration and evaluation data must be disjoint: use two datasets with no sample in common"
        )
    in_b = {h: i for i, h in reversed(list(enumerate(b.sample_hashes)))}
    shared = [i for i, h in enumerate(a.sample_hashes) if h in in_b]
    if shared:
        first = shared[0]
        raise RecipeError(
            f"data.{a.name}: {len(shared)} of its {a.sample_count} samples also appear in data.{b.name} "
            f"(e.g. its sample {first} is sample {in_b[a.sample_hashes[first]]} of data.{b.name}); "
            "calibration and evaluation data must be disjoint: remove the shared samples from one of them"
        )


# --- shared helpers --------------------------------------------------------------------------------


def _select(total: int, samples: int | None, seed: int, where: str, source: str | Path) -> Any:
    """The indices of the samples used, in order: all of them (a list: a text dataset's identity is known
    without importing numpy, for `optimize plan`), or `samples` drawn with `seed`."""
    if samples is None:
        return list(range(total))
    check_sample_count(where, samples, total, source)
    return np.sort(np.random.default_rng(seed).choice(total, size=samples, replace=False))


def _batched(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i : i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]


def _check_arrays(
    where: str,
    field: str,
    source: str,
    keys: list[str],
    arrays: Mapping[str, Any],
    input_names: list[str],
    labels: str | None,
) -> dict[str, np.ndarray]:
    """The model's inputs (and labels) from a mapping of arrays with samples first, checked; `keys` lists
    what the mapping holds (for messages)."""
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise RecipeError(
            f"{where}.{field}: {source} has no array {', '.join(map(repr, missing))} "
            f"(it has {', '.join(keys) or 'none'}); keys must be the model's input names"
        )
    if labels is not None and labels not in arrays:
        raise RecipeError(f"{where}.labels: {source} has no array {labels!r}")
    used: dict[str, np.ndarray] = {}
    for k in [*input_names, *([labels] if labels else [])]:
        try:
            used[k] = np.asarray(arrays[k])
        except Exception as e:
            raise RecipeError(f"{where}.{field}: {source}: {k!r} is not an array ({first_line(e)})") from None
        if used[k].dtype == object:
            raise RecipeError(f"{where}.{field}: {source}: {k!r} is not a numeric array (dtype object)")
    lengths = {k: v.shape[0] if v.ndim else 0 for k, v in used.items()}
    if len(set(lengths.values())) != 1:
        shown = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise RecipeError(f"{where}.{field}: {source}: arrays differ in sample count ({shown})")
    if next(iter(lengths.values())) == 0:
        raise RecipeError(f"{where}.{field}: {source}: the arrays hold no samples")
    return used


def _from_arrays(
    name: str,
    arrays: dict[str, np.ndarray],
    input_names: list[str],
    labels_key: str | None,
    spec: Any,
    source: str,
    file_sha256: str | None,
    what: str,
) -> Batches:
    where = f"data.{name}"
    total = len(next(iter(arrays.values())))
    index = _select(total, spec.samples, spec.seed, where, source)
    feeds = {n: arrays[n][index] for n in input_names}
    labels = arrays[labels_key][index] if labels_key else None
    return _array_batches(
        name, feeds, labels, spec, f"{what}: {len(index)} of {total} samples, batch_size={spec.batch_size}", file_sha256
    )


def _array_batches(
    name: str,
    feeds: dict[str, np.ndarray],
    labels: np.ndarray | None,
    spec: Any,
    description: str,
    file_sha256: str | None,
) -> Batches:
    """Selected samples (arrays keyed by input name) cut into batches, with their content hashes."""
    hashes = array_sample_hashes(feeds)
    return Batches(
        name,
        _batched(feeds, spec.batch_size),
        labels,
        len(hashes),
        samples_sha256(hashes),
        description,
        hashes,
        file_sha256,
    )


# --- text ------------------------------------------------------------------------------------------


def load_text(
    name: str, spec: TextDataset, tokenizer_dir: Path | None, input_names: list[str] | Callable[[], list[str]]
) -> Batches:
    """Text lines, identified at once and tokenised with the model's tokenizer into fixed-length (or longest)
    padded batches on first use. `input_names` may be given as a function, called when tokenising."""
    where = f"data.{name}"
    lines = read_text_lines(spec.path, where)
    index = _select(len(lines), spec.samples, spec.seed, where, spec.path)
    chosen = [lines[i] for i in index]
    folder = spec.tokenizer or tokenizer_dir
    if folder is None:
        raise RecipeError(f"{where}.tokenizer: a text dataset needs a tokenizer folder for this model source")

    def tokenise() -> Feeds:
        tokenizer = models.hf_tokenizer(folder, f"{where}.tokenizer")
        names = input_names() if callable(input_names) else input_names
        batches = []
        for i in range(0, len(chosen), spec.batch_size):
            enc = tokenizer(
                chosen[i : i + spec.batch_size],
                padding=spec.padding,
                truncation=True,
                max_length=spec.max_length,
                return_tensors="np",
            )
            missing = [n for n in names if n not in enc]
            if missing:
                raise RecipeError(f"{where}: the tokenizer does not produce input(s) {', '.join(missing)}")
            batches.append({n: np.asarray(enc[n], dtype=np.int64) for n in names})
        return batches

    hashes = tuple(text_sample_hash(line) for line in chosen)
    return Batches(
        name,
        tokenise,
        None,
        len(chosen),
        samples_sha256(hashes),
        f"text {spec.path.name}: {len(chosen)} of {len(lines)} lines, padding={spec.padding}, "
        f"max_length={spec.max_length}, batch_size={spec.batch_size}",
        hashes,
        sha256_file(spec.path),
    )


# --- npz -------------------------------------------------------------------------------------------


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
    source = spec.path.name
    used = _check_arrays(where, "path", source, list(arrays), arrays, input_names, spec.labels)
    return _from_arrays(
        name, used, input_names, spec.labels, spec, str(spec.path), sha256_file(spec.path), f"npz {source}"
    )


# --- entry point -----------------------------------------------------------------------------------


def load_entry_point(name: str, spec: EntryPointDataset, input_names: list[str]) -> Batches:
    """Arrays returned by `package.module:function(**kwargs)` as {input name: array, samples first}."""
    where = f"data.{name}"
    ep = spec.entry_point
    fn = models.import_entry_point(ep, spec.python_path, f"{where}.entry_point")
    try:
        result = fn(**spec.kwargs)
    except Exception as e:
        raise RecipeError(f"{where}.entry_point: {ep} raised {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(result, Mapping):
        raise RecipeError(
            f"{where}.entry_point: {ep} returned {type(result).__name__}; it must return a mapping of "
            "input name to array (samples first)"
        )
    keys = [str(k) for k in result]
    used = _check_arrays(where, "entry_point", ep, keys, result, input_names, spec.labels)
    return _from_arrays(name, used, input_names, spec.labels, spec, ep, None, f"entry point {ep}")


# --- images ----------------------------------------------------------------------------------------


def _listing_sha256(root: Path, files: list[Path]) -> str:
    """sha256 of a `sha256sum` listing of the files, as `cd root && sha256sum <files in sorted order> | sha256sum`."""
    listing = "".join(f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in files)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def _per_channel(where: str, field: str, values: list[float], channels: int, mode: str) -> np.ndarray:
    check_channels(where, field, values, channels, mode)
    return np.asarray(values, dtype=np.float64)


def _preprocess(where: str, spec: ImageFolderDataset, path: Path, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """One image file -> an array in the dataset's layout (CHW or HWC) and dtype."""
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert(spec.mode)
    except Exception as e:
        raise RecipeError(f"{where}.path: {path}: not a readable image ({first_line(e)})") from None
    if spec.resize is not None:
        w, h = im.size
        if len(spec.resize) == 1:  # shorter side to size, the longer one scaled (and truncated) as torchvision does
            s = spec.resize[0]
            size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        else:
            size = (spec.resize[1], spec.resize[0])
        if size != im.size:
            im = im.resize(size, Image.Resampling.BILINEAR)
    arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if spec.crop is not None:
        ch, cw = hw(spec.crop)
        h, w = arr.shape[:2]
        if ch > h or cw > w:
            raise RecipeError(
                f"{where}.crop: {path} is {h}x{w} (height x width) before cropping, smaller than the crop "
                f"{ch}x{cw}; resize to at least the crop size"
            )
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        arr = arr[top : top + ch, left : left + cw]
    x = (arr.astype(np.float64) * spec.scale - mean) / std
    if spec.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x.astype(spec.dtype))


def load_images(name: str, spec: ImageFolderDataset, input_names: list[str]) -> Batches:
    """Image files decoded with Pillow and preprocessed into one input: convert(mode), resize, centre crop,
    × scale, (x − mean) / std, layout, dtype. Labels from class subfolders when `labels_from_folders`."""
    where = f"data.{name}"
    input_name = image_input(where, spec, input_names)
    channels = 1 if spec.mode == "L" else 3
    mean = _per_channel(where, "mean", spec.mean, channels, spec.mode)
    std = _per_channel(where, "std", spec.std, channels, spec.mode)
    files, classes, class_of = image_files(where, spec)
    index = _select(len(files), spec.samples, spec.seed, where, spec.path)
    images = []
    for i in index:
        x = _preprocess(where, spec, files[i], mean, std)
        if images and x.shape != images[0].shape:
            axes = slice(1, 3) if spec.layout == "NCHW" else slice(0, 2)
            (h0, w0), (h, w) = images[0].shape[axes], x.shape[axes]
            raise RecipeError(
                f"{where}.path: {files[i]} is {h}x{w} (height x width) after preprocessing, "
                f"{files[index[0]]} is {h0}x{w0}; set `resize` and/or `crop` so every image ends the same size"
            )
        images.append(x)
    feeds = {input_name: np.stack(images)}
    labels = np.asarray([class_of[i] for i in index], dtype=np.int64) if spec.labels_from_folders else None
    steps = [f"mode={spec.mode}"]
    if spec.resize:
        steps.append(f"resize={spec.resize}")
    if spec.crop:
        steps.append(f"crop={spec.crop}")
    steps += [f"scale={spec.scale:g}", f"mean={spec.mean}", f"std={spec.std}", spec.layout, spec.dtype]
    what = f"{len(classes)} classes, " if spec.labels_from_folders else ""
    return _array_batches(
        name,
        feeds,
        labels,
        spec,
        f"images {spec.path.name}/: {len(index)} of {len(files)} images, {what}{', '.join(steps)}, "
        f"batch_size={spec.batch_size}",
        _listing_sha256(spec.path, files),
    )


# --- dispatch and checks ---------------------------------------------------------------------------


def load_dataset(
    name: str, spec: Any, input_names: list[str] | Callable[[], list[str]], tokenizer_dir: Path | None
) -> Batches:
    """Load a named dataset of the recipe for a model with these input names (a function giving them is
    called only when the samples are read into arrays: a text dataset's are tokenised on first use)."""
    if isinstance(spec, TextDataset):
        return load_text(name, spec, tokenizer_dir, input_names)
    if callable(input_names):
        input_names = input_names()
    if isinstance(spec, ImageFolderDataset):
        return load_images(name, spec, input_names)
    if isinstance(spec, EntryPointDataset):
        return load_entry_point(name, spec, input_names)
    return load_npz(name, spec, input_names)


def check_against_inputs(ds: Batches, inputs: list[Any]) -> None:
    """Fail with a clear message when a dataset's arrays do not fit the model's inputs (dtype, rank, static dims)."""
    check_feeds(ds.name, ds.batches, inputs)


def check_feeds(name: str, batches: Feeds, inputs: list[Any]) -> None:
    """`check_against_inputs` on a dataset's batches (the first batch stands for all)."""
    first = batches[0]
    check_feed_specs(name, {k: (str(v.dtype), v.shape) for k, v in first.items()}, inputs)
