"""The precision stage: one unit per variant of the recipe (FP16, INT8 with its accuracy-aware fallback),
each built from the FP32 ONNX, run once on real data (NaN or Inf fails it), and cached. After them the
stage writes recipe.lock.yaml and lays out what runs on each target."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from optimize import accuracy, bench, gates, preflight, recipe_yaml
from optimize.cpu import saturating
from optimize.errors import StageError
from optimize.files import write_npz, write_text
from optimize.lazy import lazy
from optimize.models import import_entry_point
from optimize.onnx_files import copy_onnx, external_data_threshold, onnx_sha256, onnx_size_bytes
from optimize.precision import fallback, fp16, int8
from optimize.precision.fusion import fused_path
from optimize.recipe import Int8Variant, Recipe, to_plain
from optimize.runtimes import TorchArtifact, open_runner, target_refuses
from optimize.stage import Context, Done, Stage, Unit, restore, store

np = lazy("numpy")

onnx = lazy("onnx")

LOCK_HEADER = (
    "# recipe.lock.yaml: this run's recipe, resolved, with what the INT8 fallback found written in\n"
    "# (nodes_to_exclude) and the search turned off. `optimize run` on this file rebuilds the same variants.\n"
)


def _units(ctx: Context) -> list[Unit]:
    return [_unit(ctx, index) for index in range(len(ctx.recipe.precision.variants))]


def _unit(ctx: Context, index: int) -> Unit:
    variant = ctx.recipe.precision.variants[index]
    dest = ctx.art_dir / f"{variant.name}.onnx"

    def run(folder: Path) -> dict[str, Any]:
        record, excluded = build_variant(ctx, index, ctx.art_dir / "fp32.onnx", dest)
        eval_ds = ctx.datasets[ctx.eval_name]
        with open_runner("onnxruntime-cpu", dest) as r:  # every model built is run: NaN/Inf fails
            feeds = eval_ds.batches[0]
            fp16.check_finite(dest, r.run(feeds), feeds, f"precision.{variant.name}")
        store(folder, dest)
        return {"record": record, "excluded": excluded, "sha256": onnx_sha256(dest)}

    def use(done: Done) -> None:
        if done.hit:
            restore(done, ctx.art_dir)
        ctx.built[variant.name] = {**done.record["record"], **({"cache": "hit"} if done.hit else {})}
        ctx.paths[variant.name], ctx.precisions[variant.name] = dest, variant.kind

    return Unit(
        "precision",
        variant.name,
        inputs=ctx.inputs(
            "onnx.fp32",
            *([f"onnx.fused-{variant.fusion}"] if isinstance(variant, Int8Variant) and variant.fusion else []),
            f"data.{ctx.eval_name}",
            *(f"data.{n}" for n in preflight.variant_datasets(variant)),
        ),
        config=_config(ctx, variant),
        libraries=("onnx", "onnxruntime", "nvidia-modelopt", "numpy"),
        code=("precision.build",),
        run=run,
        use=use,
        # the fallback judges INT8 trials on this CPU's kernels: another ISA may keep other nodes
        device=ctx.isa_identity() if isinstance(variant, Int8Variant) else None,
        produces=f"onnx.{variant.name}",
    )


def _config(ctx: Context, variant: Any) -> dict[str, Any]:
    """What a variant's build depends on besides its inputs: its section; for INT8, also what the
    accuracy-aware fallback tunes against (the accuracy gates, the targets that run, the evaluation
    settings and the task metric's code)."""
    config: dict[str, Any] = {"variant": to_plain(variant), "external_data_bytes": external_data_threshold()}
    if isinstance(variant, Int8Variant):
        config["fallback_gates"] = [
            g.model_dump() for g in fallback.accuracy_gates(ctx.recipe.gates, variant.name, ctx.ran)
        ]
        config["targets"] = ctx.ran
        config["evaluate"] = to_plain(ctx.recipe.evaluate)
        config["task_metric_code"] = ctx.task_metric_code()
    return config


def _finish(ctx: Context, done: list[tuple[Unit, Done]], rec: dict[str, Any]) -> None:
    """The lock file, the saturation warning, and what runs on each target."""
    recipe, records = ctx.recipe, ctx.built
    rec["variants"] = records
    locked = to_plain(recipe)
    for index, (_, unit_done) in enumerate(done):
        if isinstance(recipe.precision.variants[index], Int8Variant):
            # The lock reproduces this build without searching: the exclusions found, fallback off.
            entry = locked["precision"]["variants"][index]
            entry["nodes_to_exclude"] = unit_done.record["excluded"]
            entry["fallback"]["enabled"] = False
    for w in saturation_warnings(recipe, ctx.hardware["cpu_isa"]):
        ctx.say.warn(w)
    rec["detail"] = ", ".join(
        f"{n} via {r['backend']}"
        + (f", {len(r['nodes_excluded'])} node(s) kept high-precision" if r.get("nodes_excluded") else "")
        for n, r in records.items()
    )
    write_text(ctx.run_dir / "recipe.lock.yaml", LOCK_HEADER + recipe_yaml.dump(locked))
    shutil.rmtree(ctx.run_dir / "work", ignore_errors=True)  # INT8 trials and calibration scratch
    lay_out_targets(ctx)


def lay_out_targets(ctx: Context) -> None:
    """What runs on each target: the ONNX on ONNX Runtime, the source module on torch, a plan on TensorRT
    (the engine stage puts it in). A variant a target cannot run (INT8 on torch, QOperator INT8 on TensorRT)
    is skipped there, with why; every other one starts its results with its size."""
    baseline_size = onnx_size_bytes(ctx.paths["fp32"])
    for name, p in ctx.paths.items():
        ctx.variants[name] = {
            "precision": ctx.precisions[name],
            "path": str(p.relative_to(ctx.run_dir)),
            "size_bytes": onnx_size_bytes(p),
            "sha256": ctx.ids[f"onnx.{name}"],
        }
    for target in ctx.ran:
        ctx.artifacts[target] = {}
        for name, p in ctx.paths.items():
            reason = target_refuses(target, ctx.recipe, name, ctx.precisions[name])
            size = ctx.variants[name]["size_bytes"]
            ctx.results.setdefault(name, {})[target] = (
                {"skipped": reason} if reason else {"size": {"bytes": size, "ratio": size / baseline_size}}
            )
            if reason:
                continue
            if target.startswith("torch-"):
                ctx.artifacts[target][name] = TorchArtifact(ctx.loaded.module, *ctx.io_specs(p), ctx.precisions[name])
            else:
                ctx.artifacts[target][name] = p


def saturation_warnings(recipe: Recipe, isa: dict[str, Any]) -> list[str]:
    """ONNX Runtime INT8 variants with 8-bit signed weights, judged here on a CPU whose u8×s8 kernels saturate
    (x86 without VNNI): their accuracy on this machine is lower than on a VNNI CPU, and differs from it."""
    if not saturating(isa):
        return []
    return [
        f"precision.variants[{i}] ({v.name}): this CPU ({isa['int8_dot']}) saturates 8-bit weight products, so "
        "its accuracy here is lower than on a CPU with VNNI; `reduce_range: true` (7-bit weights) gives the "
        "same results on both"
        for i, v in enumerate(recipe.precision.variants)
        if isinstance(v, Int8Variant)
        and v.backend.startswith("onnxruntime")
        and not v.reduce_range
        and v.weight_type == "int8"
    ]


def build_variant(ctx: Context, index: int, baseline: Path, dest: Path) -> tuple[dict[str, Any], list[str] | None]:
    """Build one precision variant to `dest`: its record, and the nodes kept in high precision (INT8)."""
    variant = ctx.recipe.precision.variants[index]
    if isinstance(variant, Int8Variant):
        return build_int8(ctx, index, baseline, dest)
    reference_dir = None
    if variant.reference_data and fp16.choose_backend(variant) == "modelopt":
        reference_dir = dest.parent / f"{variant.name}-reference"
        for k, batch in enumerate(ctx.datasets[variant.reference_data].batches[: variant.reference_batches]):
            write_npz(reference_dir / f"batch{k:04d}.npz", batch)
    result = fp16.convert_fp16(baseline, dest, variant, reference_dir)
    return {**result.record(), "reference_data": variant.reference_data if reference_dir else None}, None


def build_int8(ctx: Context, index: int, baseline: Path, dest: Path) -> tuple[dict[str, Any], list[str]]:
    """Quantise one INT8 variant to `dest`, with the accuracy-aware fallback where the recipe has accuracy
    gates for it. Returns the stage record and the final nodes kept in high precision."""
    recipe = ctx.recipe
    variant = recipe.precision.variants[index]
    assert isinstance(variant, Int8Variant)
    where = f"precision.variants[{index}]"
    int8.require_backend(variant, where)
    work = ctx.run_dir / "work" / variant.name
    src, fusion = baseline, None
    if variant.fusion:  # made by the fusion stage, shared by the variants that fuse for the same model type
        src, fusion = fused_path(ctx, variant.fusion), ctx.fused[variant.fusion]
    int8.check_exclusions(src, variant.nodes_to_exclude, variant.op_types_to_exclude, where)
    calib = ctx.datasets[variant.calibration].batches[: variant.calibration_batches] if variant.calibration else []
    checks = fallback.accuracy_gates(recipe.gates, variant.name, ctx.ran)
    fb_name = variant.fallback.dataset or variant.calibration
    fb_ds = ctx.datasets.get(fb_name) if fb_name else None
    untuned = []  # gates the trials cannot measure: said, since the evaluation will judge them
    if fb_ds is not None and fb_ds.labels is None:
        untuned = [g.check for g in checks if g.metric.startswith("accuracy.task_metric")]
        checks = [g for g in checks if not g.metric.startswith("accuracy.task_metric")]
    off_reason = (
        "fallback.enabled is false"
        if not variant.fallback.enabled
        else "no accuracy gate covers this variant on a target that runs here"
        if not checks
        else "no data to tune on: set fallback.dataset (never the evaluation dataset)"
        if fb_ds is None
        else None
    )
    if off_reason:
        if fb_ds is None and checks and variant.fallback.enabled:
            ctx.say.note(f"{variant.name}: accuracy-aware fallback off, {off_reason}")
        result = int8.quantize(src, dest, variant, calib, work, where, progress=ctx.progress.bar())
        result.fusion = fusion
        shutil.rmtree(work, ignore_errors=True)
        return {**result.record(), "fallback": {"enabled": False, "reason": off_reason}}, result.nodes_excluded
    if untuned:
        ctx.say.note(f"{variant.name}: the fallback data {fb_name} has no labels; not tuned on {', '.join(untuned)}")
    trials = _Trials(ctx, variant, where, baseline, src, work, calib, fb_ds, checks)
    outcome = fallback.search(
        variant.fallback, trials.build, trials.judge, trials.speed, trials.rank, on_trial=trials.shown,
        progress=trials.bar,
    )  # fmt: skip
    copy_onnx(outcome.chosen.path, dest, link=True)  # the trial's data file becomes <variant>.onnx.data
    result = trials.results[outcome.chosen.index]
    result.fusion = fusion
    shutil.rmtree(work, ignore_errors=True)
    record = {**result.record(), "fallback": {"enabled": True, "dataset": fb_name, **outcome.record()}}
    if untuned:
        record["fallback"]["not_tuned_on"] = untuned
    return record, result.nodes_excluded


class _Trials:
    """The accuracy-aware fallback's side of one INT8 variant: build a trial with some nodes excluded, judge
    its accuracy gates and its speed on the fallback data, rank the quantised nodes by the harm each does."""

    def __init__(
        self, ctx: Context, variant: Int8Variant, where: str, baseline: Path, src: Path, work: Path,
        calib: list[Any], fb_ds: Any, checks: list[Any],
    ) -> None:  # fmt: skip
        recipe = ctx.recipe
        self.ctx, self.variant, self.where, self.baseline, self.src, self.work = (
            ctx,
            variant,
            where,
            baseline,
            src,
            work,
        )
        self.calib, self.checks, self.threads = calib, checks, recipe.benchmark.threads
        self.batches = fb_ds.batches[: variant.fallback.batches]
        self.labels = fb_ds.labels[: int8.sample_count(self.batches)] if fb_ds.labels is not None else None
        self.metric_fn = None
        if recipe.evaluate.task_metric and self.labels is not None:
            self.metric_fn = import_entry_point(
                recipe.evaluate.task_metric, recipe.evaluate.task_metric_python_path, "evaluate.task_metric"
            )
        with open_runner("onnxruntime-cpu", baseline, self.threads) as r:
            self.base_out = accuracy.run_all(r, self.batches)
            inputs = r.inputs
        largest = max(recipe.benchmark.shapes, key=lambda sh: int(np.prod(list(sh.values()))))
        self.speed_feeds = bench.make_feeds(inputs, largest, self.batches[0], "benchmark.shapes")
        self.results: dict[int, Any] = {}
        # Bars under the stage: the trials against their budget, and the calibration the first trial runs.
        self.bar, self.calibration = ctx.progress.bar(), ctx.progress.bar()
        self.rank_batches = self.batches[:2]
        with open_runner("onnxruntime-cpu", src, self.threads) as r:
            self.rank_reference = accuracy.run_all(r, self.rank_batches)

    def build(self, i: int, excluded: list[str]) -> Path:
        path = self.work / f"trial{i}.onnx"
        self.results[i] = int8.quantize(
            self.src, path, self.variant, self.calib, self.work, self.where, excluded, progress=self.calibration
        )
        return path

    def judge(self, path: Path) -> tuple[dict[str, Any], list[str]]:
        with open_runner("onnxruntime-cpu", path, self.threads) as r:
            out = accuracy.run_all(r, self.batches)
        evaluate = self.ctx.recipe.evaluate
        acc = accuracy.compare_outputs(self.base_out, out, evaluate.top1_outputs, evaluate.neighbour_outputs)
        if self.metric_fn is not None:
            acc.update(accuracy.task_metric(self.metric_fn, self.base_out, out, self.labels))
        verdict = gates.evaluate_gates(
            self.checks,
            {"fp32": {}, self.variant.name: {"onnxruntime-cpu": {"accuracy": acc}}},
            {"onnxruntime-cpu": {"status": "ran"}},
        )
        return acc, [f"{row['check']}: {row.get('reason')}" for row in verdict["gates"] if row["status"] == "failed"]

    def speed(self, path: Path) -> float:
        runners = {
            "fp32": open_runner("onnxruntime-cpu", self.baseline, self.threads),
            "trial": open_runner("onnxruntime-cpu", path, self.threads),
        }
        try:
            iterations = max(10, self.ctx.recipe.benchmark.iterations // 5)
            t = bench.time_interleaved(runners, self.speed_feeds, 3, iterations)
        finally:
            for r in runners.values():
                r.close()
        return float(np.percentile(t["fp32"], 50) / np.percentile(t["trial"], 50))

    def _outputs_of(self, path: Path) -> dict[str, np.ndarray]:
        with open_runner("onnxruntime-cpu", path, self.threads) as r:
            return accuracy.run_all(r, self.rank_batches)

    def _quantise_only(self, node: str) -> Path | None:
        path = self.work / "rank.onnx"
        try:
            int8.quantize(self.src, path, self.variant, self.calib, self.work, self.where, only=node)
        except StageError:  # a node that is not quantised on its own
            return None
        return path

    def rank(self, path: Path) -> list[tuple[str, float]]:
        candidates = fallback.quantised_nodes(
            onnx.load(str(self.src), load_external_data=False),
            onnx.load(str(path), load_external_data=False),
            int8.candidate_op_types(self.variant),
        )
        self.ctx.say.line(f"fallback {self.variant.name}: ranking {len(candidates)} quantised nodes")
        return fallback.rank_isolated(
            candidates,
            self._quantise_only,
            self._outputs_of,
            self.rank_reference,
            progress=self.ctx.progress.bar(),
            only=fallback.judged_outputs(self.checks),
        )

    def shown(self, trial: fallback.Trial) -> None:
        acc = trial.accuracy
        self.ctx.say.line(
            f"fallback {self.variant.name} trial {trial.index}: {len(trial.excluded)} node(s) high-precision, "
            + (f"cosine mean {acc['cosine_mean']:.4f}, " if "cosine_mean" in acc else "")
            + f"p50 speed-up {trial.p50_speedup:.2f}×, "
            + ("passed" if trial.passed else "failed: " + "; ".join(trial.failed_gates))
        )


STAGE = Stage("precision", lambda ctx: ", ".join(v.name for v in ctx.recipe.precision.variants), _finish, units=_units)
