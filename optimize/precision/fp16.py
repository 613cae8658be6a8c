"""FP16 conversion: ModelOpt AutoCast when installed, ONNX Runtime's float16 converter otherwise.

Every converted model is loaded and run on real inputs before the stage counts as done; NaN/Inf in
its outputs fails the stage and names the op types that first produced them.
"""

from __future__ import annotations

import importlib.util
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimize.errors import RuntimeMissingError, StageError, first_line
from optimize.lazy import lazy
from optimize.onnx_files import external_data_names, save_onnx
from optimize.recipe import Fp16Variant

np = lazy("numpy")

onnx = lazy("onnx")
ort = lazy("onnxruntime")
autocast = lazy("modelopt.onnx.autocast")
ort_float16 = lazy("onnxruntime.transformers.float16")
ort_onnx_model = lazy("onnxruntime.transformers.onnx_model")


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
    if importlib.util.find_spec("modelopt") is None:
        return False
    try:  # nvidia-modelopt without its ONNX dependencies installs, but AutoCast does not import
        autocast.convert_to_mixed_precision  # noqa: B018 (the first attribute read imports AutoCast)
    except Exception:
        return False
    return True


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


def convert_fp16(src: Path, dest: Path, variant: Fp16Variant, reference_dir: Path | None = None) -> Fp16Result:
    """Convert the FP32 ONNX at `src` to FP16 at `dest` (atomically, with external data over the threshold of
    optimize.onnx_files) with the variant's options.

    `reference_dir` holds one .npz per batch of real inputs for AutoCast's range check (modelopt only).
    """
    backend = choose_backend(variant)
    t0 = time.perf_counter()
    try:
        if backend == "modelopt":
            model = autocast.convert_to_mixed_precision(
                onnx_path=str(src),
                low_precision_type="fp16",
                keep_io_types=variant.keep_io_types,
                # AutoCast takes regular expressions matched at the start of a name; ours are whole names
                nodes_to_exclude=[f"{re.escape(n)}\\Z" for n in variant.node_block_list] or None,
                op_types_to_exclude=list(variant.op_block_list) or None,
                calibration_data=str(reference_dir) if reference_dir is not None else None,
                providers=["cpu"],
            )
        else:
            # What OnnxModel.convert_float_to_float16 does: float16.convert_float_to_float16, then remove the
            # Cast pairs FP32 -> FP16 -> FP32 it leaves between blocked nodes (without that, values pass
            # through FP16 between two FP32 ops and overflow there all the same). Given the model's path, the
            # converter runs ONNX shape inference on the file, which works past protobuf's 2 GB (in memory it
            # fails), and loads the external data from beside `src`.
            wrapper = ort_onnx_model.OnnxModel(
                ort_float16.convert_float_to_float16(
                    str(src),
                    keep_io_types=variant.keep_io_types,
                    op_block_list=[*ort_float16.DEFAULT_OP_BLOCK_LIST, *variant.op_block_list],
                    node_block_list=list(variant.node_block_list) or None,
                )
            )
            wrapper.remove_cascaded_cast_nodes()
            wrapper.remove_useless_cast_nodes()
            model = wrapper.model
            # The converter appends its Casts at the end of the node list and leaves value_info of
            # initializers it kept in FP32 typed FP16: the file fails onnx.checker (unsorted graph) and
            # shape inference (type conflict). Sort the nodes; drop value_info of initializers.
            ort_onnx_model.OnnxModel.graph_topological_sort(model.graph, is_deterministic=True)
            initializers = {t.name for t in model.graph.initializer}
            kept = [v for v in model.graph.value_info if v.name not in initializers]
            del model.graph.value_info[:]
            model.graph.value_info.extend(kept)
    except Exception as e:
        raise StageError(f"precision.{variant.name}: FP16 conversion with {backend} failed: {first_line(e)}") from None
    save_onnx(model, dest)
    kinds = Counter(t.data_type for t in model.graph.initializer)
    return Fp16Result(
        backend,
        time.perf_counter() - t0,
        kinds.get(onnx.TensorProto.FLOAT16, 0),
        kinds.get(onnx.TensorProto.FLOAT, 0),
    )


def check_finite(model_path: Path, outputs: dict[str, np.ndarray], feeds: dict[str, np.ndarray], where: str) -> None:
    """Fail the stage when an output holds NaN/Inf, naming the op types that first produced non-finite values.

    The outputs are checked as given and as the graph computes them with every intermediate kept in its own
    type: ONNX Runtime's CPU provider runs FP16 ops that lack a CPU kernel in FP32 and drops the Casts around
    them, which hides an overflow that FP16 kernels (GPUs) produce.
    """
    try:
        values, culprits = run_every_node(model_path, feeds)
    except Exception:  # a graph ONNX Runtime cannot run this way (e.g. sequence-typed values): outputs only
        values, culprits = {}, []
    bad = [name for name, arr in outputs.items() if not _finite(arr) or not _finite(values.get(name))]
    if not bad:
        return
    named = ", ".join(f"{op} ({node})" for op, node in culprits[:5]) or "unknown nodes"
    raise StageError(
        f"{where}: output(s) {', '.join(bad)} contain NaN/Inf in FP16; first produced by {named}; "
        "keep those op types in FP32 with op_block_list"
        + (
            "; after '→ Cast' the value itself exceeds FP16, so block the ops that consume it too"
            if any("→ Cast" in op for op, _ in culprits[:5])
            else ""
        )
    )


def nonfinite_op_types(model_path: Path, feeds: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """(op type, node name) of the first nodes whose outputs are non-finite while all their inputs are finite."""
    return run_every_node(model_path, feeds)[1]


def _finite(v: Any) -> bool:
    """True for anything but a float array holding NaN/Inf."""
    return not (isinstance(v, np.ndarray) and v.dtype.kind == "f") or bool(np.all(np.isfinite(v)))


def run_every_node(
    model_path: Path, feeds: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """Run the unoptimised graph with every node output as a graph output (so each keeps its own type).

    Returns the values by name and the (op type, node name) of the first nodes whose outputs are non-finite
    while all their inputs are finite.
    """
    # Without its weights the graph stays small (a model over 2 GB cannot be passed as bytes); ONNX Runtime
    # reads external data from the model's folder.
    model = onnx.load(str(model_path), load_external_data=False)
    graph_outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for out in node.output:
            if out and out not in graph_outputs:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(out))
                graph_outputs.add(out)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    if external_data_names(model):
        folder = str(Path(model_path).resolve().parent)
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, feeds), strict=True))
    producer = {o: node for node in model.graph.node for o in node.output}
    culprits = []
    for node in model.graph.node:
        if any(not _finite(values.get(o)) for o in node.output) and all(
            _finite(values.get(i)) for i in node.input if i
        ):
            source = producer.get(node.input[0]) if node.op_type == "Cast" and node.input else None
            if source is not None:
                # A converter's Cast to FP16 overflowed: the value came out of range in the op before it.
                culprits.append((f"{source.op_type} → Cast", f"{source.name} → {node.name}"))
            else:
                culprits.append((node.op_type, node.name))
    return values, culprits
