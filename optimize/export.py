"""Export stage: torch → ONNX with named inputs/outputs and dynamic axes, then a check against torch on
real inputs of a different shape than the example (which proves the dynamic axes work)."""

from __future__ import annotations

import inspect
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimize import data, preflight
from optimize.errors import RecipeError, StageError, first_line
from optimize.files import display_path
from optimize.gates import check_outputs
from optimize.lazy import lazy
from optimize.models import LoadedModel
from optimize.onnx_files import copy_onnx, external_data_threshold, onnx_sha256, write_onnx_with
from optimize.recipe import ExportSection, OnnxModel
from optimize.runtimes import open_runner
from optimize.stage import Context, Done, Stage, Unit, restore, store

np = lazy("numpy")

torch = lazy("torch")
onnx = lazy("onnx")


@dataclass(frozen=True)
class ExportCheck:
    """How the exported ONNX compared with torch on the validation batches."""

    batches: int
    shapes: list[dict[str, list[int]]]
    max_abs_error: dict[str, float]
    worst_excess: float  # max of |a - b| - (atol + rtol * |b|); <= 0 means within tolerance

    def record(self) -> dict[str, Any]:
        """JSON-able form for the stage record."""
        return {
            "batches": self.batches,
            "shapes": self.shapes,
            "max_abs_error": self.max_abs_error,
            "within_tolerance": self.worst_excess <= 0,
        }


def _in_forward_order(module: torch.nn.Module, names: list[str]) -> list[str]:
    """The input names in the order of forward's parameters when they name them.

    The export passes the inputs by position, so an input named after a parameter must sit at that
    parameter's position, or the ONNX input of that name would feed another parameter. Names that are not
    all forward's parameter names are passed in the order given.
    """
    try:
        params = [
            p.name
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return names
    if not set(names) <= set(params):
        return names
    ordered = sorted(names, key=params.index)
    if ordered != params[: len(ordered)]:
        skipped = [p for p in params[: params.index(ordered[-1])] if p not in names]
        raise RecipeError(
            f"export.input_names: the inputs are passed to forward() by position, and {', '.join(names)} "
            f"skip its parameter(s) {', '.join(skipped)}; add them to the inputs (and the example inputs)"
        )
    return ordered


def export_onnx(loaded: LoadedModel, spec: ExportSection, dest: Path) -> float:
    """Export the torch module to the ONNX artifact `dest` (one file, or with `<dest>.data` when over the
    external-data threshold, see optimize.onnx_files), atomically; returns seconds taken."""
    assert loaded.module is not None
    names = _in_forward_order(loaded.module, loaded.input_names(spec))
    args = tuple(loaded.example_inputs[n] for n in names)
    known = set(names) | set(spec.output_names)
    unknown = [k for k in spec.dynamic_axes if k not in known]
    if unknown:
        raise RecipeError(
            f"export.dynamic_axes: {', '.join(unknown)} is neither an input nor an output "
            f"(inputs: {', '.join(names)}; outputs: {', '.join(spec.output_names)})"
        )
    # Asked for one file, the exporter fails on a model over 2 GB; asked for external data, it writes
    # `<tmp>.data`, which becomes `<dest>.data`, or one file again when the model turns out small.
    external = 2 * _state_bytes(loaded.module) > external_data_threshold()
    t0 = time.perf_counter()

    def _write(tmp: Path) -> None:
        with torch.no_grad():
            torch.onnx.export(
                loaded.module,
                args,
                str(tmp),
                input_names=names,
                output_names=list(spec.output_names),
                dynamic_axes={k: dict(v) for k, v in spec.dynamic_axes.items()} or None,
                opset_version=spec.opset,
                external_data=external,
            )
        _strip_stack_traces(tmp)
        _check_exported(tmp, spec)  # before the rename: a failed check leaves no file at `dest`

    try:
        write_onnx_with(dest, _write)
    except (RecipeError, StageError):
        raise
    except Exception as e:
        root = e
        while root.__cause__ is not None:  # torch wraps the model's own error in a generic TorchExportError
            root = root.__cause__
        why = f"{type(e).__name__} caused by " if root is not e else ""
        raise StageError(f"export: torch.onnx.export failed: {why}{type(root).__name__}: {first_line(root)}") from None
    return time.perf_counter() - t0


# Node metadata the exporter writes with the Python stack of each op: file paths and line numbers of the
# machine that exported (the venv, the checkout), so the same model exported from another path had another
# sha256, and another cache key and registry identity after it.
STACK_TRACE = "pkg.torch.onnx.stack_trace"


def _strip_stack_traces(path: Path) -> None:
    """Drop STACK_TRACE from every node (subgraphs and functions too); the graph and weights stay as written."""
    model = onnx.load(str(path), load_external_data=False)
    graphs = [model.graph, *(f for f in model.functions)]
    changed = False
    while graphs:
        g = graphs.pop()
        for node in g.node:
            kept = [p for p in node.metadata_props if p.key != STACK_TRACE]
            if len(kept) != len(node.metadata_props):
                del node.metadata_props[:]
                node.metadata_props.extend(kept)
                changed = True
            graphs += [a.g for a in node.attribute if a.HasField("g")] + [
                sub for a in node.attribute for sub in a.graphs
            ]
    if changed:
        onnx.save(model, str(path))  # tensors stored outside keep their references to the data file


def _state_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers (about the size of the exported weights)."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers()))


def _check_exported(path: Path, spec: ExportSection) -> None:
    model = onnx.load(str(path), load_external_data=False)
    try:
        # Given a path, the checker reads external data beside the model and takes models over 2 GB.
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise StageError(f"export: the exported ONNX does not pass onnx.checker: {first_line(e)}") from None
    outs = [o.name for o in model.graph.output]
    if outs != list(spec.output_names):
        raise StageError(
            f"export.output_names: the model returned {len(outs)} output(s) {outs}, "
            f"the recipe names {list(spec.output_names)}"
        )


def check_export(
    loaded: LoadedModel, onnx_runner: Any, batches: list[dict[str, np.ndarray]], spec: ExportSection
) -> ExportCheck:
    """Run torch and ONNX Runtime on the same batches; fail unless every output is within tolerance.

    At least one batch must differ in shape from the example inputs, or the dynamic axes are unproven.
    """
    assert loaded.module is not None
    names = [i.name for i in onnx_runner.inputs]
    example_shapes = {n: tuple(loaded.example_inputs[n].shape) for n in names}
    used = batches[: spec.validation_batches]
    if not any(tuple(b[n].shape) != example_shapes[n] for b in used for n in names):
        raise RecipeError(
            "export: the evaluation batches have the example inputs' shape "
            f"({ {n: list(s) for n, s in example_shapes.items()} }), so the dynamic axes are not exercised; "
            "use another batch_size / max_length for the evaluation dataset"
        )
    max_err: dict[str, float] = {}
    worst = -np.inf
    for batch in used:
        with torch.no_grad():
            ref = loaded.module(*[torch.from_numpy(batch[n]) for n in names])
        ref_list = list(ref) if isinstance(ref, (tuple, list)) else [ref]
        got = onnx_runner.run(batch)
        for out_spec, r in zip(onnx_runner.outputs, ref_list, strict=True):
            a = got[out_spec.name]
            b = r.detach().cpu().numpy()
            if a.shape != b.shape:
                raise StageError(
                    f"export: output {out_spec.name!r} has shape {list(a.shape)} in ONNX Runtime and "
                    f"{list(b.shape)} in torch for inputs {[list(batch[n].shape) for n in names]}"
                )
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            max_err[out_spec.name] = max(max_err.get(out_spec.name, 0.0), float(diff.max(initial=0.0)))
            excess = diff - (spec.tolerance.atol + spec.tolerance.rtol * np.abs(b.astype(np.float64)))
            worst = max(worst, float(excess.max(initial=-np.inf)))
            if not np.all(np.isfinite(a)):
                raise StageError(f"export: output {out_spec.name!r} of the ONNX model has NaN/Inf")
    check = ExportCheck(len(used), [{n: list(b[n].shape) for n in names} for b in used], max_err, worst)
    if worst > 0:
        worst_out = max(max_err, key=max_err.get)  # type: ignore[arg-type]
        raise StageError(
            f"export: ONNX Runtime differs from torch beyond export.tolerance (atol={spec.tolerance.atol}, "
            f"rtol={spec.tolerance.rtol}): output {worst_out!r} max |diff| = {max_err[worst_out]:.3g}"
        )
    return check


# --- the export stage -------------------------------------------------------------------------------------


def _export_unit(ctx: Context) -> list[Unit]:
    """The FP32 export of a torch source, checked against torch on the evaluation data (none for an ONNX
    source, which is copied as it is)."""
    recipe = ctx.recipe
    if isinstance(recipe.model, OnnxModel):
        return []
    baseline = ctx.art_dir / "fp32.onnx"

    def run(folder: Path) -> dict[str, Any]:
        loaded, datasets = ctx.loaded, ctx.datasets
        eval_ds = datasets[ctx.eval_name]
        examples = preflight.example_inputs(loaded, recipe.export)
        for ds in datasets.values():  # data that cannot fit the model is refused before the export
            data.check_feeds(ds.name, ds.made, examples)
        export_onnx(loaded, recipe.export, baseline)
        for ds in datasets.values():  # a wrong dtype or name is the user's, before the check
            _ = ds.batches
        with open_runner("onnxruntime-cpu", baseline) as r:
            check = check_export(loaded, r, eval_ds.batches, recipe.export)
            outputs = {o.name: list(o.shape) for o in r.outputs}
        worst = max(check.max_abs_error.values())
        detail = f"opset {recipe.export.opset}, max |torch − ORT| {worst:.2g} on {check.shapes[0]}"
        store(folder, baseline)
        return {"check": check.record(), "detail": detail, "outputs": outputs, "sha256": onnx_sha256(baseline)}

    def use(done: Done) -> None:
        if done.hit:
            restore(done, ctx.art_dir)

    return [
        Unit(
            "export",
            "fp32",
            inputs=ctx.inputs("model", f"data.{ctx.eval_name}"),
            config={**recipe.export.model_dump(mode="json"), "external_data_bytes": external_data_threshold()},
            libraries=("torch", "onnx", "onnxscript", "onnxruntime", "transformers"),
            code=("export",),
            run=run,
            use=use,
            produces="onnx.fp32",
        )
    ]


def _finish(ctx: Context, done: list[tuple[Unit, Done]], rec: dict[str, Any]) -> None:
    """Copy an ONNX source in; then refuse, before any variant is built, a gate (or evaluate list) that names
    an output the model lacks or whose metric does not fit its shape (cosine of one number per sample). A
    cached export carries the shapes; an ONNX source's are read from its graph, without a session."""
    recipe, baseline = ctx.recipe, ctx.art_dir / "fp32.onnx"
    if isinstance(recipe.model, OnnxModel):
        copy_onnx(ctx.loaded.onnx_path, baseline)  # with its external data, renamed fp32.onnx.data
        ctx.ids["onnx.fp32"] = onnx_sha256(baseline)
        rec["detail"] = f"ONNX given ({ctx.loaded.onnx_path.name}); export skipped"
        outputs = {o.name: o.shape for o in preflight.onnx_outputs(baseline, "model.path")}
    else:
        unit_done = done[0][1]
        rec.update({k: unit_done.record[k] for k in ("check", "detail", "outputs")})
        if unit_done.hit:
            rec["cache"] = "hit"
        outputs = unit_done.record["outputs"]
    ctx.paths["fp32"], ctx.precisions["fp32"] = baseline, "fp32"
    check_outputs(recipe.gates, recipe.evaluate, outputs, display_path(ctx.recipe_file))


STAGE = Stage("export", lambda ctx: "torch → ONNX, checked against torch", _finish, units=_export_unit)
