"""Content-addressed cache of stage outputs: a stage whose inputs, config, library versions and device are
unchanged reuses the files it produced before instead of running again. Stdlib only, so that the CLI's
`optimize cache` commands stay fast.

Layout under the cache root ($OPTIMIZE_CACHE_DIR, else ~/.cache/optimize):

    stages/<stage>/<key[:2]>/<key>/        one entry: the stage's files, entry.json, key.json, used
    stages/<stage>/<key[:2]>/<key>.lock    the per-key lock that producers and removers take
    stages/<stage>/.tmp-<key>-<random>/    an entry being produced (stale if its lock is free)
    tensorrt/                              TensorRT timing caches (optimize.engine); never touched here
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from optimize.errors import RecipeError, StageError, no_space
from optimize.files import file_lock, fsync_path, write_json, write_text

# Bump when the key description or the entry layout changes: every older entry becomes a miss.
# 2: the description holds the sha256 of each source file of the unit's code (`code`), the entry its unit.
FORMAT = 2

STAGES_DIR = "stages"
ENTRY_FILE = "entry.json"
KEY_FILE = "key.json"
USED_FILE = "used"  # its mtime is the entry's last use (LRU)
RESERVED_NAMES = frozenset({ENTRY_FILE, KEY_FILE, USED_FILE})
MAX_BYTES_ENV = "OPTIMIZE_CACHE_MAX_BYTES"

_KEY_RE = re.compile(r"[0-9a-f]{64}")
_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_STAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TMP_RE = re.compile(r"\.tmp-([0-9a-f]{64})-")
# What an interrupted removal leaves beside the entries: never read, always safe to delete.
_ASIDE_RE = re.compile(r"[0-9a-f]{64}\.(corrupt|removing)-[0-9a-z_]+")


def cache_root() -> Path:
    """The cache root: $OPTIMIZE_CACHE_DIR, else ~/.cache/optimize (the same root as the TensorRT timing
    caches of optimize.engine.cache_dir)."""
    root = os.environ.get("OPTIMIZE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "optimize"


# --- keys ------------------------------------------------------------------------------------------


def canonical_json(obj: Any) -> str:
    """The one JSON text of `obj` that keys are hashed from: sorted keys, no spaces, str() for the rest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def key_description(
    stage: str,
    *,
    inputs: dict[str, str],
    config: Any,
    versions: dict[str, str],
    device: str | None = None,
    code: dict[str, str] | None = None,
) -> dict[str, Any]:
    """What a stage key is the hash of, as plain JSON (stored as key.json beside the entry).

    `inputs` maps each input's name to the sha256 of its content; `config` is the stage's settings (pass
    plain JSON, e.g. a pydantic model's `model_dump(mode="json")`: other objects count by their str(),
    and a str() that differs between runs only costs misses); `versions` maps library names to version
    strings; `device` is where the output depends on it (a GPU architecture), else None; `code` maps each
    source file of optimize that makes the output to its sha256 (optimize.stage.code_digests)."""
    description = {
        "format": FORMAT,
        "stage": stage,
        "inputs": inputs,
        "config": config,
        "versions": versions,
        "device": device,
        "code": code or {},
    }
    # The round trip makes what is stored equal to what is hashed (tuples become lists, objects strings).
    return json.loads(canonical_json(description))


def key_of(description: dict[str, Any]) -> str:
    """The key of a description from key_description: the hex sha256 of its canonical JSON."""
    return hashlib.sha256(canonical_json(description).encode("utf-8")).hexdigest()


def stage_key(
    stage: str, *, inputs: dict[str, str], config: Any, versions: dict[str, str], device: str | None = None
) -> str:
    """The cache key of one stage run: hex sha256 over the stage name, its inputs' content hashes, its
    config, the versions of the libraries it uses, the device and the cache FORMAT. Any change in any of
    them, however small (a config value, a patch version, an input byte), gives another key: a miss.
    Dict order does not matter."""
    return key_of(key_description(stage, inputs=inputs, config=config, versions=versions, device=device))


def describe(description: Any) -> str:
    """A short text of a key description for `optimize cache ls`: device and library versions."""
    if not isinstance(description, dict):
        return "?"
    parts = [str(description.get("device") or "any device")]
    versions = description.get("versions")
    if isinstance(versions, dict):
        parts += [f"{name}={version}" for name, version in sorted(versions.items())]
    return " ".join(parts)


# --- what the cache hands out -------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedFile:
    """One file of an entry as entry.json records it."""

    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Entry:
    """A verified cache entry: its folder, its files and the record the stage returned."""

    stage: str
    key: str
    dir: Path
    files: dict[str, CachedFile]
    record: Any
    description: dict[str, Any]

    def path(self, name: str) -> Path:
        """The path of one of the entry's files (`name` relative, as the stage wrote it)."""
        if name not in self.files:
            have = ", ".join(sorted(self.files))
            raise KeyError(f"cache entry {self.stage}/{self.key[:12]} has no file {name!r}; it has: {have}")
        return self.dir / name


@dataclass
class Slot:
    """What `StageCache.produce` yields. On a hit, `hit` is the entry and `dir` is None. On a miss, `hit`
    is None: write the stage's files under `dir` and set `record`; when the block ends they become the
    entry, and `entry` is set (after the block, also on a hit)."""

    hit: Entry | None
    dir: Path | None
    record: Any = field(default_factory=dict)
    entry: Entry | None = None


@dataclass(frozen=True)
class EntryInfo:
    """One entry as `entries()` lists it (not verified: listing does not hash the files)."""

    stage: str
    key: str
    path: Path
    size_bytes: int
    created: float  # epoch seconds
    last_used: float  # epoch seconds
    description: str

    def as_json(self) -> dict[str, Any]:
        """The entry as `optimize cache ls --json` prints it."""
        return {
            "stage": self.stage,
            "key": self.key,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "created": _iso(self.created),
            "last_used": _iso(self.last_used),
            "description": self.description,
        }


@dataclass(frozen=True)
class PruneResult:
    """What prune or clear did: entries removed, bytes freed (entries and stale temporary folders),
    entries kept because a process held their lock, stale temporary folders removed."""

    removed: tuple[EntryInfo, ...] = ()
    freed_bytes: int = 0
    skipped_in_use: int = 0
    stale_removed: int = 0


# --- the cache ---------------------------------------------------------------------------------------


class StageCache:
    """Stage entries under `<root>/stages/`. Entries appear whole (built in a temporary folder, renamed
    into place) and are verified (size and sha256 of every file) each time they are looked up.

    Removal (prune, clear, a corrupt entry found by lookup) does not wait for readers that hold no lock:
    use a hit's files inside the `produce` block, which holds the key's lock, or copy them out there."""

    def __init__(self, root: Path, lock_timeout_s: float = 3600, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.stages = self.root / STAGES_DIR
        self.lock_timeout_s = lock_timeout_s
        if max_bytes is None and os.environ.get(MAX_BYTES_ENV):
            max_bytes = parse_size(os.environ[MAX_BYTES_ENV], what=MAX_BYTES_ENV)
        self.max_bytes = max_bytes
        self._digests: dict[str, Any] | None = None  # remembered_sha256's memo, read on first use

    # --- one entry

    def entry_dir(self, stage: str, key: str) -> Path:
        """Where the entry of (stage, key) lives when it exists."""
        _check(stage, key)
        return self.stages / stage / key[:2] / key

    def lock_path(self, stage: str, key: str) -> Path:
        """The per-key lock file that producers and removers of (stage, key) take."""
        return self.entry_dir(stage, key).with_name(f"{key}.lock")

    def lookup(self, stage: str, key: str) -> Entry | None:
        """The entry of (stage, key) if it exists and every file it lists has its recorded size and sha256;
        else None. An entry that fails the check is moved aside and deleted (a miss, never an error).
        A hit marks the entry as used now (for LRU pruning)."""
        path = self.entry_dir(stage, key)
        if not path.is_dir():
            return None
        entry = _verified(path, stage, key)
        if entry is None:
            _remove_dir(path, "corrupt")
            return None
        try:
            (path / USED_FILE).touch()
        except OSError:
            pass  # a read-only cache still serves hits; only LRU order suffers
        return entry

    @contextmanager
    def produce(self, stage: str, key: str, description: dict[str, Any], refresh: bool = False) -> Iterator[Slot]:
        """Hold the key's lock and yield a Slot: the entry if it exists (looked up after taking the lock,
        so a second process producing the same key waits and gets the first one's entry), else a fresh
        temporary folder for the stage's files. A block that ends normally turns the folder into the
        entry (every file fsynced, entry.json written, one rename); one that raises leaves no trace.
        `description` is key_description(...) of `key`; `refresh` removes an existing entry first.
        Raises StageError when the lock stays held for lock_timeout_s or the disk is full; ValueError (a bug
        in the caller) for a description that is not the key's, or a stage that wrote a symlink or one of
        RESERVED_NAMES."""
        _check(stage, key)
        if not isinstance(description, dict) or description.get("stage") != stage or key_of(description) != key:
            raise ValueError(f"cache: the description given for {stage}/{key[:12]} is not the one its key is made of")
        lock = self.lock_path(stage, key)
        with ExitStack() as stack:
            try:
                stack.enter_context(file_lock(lock, self.lock_timeout_s, f"cache entry {stage}/{key[:12]}"))
            except TimeoutError:
                raise StageError(
                    f"{stage}: the cache entry {key[:12]} is being produced by another process: {lock} stayed "
                    f"locked for {self.lock_timeout_s:g} s; let that run finish or stop it"
                ) from None
            if refresh:  # produce anew (`optimize run --rebench`): the old entry goes, under the lock
                _remove_dir(self.entry_dir(stage, key), "refreshed")
            hit = self.lookup(stage, key)
            if hit is not None:
                slot = Slot(hit=hit, dir=None, entry=hit)
                yield slot
                return
            tmp = self._tmp_path(stage, key)
            slot = Slot(hit=None, dir=tmp)
            try:
                # made inside the try: a Ctrl-C that lands just after the folder exists still removes it
                tmp.mkdir(mode=0o777)  # entries get the usual permissions (the umask's)
                yield slot
                slot.entry = self._commit(stage, key, description, slot)
            except BaseException as e:
                shutil.rmtree(tmp, ignore_errors=True)
                full = no_space(e)
                if full is not None and _on_full_device(full, self.root):
                    raise StageError(
                        f"{stage}: no space left on device under {self.root} while producing cache entry "
                        f"{key[:12]}; free space or run `optimize cache prune --max-size SIZE`"
                    ) from e
                raise
            self.enforce_budget()  # still under the lock: the new entry is in use, pruning skips it

    def _tmp_path(self, stage: str, key: str) -> Path:
        """A new temporary folder's name for an entry being produced (the folder is not made here)."""
        stage_dir = self.stages / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        return stage_dir / f".tmp-{key}-{secrets.token_hex(16)}"

    def _commit(self, stage: str, key: str, description: dict[str, Any], slot: Slot) -> Entry:
        """Turn the slot's folder into the entry: fsync, entry.json, rename, fsync the parents."""
        tmp = slot.dir
        assert tmp is not None
        files: dict[str, dict[str, Any]] = {}
        folders = [tmp]
        for p in sorted(tmp.rglob("*")):
            rel = p.relative_to(tmp).as_posix()
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                raise ValueError(f"cache: {stage} wrote {rel!r}, which is not a plain file or folder")
            if p.is_dir():
                folders.append(p)
                continue
            if rel in RESERVED_NAMES:
                raise ValueError(f"cache: {stage} wrote {rel!r}, a name the cache keeps for itself")
            files[rel] = _hash_and_sync(p)
        created = time.time()
        write_json(tmp / KEY_FILE, description)
        write_json(
            tmp / ENTRY_FILE,
            {
                "stage": stage,
                "key": key,
                "created": _iso(created),
                "files": files,
                "record": slot.record,
                "description": description,
            },
        )
        _write_synced(tmp / USED_FILE)
        for folder in reversed(folders):
            fsync_path(folder)
        final = self.entry_dir(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, final)
        except OSError as e:
            # Only under our lock can an entry appear; if one did anyway (its lock file was replaced), a
            # valid one wins and ours goes.
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            existing = self.lookup(stage, key)
            if existing is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return existing
            os.rename(tmp, final)
        fsync_path(final.parent)
        fsync_path(tmp.parent)
        entry = _verified(final, stage, key, check_content=False)
        assert entry is not None
        return entry

    def peek(self, stage: str, key: str) -> dict[str, Any] | None:
        """The entry.json of (stage, key) if the entry is there, read without verifying its files or marking it
        used: what `optimize plan` asks (a run's lookup still verifies, and a corrupt entry is a miss then)."""
        try:
            data = json.loads((self.entry_dir(stage, key) / ENTRY_FILE).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("key") == key else None

    def mark_latest(self, stage: str, label: str, key: str) -> None:
        """Remember `key` as the newest entry made or used for `label` (a recipe's unit): what `latest` reads."""
        write_text(self._latest_path(stage, label), key)

    def latest(self, stage: str, label: str) -> dict[str, Any] | None:
        """The entry.json of the newest entry of a stage for `label` (see `mark_latest`) while it exists: what
        that unit's last run was made of and how long it took."""
        try:
            key = self._latest_path(stage, label).read_text().strip()
        except OSError:
            return None
        return self.peek(stage, key) if _KEY_RE.fullmatch(key) else None

    def _latest_path(self, stage: str, label: str) -> Path:
        _check(stage, "0" * 64)
        return self.stages / stage / ".latest" / hashlib.sha256(label.encode()).hexdigest()

    def remembered_sha256(self, path: Path) -> str:
        """sha256 of a file, remembered by its path, size, mtime and inode in <root>/digests.json (as git's
        index does): for `optimize plan`, which must not read a model's gigabytes each time. A run hashes the
        bytes."""
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        memo_path = self.root / "digests.json"
        if self._digests is None:
            try:
                self._digests = json.loads(memo_path.read_text())
            except (OSError, ValueError):
                self._digests = {}
        known = self._digests.get(str(path))
        if isinstance(known, list) and known[:3] == stamp:
            return str(known[3])
        digest = _sha256(path)
        self._digests[str(path)] = [*stamp, digest]
        try:
            write_json(memo_path, self._digests)
        except OSError:
            pass  # a read-only cache: hashed again next time
        return digest

    # --- every entry

    def entries(self) -> list[EntryInfo]:
        """Every entry (stage, key, folder, size, created, last used, short description), without hashing;
        an entry whose entry.json is unreadable is listed too (lookup will discard it)."""
        found = []
        for stage_dir in _subdirs(self.stages):
            if stage_dir.name.startswith("."):
                continue
            for shard in _shards(stage_dir):
                for path in _subdirs(shard):
                    if _KEY_RE.fullmatch(path.name) and path.name.startswith(shard.name):
                        info = _info(stage_dir.name, path)
                        if info is not None:
                            found.append(info)
        return found

    def prune(self, older_than_s: float | None = None, max_bytes: int | None = None) -> PruneResult:
        """Remove the entries not used within `older_than_s`, then the least recently used ones until the
        entries total at most `max_bytes`. Entries whose lock a process holds are kept. Stale temporary
        folders (of producers that died) and leftovers of interrupted removals go too."""
        now = time.time()
        stale, stale_bytes = self._remove_stale()
        removed: list[EntryInfo] = []
        in_use: set[Path] = set()
        remaining = []
        for info in self.entries():
            if older_than_s is not None and now - info.last_used >= older_than_s:
                if self._remove_entry(info):
                    removed.append(info)
                    continue
                in_use.add(info.path)
            remaining.append(info)
        if max_bytes is not None:
            total = sum(info.size_bytes for info in remaining)
            for info in sorted(remaining, key=lambda i: i.last_used):
                if total <= max_bytes:
                    break
                if self._remove_entry(info):
                    removed.append(info)
                    total -= info.size_bytes
                else:
                    in_use.add(info.path)
        freed = stale_bytes + sum(info.size_bytes for info in removed)
        return PruneResult(tuple(removed), freed, len(in_use), stale)

    def clear(self) -> PruneResult:
        """Remove every entry under stages/ (not the TensorRT timing caches), except those whose lock a
        process holds, and every stale temporary folder."""
        stale, stale_bytes = self._remove_stale()
        removed: list[EntryInfo] = []
        skipped = 0
        for info in self.entries():
            if self._remove_entry(info):
                removed.append(info)
            else:
                skipped += 1
        return PruneResult(tuple(removed), stale_bytes + sum(i.size_bytes for i in removed), skipped, stale)

    def enforce_budget(self) -> PruneResult:
        """Prune least recently used entries down to the size budget (`max_bytes`, else
        $OPTIMIZE_CACHE_MAX_BYTES); nothing without a budget. `produce` calls it after creating an entry."""
        if self.max_bytes is None:
            return PruneResult()
        return self.prune(max_bytes=self.max_bytes)

    def _remove_entry(self, info: EntryInfo) -> bool:
        """Remove one entry under its lock; False when a process holds the lock."""
        try:
            with file_lock(self.lock_path(info.stage, info.key), 0, f"cache entry {info.stage}/{info.key[:12]}"):
                _remove_dir(info.path, "removing")
        except TimeoutError:
            return False
        return True

    def _remove_stale(self) -> tuple[int, int]:
        """Remove temporary folders whose producer is gone (its lock is free) and leftovers of interrupted
        removals; return how many and their bytes."""
        count = size = 0
        for stage_dir in _subdirs(self.stages):
            if stage_dir.name.startswith("."):
                continue
            for path in _subdirs(stage_dir):
                match = _TMP_RE.match(path.name)
                if not match:
                    continue
                key = match.group(1)
                try:
                    with file_lock(self.lock_path(stage_dir.name, key), 0, f"cache entry {stage_dir.name}/{key[:12]}"):
                        size += _tree_bytes(path)
                        shutil.rmtree(path, ignore_errors=True)
                        count += 1
                except TimeoutError:
                    continue  # being produced right now
            for shard in _shards(stage_dir):
                for path in _subdirs(shard):
                    if _ASIDE_RE.fullmatch(path.name):
                        size += _tree_bytes(path)
                        shutil.rmtree(path, ignore_errors=True)
                        count += 1
        return count, size


# --- user input ----------------------------------------------------------------------------------------

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_NUMBER_UNIT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_age(text: str, *, what: str = "age") -> float:
    """Seconds in an age such as 90s, 30m, 12h, 7d or 2w (decimals allowed: 1.5h). RecipeError otherwise."""
    match = _NUMBER_UNIT.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _AGE_UNITS:
        raise RecipeError(f"{what}: {text!r} is not an age; give a number and a unit s, m, h, d or w, e.g. 7d or 12h")
    return float(Decimal(match.group(1)) * _AGE_UNITS[unit])


def parse_size(text: str, *, what: str = "size") -> int:
    """Bytes in a size such as 500MB, 20GB or 1.5G (decimal units: 1 GB = 10^9 bytes; KiB, MiB, GiB and
    TiB are binary; a plain number is bytes). RecipeError otherwise."""
    match = _NUMBER_UNIT.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise RecipeError(
            f"{what}: {text!r} is not a size; give a number and a unit B, KB, MB, GB, TB (or KiB, MiB, GiB, "
            "TiB), e.g. 20GB or 500MB"
        )
    try:
        return int(Decimal(match.group(1)) * _SIZE_UNITS[unit])
    except InvalidOperation:  # pragma: no cover - the pattern only lets numbers through
        raise RecipeError(f"{what}: {text!r} is not a size") from None


def format_size(size_bytes: int) -> str:
    """Bytes as a short decimal size (the units parse_size reads): 512 B, 12.3 MB, 1.50 GB."""
    if size_bytes < 1000:
        return f"{size_bytes} B"
    value = float(size_bytes)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            break
    return f"{value:.1f} {unit}"


# --- helpers ---------------------------------------------------------------------------------------


def _check(stage: str, key: str) -> None:
    """Stage and key become path segments: refuse anything that could leave the cache folder."""
    if not _STAGE_RE.fullmatch(stage):
        raise ValueError(f"cache: stage name {stage!r} is not letters, digits, '_', '.', '-'")
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"cache: key {key!r} is not a lowercase hex sha256")


def _verified(path: Path, stage: str, key: str, check_content: bool = True) -> Entry | None:
    """The entry in `path` if its entry.json is readable and names it, and (with `check_content`) every
    file it lists has its recorded size and sha256; else None."""
    try:
        meta = json.loads((path / ENTRY_FILE).read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("stage") != stage or meta.get("key") != key:
            return None
        files = {}
        for name, rec in meta["files"].items():
            if name in RESERVED_NAMES or Path(name).is_absolute() or ".." in Path(name).parts:
                return None  # entries only list files inside themselves
            target = path / name
            files[name] = CachedFile(str(rec["sha256"]), int(rec["bytes"]))
            if check_content:
                if target.is_symlink() or not target.is_file() or target.stat().st_size != files[name].size_bytes:
                    return None
                if _sha256(target) != files[name].sha256:
                    return None
        return Entry(stage, key, path, files, meta.get("record"), meta.get("description") or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _hash_and_sync(path: Path) -> dict[str, Any]:
    """sha256 and size of a file, read once; the file is fsynced on the way."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
        os.fsync(fh.fileno())
    return {"sha256": h.hexdigest(), "bytes": size}


def _write_synced(path: Path) -> None:
    with open(path, "wb") as fh:
        os.fsync(fh.fileno())


def _remove_dir(path: Path, why: str) -> None:
    """Rename `path` aside first (no reader ever sees half of it), then delete it."""
    aside = path.with_name(f"{path.name}.{why}-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another process removed it first
    shutil.rmtree(aside, ignore_errors=True)


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def _shards(stage_dir: Path) -> list[Path]:
    return [p for p in _subdirs(stage_dir) if _SHARD_RE.fullmatch(p.name)]


def _tree_bytes(path: Path) -> int:
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _info(stage: str, path: Path) -> EntryInfo | None:
    """An entry's listing from its entry.json and file times; None if it vanished meanwhile."""
    try:
        dir_mtime = path.stat().st_mtime
    except OSError:
        return None
    try:
        meta = json.loads((path / ENTRY_FILE).read_text(encoding="utf-8"))
        created = datetime.fromisoformat(meta["created"]).timestamp()
        text = describe(meta.get("description"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        created, text = dir_mtime, "(unreadable entry.json: a miss on lookup)"
    last_used = dir_mtime
    for name in (USED_FILE, ENTRY_FILE):
        try:
            last_used = (path / name).stat().st_mtime
            break
        except OSError:
            continue
    return EntryInfo(stage, path.name, path, _tree_bytes(path), created, last_used, text)


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat(timespec="seconds")


def _on_full_device(e: OSError, root: Path) -> bool:
    """Whether a full-disk error is the cache's: it names a file under `root`, or (no file named) `root`'s
    device has next to nothing free. A full run directory on another device is the pipeline's to report."""
    named = [Path(f) for f in (e.filename, e.filename2) if f]
    if named:
        return any(Path(os.path.abspath(f)).is_relative_to(Path(os.path.abspath(root))) for f in named)
    try:
        return shutil.disk_usage(root).free < 16 << 20
    except OSError:
        return True
