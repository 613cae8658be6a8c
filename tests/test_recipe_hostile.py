"""Hostile and malformed recipes through the real command line: every one ends, quickly, in exit 2 with one
line on stderr and no traceback, through both `optimize validate` and `optimize run`.

The corpus is tests/data/hostile_recipes/ (small files; `_base.yaml` is the valid recipe the cases extend, so
that each case has exactly one problem) plus the large cases this file writes. One child process runs the
CLI's own entry point (`optimize.cli.main`, argv and all) once per case and command and times each call, so
that the suite pays for one interpreter start instead of a hundred; a few cases also run as separate
`python -m optimize` processes, timed from outside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from optimize import recipe_yaml

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs, /dev/zero, the driver's resource module")

CORPUS = REPO / "tests" / "data" / "hostile_recipes"
SECONDS = 2.0  # the most one case may take, command and all

# Per case: a piece of its one-line message (the corpus file that fails names itself or the file at fault).
EXPECTED = {
    "alias_bomb.yaml": f"more than {recipe_yaml.MAX_VALUES} values once aliases",
    "alias_bomb_merge.yaml": f"more than {recipe_yaml.MAX_VALUES} values once aliases",
    "alias_recursive.yaml": "alias_recursive.yaml:2:8: an alias (*name) used inside its own anchor",
    "alias_undefined.yaml": "alias_undefined.yaml:4:8: invalid YAML: found undefined alias 'nowhere'",
    "binary.yaml": "binary.yaml:1:1: not UTF-8 text (byte 0x89)",
    "binary_tag.yaml": "binary_tag.yaml:4:11: tag !!binary is not allowed",
    "comment_only.yaml": "comment_only.yaml: the recipe is empty",
    "complex_key.yaml": "complex_key.yaml:2:3: a key must be a name or a number, not a list or mapping",
    "custom_tag.yaml": "custom_tag.yaml:2:7: tag !include is not allowed",
    "deep_alias.yaml": f"nested more than {recipe_yaml.MAX_DEPTH} levels deep",
    "deep_block.yaml": f"deep_block.yaml:65:127: nested more than {recipe_yaml.MAX_DEPTH} levels deep",
    "deep_flow.yaml": f"deep_flow.yaml:4:69: nested more than {recipe_yaml.MAX_DEPTH} levels deep",
    "dup_after_bom.yaml": "dup_after_bom.yaml:3: duplicate key 'name' (first at line 2)",
    "dup_merge_key.yaml": "dup_merge_key.yaml:7: duplicate key '<<' (first at line 6)",
    "dup_nested_key.yaml": "dup_nested_key.yaml:7: duplicate key 'path' (first at line 5)",
    "dup_quoted_key.yaml": "dup_quoted_key.yaml:3: duplicate key 'name' (first at line 2)",
    "dup_top_level_key.yaml": "dup_top_level_key.yaml:6: duplicate key 'gates' (first at line 2)",
    "empty.yaml": "empty.yaml: the recipe is empty",
    "extends_bad_value.yaml": "extends_bad_value.yaml: extends: must be a file name or a list of file names",
    "extends_binary.yaml": "binary.yaml:1:1: not UTF-8 text",
    "extends_cycle_a.yaml": "extends: cycle ",
    "extends_cycle_b.yaml": "extends: cycle ",
    "extends_device.yaml": "/dev/zero: not a regular file",
    "extends_empty.yaml": "empty.yaml: the recipe is empty",
    "extends_empty_name.yaml": "extends_empty_name.yaml: extends: must be a file name",
    "extends_folder.yaml": "hostile_recipes: is a folder, not a recipe file",
    "extends_invalid_parent.yaml": "tabs.yaml:3:1: invalid YAML: a tab cannot indent YAML",
    "extends_long_name.yaml": "extends_long_name.yaml: extends: nnnnnnnn",
    "extends_missing.yaml": "extends_missing.yaml: extends: nowhere.yaml: file not found",
    "extends_not_a_mapping.yaml": "not_a_mapping.yaml: the recipe must be a mapping of sections",
    "extends_nul.yaml": r"extends_nul.yaml: extends: _base\x00.yaml: not a usable file name",
    "extends_self.yaml": "extends: cycle ",
    "huge_int.yaml": "huge_int.yaml:3:15: integer too long (5000 digits)",
    "invalid_utf8.yaml": "invalid_utf8.yaml:3:10: not UTF-8 text (byte 0xff)",
    "latin1.yaml": "latin1.yaml:2:17: not UTF-8 text (byte 0xe9)",
    "long_key.yaml": "long_key.yaml:2:3: a key longer than 1024 characters",
    "merge_not_mapping.yaml": "merge_not_mapping.yaml:3:7: a merge key (<<) takes a mapping or a list of mappings",
    "non_string_key.yaml": "non_string_key.yaml: [1]: Keys should be strings",
    "not_a_mapping.yaml": "not_a_mapping.yaml: the recipe must be a mapping of sections",
    "nul_byte.yaml": "nul_byte.yaml:2:10: invalid YAML: character U+0000 is not allowed",
    "python_tag.yaml": "python_tag.yaml:4:8: tag !!python/object/apply:os.system is not allowed",
    "scalar_document.yaml": "scalar_document.yaml: the recipe must be a mapping of sections",
    "tabs.yaml": "tabs.yaml:3:1: invalid YAML: a tab cannot indent YAML",
    "timestamp_tag.yaml": "timestamp_tag.yaml:2:14: tag !!timestamp is not allowed",
    "two_documents.yaml": "two_documents.yaml:2:1: invalid YAML: a recipe is one YAML document",
    "undefined_tag_handle.yaml": "undefined_tag_handle.yaml:2:7: invalid YAML:",
    "utf16_without_bom.yaml": "utf16_without_bom.yaml:1:2: invalid YAML: character U+0000",
    # YAML 1.1 would read these as booleans or a number of seconds; here they stay what was written
    "yaml11_bool_in_str_field.yaml": "registry.model_name: Input should be a valid string (got True)",
    "yaml11_bool_tag.yaml": "yaml11_bool_tag.yaml:3:12: 'yes' is not a valid !!bool value",
    "yaml11_no_in_list.yaml": "benchmark.targets[1]: 'no' is not one of",
    "yaml11_on_key.yaml": "yaml11_on_key.yaml: on: unknown key",
    "yaml11_sexagesimal.yaml": "benchmark.iterations: Input should be a valid integer, unable to parse string as an "
    "integer (got '1:30')",
    "yaml2_directive.yaml": "yaml2_directive.yaml:1:1: invalid YAML: found incompatible YAML document",
}


def _generated(folder: Path) -> dict[str, str]:
    """The cases too large to keep as files (and the FIFO and link loop): written to `folder`, with the piece
    of their message, keyed by path."""
    folder.mkdir()
    base = CORPUS / "_base.yaml"
    limit = recipe_yaml.MAX_BYTES
    cases: dict[Path, str] = {}

    def case(name: str, text: str | bytes, expected: str) -> Path:
        path = folder / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        cases[path] = expected
        return path

    case("too_large.yaml", f"extends: {base}\ndescription: {'x' * limit}\n", "too_large.yaml: too large")
    case(
        "huge_scalar.yaml",
        f"extends: {base}\nname: {'x ' * (limit // 2 - 1000)}\n",
        "huge_scalar.yaml: name: String should match pattern",
    )
    many = ", ".join(["1"] * (recipe_yaml.MAX_VALUES + 10))
    case("many_values.yaml", f"extends: {base}\nmodel:\n  kwargs:\n    x: [{many}]\n", "more than 10000 values")
    case("deep_flow_huge.yaml", "x: " + "[" * (limit - 100), "deep_flow_huge.yaml:1:")
    case("many_documents.yaml", "name: x\n" + "---\n" * (limit // 5), "many_documents.yaml:2:1: invalid YAML:")
    case(
        "blank_lines_then_duplicate.yaml",
        "\n" * (limit - 1000) + "name: a\nname: b\n",
        f"blank_lines_then_duplicate.yaml:{limit - 1000 + 2}: duplicate key 'name' (first at line {limit - 1000 + 1})",
    )
    case("extends_huge.yaml", "extends: too_large.yaml\n", "too_large.yaml: too large")
    # parents that fit one by one, not together
    quarter = "description: " + "q" * (limit // 4) + "\n"
    for i in range(5):
        (folder / f"quarter_{i}.yaml").write_text(quarter)
    parents = ", ".join(f"quarter_{i}.yaml" for i in range(5))
    case("extends_too_much_together.yaml", f"extends: [{parents}]\n", "too large with the files it extends")
    # a chain one longer than allowed
    depth = recipe_yaml.MAX_EXTENDS_DEPTH + 2
    for i in range(1, depth):
        (folder / f"chain_{i}.yaml").write_text(f"extends: {f'chain_{i + 1}.yaml' if i < depth - 1 else base}\n")
    case(
        "chain_0.yaml", "extends: chain_1.yaml\n", f"extends: chain of more than {recipe_yaml.MAX_EXTENDS_DEPTH} files"
    )
    # many parents, and a diamond that would read 2^8 files
    for i in range(recipe_yaml.MAX_FILES + 5):
        (folder / f"part_{i}.yaml").write_text(f"description: part {i}\n")
    fan = ", ".join(f"part_{i}.yaml" for i in range(recipe_yaml.MAX_FILES + 5))
    case("extends_fan_out.yaml", f"extends: [{fan}]\n", f"extends: more than {recipe_yaml.MAX_FILES} files in all")
    for i in range(1, 8):
        (folder / f"diamond_{i}.yaml").write_text(f"extends: [diamond_{i + 1}.yaml, diamond_{i + 1}.yaml]\n")
    (folder / "diamond_8.yaml").write_text(f"extends: {base}\n")
    case("diamond_0.yaml", "extends: [diamond_1.yaml, diamond_1.yaml]\n", "more than 32 files in all")
    if hasattr(os, "mkfifo"):  # a FIFO no one writes to: reading it would block forever
        os.mkfifo(folder / "fifo.yaml")
        cases[folder / "fifo.yaml"] = "fifo.yaml: not a regular file"
        case("extends_fifo.yaml", "extends: fifo.yaml\n", "fifo.yaml: not a regular file")
    (folder / "loop.yaml").symlink_to("loop.yaml")
    cases[folder / "loop.yaml"] = "loop.yaml: cannot read"
    case("extends_loop.yaml", "extends: loop.yaml\n", "loop.yaml")
    case("escape_in_key.yaml", f'extends: {base}\n"\\e[31mred": 1\n', r"\x1b[31mred: unknown key")
    return {str(p): expected for p, expected in cases.items()}


# Runs each (argv) through the CLI's entry point in this one process, timing it, with its stderr captured.
_DRIVER = r"""
import functools, io, json, resource, sys, time
import typer.main
from optimize.cli import main

# typer rebuilds its click command from the functions' signatures on every call (some 60 ms, most of a case's
# time); built once here, the parsing, the commands and main()'s mapping of errors to exit codes are the real ones
typer.main.get_command = functools.cache(typer.main.get_command)

def call(argv):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["optimize", *argv]
    real = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    start = time.perf_counter()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.stdout, sys.stderr = real
    return code, time.perf_counter() - start, err.getvalue()

cases, runs_dir, results = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
# the first call of each command imports its modules: not a case's time
call(["validate", "missing.yaml"])
call(["run", "missing.yaml", "--runs-dir", runs_dir, "-q"])
with open(results, "w") as fh:
    for case in cases:
        for argv in (["validate", case], ["run", case, "--runs-dir", runs_dir, "--no-cache", "-q"]):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            code, seconds, stderr = call(argv)
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            fh.write(json.dumps({"argv": argv, "code": code, "seconds": seconds, "stderr": stderr, "rss_kb": grown}))
            fh.write("\n")
            fh.flush()
"""


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OPTIMIZE_CACHE_DIR": str(tmp_path / "cache")}


def test_every_hostile_recipe_is_exit_2_with_one_line_through_validate_and_run(tmp_path: Path) -> None:
    in_corpus = sorted(p.name for p in CORPUS.iterdir() if not p.name.startswith("_"))
    assert in_corpus == sorted(EXPECTED), "every corpus file needs its expected message here, and only those"
    expected = {str(CORPUS / name): piece for name, piece in EXPECTED.items()} | _generated(tmp_path / "gen")
    runs_dir, results = tmp_path / "runs", tmp_path / "results.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(list(expected)), str(runs_dir), str(results)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(tmp_path),
    )
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    assert proc.returncode == 0, f"driver failed after {len(done)} calls: {proc.stderr[-3000:]}"
    assert len(done) == 2 * len(expected)
    problems = []
    for row in done:
        command, case = row["argv"][0], row["argv"][1]
        lines = row["stderr"].splitlines()
        line = lines[0] if lines else ""
        shown = f"{command} {Path(case).name}: {row['stderr']!r}"
        if row["code"] != 2:
            problems.append(f"{shown} exit {row['code']}")
        if len(lines) != 1 or "Traceback" in row["stderr"]:
            problems.append(f"{shown} is not one line")
        elif command == "run" and not line.startswith("error: "):
            problems.append(f"{shown} lacks `error: `")
        if expected[case] not in line:
            problems.append(f"{shown} does not say {expected[case]!r}")
        if len(line) > 1100:
            problems.append(f"{command} {Path(case).name}: a line of {len(line)} characters")
        if row["seconds"] > SECONDS:
            problems.append(f"{command} {Path(case).name}: {row['seconds']:.2f} s")
        if row["rss_kb"] > 256 * 1024:
            problems.append(f"{command} {Path(case).name}: memory grew {row['rss_kb'] // 1024} MiB")
    assert not problems, "\n".join(problems)
    assert not runs_dir.exists(), "a bad recipe starts no run directory"


def test_hostile_recipes_as_separate_processes(tmp_path: Path) -> None:
    """An alias bomb through `python -m optimize` itself, timed from outside against a recipe that is simply
    missing (the interpreter's and the CLI's start-up are not the case's time)."""

    def cli(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "optimize", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(tmp_path),
        )
        return proc, time.perf_counter() - start

    for command in (["validate"], ["run", "--runs-dir", str(tmp_path / "runs"), "-q"]):
        _, baseline = cli(*command, "missing.yaml")
        proc, seconds = cli(*command, str(CORPUS / "alias_bomb.yaml"))
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
        assert EXPECTED["alias_bomb.yaml"] in proc.stderr
        assert seconds <= baseline + SECONDS, (command, seconds, baseline)


def test_validate_reports_each_of_many_bad_recipes_in_one_line(tmp_path: Path) -> None:
    """One `optimize validate` over the whole corpus: a line per recipe, exit 2."""
    cases = sorted(str(CORPUS / name) for name in EXPECTED)
    proc = subprocess.run(
        [sys.executable, "-m", "optimize", "validate", *cases],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp_path),
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == len(cases), proc.stderr
    for line, name in zip(lines, sorted(EXPECTED), strict=True):
        assert EXPECTED[name] in line, (name, line)
