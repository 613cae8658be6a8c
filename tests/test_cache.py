"""The stage cache on a real filesystem: keys, verified lookups, atomic produce under a per-key lock, killed
and concurrent producers, pruning, the size budget, and `optimize cache ls|prune|clear`."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from test_cli import HEAVY, _imports_of, cli, one_error_line

from optimize.cache import (
    ENTRY_FILE,
    FORMAT,
    KEY_FILE,
    USED_FILE,
    StageCache,
    cache_root,
    key_description,
    key_of,
    parse_age,
    parse_size,
    stage_key,
)
from optimize.errors import RecipeError, StageError

MODEL_SHA = "ab" * 32
BASE: dict[str, Any] = {
    "inputs": {"model": MODEL_SHA, "calibration": "cd" * 32},
    "config": {"opset": 17, "dynamic": {"batch": True, "seq": False}},
    "versions": {"torch": "2.5.1", "onnx": "1.17.0"},
    "device": None,
}


def _desc(stage: str = "export", **changes: Any) -> dict[str, Any]:
    return key_description(stage, **{**BASE, **changes})


def _produce(
    cache: StageCache, files: dict[str, bytes], stage: str = "export", record: Any = None, **changes: Any
) -> str:
    """Produce an entry holding `files`; return its key."""
    desc = _desc(stage, **changes)
    key = key_of(desc)
    with cache.produce(stage, key, desc) as slot:
        assert slot.hit is None and slot.dir is not None
        for name, data in files.items():
            (slot.dir / name).parent.mkdir(parents=True, exist_ok=True)
            (slot.dir / name).write_bytes(data)
        slot.record = record if record is not None else {"max_abs_error": 1e-6}
    return key


def _leftovers(cache: StageCache) -> list[str]:
    """Everything under stages/ except lock files and shard folders: entries and temporary folders."""
    return sorted(
        p.relative_to(cache.stages).as_posix()
        for p in cache.stages.rglob("*")
        if p.is_dir() and len(p.relative_to(cache.stages).parts) in (2, 3) and len(p.name) > 2
    )


def _set_last_used(cache: StageCache, stage: str, key: str, epoch_s: float) -> None:
    os.utime(cache.entry_dir(stage, key) / USED_FILE, (epoch_s, epoch_s))


@pytest.fixture
def cache(tmp_path: Path) -> StageCache:
    return StageCache(tmp_path / "cache", lock_timeout_s=30)


# --- keys ----------------------------------------------------------------------------------------


def test_key_is_stable_across_dict_order() -> None:
    a = stage_key(
        "export",
        inputs={"model": MODEL_SHA, "calibration": "cd" * 32},
        config={"opset": 17, "dynamic": {"batch": True, "seq": False}},
        versions={"torch": "2.5.1", "onnx": "1.17.0"},
    )
    b = stage_key(
        "export",
        versions={"onnx": "1.17.0", "torch": "2.5.1"},
        config={"dynamic": {"seq": False, "batch": True}, "opset": 17},
        inputs={"calibration": "cd" * 32, "model": MODEL_SHA},
    )
    assert a == b == key_of(_desc())
    # the hex sha256 of the description's canonical JSON, computed here without optimize.cache
    canonical = json.dumps(_desc(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert re.fullmatch(r"[0-9a-f]{64}", a) and a == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    other_input = {"model": "ac" * 32, "calibration": "cd" * 32}
    assert stage_key("export", inputs=other_input, config=BASE["config"], versions=BASE["versions"]) != a


@pytest.mark.parametrize(
    ("stage", "changes"),
    [
        ("precision", {}),
        ("export", {"inputs": {"model": "ac" * 32, "calibration": "cd" * 32}}),
        ("export", {"inputs": {"model": MODEL_SHA}}),
        ("export", {"config": {"opset": 18, "dynamic": {"batch": True, "seq": False}}}),
        ("export", {"config": {"opset": 17, "dynamic": {"batch": True, "seq": True}}}),
        ("export", {"config": {"opset": 17.0, "dynamic": {"batch": True, "seq": False}}}),
        ("export", {"versions": {"torch": "2.5.2", "onnx": "1.17.0"}}),
        ("export", {"versions": {"torch": "2.5.1", "onnx": "1.17.0", "onnxscript": "0.2"}}),
        ("export", {"device": "sm90"}),
    ],
    ids=[
        "stage",
        "input-hash",
        "input-removed",
        "config-value",
        "nested-config-value",
        "config-int-vs-float",
        "library-version",
        "library-added",
        "device",
    ],
)
def test_key_changes_with_every_part(stage: str, changes: dict[str, Any]) -> None:
    assert key_of(_desc(stage, **changes)) != key_of(_desc())


def test_key_description_is_exactly_what_is_hashed() -> None:
    desc = key_description("export", inputs={"m": MODEL_SHA}, config=(1, Path("/x")), versions={}, device="sm90")
    assert desc == {
        "format": FORMAT,
        "stage": "export",
        "inputs": {"m": MODEL_SHA},
        "config": [1, "/x"],
        "versions": {},
        "device": "sm90",
        "code": {},
    }
    assert key_of(json.loads(json.dumps(desc))) == key_of(desc)


# --- produce and lookup --------------------------------------------------------------------------


def test_produce_then_lookup_is_a_hit_with_files_and_record(cache: StageCache) -> None:
    files = {"model.onnx": b"\x00onnx" * 1000, "weights/data.bin": b"w" * 10}
    key = _produce(cache, files, record={"max_abs_error": 2e-6, "nodes": 12})
    entry = cache.lookup("export", key)
    assert entry is not None
    assert entry.dir == cache.stages / "export" / key[:2] / key
    assert {name: entry.path(name).read_bytes() for name in entry.files} == files
    assert entry.files["model.onnx"].size_bytes == 5000
    assert entry.record == {"max_abs_error": 2e-6, "nodes": 12}
    assert entry.description == _desc()
    assert json.loads((entry.dir / KEY_FILE).read_text()) == _desc()
    meta = json.loads((entry.dir / ENTRY_FILE).read_text())
    assert (meta["stage"], meta["key"], sorted(meta["files"])) == ("export", key, sorted(files))
    assert _leftovers(cache) == [f"export/{key[:2]}/{key}"]
    with pytest.raises(KeyError, match="has no file 'nope.onnx'"):
        entry.path("nope.onnx")


def test_a_second_produce_gets_the_hit_and_writes_nothing(cache: StageCache) -> None:
    key = _produce(cache, {"model.onnx": b"first"})
    with cache.produce("export", key, _desc()) as slot:
        assert slot.dir is None and slot.hit is not None
        assert slot.hit.path("model.onnx").read_bytes() == b"first"
    assert slot.entry == slot.hit


def test_a_miss_for_an_unknown_key(cache: StageCache) -> None:
    assert cache.lookup("export", key_of(_desc())) is None
    assert not cache.stages.exists()  # looking does not create folders


def test_a_hit_marks_the_entry_used(cache: StageCache) -> None:
    key = _produce(cache, {"a": b"1"})
    _set_last_used(cache, "export", key, 1_000_000)
    assert cache.lookup("export", key) is not None
    assert time.time() - (cache.entry_dir("export", key) / USED_FILE).stat().st_mtime < 60


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: _flip_a_byte(d / "model.onnx"),
        lambda d: (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:-1]),
        lambda d: (d / "model.onnx").unlink(),
        lambda d: (d / ENTRY_FILE).write_text("{not json"),
        lambda d: (d / ENTRY_FILE).unlink(),
        lambda d: (d / ENTRY_FILE).write_text(json.dumps({"stage": "export", "key": "0" * 64, "files": {}})),
        lambda d: (d / ENTRY_FILE).write_text(
            json.dumps({**json.loads((d / ENTRY_FILE).read_text()), "files": {"../../x": {"sha256": "", "bytes": 0}}})
        ),
    ],
    ids=[
        "changed-byte-same-size",
        "truncated",
        "file-missing",
        "entry-json-not-json",
        "entry-json-missing",
        "entry-json-other-key",
        "entry-json-path-outside",
    ],
)
def test_a_damaged_entry_is_a_miss_and_is_removed(cache: StageCache, damage) -> None:
    key = _produce(cache, {"model.onnx": bytes(range(256)) * 8})
    damage(cache.entry_dir("export", key))
    assert cache.lookup("export", key) is None
    assert _leftovers(cache) == []  # moved aside and deleted, nothing left to trust
    # and the key can be produced again
    _produce(cache, {"model.onnx": b"again"})
    assert cache.lookup("export", key).path("model.onnx").read_bytes() == b"again"


def test_an_exception_inside_produce_leaves_no_entry_and_no_temporary_folder(cache: StageCache) -> None:
    desc = _desc()
    key = key_of(desc)
    with pytest.raises(RuntimeError, match="export failed"), cache.produce("export", key, desc) as slot:
        (slot.dir / "model.onnx").write_bytes(b"half")
        raise RuntimeError("export failed")
    assert cache.lookup("export", key) is None
    assert _leftovers(cache) == []


def test_a_full_disk_removes_the_temporary_folder_and_says_what_to_do(cache: StageCache) -> None:
    desc = _desc()
    key = key_of(desc)
    with pytest.raises(StageError) as info, cache.produce("export", key, desc) as slot:
        (slot.dir / "model.onnx").write_bytes(b"part")
        # what shutil.copyfile raises when the cache's disk fills: ENOSPC naming the file it was writing
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/src.onnx", None, str(slot.dir / "model.onnx"))
    message = str(info.value)
    assert message.startswith("export: no space left on device under ")
    assert str(cache.root) in message and "`optimize cache prune" in message
    assert "\n" not in message
    assert _leftovers(cache) == []


def test_a_full_disk_elsewhere_is_not_reported_as_the_cache_s(cache: StageCache) -> None:
    """The kernel's own ENOSPC with no file named (a write to /dev/full) while the cache's disk has room: the
    run directory's disk is full, which the pipeline reports; the cache only cleans up."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    desc = _desc()
    with pytest.raises(OSError) as info, cache.produce("export", key_of(desc), desc) as slot:
        (slot.dir / "model.onnx").write_bytes(b"part")
        with open("/dev/full", "wb") as fh:
            fh.write(b"x" * 4096)
            fh.flush()
    assert info.value.errno == errno.ENOSPC and not isinstance(info.value, StageError)
    assert _leftovers(cache) == []


@pytest.mark.parametrize("name", [ENTRY_FILE, KEY_FILE, USED_FILE])
def test_a_stage_cannot_write_the_cache_s_own_file_names(cache: StageCache, name: str) -> None:
    desc = _desc()
    with pytest.raises(ValueError, match="a name the cache keeps"), cache.produce("export", key_of(desc), desc) as s:
        (s.dir / name).write_text("{}")
    assert _leftovers(cache) == []


def test_produce_refuses_a_description_that_is_not_its_key_s(cache: StageCache) -> None:
    with pytest.raises(ValueError, match="not the one its key is made of"):
        with cache.produce("export", key_of(_desc()), _desc(device="sm90")):
            pass
    with pytest.raises(ValueError, match="stage name"):
        cache.lookup("../etc", key_of(_desc()))


def test_a_held_lock_times_out_as_a_stage_error_naming_the_lock(tmp_path: Path) -> None:
    patient = StageCache(tmp_path / "cache")
    hasty = StageCache(tmp_path / "cache", lock_timeout_s=0.2)
    desc = _desc()
    key = key_of(desc)
    with patient.produce("export", key, desc):  # flock: a second open file in this process waits too
        with pytest.raises(StageError) as info, hasty.produce("export", key, desc):
            pass
    assert str(info.value).startswith(f"export: the cache entry {key[:12]} is being produced by another process: ")
    assert str(patient.lock_path("export", key)) in str(info.value)


# --- killed and concurrent producers ----------------------------------------------------------------

_KILLED = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    from optimize.cache import StageCache
    root, stage, key, desc = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    with StageCache(Path(root)).produce(stage, key, desc) as slot:
        (slot.dir / "model.onnx").write_bytes(b"half an export")
        print(slot.dir, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_sigkilled_producer_leaves_no_entry_and_prune_removes_its_temporary_folder(cache: StageCache) -> None:
    desc = _desc()
    key = key_of(desc)
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED, str(cache.root), "export", key, json.dumps(desc)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    tmp = Path(proc.stdout.strip())
    assert tmp.parent == cache.stages / "export" and tmp.name.startswith(f".tmp-{key}-")
    assert (tmp / "model.onnx").is_file()  # what it wrote is still there, but never an entry
    assert cache.lookup("export", key) is None
    assert cache.entries() == []

    _produce(cache, {"model.onnx": b"a whole export"})  # the lock died with its holder
    assert cache.lookup("export", key).path("model.onnx").read_bytes() == b"a whole export"

    result = cache.prune()
    assert (result.stale_removed, result.removed, result.freed_bytes) == (1, (), len(b"half an export"))
    assert not tmp.exists()
    assert cache.lookup("export", key) is not None


def test_prune_keeps_the_temporary_folder_of_a_live_producer(cache: StageCache) -> None:
    desc = _desc()
    with cache.produce("export", key_of(desc), desc) as slot:
        (slot.dir / "model.onnx").write_bytes(b"in progress")
        assert cache.prune(older_than_s=0).stale_removed == 0
        assert cache.clear().stale_removed == 0
        assert (slot.dir / "model.onnx").is_file()
    assert cache.lookup("export", key_of(desc)) is not None


_RACER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from optimize.cache import StageCache
    root, name, key, desc = Path(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    (root / f"ready-{name}").touch()
    while len(list(root.glob("ready-*"))) < 2:  # start together
        time.sleep(0.005)
    entered = time.time()
    with StageCache(root).produce("export", key, desc) as slot:
        got_slot = time.time()
        if slot.hit is None:
            (slot.dir / "producer.txt").write_text(name)
            time.sleep(0.5)
        done = time.time()
    print(json.dumps({"name": name, "hit": slot.hit is not None, "dir": str(slot.entry.dir),
                      "producer": slot.entry.path("producer.txt").read_text(),
                      "entered": entered, "got_slot": got_slot, "done": done}))
    """
)


def test_two_processes_producing_one_key_take_turns_and_share_one_entry(cache: StageCache) -> None:
    desc = _desc()
    key = key_of(desc)
    cache.root.mkdir(parents=True)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(cache.root), name, key, json.dumps(desc)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    produced = [r for r in results if not r["hit"]]
    waited = [r for r in results if r["hit"]]
    assert len(produced) == 1 and len(waited) == 1, results
    producer, other = produced[0], waited[0]
    assert producer["producer"] == other["producer"] == producer["name"]
    assert producer["dir"] == other["dir"] == str(cache.entry_dir("export", key))
    # The other one asked while the producer was still at work, and got its slot only after it finished.
    assert other["entered"] < producer["done"] <= other["got_slot"]
    assert [i.key for i in cache.entries()] == [key]


# --- prune, clear, budget ------------------------------------------------------------------------------


def _three_entries(cache: StageCache) -> list[str]:
    """Entries of 1000, 2000 and 3000 bytes of payload, used 3, 2 and 1 days ago."""
    now = time.time()
    keys = []
    for n in (1, 2, 3):
        key = _produce(cache, {"model.onnx": b"x" * (1000 * n)}, device=f"gpu{n}")
        _set_last_used(cache, "export", key, now - (4 - n) * 86400)
        keys.append(key)
    return keys


def test_prune_by_age(cache: StageCache) -> None:
    old, middle, new = _three_entries(cache)
    result = cache.prune(older_than_s=parse_age("36h"))
    assert sorted(i.key for i in result.removed) == sorted([old, middle])
    assert result.freed_bytes == sum(i.size_bytes for i in result.removed) > 3000
    assert [i.key for i in cache.entries()] == [new]


def test_prune_by_size_removes_least_recently_used_first(cache: StageCache) -> None:
    old, middle, new = _three_entries(cache)
    sizes = {i.key: i.size_bytes for i in cache.entries()}
    # Using the oldest makes it the newest: the middle one goes first, then the (now) oldest.
    assert cache.lookup("export", old) is not None
    result = cache.prune(max_bytes=sizes[new] + sizes[old])
    assert [i.key for i in result.removed] == [middle]
    result = cache.prune(max_bytes=sizes[old])
    assert [i.key for i in result.removed] == [new]
    assert [i.key for i in cache.entries()] == [old]
    assert cache.prune(max_bytes=0).removed[0].key == old
    assert cache.entries() == []


def test_prune_and_clear_keep_an_entry_in_use(cache: StageCache) -> None:
    old, middle, new = _three_entries(cache)
    with cache.produce("export", old, _desc(device="gpu1")) as slot:
        assert slot.hit is not None
        assert cache.prune(older_than_s=0).skipped_in_use == 1
        result = cache.clear()
        assert (result.skipped_in_use, len(result.removed)) == (1, 0)
        assert slot.hit.path("model.onnx").read_bytes() == b"x" * 1000
    assert [i.key for i in cache.entries()] == [old]


def test_clear_removes_every_entry_and_keeps_the_tensorrt_timing_caches(cache: StageCache) -> None:
    timing = cache.root / "tensorrt" / "timing-sm90-trt10.16.0.cache"
    timing.parent.mkdir(parents=True)
    timing.write_bytes(b"timing")
    _three_entries(cache)
    _produce(cache, {"fp16.onnx": b"y"}, stage="precision")
    assert cache.prune(older_than_s=0, max_bytes=0).freed_bytes > 0
    _three_entries(cache)
    result = cache.clear()
    assert len(result.removed) == 3 and result.freed_bytes > 6000
    assert cache.entries() == [] and _leftovers(cache) == []
    assert timing.read_bytes() == b"timing"
    assert sorted(p.name for p in cache.root.iterdir()) == ["stages", "tensorrt"]


def test_the_size_budget_from_the_environment_is_enforced_after_produce(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPTIMIZE_CACHE_MAX_BYTES", "3KB")
    cache = StageCache(tmp_path / "cache")
    assert cache.max_bytes == 3000
    first = _produce(cache, {"model.onnx": b"1" * 1500}, device="gpu1")
    _set_last_used(cache, "export", first, time.time() - 60)
    second = _produce(cache, {"model.onnx": b"2" * 1500}, device="gpu2")  # over 3 KB with the metadata
    assert [i.key for i in cache.entries()] == [second]
    big = _produce(cache, {"model.onnx": b"3" * 5000}, device="gpu3")  # alone over budget: it stays
    assert [i.key for i in cache.entries()] == [big]
    assert StageCache(tmp_path / "cache", max_bytes=10**6).enforce_budget().removed == ()


def test_a_bad_size_budget_in_the_environment_is_a_recipe_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPTIMIZE_CACHE_MAX_BYTES", "lots")
    with pytest.raises(RecipeError, match="^OPTIMIZE_CACHE_MAX_BYTES: 'lots' is not a size"):
        StageCache(tmp_path)


def test_cache_root_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTIMIZE_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("OPTIMIZE_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "optimize"


# --- user input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600), ("1.5h", 5400), ("0s", 0)],
)
def test_parse_age(text: str, seconds: float) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "-1d", "7 days", "1e3s", "7x", "nan"])
def test_parse_age_refuses(text: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(f"--older-than: {text!r} is not an age; give a number and a unit")):
        parse_age(text, what="--older-than")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("20GB", 20 * 10**9),
        ("500MB", 500 * 10**6),
        ("1.5G", 1_500_000_000),
        ("4.35kb", 4350),
        ("2GiB", 2 * 2**30),
        ("123", 123),
        ("10 B", 10),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "20XB", "1,5GB", "inf"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(f"--max-size: {text!r} is not a size; give a number and a unit")):
        parse_size(text, what="--max-size")


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_ls_and_ls_json(cache: StageCache, tmp_path: Path) -> None:
    env = {"OPTIMIZE_CACHE_DIR": str(cache.root)}
    proc = cli("cache", "ls", cwd=tmp_path, env=env)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == f"0 entries, 0 B in {cache.stages}\n"

    key = _produce(cache, {"model.onnx": b"m" * 2000}, versions={"torch": "2.5.1"}, device="sm90")
    proc = cli("cache", "ls", cwd=tmp_path, env=env)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    header, row, total = proc.stdout.splitlines()
    assert header.split() == ["STAGE", "KEY", "SIZE", "CREATED", "LAST", "USED", "DESCRIPTION"]
    assert row.startswith(f"export  {key[:12]}  ")
    assert row.endswith("sm90 torch=2.5.1") and " KB " in row
    assert total.startswith("1 entry, ") and total.endswith(f" in {cache.stages}")

    proc = cli("cache", "ls", "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    (listed,) = json.loads(proc.stdout)
    assert listed["stage"] == "export" and listed["key"] == key
    assert listed["path"] == str(cache.entry_dir("export", key))
    assert listed["size_bytes"] > 2000 and listed["description"] == "sm90 torch=2.5.1"
    assert listed["created"].endswith("+00:00") and listed["last_used"].endswith("+00:00")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "error: cache prune: give --older-than AGE, --max-size SIZE or both"),
        (("--older-than", "soon"), "error: --older-than: 'soon' is not an age; "),
        (("--max-size", "big"), "error: --max-size: 'big' is not a size; "),
    ],
    ids=["no-option", "bad-age", "bad-size"],
)
def test_cli_prune_usage_errors_exit_2(cache: StageCache, tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    key = _produce(cache, {"model.onnx": b"m"})
    proc = cli("cache", "prune", *args, cwd=tmp_path, env={"OPTIMIZE_CACHE_DIR": str(cache.root)})
    assert proc.returncode == 2
    assert one_error_line(proc).startswith(expected)
    assert cache.lookup("export", key) is not None


def test_cli_prune_and_clear(cache: StageCache, tmp_path: Path) -> None:
    env = {"OPTIMIZE_CACHE_DIR": str(cache.root)}
    timing = cache.root / "tensorrt" / "timing.cache"
    timing.parent.mkdir(parents=True)
    timing.write_bytes(b"t")
    old, middle, new = _three_entries(cache)
    proc = cli("cache", "prune", "--older-than", "36h", cwd=tmp_path, env=env)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    lines = proc.stdout.splitlines()
    assert sorted(line.split()[2] for line in lines[:-1]) == sorted([old[:12], middle[:12]])
    assert lines[-1].startswith("removed 2 entries, freed ") and lines[-1].endswith(" KB")
    assert [i.key for i in cache.entries()] == [new]

    proc = cli("cache", "prune", "--older-than", "0s", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(f"removed export {new[:12]} (")
    assert cache.entries() == []

    _three_entries(cache)
    proc = cli("cache", "clear", cwd=tmp_path, env=env)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert proc.stdout.startswith("removed 3 entries, freed ")
    assert cache.entries() == []
    assert timing.read_bytes() == b"t"


def test_cli_cache_commands_import_no_heavy_library(
    cache: StageCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _produce(cache, {"model.onnx": b"m"})
    monkeypatch.setenv("OPTIMIZE_CACHE_DIR", str(cache.root))
    for args in (["cache", "ls"], ["cache", "prune", "--max-size", "1GB"], ["cache", "--help"]):
        result = _imports_of(args, tmp_path)
        assert result["code"] in (0, None), result
        assert result["heavy"] == [], (args, HEAVY)
