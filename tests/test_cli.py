"""The `optimize` command line as a user runs it: real processes, exit codes, stderr, imports."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest
from conftest import RECIPE_SECTIONS, REPO
from typer.testing import CliRunner

from optimize import __version__
from optimize.cli import app

RECIPES = REPO / "recipes"
HEAVY = ("torch", "onnxruntime", "mlflow", "transformers")


def cli(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m optimize ARGS` in `cwd` (with `env` added to this process's environment)."""
    return subprocess.run(
        [sys.executable, "-m", "optimize", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single `error: ...` line a failing command prints on stderr (and no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    return lines[0]


@cache
def _has_cuda_provider() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


# --- help and version ----------------------------------------------------------------------------


def test_python_m_optimize_help(tmp_path: Path) -> None:
    proc = cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ")
    for command in ("run", "validate", "schema"):
        assert f"  {command} " in proc.stdout
    assert "4 a required runtime or device is missing" in " ".join(proc.stdout.split())
    assert proc.stderr == ""


def test_console_script_help_and_version(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("optimize")
    if not script.exists():
        script = Path(shutil.which("optimize") or "")
    if not script.is_file():
        pytest.skip("the `optimize` console script is not installed next to this Python")
    proc = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: optimize " in proc.stdout
    proc = subprocess.run([str(script), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, f"optimize {__version__}\n")


def test_version(tmp_path: Path) -> None:
    proc = cli("--version", cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout == f"optimize {__version__}\n"


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("run", "--require-target"),
        ("validate", "Recipe YAML files."),
        ("schema", "JSON schema"),
        ("report", "RUN_DIR/report.html"),
        ("compare", "models:/NAME@ALIAS"),
        ("runs", "newest first"),
    ],
)
def test_command_help(command: str, expected: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert expected in result.output


# --- usage errors: exit 2, one line, no traceback --------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("bogus",), "error: No such command 'bogus'"),
        (("validate",), "error: Missing argument"),
        (("run", "--no-such-option", "r.yaml"), "error: No such option: --no-such-option"),
        (("run",), "error: Missing argument"),
    ],
    ids=["unknown-command", "validate-no-file", "unknown-option", "run-no-file"],
)
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc).startswith(expected)
    assert "internal error" not in proc.stderr


def test_no_arguments_shows_usage_and_exits_2(tmp_path: Path) -> None:
    proc = cli(cwd=tmp_path)
    assert proc.returncode == 2
    assert "Usage: " in proc.stderr and "validate" in proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


# --- validate ------------------------------------------------------------------------------------


def test_validate_shipped_recipes(tmp_path: Path) -> None:
    proc = cli("validate", RECIPES / "fp16.yaml", RECIPES / "digits-fp16.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{RECIPES / 'fp16.yaml'}: ok — minilm-fp16: fp32 baseline + fp16 (fp16); 5 gate(s)")
    assert lines[1].startswith(f"{RECIPES / 'digits-fp16.yaml'}: ok — digits-fp16: ")


def test_validate_bad_recipe_exits_2_with_the_error_on_stderr(write_recipe, tmp_path: Path) -> None:
    write_recipe({"precison": {}})
    proc = cli("validate", "recipe.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == "recipe.yaml: precison: unknown key; did you mean 'precision'?"
    assert "Traceback" not in proc.stderr


def test_validate_checks_every_file_and_reports_every_problem(write_recipe, tmp_path: Path) -> None:
    write_recipe(name="good.yaml")
    write_recipe({"precison": {}, "benchmark": {"iteratons": 1}}, name="bad.yaml")
    proc = cli("validate", "bad.yaml", "missing.yaml", "good.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines() == ["good.yaml: ok — tiny: fp32 baseline + fp16 (fp16); 2 gate(s)"]
    assert sorted(proc.stderr.strip().splitlines()) == [
        "bad.yaml: benchmark.iteratons: unknown key; did you mean 'iterations'?",
        "bad.yaml: precison: unknown key; did you mean 'precision'?",
        "missing.yaml: file not found",
    ]


# --- what `validate`, `--help` and `schema` import -------------------------------------------------

_IMPORT_PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    sys.argv = ["optimize", *json.loads(sys.argv[1])]
    from optimize import cli
    out, err = io.StringIO(), io.StringIO()
    code = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as e:
        code = e.code
    heavy = sorted(m for m in {heavy!r} if m in sys.modules)
    print(json.dumps({{"code": code, "heavy": heavy, "stdout": out.getvalue(), "stderr": err.getvalue()}}))
    """
).format(heavy=HEAVY)


def _imports_of(args: list[str], cwd: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, json.dumps(args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["run", "--help"],
        ["--version"],
        ["schema"],
        ["validate", str(RECIPES / "fp16.yaml"), str(RECIPES / "digits-fp16.yaml")],
        ["runs"],
        ["compare", "--help"],
        ["report", "--help"],
    ],
    ids=["help", "run-help", "version", "schema", "validate", "runs", "compare-help", "report-help"],
)
def test_cheap_commands_import_no_heavy_library(tmp_path: Path, args: list[str]) -> None:
    result = _imports_of(args, tmp_path)
    assert result["code"] in (0, None), result
    assert result["heavy"] == []


def test_validate_of_a_bad_recipe_imports_no_heavy_library(write_recipe, tmp_path: Path) -> None:
    write_recipe({"model": {"entry_point": "foo"}})
    result = _imports_of(["validate", "recipe.yaml"], tmp_path)
    assert result["code"] == 2
    assert "model.entry_point: 'foo' is not of the form package.module:function" in result["stderr"]
    assert result["heavy"] == []


def test_import_probe_sees_heavy_imports(write_recipe, tmp_path: Path) -> None:
    """The probe above is not blind: `run` reaching the target check does import onnxruntime."""
    write_recipe({"benchmark": {"targets": ["onnxruntime-cpu"]}})
    result = _imports_of(["run", "--require-target", "tensorrt", "recipe.yaml"], tmp_path)
    assert "onnxruntime" in result["heavy"], result


# --- schema --------------------------------------------------------------------------------------


def test_schema_prints_json(tmp_path: Path) -> None:
    proc = cli("schema", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    assert schema["type"] == "object"
    for section in RECIPE_SECTIONS:
        assert schema["properties"][section]["description"].strip(), section
    assert "Gate" in schema["$defs"]


def test_schema_in_process_matches_json_schema() -> None:
    from optimize.recipe import json_schema

    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.output) == json_schema()


# --- run: failures before any heavy work ------------------------------------------------------------


def test_run_missing_recipe(tmp_path: Path) -> None:
    proc = cli("run", "nope.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert one_error_line(proc) == "error: nope.yaml: file not found"
    assert proc.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_run_unknown_require_target(write_recipe, tmp_path: Path) -> None:
    write_recipe()
    proc = cli("run", "--require-target", "foo", "recipe.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert line.startswith("error: --require-target: unknown target 'foo'")
    for target in ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"):
        assert target in line
    assert not (tmp_path / "runs").exists()


def test_run_bad_recipe_is_one_line_counting_the_rest(write_recipe, tmp_path: Path) -> None:
    write_recipe({"precison": {}, "benchmark": {"iteratons": 1}})
    proc = cli("run", "recipe.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert line.startswith("error: recipe.yaml: ")
    assert "unknown key; did you mean" in line
    assert line.endswith(" (and 1 more problem(s); see `optimize validate`)")
    assert not (tmp_path / "runs").exists()


def test_run_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path: Path) -> None:
    proc = cli("--debug", "run", "nope.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    assert "RecipeError: nope.yaml: file not found" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: nope.yaml: file not found"


@pytest.mark.skipif(_has_cuda_provider(), reason="this onnxruntime has CUDA: onnxruntime-cuda is available")
def test_run_required_target_missing_exits_4(write_recipe, tmp_path: Path) -> None:
    write_recipe({"benchmark": {"targets": ["onnxruntime-cuda"]}})
    proc = cli("run", "recipe.yaml", cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    line = one_error_line(proc)
    assert line.startswith("error: benchmark.targets: onnxruntime-cuda is required but not available: ")
    assert "CUDAExecutionProvider" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
@pytest.mark.parametrize("recipe", ["tiny", "fp16.yaml"])
def test_run_require_target_on_an_optional_target_exits_4(write_recipe, tmp_path: Path, recipe: str) -> None:
    path = write_recipe({"benchmark": {"optional_targets": ["tensorrt"]}}) if recipe == "tiny" else RECIPES / recipe
    proc = cli("run", "--require-target", "tensorrt", path, "--no-register", cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    line = one_error_line(proc)
    assert line.startswith("error: --require-target: tensorrt is required but not available: ")
    assert "TensorRT is not installed" in line
    assert not (tmp_path / "runs").exists()


# --- run: the verdict as the user sees it --------------------------------------------------------


def test_run_prints_failed_and_skipped_gates_and_exits_1(write_recipe, tmp_path: Path) -> None:
    recipe = write_recipe(
        {
            "benchmark": {"optional_targets": ["tensorrt"]},
            "gates": [
                "accuracy.cosine_min >= 0.99",
                "size.bytes <= 10",
                {"check": "latency.p50_speedup >= 2", "target": "tensorrt"},
            ],
        }
    )
    proc = cli("run", "--no-register", recipe, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    # The outcome is on stdout, the progress on stderr.
    assert "✗ failed  fp16 @ onnxruntime-cpu: size.bytes <= 10 — size.bytes = " in proc.stdout
    # Bracketed text (an install hint) survives the terminal's markup.
    assert "- skipped fp16 @ tensorrt: latency.p50_speedup >= 2 — TensorRT is not installed" in proc.stdout
    assert "'optimize[gpu]'" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("FAILED  report: runs/tiny/")
    assert "✓ gate" in proc.stderr and "✓" not in proc.stdout
    assert "report: " not in proc.stderr and "✗ failed" not in proc.stderr
    assert "Traceback" not in proc.stderr
    (first,) = (tmp_path / "runs" / "tiny").iterdir()

    # The same run for a script (every stage from the cache): one JSON object is all of stdout.
    proc = cli("run", "--no-register", "--json", recipe, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    (run_dir,) = set((tmp_path / "runs" / "tiny").iterdir()) - {first}
    assert (out["command"], out["status"], out["exit_code"], out["error"], out["verdict"]) == (
        "run", "failed", 1, None, "failed"
    )  # fmt: skip
    assert (out["recipe"], out["recipe_file"], out["run_dir"]) == ("tiny", str(recipe.resolve()), str(run_dir))
    (fp16,) = out["variants"]
    assert (fp16["name"], fp16["status"], fp16["target"]) == ("fp16", "failed", "onnxruntime-cpu")
    assert "size.bytes" in fp16["reason"] and fp16["cosine_min"] > 0.99
    assert (out["registered"], out["alias_uri"], out["mlflow_run_id"]) == ([], None, None)
    assert out["report_html"] == str(run_dir / "report.html") and Path(out["report_html"]).is_file()
    assert "✓ gate" in proc.stderr


def test_run_passes_registers_and_names_the_version(write_recipe, tmp_path: Path) -> None:
    proc = cli("run", write_recipe(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for stage in ("load", "export", "precision", "evaluate", "benchmark", "gate", "register"):
        assert f"✓ {stage}" in proc.stderr
    said = proc.stdout.splitlines()
    assert said[0].startswith("PASSED  report: runs/tiny/")
    assert "registered tiny version 1 (fp16) → models:/tiny/1" in said
    assert said[-1].startswith("alias candidate → models:/tiny@candidate  (store: sqlite:///")
    assert "registered tiny" not in proc.stderr and "alias candidate →" not in proc.stderr
    assert (tmp_path / "mlflow.db").is_file()

    # Again, piped into a JSON reader as a script would: the version is found registered already.
    read = "import json, sys; out = json.load(sys.stdin); print(out['status'], json.dumps(out['registered']))"
    command = f"set -o pipefail; {sys.executable} -m optimize run --json recipe.yaml | {sys.executable} -c {read!r}"
    proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    status, registered = proc.stdout.strip().split(" ", 1)
    assert status == "passed"
    assert json.loads(registered) == [
        {"variant": "fp16", "model_name": "tiny", "version": 1, "uri": "models:/tiny/1", "already_registered": True}
    ]


def test_run_json_without_a_run_directory(write_recipe, tmp_path: Path) -> None:
    """A bad recipe or usage (exit 2) still prints the JSON object, with no run directory."""
    write_recipe({"precison": {}})
    for args, error in [
        (("recipe.yaml",), "recipe.yaml: precison: unknown key; did you mean 'precision'?"),
        (("--bogus", "recipe.yaml"), "No such option: --bogus"),
    ]:
        proc = cli("run", "--json", *args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert one_error_line(proc) == f"error: {error}"
        out = json.loads(proc.stdout)
        assert (out["status"], out["exit_code"], out["error"]) == ("error", 2, error)
        assert (out["run_dir"], out["run_id"], out["verdict"], out["variants"]) == (None, None, None, [])
    assert not (tmp_path / "runs").exists()


def test_run_json_when_a_stage_fails_names_the_run_directory(write_recipe, tmp_path: Path) -> None:
    write_recipe({"model": {"entry_point": "tinynet:overflow"}})  # FP16 overflows: the precision stage fails
    proc = cli("run", "--json", "--quiet", "--no-register", "recipe.yaml", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    out = json.loads(proc.stdout)
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    assert (out["status"], out["exit_code"], out["error"]) == ("error", 3, line.removeprefix("error: "))
    assert (out["recipe"], out["run_id"], out["run_dir"]) == ("tiny", run_dir.name, str(run_dir))
    assert "precision.fp16" in out["error"] and "NaN/Inf" in out["error"]
    assert (out["verdict"], out["variants"], out["report_html"]) == (None, [], None)
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "failed"


# --- --json for the registry commands and compare (in this process: MLflow is imported once) -------------------


def _main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict, str]:
    """`optimize ARGS` through the console entry point: (exit code, the JSON object on stdout, stderr)."""
    from optimize import cli as cli_module

    monkeypatch.setattr(sys, "argv", ["optimize", *args])
    with pytest.raises(SystemExit) as e:
        cli_module.main()
    out, err = capsys.readouterr()
    return int(e.value.code or 0), json.loads(out), err


def test_registry_commands_print_json(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from optimize import registry

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert registry.publish(run_dir, store).versions == {"fp16": 1, "fp16-fp32io": 2}
    capsys.readouterr()  # MLflow's log of creating the store
    uri = ("--tracking-uri", store, "--json")

    code, out, err = _main(monkeypatch, capsys, "promote", "tiny", "--to", "canary", "--version", "1", *uri)
    assert (code, err) == (0, "")
    sha256 = out.pop("sha256")
    assert len(sha256) == 64
    assert out == {
        "command": "promote", "uri": "models:/tiny@canary", "unchanged": False, "model": "tiny", "alias": "canary",
        "version": 1, "previous": None, "status": "ok", "exit_code": 0, "error": None,
    }  # fmt: skip
    move = ("promote", "tiny", "--to", "canary", "--from", "candidate-fp16-fp32io")
    code, out, _ = _main(monkeypatch, capsys, *move, *uri)
    assert (code, out["version"], out["previous"]) == (0, 2, 1)
    code, out, _ = _main(monkeypatch, capsys, "rollback", "tiny", "--alias", "canary", *uri)
    assert (code, out["command"], out["version"], out["previous"], out["already_rolled_back"]) == (
        0, "rollback", 1, 2, False
    )  # fmt: skip
    code, out, _ = _main(monkeypatch, capsys, "smoke", "models:/tiny@canary", *uri)
    assert (code, out["status"], out["version"], out["target"], out["sha256"]) == (
        0, "passed", 1, "onnxruntime-cpu", sha256
    )  # fmt: skip
    # the golden outputs were recorded on this target from these very inputs: the same numbers, to rounding
    assert 0 <= out["max_abs_error"] < 1e-5 and out["golden_target"] == "onnxruntime-cpu" and out["p50_ms"] > 0

    # Failures: the same JSON shape, with the error line that stderr has.
    for args, code_expected in [
        (("promote", "tiny", "--to", "canary", "--version", "99"), 2),
        (("promote", "tiny", "--to", "canary"), 2),  # neither --version nor --from
        (("promote", "tiny"), 2),  # click: --to missing, before the command runs
        (("rollback", "tiny", "--alias", "production"), 2),
        (("smoke", "models:/tiny@nowhere"), 2),
    ]:
        code, out, err = _main(monkeypatch, capsys, *args, *uri)
        (line,) = err.strip().splitlines()
        assert (code, out["command"], out["status"], out["exit_code"]) == (code_expected, args[0], "error", code)
        assert out["error"] == line.removeprefix("error: "), args


def test_compare_prints_json(
    finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_a, other = tmp_path / "a", tmp_path / "other"  # copies: compare writes its page into RUN_A
    shutil.copytree(finished_run, run_a)
    shutil.copytree(finished_run, other)
    metrics = json.loads((other / "metrics.json").read_text())
    for by_target in metrics["results"]["fp16"].values():
        for shape in by_target.get("shapes", {}).values():
            shape["p50_ms"] *= 2
    (other / "metrics.json").write_text(json.dumps(metrics))

    code, out, err = _main(monkeypatch, capsys, "compare", str(run_a), str(other), "--json")
    assert (code, err, out["status"], out["error"]) == (0, "", "ok", None)
    assert Path(out["html"]).is_file() and Path(out["html"]).parent == run_a.resolve()
    assert out["before"]["verdict"] == out["after"]["verdict"] == "passed"
    slower = [m for m in out["metrics"] if m["variant"] == "fp16" and m["metric"] == "p50 ms"]
    assert slower and all(m["after"] == 2 * m["before"] and m["better"] is False for m in slower)
    assert out["gates"] and not any(g["flipped"] for g in out["gates"])

    code, out, err = _main(monkeypatch, capsys, "compare", str(tmp_path / "nothing"), str(other), "--json")
    assert (code, out["status"], out["run_a"]) == (2, "error", str(tmp_path / "nothing"))
    assert out["error"] == err.strip().removeprefix("error: ")
