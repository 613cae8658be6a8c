"""The machine a run is on, for its manifest and for the cache keys that depend on it: library versions, the
CPU (model, instruction sets, cores), memory, GPUs (NVML) and OS. Reads files and package metadata only: no
torch, ONNX Runtime or MLflow is imported."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from optimize import __version__
from optimize.cpu import isa as cpu_isa
from optimize.gpu import gpus

LIBRARIES = (
    "torch",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "mlflow",
    "numpy",
    "transformers",
    "nvidia-modelopt",
    "tensorrt",
    "nvidia-ml-py",
    # optimize serve and the load generator (the serving unit keys on them)
    "starlette",
    "uvicorn",
    "prometheus-client",
)


def environment(probe_gpus: bool = True) -> dict[str, Any]:
    """Library versions, hardware and OS for the manifest. `probe_gpus=False` leaves `gpus` empty without
    loading NVML (`optimize plan` where no GPU target runs: nothing it keys on depends on them)."""
    versions = {"python": platform.python_version(), "optimize": __version__}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    mem_gb = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            gpu = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            gpu = None
    return {
        "versions": versions,
        "hardware": {
            "cpu": cpu,
            # which kernels run: INT8 accuracy and all timings depend on it, and a model name does not say it
            "cpu_isa": cpu_isa(),
            "cores": os.cpu_count(),
            "memory_gb": mem_gb,
            "gpu": gpu,
            "gpus": [g.record() for g in gpus()] if probe_gpus else [],  # NVML: name, cc, driver, CUDA, memory
        },
        "os": f"{platform.system()} {platform.release()} ({platform.platform()})",
    }
