"""End to end: wall time of a cold `optimize run recipes/fp16.yaml` and the seconds of each stage.

A fresh process with an empty runs folder and a new sqlite MLflow store (both in a temporary
folder, removed afterwards; --keep keeps them). Bar: wall time < 180 s.

    python benchmarks/e2e_run.py [--recipe recipes/fp16.yaml] [--keep]

Stage seconds come from the run's manifest.json (`stages`), written by the pipeline itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cli_startup import entry_point  # the same console-script lookup (this folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent
BAR_S = 180.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/fp16.yaml")
    ap.add_argument("--keep", action="store_true", help="keep the temporary runs folder and MLflow store")
    opts = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="optimize-e2e-"))
    runs = tmp / "runs"
    argv = [
        *entry_point(),
        "run",
        opts.recipe,
        "--runs-dir",
        str(runs),
        "--tracking-uri",
        f"sqlite:///{tmp}/mlflow.db",
    ]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"$ {' '.join(argv)}\ncores {os.cpu_count()}, load average before: {load}\n")
    stray = REPO / "mlflow.db"  # the default store; the run is told to use another one
    stray_before = stray.exists()
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    stray_created = stray.exists() and not stray_before

    manifests = sorted(runs.glob("*/*/manifest.json"))
    if not manifests:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"no manifest.json under {runs} (exit {proc.returncode})")
    manifest = json.loads(manifests[-1].read_text())
    stages = manifest.get("stages", [])

    header = f"{'stage':<11} {'seconds':>8} {'share':>6}  detail"
    print(header + "\n" + "-" * 100)
    total = sum(float(s.get("seconds", 0)) for s in stages)
    for s in stages:
        secs = float(s.get("seconds", 0))
        detail = str(s.get("detail") or s.get("what", ""))
        print(f"{s['stage']:<11} {secs:>8.1f} {secs / wall:>6.1%}  {detail[:72]}")
    print("-" * 100)
    print(f"{'stages':<11} {total:>8.1f} {total / wall:>6.1%}")
    outside = wall - total
    print(f"{'outside':<11} {outside:>8.1f} {outside / wall:>6.1%}  start-up, imports, run folder, report")
    print(f"{'wall':<11} {wall:>8.1f}")
    ok = wall < BAR_S
    print(
        f"\nexit {proc.returncode}, run status {manifest.get('status')!r}; "
        f"bar: wall < {BAR_S:.0f} s: {'PASS' if ok else 'FAIL'}"
    )
    if proc.returncode not in (0, 1):
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] or proc.stderr.splitlines()[-3:]
        print("\n".join(errors))
    if stray_created:
        stray.unlink()
        print(f"note: the run created {stray} although --tracking-uri named another store (removed it)")
    if opts.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if ok and proc.returncode in (0, 1) else 1)


if __name__ == "__main__":
    main()
