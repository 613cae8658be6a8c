"""What `optimize plan` costs and says on a warm stage cache (issue 16's bar: under 1 s for recipes/int8.yaml, and
the cause of each miss named after one calibration file changes).

    python benchmarks/plan_time.py                      # recipes/int8.yaml against the stage cache in use
    python benchmarks/plan_time.py --run                # run the recipe first (~15 min on 2 cores) to warm it
    python benchmarks/plan_time.py --recipe recipes/fp16.yaml

1. `optimize plan RECIPE --json` in fresh processes (one untimed first, then --repeat timed): median and max
   wall time, and how many units were hits.
2. A copy of the recipes and calibration folders with one line of the first calibration file changed: the
   plan of the copied recipe, every unit that is not a hit with why.

Prints the tables and the load average; exits 1 when the median reaches 1 s, when the warm plan is not all
hits, or when the changed file is not named as the cause of a miss.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BAR_S = 1.0


def plan_json(recipe: Path, cwd: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "optimize", "plan", str(recipe), "--json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - t0, json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "int8.yaml")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--run", action="store_true", help="run the recipe first (--no-register) to warm the cache")
    parser.add_argument(
        "--change", default="calibration/sentences-calib.txt", help="the data file (text) whose first line is changed"
    )
    args = parser.parse_args()
    recipe = args.recipe.resolve()
    if args.run:
        with tempfile.TemporaryDirectory() as runs:
            subprocess.run(
                [sys.executable, "-m", "optimize", "run", str(recipe), "--no-register", "-q", "--runs-dir", runs],
                cwd=REPO,
                check=False,
            )
    plan_json(recipe, REPO)  # untimed: the first reads the model's files into the digest memo
    times, last = [], {}
    for _ in range(args.repeat):
        seconds, last = plan_json(recipe, REPO)
        times.append(seconds)
    median = statistics.median(times)
    print(f"load average {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    print("| recipe | units | hits | median s | max s | bar |\n|---|---|---|---|---|---|")
    print(f"| {recipe.name} | {len(last['units'])} | {last['hits']} | {median:.3f} | {max(times):.3f} | < {BAR_S} s |")
    ok = median < BAR_S and last["to_make"] == 0
    if last["to_make"]:
        print(f"the cache is not warm for {recipe.name} ({last['to_make']} units to make): run with --run")

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp)
        shutil.copytree(REPO / "recipes", copy / "recipes")
        shutil.copytree(REPO / "calibration", copy / "calibration")
        changed = copy / args.change
        lines = changed.read_text().splitlines()
        lines[0] = lines[0] + " (changed)"
        changed.write_text("\n".join(lines) + "\n")
        _, after = plan_json(copy / recipe.relative_to(REPO), copy)
    print(f"\nafter changing one line of {args.change}:")
    print("| unit | status | why |\n|---|---|---|")
    for u in after["units"]:
        if u["status"] != "hit":
            print(f"| {u['stage']} {u['unit']} | {u['status']} | {'; '.join(u['why'])} |")
    named = any(f"data.{changed.stem}" in why for u in after["units"] for why in u["why"])
    if not named:
        print(f"no miss names data.{changed.stem}")
    return 0 if ok and named else 1


if __name__ == "__main__":
    sys.exit(main())
