"""Calibration memory: does ONNX Runtime static calibration of all-MiniLM-L6-v2 stay inside the recipe's
`memory_budget_gb`? Each case runs in a fresh process and reports its own peak RSS (VmHWM).

    python benchmarks/calibration_memory.py [--budgets 4 2 1.5] [--method entropy]

Cases: our chunked calibration at each budget, and, for reference, ONNX Runtime's own `quantize_static`
(all batches in one `collect_data`, which is what the issue measured at 2-3.5 GB for histograms). The
model is exported once with the pipeline's own export (recipes/int8.yaml's model and data sections).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
from pathlib import Path
from optimize.recipe import load_recipe, Int8Variant
from optimize import data
from optimize.models import load_model
from optimize.precision import int8
recipe_path, onnx_path, work, method, budget, mode = sys.argv[1:7]
recipe = load_recipe(recipe_path)
loaded = load_model(recipe.model)
names = ["input_ids", "attention_mask", "token_type_ids"]
calib = data.load_dataset("sentences-calib", recipe.data["sentences-calib"], names, loaded.tokenizer_dir).batches
v = Int8Variant(name="q", kind="int8", backend="onnxruntime", calibration="sentences-calib", method=method,
                op_types=["MatMul", "Gather"], memory_budget_gb=float(budget))
base = int8.rss_bytes() / 2**20
int8.reset_peak_rss()
t0 = time.perf_counter()
if mode == "ours":
    _, record = int8.calibrate_ort(Path(onnx_path), v, calib, Path(work), "precision.variants[0]")
else:
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    reader = int8.batch_reader(calib)
    quantize_static(onnx_path, str(Path(work) / "q.onnx"), reader, op_types_to_quantize=["MatMul", "Gather"],
                    calibrate_method={"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
                                      "percentile": CalibrationMethod.Percentile}[method])
    record = {}
print(json.dumps({"base_mb": base, "peak_mb": int8.rss_bytes("VmHWM") / 2**20,
                  "seconds": time.perf_counter() - t0, "chunk_batches": record.get("chunk_batches"),
                  "batches": len(calib)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[4.0, 2.0, 1.5])
    ap.add_argument("--method", default="entropy", choices=["minmax", "entropy", "percentile"])
    opts = ap.parse_args()
    recipe = REPO / "recipes" / "int8.yaml"
    with tempfile.TemporaryDirectory(prefix="optimize-calmem-") as tmp:
        onnx_path = Path(tmp) / "fp32.onnx"
        export = (
            "import sys; from pathlib import Path; from optimize.recipe import load_recipe; "
            "from optimize.models import load_model; from optimize import export; "
            "r = load_recipe(sys.argv[1]); m = load_model(r.model); export.export_onnx(m, r.export, Path(sys.argv[2]))"
        )
        subprocess.run([sys.executable, "-c", export, str(recipe), str(onnx_path)], check=True, capture_output=True)
        print(
            f"cores {os.cpu_count()}; MiniLM fp32.onnx {onnx_path.stat().st_size / 2**20:.0f} MB; method {opts.method}"
        )
        print()
        print("| calibration | budget GB | batches per chunk | process before MB | peak RSS MB | under budget | s |")
        print("|---|---|---|---|---|---|---|")
        cases = [("ours", b) for b in opts.budgets] + [("onnxruntime quantize_static", 0.0)]
        all_under = True
        for mode, budget in cases:
            work = Path(tmp) / f"w-{mode[:4]}-{budget}"
            work.mkdir()
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(recipe),
                    str(onnx_path),
                    str(work),
                    opts.method,
                    str(budget or 64),
                    "ours" if mode == "ours" else "ort",
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"| {mode} | {budget or '-'} | - | - | - | failed: {tail} | - |")
                all_under = all_under and not budget
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            under = "yes" if budget and r["peak_mb"] < budget * 1024 else ("-" if not budget else "NO")
            all_under = all_under and under != "NO"
            print(
                f"| {mode} | {budget or '-'} | {r['chunk_batches'] or r['batches']} of {r['batches']} | "
                f"{r['base_mb']:.0f} | {r['peak_mb']:.0f} | {under} | {r['seconds']:.0f} |"
            )

    sys.exit(0 if all_under else 1)


if __name__ == "__main__":
    main()
