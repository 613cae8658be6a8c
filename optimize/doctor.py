"""What this machine can run: GPUs, driver, the libraries each stage needs, and every recipe target.

`diagnose()` gathers the facts as a JSON-ready dict (`optimize doctor --json`); `render()` turns it
into aligned text for a person. Each library is named through optimize.lazy and imported only when
`diagnose()` reads it.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
import warnings
from typing import Any

from optimize import __version__, runtimes
from optimize.errors import first_line
from optimize.gpu import gpus
from optimize.gpu import unavailable_reason as gpu_unavailable_reason
from optimize.lazy import lazy
from optimize.recipe import GPU_TARGETS, TARGETS

torch = lazy("torch")
tensorrt = lazy("tensorrt")
onnxruntime = lazy("onnxruntime")
modelopt = lazy("modelopt")
mlflow = lazy("mlflow")

# TensorRT 10 is the oldest with strongly typed networks, which the engine stage relies on.
MIN_TENSORRT = 10
SECTIONS = ("python", "gpu", "torch", "tensorrt", "onnxruntime", "modelopt", "mlflow", "targets")


def diagnose() -> dict[str, Any]:
    """What this machine can do, one section per key of SECTIONS.

    Library sections have `available` (bool), `version` and `reason` (None when available);
    `targets` maps each recipe target to {"available", "reason", "gpu"}, the reason from
    optimize.runtimes.unavailable_reason.
    """
    return {
        "python": _python(),
        "gpu": _gpu(),
        "torch": _torch(),
        "tensorrt": _tensorrt(),
        "onnxruntime": _onnxruntime(),
        "modelopt": _modelopt(),
        "mlflow": _mlflow(),
        "targets": _targets(),
    }


def _python() -> dict[str, Any]:
    return {
        "version": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "optimize": __version__,
    }


def _gpu() -> dict[str, Any]:
    found = gpus()
    reason = None if found else gpu_unavailable_reason()
    return {
        "available": bool(found),
        "reason": reason,
        "driver": found[0].driver if found else None,
        "cuda_driver": found[0].cuda_driver if found else None,
        "devices": [g.record() for g in found],
    }


def _missing(reason: str, **extra: Any) -> dict[str, Any]:
    return {"available": False, "version": None, "reason": reason, **extra}


def _import_failure(name: str, e: BaseException) -> str:
    if isinstance(e, ModuleNotFoundError) and e.name == name:
        return f"{name} is not installed"
    return f"{name} cannot be imported: {first_line(e)}"


def _torch() -> dict[str, Any]:
    try:
        version = torch.__version__
    except Exception as e:
        return _missing(_import_failure("torch", e), cuda=None, cuda_available=False, device_count=0)
    cuda = torch.version.cuda
    # torch explains a failed CUDA probe (no driver, driver too old) only in a warning: keep its text
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cuda_available = bool(torch.cuda.is_available())
            device_count = torch.cuda.device_count() if cuda_available else 0
            probe_error = None
        except Exception as e:
            cuda_available, device_count, probe_error = False, 0, first_line(e)
    cuda_reason = None
    if not cuda_available:
        if cuda is None:
            cuda_reason = f"torch {version} is a CPU-only build"
        elif probe_error or caught:
            cuda_reason = probe_error or first_line(caught[-1].message)  # type: ignore[arg-type]
        else:
            cuda_reason = "torch sees no CUDA device"
    return {
        "available": True,
        "version": version,
        "reason": None,
        "cuda": cuda,
        "cuda_available": cuda_available,
        "cuda_reason": cuda_reason,
        "device_count": device_count,
    }


def _tensorrt() -> dict[str, Any]:
    extra = {"required": f">= {MIN_TENSORRT}"}
    try:
        version = str(getattr(tensorrt, "__version__", "unknown"))
    except Exception as e:  # besides ImportError, a wheel without its libraries raises OSError
        reason = _import_failure("tensorrt", e)
        if reason.endswith("not installed"):
            reason += " (pip install 'optimize[gpu]' on a GPU machine that reaches NVIDIA's package host)"
        return _missing(reason, **extra)
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = None
    if major is not None and major < MIN_TENSORRT:
        return {
            "available": False,
            "version": version,
            "reason": f"TensorRT {version} is too old: optimize needs TensorRT >= {MIN_TENSORRT}",
            **extra,
        }
    return {"available": True, "version": version, "reason": None, **extra}


def _onnxruntime() -> dict[str, Any]:
    # onnxruntime and onnxruntime-gpu install the same module and break each other: name which is here
    packages = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            packages.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        version = onnxruntime.__version__
    except Exception as e:
        return _missing(_import_failure("onnxruntime", e), providers=[], packages=packages)
    return {
        "available": True,
        "version": version,
        "reason": None,
        "providers": list(onnxruntime.get_available_providers()),
        "packages": packages,
    }


def _modelopt() -> dict[str, Any]:
    try:
        version = importlib.metadata.version("nvidia-modelopt")
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        modelopt.__spec__  # noqa: B018 (the first attribute read imports it)
    except Exception as e:
        reason = _import_failure("modelopt", e)
        if version is None and "not installed" in reason:
            reason += " (pip install 'optimize[modelopt]')"
        return _missing(reason, version=version)
    return {"available": True, "version": version, "reason": None}


def _mlflow() -> dict[str, Any]:
    try:
        version = mlflow.__version__
    except Exception as e:
        return _missing(_import_failure("mlflow", e))
    return {"available": True, "version": version, "reason": None}


def _targets() -> dict[str, Any]:
    targets = {}
    for target in TARGETS:
        try:
            reason = runtimes.unavailable_reason(target)
        except Exception as e:  # a broken check is a finding, not a crash of the report
            reason = f"the availability check failed: {type(e).__name__}: {first_line(e)}"
        targets[target] = {"available": reason is None, "reason": reason, "gpu": target in GPU_TARGETS}
    return targets


# --- text --------------------------------------------------------------------------------------------

_OK, _NO = "✓", "✗"


def _mark(ok: bool) -> str:
    return _OK if ok else _NO


def _block(title: str, rows: list[tuple[str, str, str]]) -> list[str]:
    """A titled block of (mark, label, text) rows with the labels aligned."""
    width = max((len(label) for _, label, _ in rows), default=0)
    lines = [title]
    for mark, label, text in rows:
        lines.append(f"  {mark or ' '} {label.ljust(width)}  {text}".rstrip())
    return lines


def _library(section: dict[str, Any], label: str) -> tuple[str, str, str]:
    """The row for a library: ✓ and its version, or ✗ and why it cannot be used."""
    if section["available"]:
        return _OK, label, section.get("version") or "installed (version unknown)"
    return _NO, label, section["reason"]


def render(report: dict[str, Any]) -> str:
    """The report from diagnose() as aligned plain text: one block per section, ✓/✗ and the reasons."""
    py, g = report["python"], report["gpu"]
    blocks = [
        _block(
            "Python",
            [
                ("", "version", f"{py['version']}  ({py['executable']})"),
                ("", "platform", py["platform"]),
                ("", "optimize", py["optimize"]),
            ],
        )
    ]
    gpu_rows: list[tuple[str, str, str]] = []
    if g["available"]:
        for d in g["devices"]:
            gpu_rows.append(
                (
                    _OK,
                    f"GPU {d['index']}",
                    f"{d['name']}  cc {d['compute_capability']} (sm{d['sm']})  "
                    f"{d['memory_total_mb']:.0f} MB  {d['uuid']}",
                )
            )
        gpu_rows += [("", "driver", g["driver"]), ("", "CUDA driver", g["cuda_driver"])]
    else:
        gpu_rows.append((_NO, "GPU", g["reason"]))
    blocks.append(_block("NVIDIA GPU", gpu_rows))

    t = report["torch"]
    torch_rows = [_library(t, "torch")]
    if t["available"]:
        if t["cuda_available"]:
            torch_rows.append((_OK, "CUDA", f"{t['cuda']}  ({t['device_count']} device(s))"))
        else:
            built = f"built for CUDA {t['cuda']}: " if t["cuda"] else ""
            torch_rows.append((_NO, "CUDA", built + t["cuda_reason"]))
    blocks.append(_block("torch", torch_rows))

    trt = report["tensorrt"]
    blocks.append(_block("TensorRT", [_library(trt, "tensorrt"), ("", "required", trt["required"])]))

    ort = report["onnxruntime"]
    ort_rows = [_library(ort, "onnxruntime")]
    if ort["available"]:
        ort_rows.append(("", "providers", ", ".join(ort["providers"]) or "(none)"))
    if len(ort["packages"]) > 1:
        ort_rows.append((_NO, "packages", f"{' and '.join(ort['packages'])} are both installed: keep one"))
    blocks.append(_block("ONNX Runtime", ort_rows))

    blocks.append(_block("ModelOpt", [_library(report["modelopt"], "modelopt")]))
    blocks.append(_block("MLflow", [_library(report["mlflow"], "mlflow")]))

    target_rows = [
        (_mark(t["available"]), name, "available" if t["available"] else t["reason"])
        for name, t in report["targets"].items()
    ]
    blocks.append(_block("Targets", target_rows))
    return "\n\n".join("\n".join(b) for b in blocks) + "\n"
