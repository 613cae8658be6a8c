"""Checks of what a recipe points at, before anything runs: the model and data files, npz keys, dtypes and
shapes against the model's inputs (read from the ONNX file itself where the source is ONNX), tokenizer
folders, and benchmark shapes against an ONNX file's axis names. `optimize validate` and the start of
`optimize run` share it; it imports no torch, ONNX Runtime or onnx and reads no weights, so it stays fast."""

from __future__ import annotations

import ast
import difflib
import mmap
import os
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimize.errors import RecipeError, first_line
from optimize.files import display_path
from optimize.gates import check_outputs
from optimize.models import huggingface_dir
from optimize.recipe import (
    EntryPointModel,
    HuggingFaceModel,
    ImageFolderDataset,
    Int8Variant,
    NpzDataset,
    OnnxModel,
    Recipe,
    TextDataset,
    TorchvisionModel,
    _unknown,
)

# What `transformers.AutoTokenizer.from_pretrained(folder)` needs to load the tokenizer a model was trained
# with (tried with transformers 5.24): tokenizer.json (a fast tokenizer, complete on its own), or a slow
# tokenizer's vocabulary with tokenizer_config.json or the model's config.json naming its class. A vocabulary
# alone does not load, and a folder with only the config files loads a 5-token tokenizer without a word: so
# both are refused here.
TOKENIZER_SLOW_VOCABULARIES = (("vocab.txt",), ("vocab.json", "merges.txt"), ("spiece.model",), ("tokenizer.model",))
TOKENIZER_CLASS_FILES = ("tokenizer_config.json", "config.json")
TOKENIZER_FOLDER = (
    "a tokenizer folder holds tokenizer.json, or a vocabulary (vocab.txt; vocab.json + merges.txt; a "
    "sentencepiece .model) with tokenizer_config.json or config.json; `tokenizer.save_pretrained(folder)` writes one"
)


@dataclass(frozen=True)
class ModelInput:
    """One input of the model as known before anything is built: its name, and its dtype and shape (ints for
    static sizes, names for dynamic axes) where the recipe or the ONNX file tells them, else None."""

    name: str
    dtype: str | None = None
    shape: tuple[int | str, ...] | None = None


def check(recipe: Recipe, recipe_path: Path) -> None:
    """Check every file the recipe's run reads; raise RecipeError `recipe file: field: problem; fix`."""
    try:
        _check(recipe)
    except RecipeError as e:
        raise RecipeError(f"{display_path(Path(recipe_path).resolve())}: {e}") from None


def variant_datasets(variant: Any) -> list[str]:
    """The datasets one variant is built or tuned on (calibration, fallback, AutoCast reference data), sorted."""
    if isinstance(variant, Int8Variant):
        return sorted({n for n in (variant.calibration, variant.fallback.dataset) if n})
    return [variant.reference_data] if variant.reference_data else []


def side_datasets(recipe: Recipe) -> set[str]:
    """Datasets some variant is built or tuned on (`variant_datasets` of every variant)."""
    return {n for v in recipe.precision.variants for n in variant_datasets(v)}


def _check(recipe: Recipe) -> None:
    inputs, known_as = _model_io(recipe)
    tokenizer_dir = _model_tokenizer_dir(recipe)
    for name in sorted({recipe.evaluate.dataset, *side_datasets(recipe)}):
        spec = recipe.data[name]
        if isinstance(spec, TextDataset):
            _check_text(name, spec, tokenizer_dir, inputs, recipe.model)
        elif isinstance(spec, NpzDataset):
            _check_npz(name, spec, inputs, known_as)
        elif isinstance(spec, ImageFolderDataset):
            _check_images(name, spec, inputs)
        # an entry point's arrays exist only once its function runs: checked when the run loads it
    if isinstance(recipe.model, OnnxModel) and inputs is not None:
        _check_onnx_axes(recipe, inputs)
        # the file names its outputs and their shapes: a gate naming another, or cosine on a [batch] score, is
        # refused here already (the run checks again after copying it, and a torch source after its export)
        outputs = onnx_outputs(recipe.model.path, "model.path")
        check_outputs(recipe.gates, recipe.evaluate, {o.name: o.shape for o in outputs})


# --- the model -------------------------------------------------------------------------------------


def _model_io(recipe: Recipe) -> tuple[list[ModelInput] | None, str]:
    """The model's inputs as far as they are known without torch (None: only the built module tells them),
    and where their names come from (for messages)."""
    model, export = recipe.model, recipe.export
    if isinstance(model, OnnxModel):
        if not model.path.is_file():
            what = "a folder, not a file" if model.path.is_dir() else "file not found"
            raise RecipeError(f"model.path: {display_path(model.path)}: {what}")
        return onnx_inputs(model.path, "model.path"), "the ONNX file's inputs"
    if isinstance(model, TorchvisionModel) and model.weights is not None and not model.weights.is_file():
        raise RecipeError(f"model.weights: {display_path(model.weights)}: file not found")
    names = export.input_names
    if isinstance(model, TorchvisionModel):
        names = names or ["image"]
    if names is None:
        return None, ""
    known_as = "export.input_names" if export.input_names else "the model's inputs"

    def axes(name: str, rank: int) -> tuple[int | str, ...]:
        dynamic = export.dynamic_axes.get(name, {})
        return tuple(dynamic.get(i, "?") for i in range(rank))  # static sizes come from the example inputs

    if isinstance(model, HuggingFaceModel):  # token ids and masks, int64 [batch, sequence] (models.build_inputs)
        return [ModelInput(n, "int64", axes(n, 2)) for n in names], known_as
    if isinstance(model, TorchvisionModel):  # a float32 image batch [batch, *input_shape]
        rank = 1 + len(model.input_shape)
        return [ModelInput(n, "float32", axes(n, rank)) for n in names], known_as
    assert isinstance(model, EntryPointModel)
    return [ModelInput(n) for n in names], known_as  # dtypes: the example tensors (example_inputs)


def example_inputs(loaded: Any, export: Any) -> list[ModelInput]:
    """A torch model's inputs as its export will have them: names, dtypes and ranks of the example tensors
    (the dynamic axes named as `export.dynamic_axes` says; static sizes are left to the check after the
    export). For checking the data before the export, where a wrong dtype would otherwise surface after it."""
    out = []
    for name in loaded.input_names(export):
        tensor = loaded.example_inputs[name]
        dynamic = export.dynamic_axes.get(name, {})
        shape = tuple(dynamic.get(i, "?") for i in range(tensor.dim()))
        out.append(ModelInput(name, str(tensor.dtype).removeprefix("torch."), shape))
    return out


def _model_tokenizer_dir(recipe: Recipe) -> Path | None:
    """The tokenizer folder that comes with the model (a Hugging Face model's own folder), checked to exist."""
    if not isinstance(recipe.model, HuggingFaceModel):
        return None
    return huggingface_dir(recipe.model)


# --- ONNX graph inputs, read from the protobuf wire format --------------------------------------------
# onnx.load would parse every initializer (and import onnx); the inputs are a few bytes of a file that may
# hold gigabytes of weights, so the file is mapped and everything but the graph's inputs and initializer
# names is skipped over. Field numbers from onnx/onnx.proto.

_ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    8: "str",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    14: "complex64",
    15: "complex128",
    16: "bfloat16",
}


class _WireError(ValueError):
    pass


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _WireError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: Any, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end) of each field of the message in buf[pos:end]."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
        elif wire == 1:
            pos += 8
            yield number, wire, 0, pos
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise _WireError("a field runs past the end of its message")
            yield number, wire, pos, pos + size
            pos += size
        elif wire == 5:
            pos += 4
            yield number, wire, 0, pos
        else:
            raise _WireError(f"wire type {wire}")
    if pos != end:
        raise _WireError("a field runs past the end of its message")


def _sub(buf: Any, start: int, end: int, number: int) -> list[tuple[int, int]]:
    """The (start, end) of each length-delimited field `number` of the message in buf[start:end]."""
    return [(s, e) for n, w, s, e in _fields(buf, start, end) if n == number and w == 2]


def _text(buf: Any, span: tuple[int, int]) -> str:
    return bytes(buf[span[0] : span[1]]).decode("utf-8", errors="replace")


def _value_info(buf: Any, start: int, end: int) -> ModelInput:
    name = "".join(_text(buf, s) for s in _sub(buf, start, end, 1))  # ValueInfoProto.name
    dtype: str | None = None
    shape: tuple[int | str, ...] | None = None
    for t in _sub(buf, start, end, 2):  # .type: TypeProto
        for tensor in _sub(buf, *t, 1):  # .tensor_type
            for n, w, v, _ in _fields(buf, *tensor):
                if n == 1 and w == 0:  # elem_type
                    dtype = _ONNX_DTYPES.get(v, f"onnx type {v}")
            for s in _sub(buf, *tensor, 2):  # .shape: TensorShapeProto
                dims: list[int | str] = []
                for d in _sub(buf, *s, 1):  # .dim
                    size: int | str = "?"
                    for n, w, v, e in _fields(buf, *d):
                        if n == 1 and w == 0:  # dim_value
                            size = v
                        elif n == 2 and w == 2:  # dim_param
                            size = _text(buf, (v, e)) or "?"
                    dims.append(size)
                shape = tuple(dims)
    return ModelInput(name, dtype, shape)


def onnx_inputs(path: Path, where: str) -> list[ModelInput]:
    """An ONNX file's graph inputs (without initializers, as ONNX Runtime lists them), read without loading
    its weights or external data."""
    return _onnx_io(path, where)[0]


def onnx_outputs(path: Path, where: str) -> list[ModelInput]:
    """An ONNX file's graph outputs (name, dtype, shape), read as onnx_inputs reads its inputs."""
    return _onnx_io(path, where)[1]


def _onnx_io(path: Path, where: str) -> tuple[list[ModelInput], list[ModelInput]]:
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            graphs = _sub(buf, 0, len(buf), 7)  # ModelProto.graph
            if not graphs:
                raise _WireError("no graph")
            g = graphs[-1]
            initializers = set()
            for t in _sub(buf, *g, 5):  # GraphProto.initializer: TensorProto, name = 8
                initializers.update(_text(buf, s) for s in _sub(buf, *t, 8))
            for sp in _sub(buf, *g, 15):  # .sparse_initializer: SparseTensorProto.values (1) is named
                for t in _sub(buf, *sp, 1):
                    initializers.update(_text(buf, s) for s in _sub(buf, *t, 8))
            inputs = [_value_info(buf, *v) for v in _sub(buf, *g, 11)]
            outputs = [_value_info(buf, *v) for v in _sub(buf, *g, 12)]  # GraphProto.output
    except (_WireError, ValueError, IndexError) as e:  # mmap of an empty file is a ValueError too
        raise RecipeError(f"{where}: {display_path(path)} is not an ONNX model ({first_line(e)})") from None
    except OSError as e:
        raise RecipeError(f"{where}: {display_path(path)}: cannot read ({e.strerror})") from None
    return [i for i in inputs if i.name not in initializers], outputs


def _check_onnx_axes(recipe: Recipe, inputs: list[ModelInput]) -> None:
    """Benchmark shapes (and an engine profile) bind the ONNX file's own dynamic axis names."""
    named = sorted({d for i in inputs for d in i.shape or () if isinstance(d, str) and d != "?"})
    where = display_path(recipe.model.path)  # type: ignore[union-attr]
    for i, shape in enumerate(recipe.benchmark.shapes):
        for axis in shape:
            if axis not in named:
                raise RecipeError(
                    f"benchmark.shapes[{i}].{axis}: {_unknown(axis, named, 'axis name')} (the dynamic axes of {where})"
                )
        for spec in inputs:
            for k, d in enumerate(spec.shape or ()):
                if isinstance(d, str) and d not in shape:
                    hint = (
                        f"add {d!r} to the shape"
                        if d != "?"
                        else f"the axis has no name in {where}; give it one (a dim_param) to benchmark it"
                    )
                    raise RecipeError(
                        f"benchmark.shapes[{i}]: no size for axis {k} ({d!r}) of input {spec.name!r}; {hint}"
                    )
    profile = recipe.engine.profile
    if profile is not None:
        for axis in profile.min:
            if axis not in named:
                raise RecipeError(
                    f"engine.profile.min.{axis}: {_unknown(axis, named, 'axis name')} (the dynamic axes of {where})"
                )


# --- data ------------------------------------------------------------------------------------------


def _data_file(where: str, path: Path, kind: str) -> int:
    """A dataset's file exists, is a file and is not empty; returns its size in bytes."""
    if not path.exists():
        raise RecipeError(f"{where}.path: {display_path(path)}: file not found")
    if not path.is_file():
        raise RecipeError(f"{where}.path: {display_path(path)} is a folder; kind: {kind} reads one file")
    size = path.stat().st_size
    if size == 0:
        raise RecipeError(f"{where}.path: {display_path(path)} is empty")
    return size


def _looks_like_npz(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _first_batch(spec: Any, total: int) -> int:
    return min(spec.batch_size, spec.samples or total)


def _check_count(where: str, spec: Any, total: int, source: Path) -> None:
    check_sample_count(where, spec.samples, total, display_path(source))


def _check_text(
    name: str, spec: TextDataset, tokenizer_dir: Path | None, inputs: list[ModelInput] | None, model: Any
) -> None:
    where = f"data.{name}"
    _data_file(where, spec.path, "text")
    if _looks_like_npz(spec.path):
        raise RecipeError(
            f"{where}.path: {display_path(spec.path)} is a zip archive (an .npz?), not UTF-8 text; "
            "kind: text reads one sample per line (kind: npz reads numpy arrays)"
        )
    lines = read_text_lines(spec.path, where)
    _check_count(where, spec, len(lines), spec.path)
    folder = spec.tokenizer or tokenizer_dir
    if folder is None:
        source = f"model.source {model.source}"
        raise RecipeError(
            f"{where}.tokenizer: a text dataset needs a tokenizer folder, and a {source} brings none; "
            f"set `tokenizer:` to one ({TOKENIZER_FOLDER})"
        )
    model_field = "model.path" if getattr(model, "path", None) else "model.package"
    check_tokenizer_folder(folder, f"{where}.tokenizer" if spec.tokenizer else model_field)
    if inputs is None:
        return
    rows = _first_batch(spec, len(lines))
    width: int | str = spec.max_length if spec.padding == "max_length" else "?"
    for i in inputs:
        if i.dtype is not None and i.dtype != "int64":
            raise RecipeError(
                f"{where}: a text dataset gives int64 token ids, the model's input {i.name!r} wants {i.dtype}; "
                "feed it another kind of dataset (npz, images, entry_point)"
            )
    check_feed_specs(name, {i.name: ("int64", (rows, width)) for i in inputs}, inputs)


def check_tokenizer_folder(folder: Path, where: str) -> None:
    """`folder` holds what a Hugging Face tokenizer loads from (see TOKENIZER_FOLDER)."""
    shown = display_path(folder)
    if not folder.exists():
        raise RecipeError(f"{where}: {shown}: folder not found; {TOKENIZER_FOLDER}")
    if not folder.is_dir():
        raise RecipeError(f"{where}: {shown} is a file, not a folder; {TOKENIZER_FOLDER}")
    has = {p.name for p in folder.iterdir()}
    slow = any(all(f in has for f in vocab) for vocab in TOKENIZER_SLOW_VOCABULARIES) or any(
        f.endswith(".model") for f in has
    )
    if "tokenizer.json" not in has and not (slow and any(f in has for f in TOKENIZER_CLASS_FILES)):
        listed = (", ".join(sorted(has)[:8]) + (", ..." if len(has) > 8 else "")) if has else "nothing"
        raise RecipeError(f"{where}: {shown} is not a tokenizer folder (it holds {listed}); {TOKENIZER_FOLDER}")


_NPY_KINDS = {"f": "float", "i": "int", "u": "uint", "c": "complex"}


def _npy_dtype(descr: Any) -> str:
    """numpy's name for an .npy header's `descr` (`<f4` -> float32), as str(numpy.dtype(descr)) gives it for
    the types a model takes; other types keep their descr (`<U5`, `|O`, a structured list)."""
    if not isinstance(descr, str) or len(descr) < 3 or descr[0] not in "<|=":
        return str(descr)
    kind, size = descr[1], descr[2:]
    if kind == "b" and size == "1":
        return "bool"
    if kind in _NPY_KINDS and size.isdigit():
        return f"{_NPY_KINDS[kind]}{int(size) * 8}"
    return descr


def _npy_header(f: Any) -> dict[str, Any]:
    """The header of an .npy stream (format 1.0, 2.0 or 3.0): {descr, fortran_order, shape}."""
    magic = f.read(8)
    if len(magic) != 8 or magic[:6] != b"\x93NUMPY" or magic[6] not in (1, 2, 3):
        raise ValueError("not an .npy array")
    size_bytes = 2 if magic[6] == 1 else 4
    size = int.from_bytes(f.read(size_bytes), "little")
    text = f.read(size).decode("utf-8" if magic[6] == 3 else "latin1")
    header = ast.literal_eval(text)
    if not isinstance(header, dict) or not isinstance(header.get("shape"), tuple) or "descr" not in header:
        raise ValueError("a malformed .npy header")
    return header


def _npz_headers(where: str, path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """dtype name and shape of each array of an .npz file, from the array headers (the data is not read)."""
    shown = display_path(path)
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if member.endswith(".npy"):
                    with zf.open(member) as f:
                        header = _npy_header(f)
                    out[member.removesuffix(".npy")] = (_npy_dtype(header["descr"]), header["shape"])
    except zipfile.BadZipFile:
        raise RecipeError(
            f"{where}.path: {shown} is not an .npz file (not a zip archive); kind: npz reads numpy.savez output"
        ) from None
    except Exception as e:
        raise RecipeError(f"{where}.path: {shown}: not a readable .npz file ({first_line(e)})") from None
    if not out:
        raise RecipeError(f"{where}.path: {shown} holds no arrays")
    return out


def _check_npz(name: str, spec: NpzDataset, inputs: list[ModelInput] | None, known_as: str) -> None:
    where = f"data.{name}"
    _data_file(where, spec.path, "npz")
    shown = display_path(spec.path)
    arrays = _npz_headers(where, spec.path)
    for key, (dtype, _) in arrays.items():
        if "O" in dtype:  # numpy reads no pickled objects here (allow_pickle=False), nor in the run
            raise RecipeError(
                f"{where}.path: {shown}: array {key!r} holds Python objects (dtype {dtype}), which are not read "
                "(no pickle); save numeric arrays"
            )
    if inputs is not None:
        names = [i.name for i in inputs]
        missing = [n for n in names if n not in arrays]
        if missing:
            raise RecipeError(
                f"{where}.path: {shown} has no array {', '.join(map(repr, missing))} "
                f"({known_as}: {', '.join(names)}; it has {', '.join(arrays)}); keys must be the model's input names"
            )
    if spec.labels is not None and spec.labels not in arrays:
        raise RecipeError(f"{where}.labels: {shown} has no array {spec.labels!r} (it has {', '.join(arrays)})")
    used = [*(i.name for i in inputs or ()), *([spec.labels] if spec.labels else [])]
    lengths = {k: arrays[k][1][0] if arrays[k][1] else 0 for k in used}
    if len(set(lengths.values())) > 1:
        counts = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise RecipeError(f"{where}.path: {shown}: arrays differ in sample count ({counts})")
    total = next(iter(lengths.values()), None)
    if total == 0:
        raise RecipeError(f"{where}.path: {shown}: the arrays hold no samples")
    if inputs is None or total is None:
        return
    _check_count(where, spec, total, spec.path)
    rows = _first_batch(spec, total)
    feeds = {k: (dtype, (rows, *shape[1:])) for k, (dtype, shape) in arrays.items()}
    check_feed_specs(name, feeds, inputs, shown)


def _check_images(name: str, spec: ImageFolderDataset, inputs: list[ModelInput] | None) -> None:
    where = f"data.{name}"
    names = [i.name for i in inputs] if inputs is not None else None
    input_name = image_input(where, spec, names) if names is not None else spec.input
    channels = 1 if spec.mode == "L" else 3
    for field in ("mean", "std"):
        check_channels(where, field, getattr(spec, field), channels, spec.mode)
    files, _, _ = image_files(where, spec)
    _check_count(where, spec, len(files), spec.path)
    if inputs is None or input_name is None:
        return
    size = spec.crop or (spec.resize if spec.resize and len(spec.resize) == 2 else None)
    h, w = hw(size) if size else ("?", "?")
    rows = _first_batch(spec, len(files))
    shape = (rows, channels, h, w) if spec.layout == "NCHW" else (rows, h, w, channels)
    check_feed_specs(name, {input_name: (spec.dtype, shape)}, inputs)


# --- checks the dataset readers (data.py) share ----------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


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


def check_sample_count(where: str, samples: int | None, total: int, source: str | Path) -> None:
    """Asking for more samples than the data holds is an error."""
    if samples is not None and samples > total:
        raise RecipeError(f"{where}.samples: asked for {samples}, {source} has {total}; lower `samples` or add data")


def check_channels(where: str, field: str, values: list[float], channels: int, mode: str) -> None:
    """Per-channel values (mean, std): one for all channels, or one per channel."""
    if len(values) not in (1, channels):
        raise RecipeError(
            f"{where}.{field}: has {len(values)} values, the images have {channels} channel(s) (mode {mode}); "
            f"give one value or {channels}"
        )


def image_input(where: str, spec: ImageFolderDataset, input_names: list[str]) -> str:
    """The input an images dataset feeds: `input`, or the model's only input."""
    if spec.input is None:
        if len(input_names) != 1:
            raise RecipeError(
                f"{where}.input: the model has {len(input_names)} inputs ({', '.join(input_names)}); "
                "set `input` to the one the images feed"
            )
        return input_names[0]
    if spec.input not in input_names:
        near = difflib.get_close_matches(spec.input, input_names, n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"its inputs: {', '.join(input_names) or '(none)'}"
        raise RecipeError(f"{where}.input: the model has no input {spec.input!r}; {hint}")
    return spec.input


def image_files(where: str, spec: ImageFolderDataset) -> tuple[list[Path], list[str], list[int]]:
    """Image files under the folder sorted by relative path, class names and each file's class index.
    Hidden files and folders (names starting with '.') are skipped."""
    root = spec.path
    if not root.exists():
        raise RecipeError(f"{where}.path: {root}: folder not found")
    if not root.is_dir():
        raise RecipeError(f"{where}.path: {root}: not a folder; an `images` dataset reads a folder of image files")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                p = Path(dirpath, f)
                found.append((p.relative_to(root).as_posix(), p))
    found.sort()
    files = [p for _, p in found]
    if not spec.labels_from_folders:
        if not files:
            raise RecipeError(f"{where}.path: {root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return files, [], []
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = [rel for rel, _ in found if "/" not in rel]
    if loose:
        raise RecipeError(
            f"{where}.path: {root / loose[0]} lies directly in the folder; with `labels_from_folders` "
            "every image must be in a class subfolder (or turn `labels_from_folders` off)"
        )
    if not classes:
        raise RecipeError(f"{where}.path: {root}: no class subfolders (`labels_from_folders` is on)")
    label_of = {c: k for k, c in enumerate(classes)}
    class_of = [label_of[rel.split("/", 1)[0]] for rel, _ in found]
    empty = sorted(set(range(len(classes))) - set(class_of))
    if empty:
        raise RecipeError(
            f"{where}.path: class folder {classes[empty[0]]!r} holds no image files "
            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
        )
    return files, classes, class_of


def hw(size: list[int]) -> tuple[int, int]:
    """[size] or [height, width] as (height, width)."""
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


def check_feed_specs(
    name: str, feeds: Mapping[str, tuple[str, tuple[Any, ...]]], inputs: list[Any], source: str = ""
) -> None:
    """Dataset `name`'s feeds as {input: (numpy dtype name, shape of its first batch)} against the model's
    inputs (each with `name`, `dtype` and `shape`; a dtype or shape of None, a size that is not a positive int,
    or a feed size that is not an int is unknown and not checked). `source`: the file the messages name."""
    where = f"data.{name}" + (f".path: {source}" if source else "")
    for spec in inputs:
        if spec.name not in feeds:
            raise RecipeError(
                f"{where}: gives no array for the model's input {spec.name!r} (it gives {', '.join(feeds)}); "
                "every model input needs data"
            )
        dtype, shape = feeds[spec.name]
        if spec.dtype is not None and dtype != spec.dtype:
            raise RecipeError(
                f"{where}: array {spec.name!r} has dtype {dtype}, the model's input wants {spec.dtype}; "
                "convert the data"
            )
        if spec.shape is None:
            continue
        shown = "[" + ", ".join(str(d) for d in shape) + "]"
        if len(shape) != len(spec.shape):
            raise RecipeError(
                f"{where}: array {spec.name!r} has shape {shown} (batch first), the model's input "
                f"has rank {len(spec.shape)} {list(spec.shape)}"
            )
        for axis, (have, want) in enumerate(zip(shape, spec.shape, strict=True)):
            if isinstance(want, int) and want > 0 and isinstance(have, int) and have != want:
                hint = ""
                if axis == 0:
                    hint = f"; set data.{name}.batch_size to {want} or give the model a dynamic batch axis"
                raise RecipeError(
                    f"{where}: array {spec.name!r} has shape {shown}, the model's input wants "
                    f"{list(spec.shape)} (axis {axis}: {have} != {want}){hint}"
                )
