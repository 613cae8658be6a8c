"""INT8 quantisation of an FP32 ONNX model, three backends:

- `modelopt`: ModelOpt ONNX PTQ → explicit Q/DQ for TensorRT, calibrated on the CPU through ONNX Runtime;
- `onnxruntime`: `quantize_static` (QDQ or QOperator) for CPU targets. We calibrate ourselves with ONNX
  Runtime's calibrators, streaming the data in chunks that fit the memory budget and exposing the
  histogram bin count, then hand the ranges to `quantize_static` as a calibration cache (so fallback
  trials reuse one calibration);
- `onnxruntime-dynamic`: `quantize_dynamic` (weights INT8, activations quantised at run time).

Calibration data is mandatory for the static backends: nothing here ever makes up inputs.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimize.child import run_python
from optimize.errors import RecipeError, RuntimeMissingError, StageError, first_line
from optimize.files import write_json, write_npz, write_with
from optimize.lazy import lazy
from optimize.onnx_files import (
    atomic_onnx_path,
    copy_onnx,
    onnx_files,
    onnx_sha256,
    uses_external_data,
    write_onnx_with,
)
from optimize.precision.fp16 import run_every_node
from optimize.progress import NO_PROGRESS, Progress
from optimize.recipe import Int8Variant

onnx = lazy("onnx")
ortq = lazy("onnxruntime.quantization")
ortq_calibrate = lazy("onnxruntime.quantization.calibrate")
ortq_registry = lazy("onnxruntime.quantization.registry")
ortq_nbits = lazy("onnxruntime.quantization.matmul_nbits_quantizer")
mo_quantization = lazy("modelopt.onnx.quantization")

MODELOPT_INSTALL = "pip install 'optimize[modelopt]'"
# ModelOpt calibration runs in a child process, stopped after this long: a hung calibration must not hold a CI
# job forever. No recipe setting: six hours is past any calibration the memory budget allows on one machine
# (per-node calibration of a large model included), so only a hang reaches it.
MODELOPT_TIMEOUT_S = 6 * 3600
# Op types whose presence marks a quantised graph (Q/DQ, integer and QLinear kernels).
QUANT_OPS = re.compile(
    r"^(QuantizeLinear|DequantizeLinear|DynamicQuantizeLinear|.*Integer|QLinear.*|Q[A-Z]\w*|MatMulNBits)$"
)

np = lazy("numpy")


@dataclass
class Int8Result:
    """What one quantisation did."""

    backend: str
    method: str | None
    seconds: float
    nodes_excluded: list[str]
    quant_ops: dict[str, int]
    calibration: dict[str, Any] = field(default_factory=dict)
    fusion: dict[str, int] | None = None

    def record(self) -> dict[str, Any]:
        """JSON-able form for the stage record."""
        return {
            "backend": self.backend,
            "method": self.method,
            "seconds": round(self.seconds, 3),
            "nodes_excluded": list(self.nodes_excluded),
            "quant_ops": dict(self.quant_ops),
            "calibration": dict(self.calibration),
            "fusion": self.fusion,
        }


def modelopt_quantization_available() -> str | None:
    """None when ModelOpt's ONNX PTQ imports, else why not."""
    if importlib.util.find_spec("modelopt") is None:
        return "nvidia-modelopt is not installed"
    try:
        mo_quantization.quantize  # noqa: B018 (the first attribute read imports it)
    except Exception as e:  # nvidia-modelopt without its ONNX dependencies installs, but does not import
        return f"modelopt.onnx.quantization does not import ({first_line(e)})"
    return None


def require_backend(variant: Int8Variant, where: str) -> None:
    """Exit 4 with the install command when the variant's backend cannot run here."""
    if variant.backend == "modelopt":
        reason = modelopt_quantization_available()
        if reason:
            raise RuntimeMissingError(f"{where}.backend: modelopt: {reason}; {MODELOPT_INSTALL}")


# --- data -----------------------------------------------------------------------------------------


def _reader_class() -> type:
    class BatchReader(ortq.CalibrationDataReader):
        """ONNX Runtime / ModelOpt calibration reader over in-memory batches (rewindable, rangeable). A batch
        counts as calibrated on `progress` when the calibrator asks for the next one (it runs them in order)."""

        def __init__(self, batches: list[dict[str, np.ndarray]], progress: Progress = NO_PROGRESS) -> None:
            self.batches, self.progress = batches, progress
            self.start, self.end, self.pos, self.counted = 0, len(batches), 0, 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.pos > self.counted:  # the batch handed out last has been run
                self.progress.advance(self.pos - self.counted)
                self.counted = self.pos
            if self.start + self.pos >= self.end:
                return None
            self.pos += 1
            return self.batches[self.start + self.pos - 1]

        def get_first(self) -> dict[str, np.ndarray]:
            return self.batches[self.start]

        def rewind(self) -> None:
            self.pos = self.counted = 0

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.start, self.end, self.pos, self.counted = start_index, min(end_index, len(self.batches)), 0, 0

    return BatchReader


def batch_reader(batches: list[dict[str, np.ndarray]], progress: Progress = NO_PROGRESS) -> Any:
    """A calibration data reader over `batches` (an ONNX Runtime CalibrationDataReader) that counts the
    batches calibrated on `progress`."""
    return _reader_class()(batches, progress)


# --- graph facts ----------------------------------------------------------------------------------


def graph_names(model_path: Path) -> tuple[list[str], list[str]]:
    """Node names and op types of a model (without loading its weights)."""
    model = onnx.load(str(model_path), load_external_data=False)
    return [n.name for n in model.graph.node], sorted({n.op_type for n in model.graph.node})


def check_exclusions(model_path: Path, nodes: list[str], op_types: list[str], where: str) -> None:
    """An exclusion that names no node / op type of the graph is a recipe error listing near matches."""
    names, types = graph_names(model_path)
    known = set(names)
    for field_name, wanted, pool in (("nodes_to_exclude", nodes, known), ("op_types_to_exclude", op_types, set(types))):
        missing = [w for w in wanted if w not in pool]
        if missing:
            what = "node" if field_name == "nodes_to_exclude" else "op type"
            near = difflib.get_close_matches(missing[0], sorted(pool), n=3, cutoff=0.5)
            hint = f"; near matches: {', '.join(near)}" if near else f"; the graph has {len(pool)} {what}s"
            raise RecipeError(
                f"{where}.{field_name}: no {what} {missing[0]!r} in {model_path.name}{hint}"
                + (f" ({len(missing)} unknown in all)" if len(missing) > 1 else "")
            )


def candidate_op_types(variant: Int8Variant) -> set[str]:
    """The op types the variant's quantiser touches: the recipe's `op_types`, else the backend's defaults."""
    if variant.op_types:
        return set(variant.op_types)
    if variant.backend == "onnxruntime-dynamic":
        return set(ortq_registry.IntegerOpsRegistry)
    if variant.backend == "onnxruntime" and variant.quant_format == "qoperator":
        return set(ortq_registry.QLinearOpsRegistry)
    return set(ortq_registry.QDQRegistry)


def quant_op_counts(model: Any) -> dict[str, int]:
    """How many quantisation-related nodes of each op type a model holds."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node if QUANT_OPS.match(n.op_type)).items()))


# --- memory ---------------------------------------------------------------------------------------


def rss_bytes(key: str = "VmRSS") -> int:
    """This process's resident set (or its peak, key=VmHWM) in bytes; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux `clear_refs` 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def plan_chunks(
    per_batch_bytes: int, batches: int, budget_bytes: float, base_bytes: int, where: str, dataset: str
) -> int:
    """Batches per calibration chunk so that the held activations stay inside the budget.

    ONNX Runtime's calibrators hold every batch's activations of one `collect_data` call (and copy them once
    when merging); so a chunk of k batches needs about 2 × k × per-batch bytes on top of what the process
    already holds.
    """
    room = budget_bytes - base_bytes
    need_one = 2 * per_batch_bytes
    if room < need_one:
        raise StageError(
            f"{where}: calibrating one batch of data.{dataset} needs about {need_one / 2**30:.2f} GB of activations "
            f"beside the {base_bytes / 2**30:.2f} GB already in use, over memory_budget_gb "
            f"({budget_bytes / 2**30:.2f} GB); raise {where}.memory_budget_gb or lower data.{dataset}.batch_size"
        )
    return max(1, min(batches, int(room // need_one)))


def chunk_ranges(batches: list[dict[str, np.ndarray]], size: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most `size` consecutive batches of one shape.

    ONNX Runtime's histogram collectors stack a chunk's arrays and fail when their shapes differ (a short
    last batch, or padding to the longest sample), so a chunk never mixes shapes.
    """
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(batches) + 1):
        if (
            i == len(batches)
            or i - start >= size
            or any(v.shape != batches[start][k].shape for k, v in batches[i].items())
        ):
            out.append((start, i))
            start = i
    return out


# --- backends -------------------------------------------------------------------------------------


def quantize(
    src: Path,
    dest: Path,
    variant: Int8Variant,
    calibration: list[dict[str, np.ndarray]],
    work_dir: Path,
    where: str,
    extra_exclusions: tuple[str, ...] | list[str] = (),
    only: str | None = None,
    progress: Progress = NO_PROGRESS,
) -> Int8Result:
    """Quantise `src` (already fused where the recipe asks) to `dest` atomically.

    `calibration` holds the calibration batches (empty for onnxruntime-dynamic); `work_dir` keeps what
    trials share (the ONNX Runtime calibration cache). `extra_exclusions` are the fallback's nodes; `only`
    quantises that one node alone (the fallback's sensitivity ranking). `progress` counts the calibration
    batches where this call calibrates (the `onnxruntime` backend, once per calibration key).
    """
    require_backend(variant, where)
    excluded = list(dict.fromkeys([*variant.nodes_to_exclude, *extra_exclusions]))
    if variant.backend != "onnxruntime-dynamic" and not calibration:
        raise RecipeError(f"{where}.calibration: no calibration batches; INT8 is never calibrated on random data")
    t0 = time.perf_counter()
    calib_record: dict[str, Any] = {}
    try:
        if variant.backend == "onnxruntime-dynamic":
            _ort_dynamic(src, dest, variant, excluded, only)
        elif variant.backend == "onnxruntime":
            calib_record = _ort_static(src, dest, variant, calibration, work_dir, excluded, where, only, progress)
        else:
            calib_record = _modelopt(src, dest, variant, calibration, work_dir, excluded, where, only)
    except (RecipeError, StageError, RuntimeMissingError):
        raise
    except Exception as e:
        raise StageError(f"{where}: INT8 quantisation with {variant.backend} failed: {first_line(e)}") from None
    if variant.exclude_as == "int8-weights" and excluded and not only:
        _weights_only(dest, excluded)
    model = onnx.load(str(dest), load_external_data=False)
    counts = quant_op_counts(model)
    if not counts:
        raise StageError(
            f"{where}: {variant.backend} quantised nothing (no Q/DQ or integer ops in the output); "
            "check op_types / op_types_to_exclude"
        )
    return Int8Result(
        variant.backend,
        variant.calibration_method,
        time.perf_counter() - t0,
        excluded,
        counts,
        calib_record,
    )


def _weights_only(path: Path, nodes: list[str]) -> None:
    """Rewrite the named MatMul nodes (constant weights) of `path` as INT8-weight MatMulNBits, in place.

    accuracy_level 4 lets ONNX Runtime quantise the activations per block of 32 values at run time (int8
    compute); with the default (float compute) batch-1 MiniLM ran 1.37x slower than FP32, with 4 at 0.72x.
    """
    external = uses_external_data(path)
    quantizer = ortq_nbits.MatMulNBitsQuantizer(
        onnx.load(str(path)), bits=8, block_size=32, is_symmetric=True, accuracy_level=4, nodes_to_include=list(nodes)
    )
    quantizer.process()
    write_onnx_with(path, lambda tmp: quantizer.model.save_model_to_file(str(tmp), use_external_data_format=external))


def _ort_method(name: str | None) -> Any:
    return {
        "minmax": ortq.CalibrationMethod.MinMax,
        "entropy": ortq.CalibrationMethod.Entropy,
        "percentile": ortq.CalibrationMethod.Percentile,
    }[name]


def sample_count(batches: list[dict[str, np.ndarray]]) -> int:
    """Samples in a list of batches (the first axis of each batch's first array)."""
    return int(sum(len(next(iter(b.values()))) for b in batches))


def _quant_type(name: str) -> Any:
    return ortq.QuantType.QInt8 if name == "int8" else ortq.QuantType.QUInt8


def _ort_dynamic(src: Path, dest: Path, variant: Int8Variant, excluded: list[str], only: str | None) -> None:
    def save(tmp: Path) -> None:
        ortq.quantize_dynamic(
            str(src),
            str(tmp),
            op_types_to_quantize=list(variant.op_types) or None,
            per_channel=variant.per_channel,
            reduce_range=variant.reduce_range,
            weight_type=_quant_type(variant.weight_type),
            nodes_to_quantize=[only] if only else None,
            nodes_to_exclude=[*excluded, *_nodes_of_types(src, variant.op_types_to_exclude)],
            use_external_data_format=uses_external_data(src),
        )

    write_onnx_with(dest, save)


def _nodes_of_types(model_path: Path, op_types: list[str]) -> list[str]:
    if not op_types:
        return []

    model = onnx.load(str(model_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in set(op_types)]


def calibrate_ort(
    src: Path,
    variant: Int8Variant,
    calibration: list[dict[str, np.ndarray]],
    work_dir: Path,
    where: str,
    progress: Progress = NO_PROGRESS,
) -> tuple[Path, dict[str, Any]]:
    """Calibrate `src` with ONNX Runtime's calibrator for the variant's method, streaming chunks of batches
    that fit `memory_budget_gb`; returns the calibration cache (JSON ranges) and what it did. `progress`
    counts the batches calibrated."""
    cache = work_dir / "calibration.json"
    method = variant.calibration_method
    extra: dict[str, Any] = {}
    if method == "entropy":
        extra = {"num_bins": variant.bins or 2048, "num_quantized_bins": variant.quantized_bins}
    elif method == "percentile":
        extra = {"num_bins": variant.bins or 2048, "percentile": variant.percentile}
    work_dir.mkdir(parents=True, exist_ok=True)
    peak_reset = reset_peak_rss()
    t0 = time.perf_counter()
    augmented = work_dir / "augmented.onnx"
    calibrator = ortq_calibrate.create_calibrator(
        src,
        list(variant.op_types) or None,
        augmented_model_path=str(augmented),
        calibrate_method=_ort_method(method),
        # a source over 2 GB makes an augmented model over 2 GB (its data file gets a uuid name)
        use_external_data_format=uses_external_data(src),
        providers=["CPUExecutionProvider"],
        extra_options=extra,
    )
    try:
        session = calibrator.infer_session
        # Size one batch's held activations by running it once through the augmented model.
        per_batch = sum(v.nbytes for v in session.run(None, calibration[0]) if isinstance(v, np.ndarray))
        chunk = plan_chunks(
            per_batch,
            len(calibration),
            variant.memory_budget_gb * 2**30,
            rss_bytes(),
            where,
            variant.calibration or "?",
        )
        progress.start(len(calibration), f"calibration ({method})")
        reader = batch_reader(calibration, progress)
        for start, end in chunk_ranges(calibration, chunk):
            reader.set_range(start, end)
            calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    finally:
        del calibrator
        leftovers = set(work_dir.glob("augmented*"))
        if augmented.is_file():
            leftovers.update(onnx_files(augmented))
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
    write_with(cache, lambda tmp: ortq_calibrate.save_tensors_data(ranges, tmp))
    record = {
        "method": method,
        **{k: v for k, v in extra.items() if k != "percentile"},
        **({"percentile": variant.percentile} if method == "percentile" else {}),
        "batches": len(calibration),
        "samples": sample_count(calibration),
        "chunk_batches": chunk,
        "activation_mb_per_batch": round(per_batch / 2**20, 1),
        "memory_budget_gb": variant.memory_budget_gb,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if peak_reset:
        record["peak_rss_mb"] = round(rss_bytes("VmHWM") / 2**20, 1)
    return cache, record


def calibration_key(src: Path, variant: Int8Variant, calibration: list[dict[str, np.ndarray]]) -> str:
    """Hash of what ONNX Runtime calibration ranges depend on: the model, the data and the method's options."""
    h = hashlib.sha256(onnx_sha256(src).encode())  # the weights too, where they are in external data
    options = [variant.calibration_method, variant.bins, variant.quantized_bins, variant.percentile, variant.op_types]
    h.update(json.dumps(options).encode())
    for batch in calibration:
        for name in sorted(batch):
            arr = np.ascontiguousarray(batch[name])
            h.update(f"{name}:{arr.dtype}:{arr.shape}".encode())
            h.update(arr.tobytes())
    return h.hexdigest()[:16]


def _ort_static(
    src: Path,
    dest: Path,
    variant: Int8Variant,
    calibration: list[dict[str, np.ndarray]],
    work_dir: Path,
    excluded: list[str],
    where: str,
    only: str | None,
    progress: Progress = NO_PROGRESS,
) -> dict[str, Any]:
    # One calibration serves every fallback trial; the file name carries what the ranges depend on.
    key = calibration_key(src, variant, calibration)
    cache, record_path = work_dir / f"calibration-{key}.json", work_dir / f"calibration-{key}.record.json"
    if cache.is_file() and record_path.is_file():
        record = {**json.loads(record_path.read_text()), "reused": True}
    else:
        ranges_path, record = calibrate_ort(src, variant, calibration, work_dir, where, progress)
        os.replace(ranges_path, cache)
        write_json(record_path, record)

    def save(tmp: Path) -> None:
        ortq.quantize_static(
            str(src),
            str(tmp),
            None,
            quant_format=ortq.QuantFormat.QDQ if variant.quant_format == "qdq" else ortq.QuantFormat.QOperator,
            op_types_to_quantize=list(variant.op_types) or None,
            per_channel=variant.per_channel,
            reduce_range=variant.reduce_range,
            activation_type=_quant_type(variant.activation_type),
            weight_type=_quant_type(variant.weight_type),
            nodes_to_quantize=[only] if only else None,
            nodes_to_exclude=[*excluded, *_nodes_of_types(src, variant.op_types_to_exclude)],
            calibrate_method=_ort_method(variant.calibration_method),
            calibration_cache_path=str(cache),
            use_external_data_format=uses_external_data(src),
        )

    write_onnx_with(dest, save)
    return record


def _modelopt(
    src: Path,
    dest: Path,
    variant: Int8Variant,
    calibration: list[dict[str, np.ndarray]],
    work_dir: Path,
    excluded: list[str],
    where: str,
    only: str | None,
) -> dict[str, Any]:
    """ModelOpt PTQ in a child process: ModelOpt patches ONNX Runtime's calibrators process-wide (its own
    collect/compute functions replace ONNX Runtime's), which would change what the `onnxruntime` backend
    computes later in the same run. The child also gives calibration a peak RSS of its own."""
    work_dir.mkdir(parents=True, exist_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # ModelOpt writes intermediates beside its input, and shape inference into the input file itself
    staged = work_dir / "modelopt-input.onnx"
    if not staged.exists():
        copy_onnx(src, staged)
    data = work_dir / "modelopt-calibration.npz"
    write_npz(data, {f"{i:05d}/{k}": v for i, b in enumerate(calibration) for k, v in b.items()})
    # ModelOpt names its external data `<out>_data`; atomic_onnx_path renames it on the way to `dest`
    with atomic_onnx_path(dest) as out:
        args = {
            "src": str(staged.resolve()),
            "out": str(out.resolve()),
            "data": str(data.resolve()),
            "result": str((work_dir / "modelopt-result.json").resolve()),
            "where": where,
            "dataset": variant.calibration,
            "method": variant.calibration_method,
            "op_types": list(variant.op_types) or None,
            "op_types_to_exclude": list(variant.op_types_to_exclude) or None,
            "nodes_to_exclude": [f"{re.escape(n)}\\Z" for n in excluded] or None,  # ModelOpt takes regexes
            "nodes_to_quantize": [f"{re.escape(only)}\\Z"] if only else None,
            "high_precision_dtype": variant.high_precision_dtype,
            "budget_bytes": variant.memory_budget_gb * 2**30,
            # `max`: ModelOpt's MinMax collector reduces every batch as it comes (ort_patching), holding ranges only
            "per_batch_bytes": 0 if variant.calibration_method == "max" else _activation_bytes(src, calibration[0]),
        }
        args_path = work_dir / "modelopt-args.json"
        write_json(args_path, args)
        Path(args["result"]).unlink(missing_ok=True)
        try:
            # cwd: ModelOpt drops uuid-named external-data files (tens of MB) into the working directory
            proc = run_python(
                ["-m", "optimize.precision.int8", str(args_path.resolve())],
                timeout_s=MODELOPT_TIMEOUT_S,
                on_timeout=f"{where}: ModelOpt calibration took over {MODELOPT_TIMEOUT_S} s and was stopped; "
                f"calibrate on fewer samples (data.{variant.calibration}.samples)",
                cwd=work_dir,
                capture_stdout=False,
                echo_stderr=True,  # into the stage's log
            )
            result = json.loads(Path(args["result"]).read_text()) if Path(args["result"]).is_file() else {}
            if "error" in result:
                raise StageError(result["error"])
            if proc.returncode != 0 or not result:
                raise proc.error(f"{where}: ModelOpt quantisation failed")
        finally:
            data.unlink(missing_ok=True)
    return {
        **result,
        "batches": len(calibration),
        "samples": sample_count(calibration),
        "memory_budget_gb": variant.memory_budget_gb,
    }


def _modelopt_child(args_path: Path) -> int:
    """The child process of `_modelopt`: calibrate and quantise, write the record (or the error) as JSON."""
    args = json.loads(args_path.read_text())
    with np.load(args["data"]) as npz:
        batches: dict[int, dict[str, np.ndarray]] = {}
        for key in npz.files:
            index, name = key.split("/", 1)
            batches.setdefault(int(index), {})[name] = npz[key]
    calibration = [batches[i] for i in sorted(batches)]
    # ModelOpt hands the whole calibration set to ONNX Runtime's calibrator at once; past the budget it
    # calibrates node by node (its documented low-memory mode, slower).
    per_batch, room = args["per_batch_bytes"], args["budget_bytes"] - rss_bytes()
    per_node = 2 * per_batch * len(calibration) > room
    if per_node and 2 * per_batch > room:
        where, dataset = args["where"], args["dataset"]
        write_json(
            Path(args["result"]),
            {
                "error": f"{where}: calibrating one batch of data.{dataset} needs about {2 * per_batch / 2**30:.2f} GB "
                f"beside ModelOpt's {rss_bytes() / 2**30:.2f} GB, over memory_budget_gb "
                f"({args['budget_bytes'] / 2**30:.2f} GB); raise {where}.memory_budget_gb or lower "
                f"data.{dataset}.batch_size"
            },
        )
        return 0
    shapes = None
    if per_node:  # per-node calibration needs static shapes
        shapes = ",".join(f"{k}:{'x'.join(str(d) for d in v.shape)}" for k, v in calibration[0].items())
    peak_reset = reset_peak_rss()
    t0 = time.perf_counter()
    mo_quantization.quantize(
        onnx_path=args["src"],
        quantize_mode="int8",
        calibration_data_reader=batch_reader(calibration),
        calibration_method=args["method"],
        calibration_eps=["cpu"],
        calibration_shapes=shapes,
        op_types_to_quantize=args["op_types"],
        op_types_to_exclude=args["op_types_to_exclude"],
        nodes_to_exclude=args["nodes_to_exclude"],
        nodes_to_quantize=args["nodes_to_quantize"],
        high_precision_dtype=args["high_precision_dtype"],
        calibrate_per_node=per_node,
        output_path=args["out"],
        log_level="WARNING",
    )
    record = {
        "method": args["method"],
        "per_node": per_node,
        "activation_mb_per_batch": round(per_batch / 2**20, 1),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if peak_reset:
        record["peak_rss_mb"] = round(rss_bytes("VmHWM") / 2**20, 1)
    write_json(Path(args["result"]), record)
    return 0


def _activation_bytes(model_path: Path, feeds: dict[str, np.ndarray]) -> int:
    """Bytes of every float intermediate of one batch (an upper bound of what a calibrator holds for it)."""
    values, _ = run_every_node(model_path, feeds)
    return sum(v.nbytes for v in values.values() if isinstance(v, np.ndarray) and v.dtype.kind == "f")


if __name__ == "__main__":
    raise SystemExit(_modelopt_child(Path(sys.argv[1])))
