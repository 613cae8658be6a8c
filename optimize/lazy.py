"""Heavy libraries, named at module top and imported when first used.

    from optimize.lazy import lazy

    torch = lazy("torch")          # nothing is imported here
    ort = lazy("onnxruntime")
    ...
    torch.zeros(3)                 # the first attribute access imports torch

A module of optimize can so name every library it uses at its top, as it does its own modules, while
`optimize --help`, `optimize plan` and `optimize validate` import no torch, ONNX Runtime, MLflow or TensorRT.
For type annotations, import the library under `if TYPE_CHECKING:` as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

# The libraries that cost seconds to import or may be missing (TensorRT, ModelOpt, MLflow): the ones that
# tests/test_architecture.py refuses at the top of an optimize module unless they go through `lazy`.
HEAVY = (
    "torch",
    "torchvision",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "onnxconverter_common",
    "mlflow",
    "tensorrt",
    "modelopt",
    "transformers",
    "tokenizers",
    "matplotlib",
    "pynvml",
    "sklearn",
)


class LazyModule:
    """A stand-in for module `name`: the first attribute read imports it (an ImportError then, not at the
    module's top, where the library is named)."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def _module(self) -> ModuleType:
        module = sys.modules.get(self._name)
        if module is None:
            # the import statement's own path (not importlib.import_module), so `python -X importtime` lists it
            __import__(self._name)
            module = sys.modules[self._name]
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._module(), attr)

    def __setattr__(self, attr: str, value: Any) -> None:  # tests patch module attributes through it
        setattr(self._module(), attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(self._module(), attr)

    def __repr__(self) -> str:
        state = "imported" if self._name in sys.modules else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"


def lazy(name: str) -> Any:
    """Module `name` (dotted names too: `onnxruntime.quantization`), imported on its first attribute read."""
    return LazyModule(name)


def available(name: str) -> bool:
    """Whether module `name` can be imported here, without importing it (its parent package is imported
    for a dotted name); a broken install still fails when it is used."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def imported(name: str) -> bool:
    """Whether module `name` has been imported in this process."""
    return name in sys.modules
