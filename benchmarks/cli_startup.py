"""CLI start-up: wall time of `optimize --help` and `optimize validate <recipes>` as fresh processes.

Bar: median < 0.5 s each, and neither command imports torch, onnxruntime or mlflow.

    python benchmarks/cli_startup.py [--runs 15] [--profile]

Over the bar, the validate command is profiled with `python -X importtime` and the slowest top-level
imports are printed (they are also printed with --profile).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BAR_S = 0.5
HEAVY = ("torch", "onnxruntime", "mlflow", "onnx", "transformers", "numpy")
MUST_NOT = ("torch", "onnxruntime", "mlflow")
COMMANDS = {
    "optimize --help": ["--help"],
    "optimize validate fp16 digits-fp16": ["validate", "recipes/fp16.yaml", "recipes/digits-fp16.yaml"],
}

# Runs the CLI in-process exactly as the console script does, then reports which heavy modules got loaded.
_IMPORTS_PROBE = """
import json, sys
sys.argv = ["optimize", *json.loads(sys.argv[1])]
from optimize.cli import main
code = 0
try:
    main()
except SystemExit as e:
    code = e.code
loaded = [m for m in {heavy} if m in sys.modules]
print("@@" + json.dumps({{"exit": code, "loaded": loaded}}), file=sys.stderr)
"""


def entry_point() -> list[str]:
    """The installed `optimize` console script next to this Python, else `python -m optimize`."""
    script = Path(sys.executable).parent / "optimize"
    if script.exists():
        return [str(script)]
    found = shutil.which("optimize")
    return [found] if found else [sys.executable, "-m", "optimize"]


def time_command(argv: list[str], runs: int) -> tuple[list[float], int]:
    times = []
    rc = 0
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        rc = proc.returncode
    return times, rc


def loaded_modules(args: list[str]) -> dict[str, object]:
    code = _IMPORTS_PROBE.format(heavy=repr(list(HEAVY)))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=REPO, capture_output=True, text=True)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("@@")]
    if not line:
        raise SystemExit(f"import probe failed:\n{proc.stderr}")
    return json.loads(line[-1][2:])


def import_profile(args: list[str], top: int) -> list[tuple[float, str]]:
    """The slowest imports at nesting depth 0-1 (`python -X importtime`), cumulative seconds."""
    code = "import sys; sys.argv = ['optimize', *sys.argv[1:]]; from optimize.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *args], cwd=REPO, capture_output=True, text=True
    )
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self_us, cum_us, name = line[len("import time:") :].split("|", 2)
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        if depth <= 1:
            rows.append((int(cum_us) / 1e6, "  " * depth + name.strip()))
    rows.sort(reverse=True)
    return rows[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15, help="runs per command (the median is reported)")
    ap.add_argument("--profile", action="store_true", help="always print the import-time profile")
    opts = ap.parse_args()

    exe = entry_point()
    print(f"entry point: {' '.join(exe)}   python {sys.version.split()[0]}   cores {os.cpu_count()}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"runs per command: {opts.runs} (1 extra warm-up run, not counted); load average {load}\n")
    header = f"{'command':<38} {'median s':>9} {'min s':>7} {'max s':>7} {'bar':>6}  {'exit':>4}  heavy imports"
    print(header)
    print("-" * len(header))
    over = []
    for label, args in COMMANDS.items():
        time_command([*exe, *args], 1)  # warm the page cache
        times, rc = time_command([*exe, *args], opts.runs)
        med = statistics.median(times)
        probe = loaded_modules(args)
        loaded = probe["loaded"]
        bad = [m for m in loaded if m in MUST_NOT]
        ok = med < BAR_S and not bad
        if not ok:
            over.append((label, args))
        shown = ", ".join(loaded) or "none"
        print(
            f"{label:<38} {med:>9.3f} {min(times):>7.3f} {max(times):>7.3f} "
            f"{'PASS' if ok else 'FAIL':>6}  {rc:>4}  {shown}"
        )
    print(f"\nbar: median < {BAR_S} s and none of {', '.join(MUST_NOT)} imported")

    to_profile = over if not opts.profile else list(COMMANDS.items())
    for label, args in to_profile:
        print(f"\nimport-time profile of `{label}` (python -X importtime; top-level imports, cumulative):")
        for secs, name in import_profile(args, 12):
            print(f"  {secs * 1000:>8.1f} ms  {name}")
    sys.exit(1 if over else 0)


if __name__ == "__main__":
    main()
