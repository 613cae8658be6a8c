"""ONNX artifacts on disk: `<name>.onnx`, plus one external-data file `<name>.onnx.data` beside it (referenced
by that relative name) when the model is too large for one protobuf. Saving, copying, listing and hashing an
artifact here keeps its files together, and no crash leaves an `.onnx` whose data is missing or stale.

A model whose serialised size exceeds `external_data_threshold()` keeps its tensors of 1 KiB and more in the
`.data` file. The threshold is protobuf's 2 GiB limit minus 128 MiB (room for what a later stage adds: Q/DQ
nodes, Casts, shape information); the environment variable OPTIMIZE_EXTERNAL_DATA_BYTES (a size: `1024`,
`64KiB`, `1.5GB`) lowers it, so that tests exercise the external-data path without a 2 GB model.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from optimize.cache import parse_size
from optimize.errors import RecipeError
from optimize.files import fsync_path, sha256_file
from optimize.lazy import lazy

onnx = lazy("onnx")
protobuf_message = lazy("google.protobuf.message")

EXTERNAL_DATA_ENV = "OPTIMIZE_EXTERNAL_DATA_BYTES"
DEFAULT_EXTERNAL_DATA_BYTES = 2**31 - 2**27  # protobuf refuses messages of 2 GiB and more
# Tensors smaller than this stay in the .onnx even when the rest moves out: shape constants and scales, which
# shape inference and graph tools read without opening the data file.
TENSOR_MIN_BYTES = 1024
DATA_SUFFIX = ".data"
# Stands in for the data file's name when hashing: an artifact's identity does not depend on what it is called.
_HASH_TAG = b"optimize.onnx-external-data.v1\0"
# An external tensor's entry names its file under this key, so a file without these bytes is self-contained.
_LOCATION = b"location"


def external_data_threshold() -> int:
    """Serialised size in bytes above which a saved model keeps its tensors in `<name>.onnx.data`: protobuf's
    2 GiB limit minus a margin, or $OPTIMIZE_EXTERNAL_DATA_BYTES where that is set (it can only lower it)."""
    text = os.environ.get(EXTERNAL_DATA_ENV, "").strip()
    if not text:
        return DEFAULT_EXTERNAL_DATA_BYTES

    value = parse_size(text, what=EXTERNAL_DATA_ENV)
    if value <= 0:
        raise RecipeError(f"{EXTERNAL_DATA_ENV}: {text!r} must be a positive size, e.g. 1024 or 64KiB; or unset it")
    return min(value, DEFAULT_EXTERNAL_DATA_BYTES)


def data_path(path: Path) -> Path:
    """Where the external data of the ONNX at `path` lives when it has any: `<name>.onnx.data` beside it."""
    path = Path(path)
    return path.with_name(path.name + DATA_SUFFIX)


def external_data_names(model: Path | Any) -> list[str]:
    """The external-data files (relative names, as the model writes them) of an ONNX file or ModelProto, in
    order of first use; [] for a self-contained model. Loads no tensor data.

    A location that is absolute or leaves the model's folder is refused (ValueError): copying such a model
    would copy a file it does not own."""
    if isinstance(model, (str, os.PathLike)):
        return list(_file_external_data_names(*_stat_key(Path(model))))
    return list(_proto_external_data_names(model))


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=256)
def _file_external_data_names(path: str, inode: int, size: int, mtime_ns: int) -> tuple[str, ...]:
    """`external_data_names` of a file, parsed once per file version (a run asks about each file many times,
    and parsing a large self-contained model costs a tenth of a second)."""
    return _proto_external_data_names(_proto(Path(path)))


def _proto_external_data_names(proto: Any) -> tuple[str, ...]:
    names: dict[str, None] = {}
    for tensor in _tensors(proto):
        location = _location(tensor)
        if location is None:
            continue
        pure = PurePosixPath(location.replace("\\", "/"))
        if not location or pure.is_absolute() or ".." in pure.parts:
            raise ValueError(f"tensor {tensor.name!r}: external data {location!r} is outside the model's folder")
        names.setdefault(location)
    return tuple(names)


def onnx_files(path: Path, unreadable_ok: bool = False) -> list[Path]:
    """The files of the ONNX artifact at `path`: the .onnx first, then its external-data file(s), read from
    the tensors' `location` fields (they are listed whether or not they exist).

    `unreadable_ok`: a file that does not parse as ONNX (damaged) is listed alone instead of raising, for an
    integrity check whose sha256 comparison then reports it."""
    path = Path(path)
    try:
        names = external_data_names(path)
    except Exception as e:
        if not (unreadable_ok and _undecodable(e)):
            raise
        names = []
    return [path, *(path.parent / name for name in names)]


def uses_external_data(path: Path) -> bool:
    """True when the ONNX at `path` keeps tensors in external-data files."""
    return bool(external_data_names(path))


def onnx_size_bytes(path: Path) -> int:
    """Bytes on disk of the ONNX artifact at `path`, its external data included."""
    return sum(p.stat().st_size for p in onnx_files(path))


def onnx_sha256(path: Path) -> str:
    """Hex sha256 identifying an ONNX artifact's content, its external data included.

    A self-contained model's identity is the sha256 of its file (what older runs, cache keys and registry tags
    hold). With external data, the .onnx holds only the graph and each tensor's offset and length: two models
    of one architecture with other weights have byte-identical .onnx files. So the identity then covers the
    graph, with each data file's name replaced by its position (a copy under another name keeps its
    identity), and every data file's content.

    A file without the bytes `location` (the key every external tensor's entry holds) cannot have external data:
    it is hashed as it is read, without parsing it or importing onnx (a second of `optimize serve`'s start)."""
    path = Path(path)
    digest = _self_contained_sha256(path)
    if digest is not None:
        return digest
    try:
        names = external_data_names(path)
    except Exception as e:
        if not _undecodable(e):
            raise
        return sha256_file(path)  # not an ONNX model (a damaged file): its bytes are all there is
    if not names:
        return sha256_file(path)
    proto = _proto(path)
    _relocate(proto, {name: f"external-data-{i}" for i, name in enumerate(names)})
    h = hashlib.sha256(_HASH_TAG)
    h.update(hashlib.sha256(proto.SerializeToString(deterministic=True)).digest())
    for name in names:
        h.update(bytes.fromhex(sha256_file(path.parent / name)))
    return h.hexdigest()


def _self_contained_sha256(path: Path) -> str | None:
    """The file's sha256 when it lacks the bytes `location` (also across a read boundary), else None."""
    h, tail = hashlib.sha256(), b""
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            if _LOCATION in tail + chunk[: len(_LOCATION)] or _LOCATION in chunk:
                return None
            h.update(chunk)
            tail = chunk[-len(_LOCATION) :]
    return h.hexdigest()


def save_onnx(model: Any, dest: Path) -> None:
    """Save a ModelProto (its tensor data in memory) as the artifact `dest`, atomically: `dest` alone when its
    serialised size is within `external_data_threshold()`, else `dest` plus `<dest>.data`. The model is left as
    it was given."""
    dest = Path(dest)
    with _scratch(dest) as folder:
        tmp = folder / dest.name
        if _write(model, tmp, external=None):
            # onnx.save moved the tensors' bytes to the file; put them back for the caller
            onnx.external_data_helper.load_external_data_for_model(model, str(folder))
            for tensor in _tensors(model):
                if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.DEFAULT:
                    tensor.ClearField("data_location")
        _install(tmp, dest)


@contextmanager
def atomic_onnx_path(dest: Path) -> Iterator[Path]:
    """Yield a path ending in `dest`'s name in a fresh folder beside it, for a tool that writes an ONNX file
    there (with external data of any name, or none); on success the model becomes the artifact `dest` in this
    module's layout (external data or not by the threshold), atomically. On any error `dest` is left as it was.

    Several files cannot be renamed at once, so an earlier artifact at `dest` is replaced in an order that
    never leaves an .onnx with the wrong data: when the new model has a data file, the old .onnx goes first,
    then the new data file and the new .onnx are renamed into place. A crash in between leaves no `dest`,
    which every reader treats as missing (a stray .data without its .onnx is never read)."""
    dest = Path(dest)
    with _scratch(dest) as folder:
        # A name of its own: ONNX's and ONNX Runtime's savers refuse a data file name that exists relative to
        # the *working directory* (onnx.external_data_helper.convert_model_to_external_data).
        tmp = folder / f"{secrets.token_hex(4)}-{dest.name}"
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"{tmp}: the writer of {dest.name} wrote no file")
        _install(_normalised(tmp, dest, by_threshold=True), dest)


def write_onnx_with(dest: Path, writer: Callable[[Path], None]) -> None:
    """Let `writer(tmp_path)` write an ONNX model (a tool's output), then make it the artifact `dest`
    atomically (see `atomic_onnx_path`)."""
    with atomic_onnx_path(dest) as tmp:
        writer(tmp)


def copy_onnx(src: Path, dest: Path, link: bool = False) -> None:
    """Copy the ONNX artifact `src` (with its external data, if any) to `dest`, atomically.

    The layout is kept (a self-contained model stays one file whatever the threshold); an external-data file
    is renamed `<dest>.onnx.data`, and the .onnx is rewritten to point at it only where that name changes, so
    `onnx_sha256` is the same for both. Several data files are merged into one. `link`: hard-link instead of
    copying where the file system allows (artifacts are only ever replaced by rename, never written in place)."""
    src, dest = Path(src), Path(dest)
    with _scratch(dest) as folder:
        tmp = folder / src.name
        for name in external_data_names(src):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(src.parent / name, folder / name, link)
        _link_or_copy(src, tmp, link)
        _install(_normalised(tmp, dest, by_threshold=False), dest)


# --- helpers ---------------------------------------------------------------------------------------


def _undecodable(e: Exception) -> bool:
    return isinstance(e, protobuf_message.DecodeError)


def _proto(model: Path | Any) -> Any:
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(str(model), load_external_data=False)
    return model


def _tensors(model: Any, attributes: bool = True) -> Iterator[Any]:
    """Every TensorProto of a model: initializers, sparse initializers and (`attributes`) attribute tensors,
    subgraphs included."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        if not attributes:
            graphs.extend(a.g for n in graph.node for a in n.attribute if a.HasField("g"))
            graphs.extend(g for n in graph.node for a in n.attribute for g in a.graphs)
            continue
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices
                for sparse in attr.sparse_tensors:
                    yield sparse.values
                    yield sparse.indices
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def _location(tensor: Any) -> str | None:
    if not tensor.HasField("data_location") or tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


def _relocate(model: Any, renames: dict[str, str]) -> None:
    """Point the external tensors at other file names (offsets and lengths unchanged)."""
    for tensor in _tensors(model):
        if _location(tensor) is None:
            continue
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value in renames:
                entry.value = renames[entry.value]


def _write(model: Any, path: Path, external: bool | None) -> bool:
    """Write `model` (tensor data in memory) to `path` in this module's layout; `external` None decides by the
    threshold. Returns True when the tensors went to `<path>.data` (their bytes then live only there)."""
    for tensor in _tensors(model):
        if _location(tensor) is not None and not tensor.HasField("raw_data"):
            raise ValueError(
                f"tensor {tensor.name!r}: its data is still in {_location(tensor)!r}; load the model with its "
                "external data before saving it"
            )
    if external is None:
        try:
            external = model.ByteSize() > external_data_threshold()
        except Exception:  # protobuf cannot even size it: far over 2 GB
            external = True
    if external:
        # Initializers only, as onnx.save_model does: TensorRT's parser and ONNX Runtime read external data
        # of initializers; Constant nodes keep their values.
        for tensor in _tensors(model, attributes=False):
            if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
                continue
            if not tensor.HasField("raw_data") and tensor.ByteSize() >= TENSOR_MIN_BYTES:
                # only raw_data moves out: typed fields (float_data, int32_data, …) become raw_data first
                tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name))
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= TENSOR_MIN_BYTES:
                # (not convert_model_to_external_data: it refuses a name that exists in the working directory)
                onnx.external_data_helper.set_external_data(tensor, data_path(path).name)
    onnx.save(model, str(path))  # writes the data file too, for the tensors marked external
    return bool(external) and data_path(path).is_file()


@contextmanager
def _scratch(dest: Path) -> Iterator[Path]:
    """A fresh hidden folder beside `dest` (same file system: renames out of it are atomic), removed afterwards
    whatever happens."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _normalised(tmp: Path, dest: Path, by_threshold: bool) -> Path:
    """The model at `tmp` (in a scratch folder) in the layout `_install` moves to `dest`: no external data, or
    one data file named `<dest>.data` in tmp's folder.

    `by_threshold`: one file within the threshold, external data over it (what a tool wrote may be either);
    otherwise the layout stays as it is. A single data file under another name is renamed and the small .onnx
    rewritten to point at it; anything else (several data files, the wrong layout) is loaded and saved again."""
    names = external_data_names(tmp)
    target = data_path(dest).name
    if by_threshold:
        size, threshold = onnx_size_bytes(tmp), external_data_threshold()
        keep = (not names and size <= threshold) or (len(names) == 1 and size > threshold)
    else:
        keep = len(names) <= 1
    if keep:
        if names and names[0] != target:
            os.replace(tmp.parent / names[0], tmp.parent / target)
            proto = _proto(tmp)
            _relocate(proto, {names[0]: target})
            tmp.unlink()  # a new file: `tmp` may be a hard link to the source's .onnx
            tmp.write_bytes(proto.SerializeToString())
        return tmp

    out = tmp.parent / "normalised" / dest.name
    out.parent.mkdir()
    _write(onnx.load(str(tmp)), out, external=None if by_threshold else True)
    return out


def _install(tmp: Path, dest: Path) -> None:
    """Rename a finished artifact (`tmp`, with `<dest>.data` beside it if it uses external data) to `dest`; see
    `atomic_onnx_path` for the order."""
    names = external_data_names(tmp)
    if names not in ([], [data_path(dest).name]):  # a bug here, never the user's
        raise ValueError(f"{tmp}: external data {names} is not {data_path(dest).name}")
    new_data = tmp.parent / names[0] if names else None
    umask = os.umask(0)
    os.umask(umask)
    for p in (tmp, new_data):
        if p is not None:
            if p.stat().st_nlink == 1:  # ONNX writes data files 0600; finished files get the usual permissions
                os.chmod(p, 0o666 & ~umask)
            fsync_path(p)
    if new_data is None:
        os.replace(tmp, dest)  # atomic: readers see the old artifact or the new one
        data_path(dest).unlink(missing_ok=True)  # an older artifact's data; the new .onnx does not point at it
    else:
        dest.unlink(missing_ok=True)  # first: no .onnx may point at the data file about to be replaced
        fsync_path(dest.parent)
        os.replace(new_data, data_path(dest))
        os.replace(tmp, dest)
    fsync_path(dest.parent)


def _link_or_copy(src: Path, dest: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dest)
            return
        except OSError:  # another file system, or links not allowed: copy
            pass
    shutil.copyfile(src, dest)
