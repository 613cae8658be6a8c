"""Smoke check of a registered model version, as a canary stage runs it before and after shifting traffic:
download it, verify its sha256, load it on this machine, compare its outputs on the stored sample with the
stored golden outputs, and time it against the latency budget recorded when it was gated.

The latency budget is written into each registry folder's `optimize.json` (`smoke.latency_budget`, one entry
per target that measured the variant) by `latency_budgets`, when the run is measured:

- the shape timed is the benchmark shape closest to the sample batch (per dynamic axis, by the ratio of
  sizes; a tie goes to the smaller shape), built from the sample inputs as the benchmark built its feeds;
- when the recipe has an absolute gate `latency.p50_ms <= X` (or `<`) covering this variant, this target
  and that shape, the budget is X (the smallest such X): the number the recipe's owner signed up to;
- otherwise it is `smoke.budget_factor` (3.0) × the p50 measured for the variant on that target at that
  shape, and never under `smoke.min_budget_ms` (1 ms): a relative budget catches a wrong provider, thread
  setting or device, not noise, and below a millisecond the host clock on a shared machine is mostly noise.

A version registered before this record existed has no budget: its latency check is reported as skipped.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

from optimize import bench
from optimize.errors import (
    GateFailedError,
    IntegrityError,
    RecipeError,
    RuntimeMissingError,
)
from optimize.files import read_npz
from optimize.lazy import lazy
from optimize.onnx_files import onnx_files, onnx_sha256
from optimize.recipe import TARGETS
from optimize.registry import tags as tag
from optimize.registry.connection import http_status, is_connection_error, session
from optimize.runtimes import DeviceRunner, open_runner, unavailable_reason

np = lazy("numpy")

onnx = lazy("onnx")
mlflow_artifacts = lazy("mlflow.artifacts")
mlflow_exceptions = lazy("mlflow.exceptions")

BUDGET_FACTOR = 3.0
MIN_BUDGET_MS = 1.0
WARMUP = 5
ITERATIONS = 30
# What a version carries (registry/<variant>/ of the run that registered it).
MODEL_FILE = "model.onnx"
SAMPLE_FILE = "sample_inputs.npz"
GOLDEN_FILE = "golden_outputs.npz"
META_FILE = "optimize.json"
# Targets that run the registered ONNX itself; torch runs the source module, TensorRT an engine.
ONNX_TARGETS = ("onnxruntime-cpu", "onnxruntime-cuda")

_URI_FORMS = "models:/NAME@ALIAS or models:/NAME/VERSION"
_ALIAS_URI = re.compile(r"^models:/([^/@]+)@([A-Za-z][\w-]*)$")
_VERSION_URI = re.compile(r"^models:/([^/@]+)/([0-9]+)$")


# --- what the pipeline records for a later smoke check -------------------------------------------


def sample_axis_sizes(model: Path, sample: dict[str, np.ndarray]) -> dict[str, int]:
    """The size the sample batch has along each named (dynamic) axis of the model's inputs."""
    graph = onnx.load(str(model), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    sizes: dict[str, int] = {}
    for value in graph.input:
        arr = sample.get(value.name)
        if value.name in initializers or arr is None:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param and axis < arr.ndim:
                sizes.setdefault(dim.dim_param, int(arr.shape[axis]))
    return sizes


def closest_shape(shapes: list[str], sizes: dict[str, int]) -> str:
    """Of benchmark shape keys (`batch=8,sequence=64`), the one closest to the sample's axis sizes:
    the smallest sum of |log(size / sample size)| over the axes the sample has; ties go to the smaller shape."""

    def parse(key: str) -> dict[str, int]:
        return {k: int(v) for k, v in (part.split("=") for part in key.split(","))}

    def distance(key: str) -> tuple[float, int]:
        shape = parse(key)
        far = sum(abs(math.log(n / sizes[a])) for a, n in shape.items() if a in sizes and sizes[a] > 0 and n > 0)
        return far, math.prod(shape.values())

    return min(shapes, key=distance)


def latency_budgets(
    variant: str,
    results: dict[str, dict[str, Any]],
    gates: list[Any],
    sizes: dict[str, int],
    factor: float = BUDGET_FACTOR,
    floor_ms: float = MIN_BUDGET_MS,
) -> dict[str, dict[str, Any]]:
    """Per target that measured `variant` (`results[target]`, as in metrics.json), the latency budget a
    smoke check holds it to (the rule is in the module docstring): {target: {"shape", "budget_ms",
    "source": "gate"|"measured", "p50_ms", and "check" for a gate}}. Torch targets are left out: they time
    the source module, which a registered version does not carry."""
    out: dict[str, dict[str, Any]] = {}
    for target, result in results.items():
        shapes = result.get("shapes") or {}
        if target.startswith("torch-") or not shapes:
            continue
        key = closest_shape(list(shapes), sizes)
        p50 = float(shapes[key]["p50_ms"])
        budget: dict[str, Any] = {"shape": key, "p50_ms": p50}
        covering = [
            g
            for g in gates
            if g.metric == "latency.p50_ms"
            and g.op in ("<=", "<")
            and (not g.variants or variant in g.variants)
            and g.target in (None, target)
            and (g.shape is None or ",".join(f"{k}={v}" for k, v in g.shape.items()) == key)
        ]
        if covering:
            gate = min(covering, key=lambda g: g.threshold)
            budget.update(budget_ms=gate.threshold, source="gate", check=gate.check)
        else:
            budget.update(budget_ms=max(factor * p50, floor_ms), source="measured")
        out[target] = budget
    return out


def smoke_record(
    variant: str,
    model: Path,
    sample: dict[str, np.ndarray],
    results: dict[str, dict[str, Any]],
    gates: list[Any],
    threads: int | None,
) -> dict[str, Any]:
    """The `smoke` section of a registry folder's optimize.json: the budget rule's parameters, the timing
    protocol and the per-target budgets."""
    return {
        "budget_factor": BUDGET_FACTOR,
        "min_budget_ms": MIN_BUDGET_MS,
        "warmup": WARMUP,
        "iterations": ITERATIONS,
        "threads": threads,
        "latency_budget": latency_budgets(variant, results, gates, sample_axis_sizes(model, sample)),
    }


# --- the smoke check -------------------------------------------------------------------------------


def parse_model_uri(uri: str, command: str = "smoke") -> tuple[str, str | None, int | None]:
    """`models:/NAME@ALIAS` → (NAME, ALIAS, None); `models:/NAME/VERSION` → (NAME, None, VERSION); anything else
    is a RecipeError whose message starts with `command`."""
    if m := _ALIAS_URI.match(uri):
        return m.group(1), m.group(2), None
    if m := _VERSION_URI.match(uri):
        return m.group(1), None, int(m.group(2))
    raise RecipeError(f"{command}: {uri!r} is not a registered model URI; use {_URI_FORMS}")


def smoke(uri: str, *, tracking_uri: str, target: str | None = None) -> dict[str, Any]:
    """Smoke-check the registered model version `uri` (models:/NAME@ALIAS or models:/NAME/VERSION) on this
    machine; raises the OptimizeError whose exit code says what is wrong.

    1. resolve the version and download its artifacts to a temporary folder (bad URI, unknown model, alias
       or version: RecipeError, 2; registry unreachable: 5; credentials refused: 7);
    2. verify model.onnx against the version's `sha256` tag (IntegrityError, 6);
    3. load it on `target`, else on the first target of the version's `target` tag that runs here; a
       target that is asked for and cannot run here, or one for which the version carries no artifact
       (TensorRT: no engine; torch: no source module), is RuntimeMissingError (4), never a fallback;
    4. run the stored sample inputs and compare with the golden outputs recorded for that target (else the
       default ones) within the recorded tolerance, |out − golden| <= atol + rtol·|golden| element-wise;
       a mismatch or a NaN/Inf output is IntegrityError (6), naming the output and the numbers;
    5. time the recorded shape (`WARMUP` untimed runs, then `ITERATIONS` timed, as the benchmark does) and
       compare the p50 with the recorded budget (see the module docstring); over it: GateFailedError (1).
       A version without a recorded budget for the target gets `latency_check: skipped`.

    Returns {"uri", "model", "version", "target", "sha256", "max_abs_error", "worst_output", "golden_target",
    "p50_ms", "budget_ms", "budget_source", "latency_shape", "latency_check": "passed"|"skipped"}.
    """
    name, alias, version = parse_model_uri(uri)
    if target is not None and target not in TARGETS:
        raise RecipeError(f"smoke: --target: unknown target {target!r}; known: {', '.join(TARGETS)}")
    with tempfile.TemporaryDirectory(prefix="optimize-smoke-") as tmp:
        with session(tracking_uri) as client:
            mv = resolve_version(client, uri, tracking_uri)
            tags = dict(mv.tags or {})
            chosen = _choose_target(uri, tags, target)
            folder = download_version(client, mv, Path(tmp), tracking_uri)
        return _check(uri, name, int(mv.version), tags, chosen, folder)


def resolve_version(client: Any, uri: str, tracking_uri: str, command: str = "smoke") -> Any:
    """The ModelVersion `uri` (models:/NAME@ALIAS or models:/NAME/VERSION) names; a bad URI or an unknown model,
    alias or version is a one-line RecipeError (exit 2) starting with `command`."""
    name, alias, version = parse_model_uri(uri, command)
    try:
        model = client.get_registered_model(name)
    except mlflow_exceptions.MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RecipeError(f"{command}: {uri}: no registered model {name!r} in {tracking_uri}") from None
        raise
    if alias is not None:
        aliases = dict(model.aliases or {})
        if alias not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise RecipeError(f"{command}: {uri}: model {name!r} has no alias {alias!r} (its aliases: {known})")
        version = int(aliases[alias])
    try:
        return client.get_model_version(name, str(version))
    except mlflow_exceptions.MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RecipeError(f"{command}: {uri}: model {name!r} has no version {version}") from None
        raise


def _choose_target(uri: str, tags: dict[str, str], asked: str | None) -> str:
    """The target to load the version on: `asked`, else the first of its `target` tag that runs here."""
    fmt = tags.get(tag.FORMAT, "onnx")
    gated = [t for t in tags.get(tag.TARGET, "").split(",") if t]
    if asked is not None:
        why = _carries_nothing_for(asked, fmt) or unavailable_reason(asked)
        if why:
            raise RuntimeMissingError(f"smoke: {uri}: cannot run on {asked}: {why}")
        return asked
    reasons = []
    for t in gated:
        why = _carries_nothing_for(t, fmt) or unavailable_reason(t)
        if why is None:
            return t
        reasons.append(f"{t}: {why}")
    if not gated:
        raise RuntimeMissingError(f"smoke: {uri}: the version has no `target` tag; name one with --target")
    raise RuntimeMissingError(f"smoke: {uri}: none of its targets runs here ({'; '.join(reasons)})")


def _carries_nothing_for(target: str, fmt: str) -> str | None:
    """Why the version carries no artifact `target` can load (None when it does)."""
    if fmt != "onnx":
        return f"the version's format is {fmt!r}; smoke loads ONNX versions"
    if target == "tensorrt":
        return "the version carries no TensorRT engine for this GPU (format onnx); smoke it on onnxruntime-cuda"
    if target.startswith("torch-"):
        return f"{target} runs the source PyTorch module, which a registered version does not carry (format onnx)"
    return None


def download_version(client: Any, mv: Any, dest: Path, tracking_uri: str) -> Path:
    """Download the version's artifacts (its LoggedModel's folder) into `dest`; returns the local folder."""
    location = client.get_model_version_download_uri(mv.name, str(mv.version))
    if location.startswith("models:/"):  # no storage location recorded: ask the LoggedModel for its folder
        location = client.get_logged_model(location.removeprefix("models:/")).artifact_location
    return Path(
        mlflow_artifacts.download_artifacts(artifact_uri=location, dst_path=str(dest), tracking_uri=tracking_uri)
    )


def recorded_recipe(client: Any, mv: Any) -> dict[str, Any] | None:
    """The resolved recipe (recipe.json) logged with the version's MLflow run, as a dict; None when the version has
    no run or the run no readable recipe.json. A registry failure (an HTTP status, a lost connection) raises."""
    if not mv.run_id:
        return None
    with tempfile.TemporaryDirectory(prefix="optimize-recipe-") as tmp:
        try:
            path = Path(client.download_artifacts(mv.run_id, "recipe.json", tmp))
        except Exception as e:  # a run without recipe.json: None; a registry failure is one
            if http_status(e) is not None or is_connection_error(e):
                raise
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None


def verify_sha256(model_file: Path, tags: dict[str, str], where: str) -> str:
    """`model_file`'s sha256 (`onnx_sha256`, external data included), checked against the version's
    `sha256` tag; no tag, a missing external-data file or another hash is IntegrityError (exit 6)."""
    expected = tags.get(tag.SHA256)
    if not expected:
        raise IntegrityError(f"{where}: the version has no sha256 tag; its model.onnx cannot be verified")
    try:
        actual = onnx_sha256(model_file)
    except FileNotFoundError as e:  # its external data is not among the artifacts
        raise IntegrityError(
            f"{where}: its artifacts lack {Path(str(e.filename)).name}, which model.onnx names"
        ) from None
    if actual != expected:
        raise IntegrityError(f"{where}: model.onnx sha256 {actual[:16]}… differs from the version's {expected[:16]}…")
    return actual


def _check(uri: str, name: str, version: int, tags: dict[str, str], target: str, folder: Path) -> dict[str, Any]:
    where = f"smoke: {uri} (version {version})"
    missing = [f for f in (MODEL_FILE, SAMPLE_FILE, GOLDEN_FILE, META_FILE) if not (folder / f).is_file()]
    if not missing:  # model.onnx.data, where the model keeps its weights in external data
        missing = [p.name for p in onnx_files(folder / MODEL_FILE, unreadable_ok=True)[1:] if not p.is_file()]
    if missing:
        raise IntegrityError(f"{where}: its artifacts lack {', '.join(missing)}; it was not registered by optimize")
    actual = verify_sha256(folder / MODEL_FILE, tags, where)
    meta = json.loads((folder / META_FILE).read_text())
    sample = read_npz(folder / SAMPLE_FILE)
    golden_file = meta.get("golden", {}).get(target, GOLDEN_FILE)
    golden_target = target if golden_file != GOLDEN_FILE else meta.get("golden_target")
    if not (folder / golden_file).is_file():
        raise IntegrityError(f"{where}: its artifacts lack {golden_file} (named in optimize.json)")
    golden = read_npz(folder / golden_file)
    tolerance = meta.get("tolerance") or {}
    atol, rtol = float(tolerance.get("atol", 0.0)), float(tolerance.get("rtol", 0.0))
    record = meta.get("smoke") or {}
    budget = (record.get("latency_budget") or {}).get(target)
    with open_runner(target, folder / MODEL_FILE, record.get("threads")) as runner:
        outputs = runner.run(sample)
        max_abs, worst = compare_with_golden(outputs, golden, atol, rtol, f"{where} on {target}")
        if budget is not None:
            shape = {k: int(v) for k, v in (p.split("=") for p in budget["shape"].split(","))}
            feeds = bench.make_feeds(runner.inputs, shape, sample, f"{META_FILE}: smoke.latency_budget.{target}.shape")
        else:
            feeds = sample
        p50 = time_p50(runner, feeds, int(record.get("warmup", WARMUP)), int(record.get("iterations", ITERATIONS)))
    result: dict[str, Any] = {
        "uri": uri,
        "model": name,
        "version": version,
        "target": target,
        "sha256": actual,
        "max_abs_error": max_abs,
        "worst_output": worst,
        "golden_target": golden_target,
        "p50_ms": p50,
        "budget_ms": None,
        "budget_source": None,
        "latency_shape": None,
        "latency_check": "skipped",
    }
    if budget is None:
        return result
    result.update(budget_ms=float(budget["budget_ms"]), budget_source=budget["source"], latency_shape=budget["shape"])
    if p50 > result["budget_ms"]:
        basis = (
            f"the recipe's gate `{budget['check']}`"
            if budget["source"] == "gate"
            else f"{record.get('budget_factor', BUDGET_FACTOR):g} × the gated p50 {budget['p50_ms']:.3g} ms, "
            f"at least {record.get('min_budget_ms', MIN_BUDGET_MS):g} ms"
        )
        raise GateFailedError(
            f"{where} on {target}: p50 {p50:.3f} ms at {budget['shape']} is over its budget "
            f"{result['budget_ms']:.3f} ms ({basis})"
        )
    result["latency_check"] = "passed"
    return result


def compare_with_golden(
    outputs: dict[str, np.ndarray], golden: dict[str, np.ndarray], atol: float, rtol: float, where: str
) -> tuple[float, str]:
    """Check every golden output element-wise, |out − golden| <= atol + rtol·|golden| (np.allclose's rule);
    returns (max abs error, the output it is in). IntegrityError names the output and the numbers on a
    missing output, a shape change, a NaN/Inf value or a value out of tolerance."""
    max_abs, worst = 0.0, ""
    for name, expected in golden.items():
        if name not in outputs:
            raise IntegrityError(f"{where}: output {name!r} is missing (the model gives {', '.join(outputs)})")
        got = np.asarray(outputs[name], dtype=np.float64)
        want = np.asarray(expected, dtype=np.float64)
        if got.shape != want.shape:
            raise IntegrityError(f"{where}: output {name!r} has shape {got.shape}, the golden one {want.shape}")
        bad = ~np.isfinite(got)
        if bad.any():
            raise IntegrityError(
                f"{where}: output {name!r} has {int(bad.sum())} NaN/Inf value(s) of {got.size} on the sample inputs"
            )
        diff = np.abs(got - want)
        allowed = atol + rtol * np.abs(want)
        over = diff > allowed
        if over.any():
            at = np.unravel_index(int(np.argmax(np.where(over, diff - allowed, -np.inf))), diff.shape)
            raise IntegrityError(
                f"{where}: output {name!r} differs from its golden outputs: {int(over.sum())} of {diff.size} value(s) "
                f"out of tolerance, max |diff| {float(diff.max()):.6g}; at {tuple(int(i) for i in at)} |diff| "
                f"{float(diff[at]):.6g} > atol {atol:g} + rtol {rtol:g} × |golden| {float(abs(want[at])):.6g}"
            )
        here = float(diff.max()) if diff.size else 0.0
        if not worst or here > max_abs:
            max_abs, worst = here, name
    return max_abs, worst


def time_p50(runner: Any, feeds: dict[str, np.ndarray], warmup: int, iterations: int) -> float:
    """p50 latency (ms) of `runner` on `feeds` with the benchmark's protocol: host clock for host runners,
    CUDA events (H2D + compute + D2H) for GPU runners."""
    if isinstance(runner, DeviceRunner):
        series = bench.time_device({"smoke": runner}, [feeds], warmup, iterations)
        return float(bench.device_latency_stats(series["smoke"], 1)["p50_ms"])
    timings = bench.time_interleaved({"smoke": runner}, feeds, warmup, iterations)
    return float(bench.latency_stats(timings["smoke"], 1)["p50_ms"])
