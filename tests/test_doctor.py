"""`optimize doctor`: what this machine can run, as text and JSON, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_cli import cli, one_error_line
from typer.testing import CliRunner

from optimize import doctor
from optimize.cli import app
from optimize.doctor import SECTIONS, render
from optimize.recipe import TARGETS

HEAVY = ("torch", "onnxruntime", "mlflow", "transformers", "pynvml")


# Each doctor run imports torch, onnxruntime and mlflow (seconds): run each form once per module.
@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    return cli("doctor", "--require-target", "onnxruntime-cpu", cwd=tmp_path_factory.mktemp("doctor"))


@pytest.fixture(scope="module")
def json_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    return cli("doctor", "--json", "--require-target", "tensorrt", cwd=tmp_path_factory.mktemp("doctor"))


# --- the CLI --------------------------------------------------------------------------------------


def test_doctor_text_has_every_section_and_onnxruntime_cpu(text_run: subprocess.CompletedProcess[str]) -> None:
    assert text_run.returncode == 0, text_run.stderr
    assert text_run.stderr == ""
    lines = text_run.stdout.splitlines()
    for title in ("Python", "NVIDIA GPU", "torch", "TensorRT", "ONNX Runtime", "ModelOpt", "MLflow", "Targets"):
        assert title in lines, title
    assert "  ✓ onnxruntime-cpu   available" in lines
    targets = lines[lines.index("Targets") + 1 :]
    assert [line.split()[1] for line in targets] == list(TARGETS)
    for line in targets:
        assert line.startswith(("  ✓ ", "  ✗ ")), line
        assert len(line.split(None, 2)) == 3, f"no reason on {line!r}"


def test_doctor_json_has_every_section(json_run: subprocess.CompletedProcess[str]) -> None:
    report = json.loads(json_run.stdout)
    assert tuple(report) == SECTIONS
    assert tuple(report["targets"]) == TARGETS
    assert report["targets"]["onnxruntime-cpu"] == {"available": True, "reason": None, "gpu": False}
    assert report["onnxruntime"]["available"] is True
    assert "CPUExecutionProvider" in report["onnxruntime"]["providers"]
    assert report["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert set(report["gpu"]) == {"available", "reason", "driver", "cuda_driver", "devices"}
    assert report["gpu"]["available"] == bool(report["gpu"]["devices"])
    assert (report["gpu"]["reason"] is None) == report["gpu"]["available"]
    for lib in ("torch", "tensorrt", "onnxruntime", "modelopt", "mlflow"):
        assert {"available", "version", "reason"} <= set(report[lib]), lib
        assert (report[lib]["reason"] is None) == report[lib]["available"], lib
    assert report["tensorrt"]["required"] == ">= 10"


def test_doctor_require_tensorrt_exits_4_naming_it(json_run: subprocess.CompletedProcess[str]) -> None:
    report = json.loads(json_run.stdout)  # the report is printed before the verdict
    trt = report["targets"]["tensorrt"]
    if trt["available"]:
        assert json_run.returncode == 0, json_run.stderr
        return
    assert json_run.returncode == 4, json_run.stderr
    assert one_error_line(json_run) == f"error: required target tensorrt is not available: {trt['reason']}"


def test_doctor_require_unknown_target_exits_2(tmp_path: Path) -> None:
    proc = cli("doctor", "--require-target", "bogus", cwd=tmp_path)
    assert proc.returncode == 2
    assert one_error_line(proc) == (f"error: --require-target: unknown target 'bogus'; known: {', '.join(TARGETS)}")
    assert proc.stdout == ""


_IMPORT_PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    sys.argv = ["optimize", *json.loads(sys.argv[1])]
    from optimize import cli
    code = None
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli.main()
    except SystemExit as e:
        code = e.code
    print(json.dumps({{"code": code, "heavy": sorted(m for m in {heavy!r} if m in sys.modules)}}))
    """
).format(heavy=HEAVY)


@pytest.mark.parametrize(
    ("args", "code"),
    [(["doctor", "--help"], 0), (["--help"], 0), (["doctor", "--require-target", "bogus"], 2)],
    ids=["doctor-help", "help", "unknown-target"],
)
def test_doctor_usage_paths_import_no_heavy_library(tmp_path: Path, args: list[str], code: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, json.dumps(args)], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"code": code, "heavy": []}


def test_doctor_help_lists_every_target() -> None:
    result = CliRunner().invoke(app, ["doctor", "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "--json" in text and "exit 4" in text
    for target in TARGETS:
        assert target in text, target


def test_top_level_help_lists_doctor() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert "  doctor " in result.output


# --- diagnose() and render() in process -----------------------------------------------------------


def _report(**over: Any) -> dict[str, Any]:
    """A report as diagnose() shapes it, for a GPU machine with everything installed."""
    device = {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "sm": "90",
        "memory_total_mb": 81559.0,
        "driver": "575.57.08",
        "cuda_driver": "12.9",
        "uuid": "GPU-0",
    }
    report = {
        "python": {"version": "3.12.3", "executable": "/usr/bin/python3", "platform": "Linux-x86_64", "optimize": "0"},
        "gpu": {"available": True, "reason": None, "driver": "575.57.08", "cuda_driver": "12.9", "devices": [device]},
        "torch": {
            "available": True,
            "version": "2.9.0+cu128",
            "reason": None,
            "cuda": "12.8",
            "cuda_available": True,
            "cuda_reason": None,
            "device_count": 1,
        },
        "tensorrt": {"available": True, "version": "10.13.0", "reason": None, "required": ">= 10"},
        "onnxruntime": {
            "available": True,
            "version": "1.23.0",
            "reason": None,
            "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
            "packages": ["onnxruntime-gpu 1.23.0"],
        },
        "modelopt": {"available": True, "version": "0.47.0", "reason": None},
        "mlflow": {"available": True, "version": "3.7.0", "reason": None},
        "targets": {t: {"available": True, "reason": None, "gpu": False} for t in TARGETS},
    }
    report.update(over)
    return report


def test_render_a_gpu_machine() -> None:
    text = render(_report())
    assert "  ✓ GPU 0        NVIDIA H100 80GB HBM3  cc 9.0 (sm90)  81559 MB  GPU-0" in text
    assert "    CUDA driver  12.9" in text
    assert "  ✓ CUDA   12.8  (1 device(s))" in text
    assert "  ✓ tensorrt  10.13.0" in text
    assert "✗" not in text


def test_render_shows_each_reason() -> None:
    report = _report(
        gpu={"available": False, "reason": "NVML init failed: X", "driver": None, "cuda_driver": None, "devices": []},
        tensorrt={"available": False, "version": "8.6.1", "reason": "TensorRT 8.6.1 is too old", "required": ">= 10"},
        onnxruntime={
            "available": True,
            "version": "1.23.0",
            "reason": None,
            "providers": ["CPUExecutionProvider"],
            "packages": ["onnxruntime 1.23.0", "onnxruntime-gpu 1.23.0"],
        },
        targets={
            "onnxruntime-cpu": {"available": True, "reason": None},
            "tensorrt": {"available": False, "reason": "R"},
        },
    )
    lines = render(report).splitlines()
    assert "  ✗ GPU  NVML init failed: X" in lines
    assert "  ✗ tensorrt  TensorRT 8.6.1 is too old" in lines
    assert "  ✗ packages     onnxruntime 1.23.0 and onnxruntime-gpu 1.23.0 are both installed: keep one" in lines
    assert lines[-2:] == ["  ✓ onnxruntime-cpu  available", "  ✗ tensorrt         R"]


@pytest.mark.parametrize(
    ("version", "available"), [("8.6.1", False), ("10.13.0.35", True), ("11.0.0", True)], ids=["8", "10", "11"]
)
def test_tensorrt_version_gate(monkeypatch: pytest.MonkeyPatch, version: str, available: bool) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__=version))
    section = doctor._tensorrt()
    assert (section["available"], section["version"]) == (available, version)
    if not available:
        assert section["reason"] == f"TensorRT {version} is too old: optimize needs TensorRT >= 10"


def test_tensorrt_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    section = doctor._tensorrt()
    assert not section["available"]
    assert section["reason"].startswith("tensorrt is not installed (pip install 'optimize[gpu]'")


def test_a_broken_target_check_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    import optimize.runtimes

    def broken(target: str) -> str | None:
        if target == "tensorrt":
            raise RuntimeError("libnvinfer.so.10: cannot open shared object file")
        return None

    monkeypatch.setattr(optimize.runtimes, "unavailable_reason", broken)
    targets = doctor._targets()
    assert targets["tensorrt"] == {
        "available": False,
        "reason": "the availability check failed: RuntimeError: libnvinfer.so.10: cannot open shared object file",
        "gpu": True,
    }
    assert targets["onnxruntime-cpu"]["available"] is True
