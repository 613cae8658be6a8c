"""What a registered version carries: each passing variant's `registry/<variant>/` folder in the run directory
(the model, sample inputs, golden outputs and their metadata), which `publish` logs as the version's LoggedModel
and `smoke` checks a downloaded version against."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from optimize.files import write_json, write_npz, write_with
from optimize.lazy import lazy
from optimize.onnx_files import copy_onnx
from optimize.recipe import Recipe
from optimize.registry.smoke import ONNX_TARGETS, smoke_record

np = lazy("numpy")


def write_folders(
    run_dir: Path,
    paths: dict[str, Path],
    meta: dict[str, Any],
    verdict: dict[str, Any],
    golden: dict[str, dict[str, np.ndarray]],
    sample: dict[str, np.ndarray],
    recipe: Recipe,
) -> None:
    """What a registered version carries: the model, sample inputs, golden outputs and their metadata.

    `golden` holds each variant's outputs on the sample batch from the first ONNX Runtime target that ran it
    (the caller's order); other ONNX Runtime targets' outputs (`golden/<target>/<variant>.npz`) ship too, as
    `golden_outputs.<target>.npz`, so a smoke check on that target compares like with like. `smoke` records
    the latency budget a smoke check holds the version to (`optimize.registry.smoke.latency_budgets`).
    """
    results = json.loads((run_dir / "metrics.json").read_text())["results"]  # written just before
    for name, status in verdict["variants"].items():
        if status["status"] != "passed":
            continue
        ran = [t for t, r in results[name].items() if "skipped" not in r]
        # The caller's order for `golden`: ONNX Runtime first, its CPU provider first of all.
        ran.sort(key=lambda t: (not t.startswith("onnxruntime-"), t != "onnxruntime-cpu"))
        folder = run_dir / "registry" / name
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / "model.onnx"
        if not dest.exists():  # hard links where possible; an external-data file becomes model.onnx.data
            copy_onnx(paths[name], dest, link=True)
        write_npz(folder / "sample_inputs.npz", sample)
        write_npz(folder / "golden_outputs.npz", golden[name])
        per_target = {ran[0]: "golden_outputs.npz"} if ran else {}
        for t in ran[1:]:
            src = run_dir / "golden" / t / f"{name}.npz"
            if t in ONNX_TARGETS and src.is_file():
                per_target[t] = f"golden_outputs.{t}.npz"
                write_with(folder / per_target[t], lambda tmp, src=src: shutil.copyfile(src, tmp))
        write_json(
            folder / "optimize.json",
            {
                "variant": name,
                "precision": meta[name]["precision"],
                "sha256": meta[name]["sha256"],
                "inputs": list(sample),
                "tolerance": recipe.export.tolerance.model_dump(),
                "recipe": recipe.name,
                "golden_target": ran[0] if ran else None,
                "golden": per_target,
                "smoke": smoke_record(name, paths[name], sample, results[name], recipe.gates, recipe.benchmark.threads),
            },
        )
