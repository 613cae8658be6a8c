"""Atomic file writes and content hashing: a reader never sees a half-written file."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from optimize.lazy import lazy

np = lazy("numpy")  # only the npz helpers need it; `optimize validate` imports this module and no numpy


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success fsync it and rename it over `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; finished files get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (after renames in it), to disk. Where a folder cannot be opened
    for that, the renames are still atomic, only their durability is weaker."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    except OSError:
        if not Path(path).is_dir():
            raise
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(dest: Path, data: bytes) -> None:
    """Write `data` to `dest` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest: Path, text: str) -> None:
    """Write `text` (UTF-8) to `dest` atomically."""
    write_bytes(dest, text.encode("utf-8"))


def append_text(dest: Path, text: str) -> None:
    """Append `text` (UTF-8) to `dest` in one write (O_APPEND: sections from parallel writers do not
    interleave), creating it and its folder if needed. For files others also append to, such as
    $GITHUB_STEP_SUMMARY, where a rename would drop their part."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(dest: Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `dest` atomically."""
    write_text(dest, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_with(dest: Path, writer: Callable[[Path], None]) -> None:
    """Let `writer(tmp_path)` produce the file, then move it to `dest` atomically."""
    with atomic_path(dest) as tmp:
        writer(tmp)


def write_npz(dest: Path, arrays: dict[str, Any]) -> None:
    """Write arrays to an .npz file atomically (any key, even `file`, which np.savez's keywords refuse)."""

    def _write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, value in arrays.items():
                with zf.open(f"{key}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)

    write_with(dest, _write)


def read_npz(path: Path) -> dict[str, Any]:
    """An .npz file's arrays by key, read whole (write_npz's counterpart; no pickled objects)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def display_path(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when below it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(root: Path, file_sha256: Callable[[Path], str] = sha256_file) -> str:
    """Hex sha256 over a folder: every file's relative path and content (`file_sha256` of it), in sorted order."""
    h = hashlib.sha256()
    for p in sorted(q for q in Path(root).rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


@contextmanager
def file_lock(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing) for the block; parallel jobs on one
    host sharing a file take turns. Raises TimeoutError naming `what` after `timeout_s`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{what}: {path} stayed locked for {timeout_s:g} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
