"""optimize: recipe-driven model optimisation (export, precision, benchmark, gate, register).

The Python API, `optimize run` from Python:

    from optimize import load_recipe, run

    recipe = load_recipe("recipes/fp16.yaml")    # a RecipeError (exit_code 2) names the file, the field and the fix
    result = run("recipes/fp16.yaml", register=False)
    result.status, result.exit_code, result.run_dir, result.variants, result.registered

Its names are imported on first use, so `import optimize` costs nothing and imports no torch, ONNX Runtime or
MLflow; a run imports what its stages need.
"""

from __future__ import annotations

__version__ = "0.1.0"

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers read this as theirs)
if TYPE_CHECKING:
    from typing import Any

    from optimize.api import RegisteredVersion, RunResult, run
    from optimize.errors import OptimizeError
    from optimize.recipe import Recipe, load_recipe

__all__ = ["OptimizeError", "Recipe", "RegisteredVersion", "RunResult", "__version__", "load_recipe", "run"]

_LAZY = {
    "run": "optimize.api",
    "RunResult": "optimize.api",
    "RegisteredVersion": "optimize.api",
    "load_recipe": "optimize.recipe",
    "Recipe": "optimize.recipe",
    "OptimizeError": "optimize.errors",
}


def __getattr__(name: str) -> Any:
    """The API's names, imported from their modules when first asked for (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'optimize' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
