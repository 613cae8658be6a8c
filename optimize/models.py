"""Model sources: turn the recipe's `model` section into a torch module with example inputs, or an ONNX file.

What identifies a model (its content hash, its description) is known at once; the module and its example
inputs are built when first used, so a run whose every stage is in the stage cache never imports torch or
transformers for the source (Hugging Face and torchvision with a weights file; an entry point builds at once,
since only its module tells what it is).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from optimize.errors import RecipeError
from optimize.files import sha256_file, sha256_tree
from optimize.lazy import lazy
from optimize.onnx_files import onnx_sha256
from optimize.recipe import EntryPointModel, ExportSection, HuggingFaceModel, OnnxModel, TorchvisionModel

torch = lazy("torch")
transformers = lazy("transformers")
tvm = lazy("torchvision.models")
# Its classes subclass torch.nn.Module: importing it imports torch, so it is named lazily like a library.
encoders = lazy("optimize.encoders")


class LoadedModel:
    """What a model source gives the pipeline: a torch module and example inputs, or an ONNX file.

    `module` and `example_inputs` are given, or built on first use by `build_module` / `build_inputs`.
    `content_sha256` and `description` are known without building anything.
    """

    def __init__(
        self,
        module: torch.nn.Module | None = None,
        example_inputs: dict[str, torch.Tensor] | None = None,
        *,
        onnx_path: Path | None = None,
        tokenizer_dir: Path | None = None,
        content_sha256: str = "",
        description: str = "",
        build_module: Callable[[], torch.nn.Module] | None = None,
        build_inputs: Callable[[], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        if module is not None:
            self.__dict__["module"] = module
        if example_inputs is not None:
            self.__dict__["example_inputs"] = example_inputs
        self._build_module = build_module
        self._build_inputs = build_inputs
        self.onnx_path = onnx_path
        self.tokenizer_dir = tokenizer_dir
        self.content_sha256 = content_sha256
        self.description = description

    @property
    def is_onnx(self) -> bool:
        """The source is an ONNX file: there is no module, and nothing to export."""
        return self.onnx_path is not None

    @cached_property
    def module(self) -> torch.nn.Module | None:
        return self._build_module() if self._build_module is not None else None

    @cached_property
    def example_inputs(self) -> dict[str, torch.Tensor]:
        return self._build_inputs() if self._build_inputs is not None else {}

    def input_names(self, spec: ExportSection) -> list[str]:
        """The ONNX input names of the export: the recipe's, or the example inputs' keys."""
        names = spec.input_names or list(self.example_inputs)
        missing = [n for n in names if n not in self.example_inputs]
        if missing:
            raise RecipeError(
                f"export.input_names: {', '.join(missing)} not among the model's example inputs "
                f"({', '.join(self.example_inputs)})"
            )
        return names


def import_entry_point(spec: str, python_path: list[Path], where: str) -> Callable[..., Any]:
    """Import `package.module:function`, with `python_path` folders first on sys.path."""
    module_name, _, attr = spec.partition(":")
    for p in reversed(python_path):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RecipeError(f"{where}: cannot import {module_name!r} ({e}); check the name and `python_path`") from None
    except Exception as e:  # the user's module raised while importing
        raise RecipeError(f"{where}: importing {module_name!r} raised {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RecipeError(f"{where}: {module_name!r} has no function {attr!r}")
    return fn


def load_model(spec: Any) -> LoadedModel:
    """Load the model a recipe describes (dispatch on `model.source`)."""
    loaders: dict[type, Callable[[Any], LoadedModel]] = {
        EntryPointModel: _from_entry_point,
        HuggingFaceModel: _from_huggingface,
        TorchvisionModel: _from_torchvision,
        OnnxModel: _from_onnx,
    }
    return loaders[type(spec)](spec)


def _from_entry_point(spec: EntryPointModel) -> LoadedModel:
    fn = import_entry_point(spec.entry_point, spec.python_path, "model.entry_point")
    try:
        result = fn(**spec.kwargs)
    except Exception as e:
        raise RecipeError(f"model.entry_point: {spec.entry_point} raised {type(e).__name__}: {e}") from None
    expected = "(torch.nn.Module, {input_name: torch.Tensor})"
    if not (isinstance(result, tuple) and len(result) == 2):
        raise RecipeError(
            f"model.entry_point: {spec.entry_point} returned {type(result).__name__}; it must return {expected}"
        )
    module, inputs = result
    if not isinstance(module, torch.nn.Module):
        raise RecipeError(
            f"model.entry_point: {spec.entry_point} returned a {type(module).__name__} as the model; "
            f"it must return {expected}"
        )
    if not (
        isinstance(inputs, dict)
        and inputs
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in inputs.items())
    ):
        raise RecipeError(
            f"model.entry_point: {spec.entry_point} returned example inputs of type {type(inputs).__name__}; "
            f"it must return {expected}"
        )
    module.eval()
    digest = _state_dict_sha256(module)
    return LoadedModel(module, inputs, content_sha256=digest, description=f"entry point {spec.entry_point}")


def _state_dict_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        # raw bytes: numpy has no bfloat16, so go through uint8 (the same bytes for every other dtype)
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def huggingface_dir(spec: HuggingFaceModel) -> Path:
    """The local folder of a Hugging Face model: `path`, or `subfolder` inside an installed `package`."""
    if spec.path is not None:
        folder = spec.path
        where = "model.path"
    else:
        try:
            found = importlib.util.find_spec(spec.package) if spec.package else None
        except (ImportError, ValueError):  # a dotted name whose parent package is missing
            found = None
        if found is None or not found.submodule_search_locations:
            raise RecipeError(
                f"model.package: {spec.package!r} is not installed; `pip install {spec.package.replace('_', '-')}` "
                "or give `model.path`"
            )
        folder = Path(list(found.submodule_search_locations)[0]) / spec.subfolder
        where = "model.subfolder"
    if not (folder / "config.json").is_file():
        raise RecipeError(f"{where}: {folder} is not a Hugging Face model folder (no config.json)")
    return folder


def _from_huggingface(spec: HuggingFaceModel) -> LoadedModel:
    folder = huggingface_dir(spec)
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type", "unknown")
    except (OSError, ValueError, AttributeError) as e:
        raise RecipeError(f"model: {folder / 'config.json'} is not a readable JSON object ({e})") from None

    def build_module() -> torch.nn.Module:
        _offline()
        try:
            backbone = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
        except Exception as e:
            raise RecipeError(f"model: cannot load the Hugging Face model in {folder}: {e}") from None
        return encoders.PooledEncoder(backbone, spec.pooling, spec.normalize).eval()

    def build_inputs() -> dict[str, torch.Tensor]:
        tokenizer = hf_tokenizer(folder, "model")
        texts = ["An example sentence for the export.", "Another one, a little longer than the first."]
        texts = (texts * spec.example_batch)[: spec.example_batch]
        enc = tokenizer(
            texts, padding="max_length", truncation=True, max_length=spec.example_sequence, return_tensors="pt"
        )
        wanted = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]
        return {n: enc[n].to(torch.int64) for n in wanted}

    return LoadedModel(
        tokenizer_dir=folder,
        content_sha256=sha256_tree(folder),
        description=f"Hugging Face {folder.name} ({model_type}), pooling={spec.pooling}",
        build_module=build_module,
        build_inputs=build_inputs,
    )


_TOKENIZERS: dict[Path, Any] = {}


def _offline() -> None:
    """Hugging Face libraries never reach for the hub: models and tokenizers load from local folders."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def hf_tokenizer(folder: Path, where: str) -> Any:
    """The Hugging Face tokenizer in `folder`, loaded offline once per process."""
    if folder not in _TOKENIZERS:
        _offline()
        try:
            _TOKENIZERS[folder] = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:
            raise RecipeError(f"{where}: cannot load a tokenizer from {folder}: {e}") from None
    return _TOKENIZERS[folder]


def _from_torchvision(spec: TorchvisionModel) -> LoadedModel:
    try:
        builder = getattr(tvm, spec.architecture, None)
    except Exception as e:
        raise RecipeError(
            f"model.source: torchvision cannot be imported ({type(e).__name__}: {e}); install a torchvision "
            "that matches your torch"
        ) from None
    if not callable(builder):
        names = [n for n in dir(tvm) if n.islower() and not n.startswith("_") and callable(getattr(tvm, n))]
        near = difflib.get_close_matches(spec.architecture, names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise RecipeError(f"model.architecture: torchvision has no model {spec.architecture!r}{hint}")
    torch.manual_seed(0)
    module = builder(weights=None, num_classes=spec.num_classes)
    digest = ""
    if spec.weights is not None:
        if not spec.weights.is_file():
            raise RecipeError(f"model.weights: {spec.weights}: file not found")
        try:
            state = torch.load(spec.weights, map_location="cpu", weights_only=True)
            module.load_state_dict(state)
        except Exception as e:
            raise RecipeError(f"model.weights: {spec.weights}: cannot load into {spec.architecture}: {e}") from None
        digest = sha256_file(spec.weights)
    module.eval()
    example = {"image": torch.rand(spec.example_batch, *spec.input_shape, generator=torch.Generator().manual_seed(0))}
    return LoadedModel(
        module,
        example,
        content_sha256=digest or _state_dict_sha256(module),
        description=f"torchvision {spec.architecture}"
        + (f" ({spec.weights.name})" if spec.weights else " (random init)"),
    )


def _from_onnx(spec: OnnxModel) -> LoadedModel:
    if not spec.path.is_file():
        raise RecipeError(f"model.path: {spec.path}: file not found")
    return LoadedModel(
        None, onnx_path=spec.path, content_sha256=onnx_sha256(spec.path), description=f"ONNX {spec.path.name}"
    )
