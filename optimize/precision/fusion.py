"""The fusion stage: ONNX Runtime's transformer optimizer (offline fusions: SkipLayerNormalization, BiasGelu,
Attention, ...) on the FP32 ONNX, one cached unit per model type that some INT8 variant asks for
(`fusion: bert`), shared by every variant that asks for it. The fused model is what those variants quantise."""

from __future__ import annotations

import difflib
from collections import Counter
from pathlib import Path
from typing import Any

from optimize.errors import RecipeError, StageError, first_line
from optimize.lazy import lazy
from optimize.onnx_files import external_data_threshold, onnx_sha256, uses_external_data, write_onnx_with
from optimize.recipe import Int8Variant
from optimize.stage import Context, Done, Stage, Unit, restore, store

ort_optimizer = lazy("onnxruntime.transformers.optimizer")


FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "EmbedLayerNormalization",
    "SkipLayerNormalization",
    "LayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "Gelu",
    "FastGelu",
    "BiasGelu",
)


def fuse(src: Path, dest: Path, model_type: str, where: str) -> dict[str, int]:
    """ONNX Runtime's transformer optimizer (offline fusions) on `src` → `dest`; returns fused op counts."""
    if model_type not in ort_optimizer.MODEL_TYPES:
        near = difflib.get_close_matches(model_type, ort_optimizer.MODEL_TYPES, n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(sorted(ort_optimizer.MODEL_TYPES))}"
        raise RecipeError(f"{where}.fusion: unknown model type {model_type!r}; {hint}")
    try:
        optimized = ort_optimizer.optimize_model(
            str(src), model_type=model_type, num_heads=0, hidden_size=0, opt_level=0
        )
    except Exception as e:
        raise StageError(f"{where}: transformer fusion ({model_type}) failed: {first_line(e)}") from None
    model = optimized.model
    external = uses_external_data(src)  # one file cannot hold a model over 2 GB
    write_onnx_with(dest, lambda tmp: optimized.save_model_to_file(str(tmp), use_external_data_format=external))
    counts = Counter(n.op_type for n in model.graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts.get(op)}


def kinds(ctx: Context) -> dict[str, int]:
    """The model types INT8 variants ask to fuse for, each with the index of the first variant that asks (for
    messages), in recipe order."""
    out: dict[str, int] = {}
    for i, v in enumerate(ctx.recipe.precision.variants):
        if isinstance(v, Int8Variant) and v.fusion and v.fusion not in out:
            out[v.fusion] = i
    return out


def fused_path(ctx: Context, kind: str) -> Path:
    return ctx.run_dir / "work" / f"fused-{kind}.onnx"


def _unit(ctx: Context, kind: str, index: int) -> Unit:
    dest = fused_path(ctx, kind)

    def run(folder: Path) -> dict[str, Any]:
        counts = fuse(ctx.art_dir / "fp32.onnx", dest, kind, f"precision.variants[{index}]")
        store(folder, dest)
        return {"fused": counts, "sha256": onnx_sha256(dest)}

    def use(done: Done) -> None:
        if done.hit:
            restore(done, dest.parent)
        ctx.fused[kind] = done.record["fused"]

    return Unit(
        "fusion",
        kind,
        inputs=ctx.inputs("onnx.fp32"),
        config={"model_type": kind, "external_data_bytes": external_data_threshold()},
        libraries=("onnx", "onnxruntime"),
        code=("precision.fusion",),
        run=run,
        use=use,
        produces=f"onnx.fused-{kind}",
    )


def _finish(ctx: Context, done: list[tuple[Unit, Done]], rec: dict[str, Any]) -> None:
    rec["detail"] = "; ".join(
        f"{kind}: " + ", ".join(f"{n} {op}" for op, n in counts.items()) for kind, counts in ctx.fused.items()
    )


STAGE = Stage(
    "fusion",
    lambda ctx: "ONNX Runtime transformer fusions for " + ", ".join(kinds(ctx)),
    _finish,
    units=lambda ctx: [_unit(ctx, kind, index) for kind, index in kinds(ctx).items()],
    when=lambda ctx: bool(kinds(ctx)),
)
