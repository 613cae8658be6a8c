"""FP16 conversion: ModelOpt AutoCast when installed, ONNX Runtime's float16 converter otherwise.

Every converted model is loaded and run on real inputs before the stage counts as done; NaN/Inf in
its outputs fails the stage and names the op types that first produced them.
"""

from __future__ import annotations

import importlib.util
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optimize.errors import RuntimeMissingError, StageError
from optimize.files import write_with
from optimize.recipe import Fp16Variant


@dataclass(frozen=True)
class Fp16Result:
    """What the FP16 stage did."""

    backend: str
    seconds: float
    fp16_initializers: int
    fp32_initializers: int

    def record(self) -> dict[str, Any]:
        """JSON-able form for the stage record."""
        return {
            "backend": self.backend,
            "seconds": round(self.seconds, 3),
            "fp16_initializers": self.fp16_initializers,
            "fp32_initializers": self.fp32_initializers,
        }


def modelopt_available() -> bool:
    """True when ModelOpt's ONNX AutoCast can be imported."""
    return importlib.util.find_spec("modelopt") is not None


def choose_backend(variant: Fp16Variant) -> str:
    """Resolve `auto` to `modelopt` or `onnxruntime`; a backend asked for by name must be installed."""
    if variant.backend == "auto":
        return "modelopt" if modelopt_available() else "onnxruntime"
    if variant.backend == "modelopt" and not modelopt_available():
        raise RuntimeMissingError(
            f"precision.variants[{variant.name}].backend: modelopt is not installed; "
            "pip install 'optimize[modelopt]' or use backend: onnxruntime"
        )
    return variant.backend


def convert_fp16(src: Path, dest: Path, variant: Fp16Variant) -> Fp16Result:
    """Convert the FP32 ONNX at `src` to FP16 at `dest` (atomically) with the variant's options."""
    import onnx

    backend = choose_backend(variant)
    t0 = time.perf_counter()
    try:
        if backend == "modelopt":
            from modelopt.onnx.autocast import convert_to_mixed_precision

            model = convert_to_mixed_precision(
                onnx_path=str(src),
                low_precision_type="fp16",
                keep_io_types=variant.keep_io_types,
                nodes_to_exclude=list(variant.node_block_list) or None,
                op_types_to_exclude=list(variant.op_block_list) or None,
                providers=["cpu"],
            )
        else:
            from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

            model = convert_float_to_float16(
                onnx.load(str(src)),
                keep_io_types=variant.keep_io_types,
                op_block_list=[*DEFAULT_OP_BLOCK_LIST, *variant.op_block_list],
                node_block_list=list(variant.node_block_list) or None,
            )
    except Exception as e:
        raise StageError(f"precision.{variant.name}: FP16 conversion with {backend} failed: {_first_line(e)}") from None
    write_with(dest, lambda tmp: onnx.save(model, str(tmp)))
    kinds = Counter(t.data_type for t in model.graph.initializer)
    return Fp16Result(
        backend,
        time.perf_counter() - t0,
        kinds.get(onnx.TensorProto.FLOAT16, 0),
        kinds.get(onnx.TensorProto.FLOAT, 0),
    )


def check_finite(model_path: Path, outputs: dict[str, np.ndarray], feeds: dict[str, np.ndarray], where: str) -> None:
    """Fail the stage when an output holds NaN/Inf, naming the op types that first produced non-finite values."""
    bad = [name for name, arr in outputs.items() if arr.dtype.kind == "f" and not np.all(np.isfinite(arr))]
    if not bad:
        return
    culprits = nonfinite_op_types(model_path, feeds)
    named = ", ".join(f"{op} ({node})" for op, node in culprits[:5]) or "unknown nodes"
    raise StageError(
        f"{where}: output(s) {', '.join(bad)} contain NaN/Inf in FP16; first produced by {named}; "
        "keep those op types in FP32 with op_block_list"
    )


def nonfinite_op_types(model_path: Path, feeds: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """(op type, node name) of the first nodes whose outputs are non-finite while all their inputs are finite."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    graph_outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for out in node.output:
            if out and out not in graph_outputs:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(out))
                graph_outputs.add(out)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, feeds)))

    def finite(name: str) -> bool:
        v = values.get(name)
        return v is None or not (isinstance(v, np.ndarray) and v.dtype.kind == "f") or bool(np.all(np.isfinite(v)))

    return [
        (node.op_type, node.name)
        for node in model.graph.node
        if any(not finite(o) for o in node.output) and all(finite(i) for i in node.input if i)
    ]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
