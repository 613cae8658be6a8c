"""The load stage and what every later stage is keyed on: the model, the datasets, their content identities,
and the targets that run here.

In a run, `load` builds the model source lazily (the module only where some unit is not cached) and the
datasets (text is tokenised on first use). `optimize plan` calls `plan_identities` instead, which reads the
same identities from the files where that needs no torch (Hugging Face and ONNX models, text, npz and
image datasets) and leaves the others unknown.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optimize import data, preflight
from optimize.errors import RecipeError, RuntimeMissingError
from optimize.files import sha256_file, sha256_tree
from optimize.gpu import gpus
from optimize.models import huggingface_dir, import_entry_point, load_model
from optimize.onnx_files import onnx_sha256
from optimize.recipe import EntryPointDataset, EntryPointModel, OnnxModel, Recipe, TorchvisionModel
from optimize.runtimes import unavailable_reason
from optimize.stage import identity

# --- targets ----------------------------------------------------------------------------------------------


def resolve_targets(
    recipe: Recipe, require: tuple[str, ...], reason: Callable[[str], str | None] | None = None
) -> dict[str, dict[str, Any]]:
    """Which targets run here. A required one that is missing is exit 4; an optional one is `skipped`.
    `reason(target)` says why a target cannot run (default: the runtimes' own check)."""
    reason = reason or unavailable_reason
    bench = recipe.benchmark
    out: dict[str, dict[str, Any]] = {}
    for target in dict.fromkeys([*bench.targets, *require]):
        why = _model_refuses(recipe, target) or reason(target)
        if why:
            source = "--require-target" if target in require and target not in bench.targets else "benchmark.targets"
            raise RuntimeMissingError(f"{source}: {target} is required but not available: {why}")
        out[target] = {"status": "ran"}
    for target in bench.optional_targets:
        if target not in out:
            why = _model_refuses(recipe, target) or reason(target)
            out[target] = {"status": "skipped", "reason": why} if why else {"status": "ran"}
    return out


def installed_reason(target: str) -> str | None:
    """Why `target` cannot run here, judged without importing its runtime (for `optimize plan`): only
    whether the library is installed. A run checks more (CUDA, the providers ONNX Runtime was built with)."""
    module = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "torch": "torch"}.get(target.split("-")[0])
    if module is None:
        return f"unknown target {target!r}"
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed"
    if target.endswith("-cuda") or target == "tensorrt":
        if not gpus():  # NVML only: no torch
            return "no NVIDIA GPU seen by NVML"
    return None


def _model_refuses(recipe: Recipe, target: str) -> str | None:
    if target.startswith("torch-") and isinstance(recipe.model, OnnxModel):
        return "the model is given as ONNX; torch targets run a PyTorch model source"
    return None


# --- identities -------------------------------------------------------------------------------------------


def model_identity(recipe: Recipe, content_sha256: str) -> str:
    """The model's content and how the recipe builds the module from it (pooling, example inputs, entry
    point arguments); where it lies on disk is not part of it."""
    section = {k: v for k, v in recipe.model.model_dump(mode="json").items() if k not in ("path", "python_path")}
    return identity(content_sha256, section)


def data_identity(recipe: Recipe, name: str, samples_sha256: str, model_sha256: str) -> str:
    """A dataset's samples and how they become model inputs (its section: batch size, sequence length,
    padding, ...; the tokenizer, which comes with the model)."""
    section = {k: v for k, v in recipe.data[name].model_dump(mode="json").items() if k != "path"}
    return identity(samples_sha256, section, model_sha256)


def used_datasets(recipe: Recipe) -> list[str]:
    """The datasets a run reads: the evaluation set and what variants are built or tuned on."""
    return sorted({recipe.evaluate.dataset, *preflight.side_datasets(recipe)})


def load(
    recipe: Recipe, io_specs: Callable[[Path], tuple[list[Any], list[Any]]], baseline: Path
) -> tuple[Any, dict[str, data.Batches], dict[str, str]]:
    """The model source and the datasets of a run, and their identities (`model`, `data.<name>`).
    `io_specs(path)` gives an ONNX file's inputs and outputs: each dataset is checked against the inputs of
    the FP32 ONNX (`baseline`) when its batches are made."""
    loaded = load_model(recipe.model)

    @functools.cache
    def input_names() -> list[str]:
        if loaded.is_onnx:
            return [i.name for i in io_specs(loaded.onnx_path)[0]]
        return loaded.input_names(recipe.export)

    datasets = {
        name: data.load_dataset(name, recipe.data[name], input_names, loaded.tokenizer_dir).checked(
            lambda name, batches: data.check_feeds(name, batches, io_specs(baseline)[0])
        )
        for name in used_datasets(recipe)
    }
    eval_ds = datasets[recipe.evaluate.dataset]
    for name in preflight.side_datasets(recipe):  # data a variant is built or tuned on must not be judged on
        data.check_disjoint(datasets[name], eval_ds)
    ids = {"model": model_identity(recipe, loaded.content_sha256)}
    ids.update({f"data.{n}": data_identity(recipe, n, d.sha256, loaded.content_sha256) for n, d in datasets.items()})
    return loaded, datasets, ids


def plan_identities(
    recipe: Recipe, file_sha256: Callable[[Path], str] = sha256_file
) -> tuple[dict[str, str | None], dict[str, str]]:
    """The identities `load` gives, read without torch where the files tell them (`file_sha256` hashes a
    model's files); None where only building the model or running an entry point would (and why, by name)."""
    unknown: dict[str, str] = {}
    content = _plan_model_sha256(recipe, file_sha256)
    if content is None:
        unknown["model"] = "the model's identity is its built module's state dict (known once a run builds it)"
    ids: dict[str, str | None] = {"model": model_identity(recipe, content) if content else None}
    if isinstance(recipe.model, OnnxModel):  # copied as it is: the copy keeps the file's identity
        ids["onnx.fp32"] = content
    inputs, _ = preflight._model_io(recipe)
    tokenizer_dir = huggingface_dir(recipe.model) if recipe.model.source == "huggingface" else None

    def names() -> list[str]:
        if inputs is None:
            raise _Unknown("the model's input names come from its built module (set export.input_names)")
        return [i.name for i in inputs]

    for name in used_datasets(recipe):
        spec = recipe.data[name]
        try:
            if isinstance(spec, EntryPointDataset):
                raise _Unknown(f"dataset {name} comes from an entry point, which only a run calls")
            if content is None:
                raise _Unknown(unknown["model"])
            ds = data.load_dataset(name, spec, names, tokenizer_dir)
            ids[f"data.{name}"] = data_identity(recipe, name, ds.sha256, content)
        except _Unknown as e:
            ids[f"data.{name}"] = None
            unknown[f"data.{name}"] = str(e)
    return ids, unknown


class _Unknown(Exception):
    pass


def _plan_model_sha256(recipe: Recipe, file_sha256: Callable[[Path], str]) -> str | None:
    """The model's content_sha256 as `load_model` gives it, without torch; None where only building tells it."""
    model = recipe.model
    if isinstance(model, EntryPointModel) or (isinstance(model, TorchvisionModel) and model.weights is None):
        return None
    if isinstance(model, TorchvisionModel):
        return file_sha256(model.weights)
    if isinstance(model, OnnxModel):
        return onnx_sha256(model.path)
    return sha256_tree(huggingface_dir(model), file_sha256)  # as models.load_model hashes its folder


def task_metric_sha256(recipe: Recipe, *, planning: bool = False) -> str | None:
    """sha256 of the module file that defines the recipe's task metric: editing it changes what is measured. A
    run imports the entry point (a bad one fails in the stage that first needs it); a plan only finds the file
    (the same file either way, so their keys agree)."""
    spec = recipe.evaluate.task_metric
    if not spec:
        return None
    module = spec.split(":", 1)[0]
    if not planning:
        import_entry_point(spec, recipe.evaluate.task_metric_python_path, "evaluate.task_metric")
        source = getattr(sys.modules.get(module), "__file__", None)
        return sha256_file(Path(source)) if source else None
    paths = [str(p) for p in recipe.evaluate.task_metric_python_path]
    sys.path[:0] = paths
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    finally:
        del sys.path[: len(paths)]
    if found is None or not found.origin or not Path(found.origin).is_file():
        raise RecipeError(f"evaluate.task_metric: module {module!r} not found")
    return sha256_file(Path(found.origin))
