"""Progress of the long loops inside stages (optimize/progress.py): what each stage function reports to a
recording bar (a real benchmark on a small ONNX model, a real ONNX Runtime calibration, the fallback's trials
and ranking, TensorRT build phases relayed from the build child through a pipe), and how the run shows it:
bars on a terminal, only the one line per stage in a CI log, nothing under -q.

TensorRT's monitor runs here against tests/runtimes/tensorrt_double.py, a TEST DOUBLE of the `tensorrt` module (it
builds nothing): that proves our orchestration (the monitor's calls, the pipe, the parent's bar). That the real
builder calls the monitor is checked by the `gpu` test at the end, on a GPU runner."""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, mlp_onnx
from rich.console import Console
from runtimes import tensorrt_double
from test_engine import request

from optimize import bench, engine
from optimize import console as console_module
from optimize.precision import fallback, int8
from optimize.progress import NO_PROGRESS
from optimize.recipe import BenchmarkSection, FallbackSection, Int8Variant
from optimize.runtimes import open_runner

H100 = engine.Device("NVIDIA H100 80GB HBM3", "9.0", "580.159.04", "13.0")
WHERE = "precision.variants[0]"


def batches(n: int, size: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """`n` rows of `x` (for conftest's mlp_onnx) in batches of `size`."""
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    return [{"x": x[i : i + size]} for i in range(0, n, size)]


def variant(**kw) -> Int8Variant:
    return Int8Variant(**{"name": "int8", "kind": "int8", "backend": "onnxruntime", "calibration": "calib", **kw})


class Recorder:
    """A progress bar that records what it was told: `bars` is one [total, what, steps done] per `start`,
    `calls` every call in order."""

    def __init__(self) -> None:
        self.bars: list[list] = []
        self.calls: list[tuple] = []

    def start(self, total: int, what: str) -> None:
        self.bars.append([total, what, 0])
        self.calls.append(("start", total, what))

    def advance(self, n: int = 1) -> None:
        assert self.bars, "advance before start"
        self.bars[-1][2] += n
        self.calls.append(("advance", n))


# --- stage functions report the right counts ----------------------------------------------------------


def test_benchmark_counts_every_run_of_every_model_per_shape(tmp_path: Path) -> None:
    """A real interleaved benchmark of two ONNX Runtime sessions: one bar per shape, warm-up and timed runs
    of both models."""
    model = mlp_onnx(tmp_path / "mlp.onnx")
    spec = BenchmarkSection(shapes=[{"batch": 1}, {"batch": 4}], warmup=3, iterations=7)
    bar = Recorder()
    with open_runner("onnxruntime-cpu", model) as a, open_runner("onnxruntime-cpu", model) as b:
        out = bench.run_shapes({"fp32": a, "int8": b}, spec, batches(16, 8), baseline="fp32", progress=bar)
    assert bar.bars == [[2 * (3 + 7), "batch=1: fp32, int8", 20], [2 * (3 + 7), "batch=4: fp32, int8", 20]]
    assert out["int8"]["batch=4"]["iterations"] == 7  # the progress calls took nothing from the protocol


def test_calibration_counts_each_batch_as_it_is_run_and_not_again_when_reused(tmp_path: Path) -> None:
    """Real ONNX Runtime calibration (MinMax) through `int8.quantize`, with batches of two shapes
    (two chunks): one step per batch, in order; a second quantisation reuses the ranges and calibrates nothing."""
    model = mlp_onnx(tmp_path / "mlp.onnx")
    data = batches(48, 16) + batches(16, 8, seed=2)  # 3 batches of 16, then 2 of 8
    v = variant(method="minmax")
    bar = Recorder()
    int8.quantize(model, tmp_path / "a.onnx", v, data, tmp_path / "work", WHERE, progress=bar)
    assert bar.calls == [("start", 5, "calibration (minmax)")] + [("advance", 1)] * 5
    again = Recorder()
    int8.quantize(model, tmp_path / "b.onnx", v, data, tmp_path / "work", WHERE, ["fc1"], progress=again)
    assert again.calls == []


def test_fallback_counts_trials_against_the_budget_and_ranked_nodes() -> None:
    """The search's own policy with steps given as functions: trial 0 fails, the ranking runs (its own bar),
    then trials until one passes."""
    settings = FallbackSection(max_trials=6)
    trials_bar, rank_bar = Recorder(), Recorder()

    def rank(path: Path) -> list[tuple[str, float]]:
        return fallback.rank_isolated(
            ["a", "b", "c", "d"],
            lambda node: Path(node),
            lambda path: {"y": np.array([1.0, {"a": 3.0, "b": 2.0}.get(str(path), 1.0)])},
            {"y": np.array([1.0, 1.0])},
            progress=rank_bar,
        )

    def judge(path: Path) -> tuple[dict, list[str]]:
        excluded = int(path.name)
        return {}, [] if excluded >= 2 else ["accuracy.cosine_min >= 0.99: 0.9"]

    outcome = fallback.search(
        settings, lambda i, ex: Path(str(len(ex))), judge, lambda p: 1.0, rank, progress=trials_bar
    )
    assert rank_bar.bars == [[4, "ranking quantised nodes", 4]]
    assert trials_bar.bars == [[6, "fallback trials", len(outcome.trials)]]
    assert len(outcome.trials) == 3 and outcome.chosen.passed  # 0 excluded, 1, 2


def test_the_default_bar_reports_nowhere() -> None:
    NO_PROGRESS.start(3, "anything")
    NO_PROGRESS.advance(2)
    assert console_module.Progress(quiet=False).bar() is NO_PROGRESS  # outside a stage


# --- TensorRT's progress monitor, through the TEST DOUBLE --------------------------------------------------


def _request(tmp_path: Path, model: Path) -> engine.BuildRequest:
    (tmp_path / "engines").mkdir(exist_ok=True)
    return request(
        tmp_path,
        model,
        "fp32",
        inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", 8]}],
        outputs=[{"name": "logits", "dtype": "float32", "shape": ["batch", 4]}],
    )


def test_build_phases_follow_the_innermost_phase_and_resume_the_outer_one() -> None:
    bar = Recorder()
    phases = engine.BuildPhases(bar, "fp16")
    for event in (
        {"event": "start", "phase": "Build", "parent": None, "steps": 2},
        {"event": "start", "phase": "Tactics", "parent": "Build", "steps": 3},
        {"event": "step", "phase": "Tactics", "step": 0},
        {"event": "step", "phase": "Tactics", "step": 2},  # steps may be skipped
        {"event": "finish", "phase": "Tactics"},
        {"event": "step", "phase": "Build", "step": 0},
        {"event": "step", "phase": "Build", "step": 0},  # said twice: counted once
        {"event": "finish", "phase": "Build"},
    ):
        phases.event(event)
    assert bar.bars == [
        [2, "engine fp16: Build", 0],
        [3, "engine fp16: Build › Tactics", 3],
        [2, "engine fp16: Build", 1],
    ]


def test_build_engine_hands_tensorrt_s_monitor_calls_on_as_events(tmp_path: Path, monkeypatch) -> None:
    trt = tensorrt_double.install(monkeypatch)
    events: list[dict] = []
    engine.build_engine(_request(tmp_path, mlp_onnx(tmp_path / "mlp.onnx")), device=H100, phases=events.append)
    top, layers, writing = tensorrt_double.DOUBLE_PHASES
    assert events[0] == {"event": "start", "phase": top, "parent": None, "steps": 2}
    assert events[1] == {"event": "start", "phase": layers, "parent": top, "steps": 5}  # one step per node
    assert events[-1] == {"event": "finish", "phase": top}
    assert [e["step"] for e in events if e["event"] == "step" and e["phase"] == layers] == [0, 1, 2, 3, 4]
    assert "IProgressMonitor" in trt.double_used


def test_a_monitor_whose_reader_is_gone_does_not_break_the_build(tmp_path: Path, monkeypatch) -> None:
    tensorrt_double.install(monkeypatch)

    def closed(event: dict) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    side = engine.build_engine(_request(tmp_path, mlp_onnx(tmp_path / "mlp.onnx")), device=H100, phases=closed)
    assert Path(side["plan_path"]).is_file()


def test_build_child_relays_its_phases_through_the_pipe(tmp_path: Path, monkeypatch) -> None:
    """A real build child (`python -m optimize.engine build ... PROGRESS_FD`) whose `tensorrt` is the TEST
    DOUBLE and whose GPU is named (this machine has none): its monitor's events cross the process boundary on
    the pipe and move the parent's bar."""
    shim = tmp_path / "child.py"
    shim.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(REPO / 'tests')!r}, {str(REPO)!r}]\n"
        "from runtimes import tensorrt_double\n"
        "sys.modules['tensorrt'] = tensorrt_double.make()\n"
        "from optimize import engine\n"
        f"engine.current_device = lambda: engine.Device{tuple(H100.__dict__.values())!r}\n"
        "assert sys.argv[1:3] == ['-m', 'optimize.engine'], sys.argv\n"
        "raise SystemExit(engine.main(sys.argv[3:]))\n"
    )
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {shim} "$@"\n')
    python.chmod(0o755)
    monkeypatch.setattr(engine.sys, "executable", str(python))
    bar = Recorder()
    side = engine.build_in_child(_request(tmp_path, mlp_onnx(tmp_path / "mlp.onnx")), timeout_s=120, progress=bar)
    assert tensorrt_double.read_plan(Path(side["plan_path"]))["double"] == "tensorrt"
    top, layers, writing = tensorrt_double.DOUBLE_PHASES
    assert bar.bars == [
        [2, f"engine fp32: {top}", 0],
        [5, f"engine fp32: {top} › {layers}", 5],
        [2, f"engine fp32: {top}", 1],
        [1, f"engine fp32: {top} › {writing}", 1],
        [2, f"engine fp32: {top}", 2],
    ]
    assert sorted(os.listdir(tmp_path / "engines")) == sorted(
        [Path(side["plan_path"]).name, Path(side["plan_path"]).with_suffix(".json").name]
    )


# --- what a run shows: bars on a terminal, one line per stage in a log, nothing under -q -------------------


def _plain(out: io.StringIO) -> str:
    """What was written, without the terminal's control sequences (colours, cursor moves)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())


def _console(monkeypatch, terminal: bool) -> io.StringIO:
    out = io.StringIO()
    con = Console(file=out, force_terminal=terminal, width=120, highlight=False, soft_wrap=True)
    if not terminal:
        assert not con.is_terminal
    monkeypatch.setattr(console_module, "_console", con)
    return out


@pytest.mark.parametrize("terminal", [True, False])
def test_the_stage_display_shows_bars_only_on_a_terminal(terminal: bool, monkeypatch) -> None:
    out = _console(monkeypatch, terminal)
    display = console_module.Progress()
    with display.stage("benchmark", "2 shape(s) × 2 models") as rec:
        bar = display.bar()
        bar.start(10, "batch=8: fp32, fp16")
        bar.advance(4)
        rec["detail"] = "fp16 p50 speed-up 1.20× on onnxruntime-cpu"
    text = _plain(out)
    lines = [line for line in text.splitlines() if line.strip()]
    if terminal:
        assert "batch=8: fp32, fp16" in text and "4/10" in text and "━" in text
        assert "✓ benchmark" in lines[-1] and "speed-up 1.20×" in lines[-1]
    else:
        assert bar is NO_PROGRESS
        assert len(lines) == 1 and lines[0].startswith("✓ benchmark") and "speed-up 1.20×" in lines[0]


def test_quiet_shows_nothing_even_on_a_terminal(monkeypatch) -> None:
    out = _console(monkeypatch, terminal=True)
    display = console_module.Progress(quiet=True)
    with display.stage("benchmark", "2 shape(s)"):
        assert display.bar() is NO_PROGRESS
    assert out.getvalue() == ""  # not even a control sequence


@pytest.mark.parametrize("shown", ["terminal", "log", "quiet"])
def test_a_run_shows_bars_on_a_terminal_one_line_per_stage_in_a_log_and_nothing_quiet(
    shown: str, write_recipe, tiny_dir: Path, monkeypatch
) -> None:
    """A real run of the tiny recipe on a given ONNX model (stage cache off, so every stage runs)."""
    from optimize.pipeline import RunOptions, run

    mlp_onnx(tiny_dir / "mlp.onnx")
    recipe = write_recipe({"model": {"source": "onnx", "path": "mlp.onnx", "entry_point": None, "python_path": None}})
    out = _console(monkeypatch, terminal=shown == "terminal")
    options = RunOptions(runs_dir=tiny_dir / "runs", register=False, cache=False, quiet=shown == "quiet")
    assert run(recipe, options).exit_code == 0
    text = _plain(out)
    stages = [line.split()[1] for line in text.splitlines() if line.startswith(("✓", "✗"))]
    if shown == "quiet":  # a warning (a noisy machine's latency CV) is not progress, and may be said
        assert all(line.startswith("warning:") for line in text.splitlines()), text
        assert "\x1b[" not in out.getvalue()  # no display drawn
        return
    assert stages == ["load", "export", "precision", "evaluate", "benchmark", "gate"]
    bars = ["batch=1: fp32, fp16", "batch=8: fp32, fp16", "peak memory on onnxruntime-cpu"]
    if shown == "terminal":
        # Each bar is drawn when it starts: 2 models × (2 warm-up + 10 timed runs) per shape; and with its final
        # count when the stage ends: a memory probe per model (the display refreshes 10 times a second besides).
        assert all(b in text for b in bars) and "0/24" in text and "2/2" in text and "━" in text
    else:
        assert not any(b in text for b in bars) and "━" not in text and "/24" not in text


# --- the real TensorRT ----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_real_tensorrt_reports_build_phases_through_the_child(tmp_path: Path) -> None:
    """TensorRT's own builder calls our IProgressMonitor in the build child, and the phases reach the parent."""
    bar = Recorder()
    side = engine.build_in_child(_request(tmp_path, mlp_onnx(tmp_path / "mlp.onnx")), timeout_s=600, progress=bar)
    assert Path(side["plan_path"]).is_file()
    assert bar.bars, "TensorRT reported no build phase"
    assert all(what.startswith("engine fp32: ") and 0 <= done <= total for total, what, done in bar.bars)
    assert any(done > 0 for _, _, done in bar.bars), json.dumps(bar.bars)
