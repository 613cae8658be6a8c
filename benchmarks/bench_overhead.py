"""Overhead of optimize's benchmark protocol against a bare ONNX Runtime loop, on MiniLM.

In one process, per shape, p50 latency of the FP32 MiniLM measured three ways:

  (a) bare      a `session.run` loop on a plain InferenceSession built with the runner's own
                SessionOptions (same threads, no spinning, ...), timed with perf_counter_ns
  (b) protocol  optimize.bench.time_interleaved with only the FP32 runner
  (c) full      optimize.bench.time_interleaved with FP32 and the FP16 variant, interleaved
                (what `optimize run` does); FP32's and FP16's p50 are both reported

After the recipe's warm-up of every session, short blocks run in rounds, the order of (a)/(b)/(c)
rotating each round, so the drift of a noisy machine falls on all three alike; each block starts with
one untimed run (the caches were just used by another session). p50s are over the samples of every
round. Bar: (b)'s p50 within 5% of (a)'s.

A last row times a one-op (Identity) model the same way: there session.run costs microseconds, so
(b) - (a) shows the protocol's own per-run cost in absolute terms.

    python benchmarks/bench_overhead.py [--rounds 20] [--block 5]

The model is exported with recipes/fp16.yaml (extends bases/minilm.yaml): the same export, FP16
variant, evaluation data (first batch, cropped/tiled per shape) and shapes as `optimize run`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BAR = 0.05


def bare_block(session: Any, names: list[str], feeds: dict[str, np.ndarray], warmup: int, iterations: int):
    """(a): the loop a user would write around session.run."""
    for _ in range(warmup):
        session.run(names, feeds)
    clock = time.perf_counter_ns
    samples = []
    for _ in range(iterations):
        t0 = clock()
        session.run(names, feeds)
        samples.append(clock() - t0)
    return samples


def p50_ms(samples_ns: list[int]) -> float:
    return float(np.percentile(np.asarray(samples_ns, dtype=np.float64) / 1e6, 50))


def rounds_of_blocks(bench: Any, bare: Any, names: list[str], r32: Any, r16: Any, feeds: Any, rounds: int, n: int):
    """Per round one block each of (a), (b), (c), in rotating order; samples pooled over the rounds."""
    got: dict[str, list[int]] = {"a": [], "b": [], "c32": [], "c16": []}
    per_round = []
    blocks = ["a", "b", "c"]
    for r in range(rounds):
        this: dict[str, list[int]] = {}
        for blk in blocks[r % 3 :] + blocks[: r % 3]:
            if blk == "a":
                this["a"] = bare_block(bare, names, feeds, 1, n)
            elif blk == "b":
                this["b"] = bench.time_interleaved({"fp32": r32}, feeds, 1, n)["fp32"]
            else:
                t = bench.time_interleaved({"fp32": r32, "fp16": r16}, feeds, 1, n)
                this["c32"], this["c16"] = t["fp32"], t["fp16"]
        for k, v in this.items():
            got[k] += v
        per_round.append(p50_ms(this["b"]) / p50_ms(this["a"]))
    return got, per_round


def identity_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "fp16.yaml"))
    ap.add_argument("--rounds", type=int, default=20, help="rounds of (a), (b), (c) blocks per shape")
    ap.add_argument("--block", type=int, default=5, help="timed runs per block")
    opts = ap.parse_args()

    import onnxruntime as ort

    from optimize import bench, data, export
    from optimize.models import load_model
    from optimize.precision import fp16
    from optimize.recipe import load_recipe
    from optimize.runtimes import open_runner

    recipe = load_recipe(opts.recipe)
    b = recipe.benchmark
    variant = recipe.precision.variants[0]
    cpu = ["CPUExecutionProvider"]

    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        t0 = time.perf_counter()
        loaded = load_model(recipe.model)
        input_names = export.input_names_for(loaded, recipe.export)
        fp32_path, fp16_path = Path(tmp) / "fp32.onnx", Path(tmp) / f"{variant.name}.onnx"
        export.export_onnx(loaded, recipe.export, fp32_path)
        conv = fp16.convert_fp16(fp32_path, fp16_path, variant)
        ds_name = recipe.evaluate.dataset
        dataset = data.load_dataset(ds_name, recipe.data[ds_name], input_names, loaded.tokenizer_dir)
        sample = dataset.batches[0]
        del loaded
        prep_s = time.perf_counter() - t0

        runner32 = open_runner("onnxruntime-cpu", fp32_path, b.threads)
        runner16 = open_runner("onnxruntime-cpu", fp16_path, b.threads)
        so = runner32.session.get_session_options()  # the runner's own options, reused for (a)
        bare = ort.InferenceSession(str(fp32_path), sess_options=so, providers=cpu)
        out_names = [o.name for o in bare.get_outputs()]
        identity = identity_model(Path(tmp) / "identity.onnx")
        id_runner = open_runner("onnxruntime-cpu", identity, b.threads)
        id_bare = ort.InferenceSession(str(identity), sess_options=so, providers=cpu)

        print(f"model: {recipe.name} ({recipe.model.package}), FP16 via {conv.backend}; prep {prep_s:.1f} s")
        print(
            f"onnxruntime {ort.__version__}, intra-op threads {so.intra_op_num_threads or 'default'}, "
            f"spinning {so.get_session_config_entry('session.intra_op.allow_spinning')}, "
            f"cores {os.cpu_count()}, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        print(
            f"warm-up {b.warmup} runs per session and shape, then {opts.rounds} rounds of blocks of "
            f"1 untimed + {opts.block} timed runs, order rotating: {opts.rounds * opts.block} samples each\n"
        )
        header = (
            f"{'shape':<22} {'(a) bare':>9} {'(b) proto':>9} {'b/a':>7} {'paired':>7} {'b/a rounds':>13} "
            f"{'(c) fp32':>9} {'c/a':>7} {'(c) fp16':>9} {'fp16 x':>7}  bar"
        )
        print(header + "\n" + "-" * len(header))

        rows: list[tuple[str, Any, Any, Any, list[str], dict[str, int] | None]] = [
            (bench.shape_key(shape), runner32, runner16, bare, out_names, shape) for shape in b.shapes
        ]
        rows.append(("identity (floor) b=1", id_runner, id_runner, id_bare, ["y"], None))
        failed = False
        for i, (label, r32, r16, sess, names, shape) in enumerate(rows):
            if shape is None:
                feeds = {"x": np.ones((1, 8), np.float32)}
            else:
                feeds = bench.make_feeds(r32.inputs, shape, sample, f"benchmark.shapes[{i}]")
            bench.time_interleaved({"fp32": r32, "fp16": r16}, feeds, b.warmup, 0)
            bare_block(sess, names, feeds, b.warmup, 0)
            got, per_round = rounds_of_blocks(bench, sess, names, r32, r16, feeds, opts.rounds, opts.block)
            pa, pb, pc32, pc16 = (p50_ms(got[k]) for k in ("a", "b", "c32", "c16"))
            spread = f"{float(np.median(per_round)):>7.3f} {min(per_round):>6.3f}-{max(per_round):<6.3f}"
            if shape is None:
                extra = f"(b)-(a) = {(pb - pa) * 1000:+.1f} us/run"
                print(f"{label:<22} {pa:>9.4f} {pb:>9.4f} {pb / pa:>7.3f} {spread} {extra:>36}")
                continue
            ok = abs(pb / pa - 1) <= BAR
            failed |= not ok
            print(
                f"{label:<22} {pa:>9.3f} {pb:>9.3f} {pb / pa:>7.3f} {spread} {pc32:>9.3f} {pc32 / pa:>7.3f} "
                f"{pc16:>9.3f} {pc32 / pc16:>7.3f}  {'PASS' if ok else 'FAIL'}"
            )
        for r in (runner32, runner16, id_runner):
            r.close()
    print(
        "\np50 in ms. b/a: protocol over bare (bar: within 5%); paired: median of the per-round ratios;\n"
        "b/a rounds: their range, i.e. how much the machine moved between blocks;\n"
        "c/a: FP32 interleaved with FP16, over bare; fp16 x: FP16 speed-up over FP32 in (c) (>1: faster)."
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
