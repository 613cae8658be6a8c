"""The stage contract: what one unit of cached work declares, and the code identity its key holds.

A run is a loop over stages (optimize/pipeline.py: load → export → precision → engine → evaluate →
benchmark → gate → report → register). A stage with cached work yields *units*: the FP32 export, one
precision variant, one TensorRT engine, one (variant, target) evaluation, one target's benchmark. A unit
declares everything its output depends on:

    stage, name     what it is ("precision", "int8")
    inputs          content identities (sha256) of what it reads, by identity name: `model`, `data.<dataset>`,
                    `onnx.<variant>`, `engine.<variant>`; None where an upstream unit has not been made yet
                    (`optimize plan` cannot know it)
    config          its recipe section, as plain JSON
    libraries       the libraries whose versions change what it makes
    device          the CPU instruction sets, GPU or machine its output depends on, else None
    code            the optimize modules it runs (with every optimize module they import)
    produces        the identity name its record's `sha256` fills in (`onnx.int8`), for the units after it
    run(folder)     makes its files in `folder` and returns its record (plain JSON)
    use(done)       takes the unit's files and record into the run, be they made now or taken from the cache

The cache key is the hash of that declaration (`description`), so no table is kept by hand: a unit that
names `export` in `code` is keyed on export.py and what it imports, and editing the report or the registry
leaves it valid. The same declarations give `optimize plan` its list (optimize/plan.py) without building
anything: `run` and `use` are only called by the pipeline.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimize import cache
from optimize.files import write_with
from optimize.onnx_files import copy_onnx, onnx_files
from optimize.runtimes import target_refuses

PACKAGE = Path(__file__).parent


@dataclass(frozen=True)
class Done:
    """A unit's outcome: its record, the folder its files are in (a cache entry, or the folder it was just
    made in), whether it came from the cache, and its seconds (measured now, or when the entry was made)."""

    record: Any
    dir: Path
    hit: bool
    seconds: float | None = None

    def path(self, name: str) -> Path:
        return self.dir / name


@dataclass(frozen=True)
class Unit:
    """One unit of cached work, declared (see the module docstring)."""

    stage: str
    name: str
    inputs: dict[str, str | None]
    config: Any
    libraries: tuple[str, ...]
    code: tuple[str, ...]
    run: Callable[[Path], Any]
    use: Callable[[Done], None]
    device: str | None = None
    produces: str | None = None
    refresh: bool = False  # produce it anew even when cached (`optimize run --rebench`)

    @property
    def known(self) -> bool:
        """Whether every input's identity is known (not waiting for an upstream unit)."""
        return all(v is not None for v in self.inputs.values())

    def description(self, versions: dict[str, str]) -> dict[str, Any]:
        """What the unit's cache key is the hash of: its declaration, with the installed versions of its
        libraries (`versions`) and the sha256 of each source file of its code."""
        return cache.key_description(
            self.stage,
            inputs={k: v or "" for k, v in self.inputs.items()},
            config=self.config,
            versions={lib: versions.get(lib, "absent") for lib in self.libraries},
            device=self.device,
            code=code_digests(self.code),
        )

    def key(self, versions: dict[str, str]) -> str:
        return cache.key_of(self.description(versions))


@dataclass
class Identities:
    """Content identities a run knows so far, by name: `model`, `data.<dataset>`, `onnx.<variant>`,
    `engine.<variant>`. `optimize plan` fills upstream ones from cache hits, and leaves the rest None."""

    known: dict[str, str | None] = field(default_factory=dict)

    def __getitem__(self, name: str) -> str | None:
        return self.known.get(name)

    def __setitem__(self, name: str, value: str | None) -> None:
        self.known[name] = value


def identity(*parts: Any) -> str:
    """sha256 of JSON parts: an identity made of other identities and recipe sections."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# --- the code a unit runs ------------------------------------------------------------------------------


@functools.cache
def code_digests(modules: tuple[str, ...]) -> dict[str, str]:
    """sha256 of every optimize source file that `modules` are made of: the modules themselves and every
    optimize module they import (read from the sources), by path relative to the package."""
    return {str(p.relative_to(PACKAGE)): hashlib.sha256(p.read_bytes()).hexdigest() for p in code_files(modules)}


def code_files(modules: tuple[str, ...]) -> list[Path]:
    """The source files of `modules` and of every optimize module they import, sorted."""
    seen: set[Path] = set()
    todo = [f for m in modules for f in module_files(m)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(f for name in optimize_imports(path) for f in module_files(name))
    return sorted(seen)


@functools.cache
def module_files(module: str) -> list[Path]:
    """The source files of an optimize module (`data`, `runtimes.base`) or package (`runtimes`): a package
    is its __init__ (what `import optimize.runtimes` runs), and its modules as they are imported."""
    base = PACKAGE.joinpath(*module.split(".")) if module != "__init__" else PACKAGE / "__init__"
    if base.is_dir():
        return [base / "__init__.py"]
    return [base.with_suffix(".py")] if base.with_suffix(".py").is_file() else []


# `import optimize.x` and `from optimize.x import (a, b)`, wherever they stand (read as text: parsing every
# source file took half a second of `optimize plan`; a docstring that shows an import only adds a file).
_IMPORT = re.compile(
    r"^[ \t]*(?:import[ \t]+(optimize(?:\.\w+)*)|from[ \t]+(optimize(?:\.\w+)*)[ \t]+import[ \t]+(\([^)]*\)|[^\n]*))",
    re.M,
)


_LAZY = re.compile(r"""\blazy\(\s*["'](optimize(?:\.\w+)*)["']""")


@functools.cache
def optimize_imports(path: Path) -> tuple[str, ...]:
    """The optimize modules a source file imports (`from optimize.x import y` also names `x.y`, which may be
    a module; `from optimize import x` is module x, not the package's lazy __init__; `lazy("optimize.x")`
    names x), relative to the package."""
    names: list[str] = []
    text = path.read_text(encoding="utf-8")
    names += _LAZY.findall(text)  # a module of ours named through optimize.lazy runs when first used
    for imported, package, what in _IMPORT.findall(text):
        if imported:
            names.append(imported)
            continue
        members = [m.split()[0] for m in re.split(r"[,\s]*,[,\s]*|\n", what.strip("()# \n")) if m.strip()]
        members = [m for m in members if m.isidentifier()]
        names += [f"{package}.{m}" for m in members] if package == "optimize" else [package]
        if package != "optimize":
            names += [f"{package}.{m}" for m in members]
    return tuple(n.removeprefix("optimize").lstrip(".") or "__init__" for n in names)


# --- what the stages share ------------------------------------------------------------------------------


@dataclass
class Context:
    """What the stages of one run (or one plan) read and hand on. The declarations read `recipe`, `ids`,
    `targets`, `versions` and `hardware`; the rest is the run's working state, filled stage by stage
    (empty when planning: nothing is built)."""

    recipe: Any
    recipe_file: Path
    targets: dict[str, dict[str, Any]]
    versions: dict[str, str]
    hardware: dict[str, Any]
    task_metric_code: Callable[[], str | None]
    say: Any  # optimize.console.Say: warn / note
    planning: bool = False
    register: bool = False  # register what passes (`optimize run` without --no-register)
    run_dir: Path = Path(".")
    rebench: bool = False
    progress: Any = None  # optimize.console.Progress: bars under the running stage
    io_specs: Callable[[Path], tuple[list[Any], list[Any]]] | None = None
    manifest: dict[str, Any] = field(default_factory=dict)  # the run's manifest.json, as it is being written
    tracking_uri: str = ""  # the MLflow store the register stage publishes to
    ids: Identities = field(default_factory=Identities)
    # the run's working state
    loaded: Any = None
    datasets: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)  # variant → its ONNX in the run directory
    precisions: dict[str, str] = field(default_factory=dict)  # variant → fp32, fp16, int8
    fused: dict[str, dict[str, int]] = field(default_factory=dict)  # fusion model type → fused op counts
    built: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant → its precision record
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant → its TensorRT plan's sidecar
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # metrics.json "variants"
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # target → variant → what it runs
    results: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # variant → target → results
    golden: dict[str, dict[str, Any]] = field(default_factory=dict)  # target → variant → outputs on a sample
    sample_inputs: dict[str, Any] = field(default_factory=dict)  # the first evaluation batch
    distributions: dict[str, Any] = field(default_factory=dict)  # distributions.npz
    outputs: dict[str, Any] = field(default_factory=dict)  # the FP32 model's outputs and their shapes
    verdict: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    registered: Any = None

    @property
    def ran(self) -> list[str]:
        """The targets that run here, in the recipe's order."""
        return [t for t, s in self.targets.items() if s["status"] == "ran"]

    @property
    def eval_name(self) -> str:
        return self.recipe.evaluate.dataset

    @property
    def art_dir(self) -> Path:
        return self.run_dir / "artifacts"

    def isa_identity(self) -> str:
        """The CPU's instruction sets, as a key's device: what INT8 kernels (and so accuracy) depend on."""
        return json.dumps({"cpu_isa": self.hardware["cpu_isa"]}, sort_keys=True)

    def device_identity(self, target: str) -> str:
        """What a target's outputs depend on: the GPU model and architecture, or on the CPU its instruction
        sets (which INT8 and matrix kernels run)."""
        if target in ("onnxruntime-cpu", "torch-cpu"):
            return self.isa_identity()
        return json.dumps([[g.get("name"), g.get("compute_capability")] for g in self.hardware["gpus"]])

    def machine_identity(self, target: str) -> str:
        """What timings depend on: the CPU, its instruction sets, cores and memory, and on GPU targets the
        GPUs and driver."""
        hw = self.hardware
        machine = {"cpu": hw["cpu"], "isa": hw["cpu_isa"], "cores": hw["cores"], "memory_gb": hw["memory_gb"]}
        if target not in ("onnxruntime-cpu", "torch-cpu"):
            machine["gpus"] = hw["gpus"]
        return json.dumps(machine, sort_keys=True)

    def artifact_source(self, target: str, name: str) -> str:
        """The identity of what a target runs for a variant: its TensorRT plan (`engine.<variant>`), the source
        module (`model`; its precision is in the unit's config), or its ONNX (`onnx.<variant>`)."""
        if target == "tensorrt":
            return f"engine.{name}"
        if target.startswith("torch-"):
            return "model"
        return f"onnx.{name}"

    def inputs(self, *names: str) -> dict[str, str | None]:
        """A unit's inputs: these identities by name, as far as they are known."""
        return {name: self.ids[name] for name in names}

    def precision_of(self, name: str) -> str:
        if name == "fp32":
            return "fp32"
        return next(v.kind for v in self.recipe.precision.variants if v.name == name)

    def variant_names(self) -> list[str]:
        return ["fp32", *(v.name for v in self.recipe.precision.variants)]

    def runs_on(self, target: str) -> list[str]:
        """The variants `target` runs (FP32 first), known from the recipe alone."""
        return [n for n in self.variant_names() if not target_refuses(target, self.recipe, n, self.precision_of(n))]


# --- a unit's files -------------------------------------------------------------------------------------


def store(folder: Path, *paths: Path) -> None:
    """Copy a unit's files into its folder (an ONNX with the external-data file its tensors name, if any)."""
    for path in paths:
        for p in onnx_files(path) if path.suffix == ".onnx" else [path]:
            shutil.copyfile(p, folder / p.name)


def restore(done: Done, dest_dir: Path) -> None:
    """Copy a unit's files into `dest_dir` under their own names, atomically: an ONNX together with its
    external-data file (no .onnx is ever there without its data), every other file alone."""
    names = sorted(p.name for p in done.dir.iterdir() if p.is_file() and p.name not in cache.RESERVED_NAMES)
    models = [n for n in names if n.endswith(".onnx")]
    data = {p.name for n in models for p in onnx_files(done.path(n))[1:]}
    for name in models:
        copy_onnx(done.path(name), dest_dir / name)
    for name in names:
        if name not in models and name not in data:
            src = done.path(name)
            write_with(dest_dir / name, lambda tmp, src=src: shutil.copyfile(src, tmp))


def _no_units(ctx: Context) -> list[Unit]:
    return []


def _always(ctx: Context) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One stage of the run: its units of cached work (none for load, gate, report and register), then
    `finish`, which takes their outcomes (in order) into the run and fills the stage's record (`detail`...).
    `when` says whether it runs at all; `shown` ones get a progress line and a manifest entry; `logged` ones
    send what libraries print to logs/<name>.log."""

    name: str
    title: Callable[[Context], str]
    finish: Callable[[Context, list[tuple[Unit, Done]], dict[str, Any]], None]
    units: Callable[[Context], list[Unit]] = _no_units
    when: Callable[[Context], bool] = _always
    shown: bool = True
    logged: bool = True
