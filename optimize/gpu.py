"""Facts about this machine's NVIDIA GPUs and this process's GPU memory, read through NVML (`pynvml`).

NVML is imported and initialised only when a function here is called, never at import time, so this
module is safe to import on machines without a GPU, a driver or the `nvidia-ml-py` package.
Indices are NVML's (nvidia-smi's order), which differ from CUDA's under CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from types import ModuleType, TracebackType
from typing import Any

from optimize.errors import RuntimeMissingError, first_line
from optimize.lazy import lazy

pynvml = lazy("pynvml")

__all__ = ["GpuInfo", "ProcessGpuMemory", "gpu", "gpus", "unavailable_reason"]

_MB = 1024 * 1024
# pynvml's code for "the installed driver's NVML has no such function" (NVML_ERROR_FUNCTION_NOT_FOUND).
_FUNCTION_NOT_FOUND = 13
# Newest first: the unversioned name is pynvml's alias for its newest struct and refuses older drivers.
_PROCESS_QUERIES = (
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetComputeRunningProcesses",
)

_lock = threading.Lock()
_users = 0  # open NVML sessions in this process; NVML is shut down when the last one closes


class _NvmlUnavailable(Exception):
    """NVML cannot be used here; the message is the one-line reason."""


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU as NVML describes it."""

    index: int
    name: str
    compute_capability: str  # "9.0"
    sm: str  # "90": the compute capability without the dot, for file names
    memory_total_mb: float
    driver: str  # NVIDIA driver version, "575.57.08"
    cuda_driver: str  # newest CUDA version the driver supports, "12.9"
    uuid: str

    def record(self) -> dict[str, Any]:
        """The GPU as a JSON-ready dict (for manifests and reports)."""
        return asdict(self)


def _text(value: Any) -> str:
    # pynvml before 11.5 returned bytes from the string getters
    return value.decode() if isinstance(value, bytes) else str(value)


def _init_failure(e: BaseException) -> str:
    msg = first_line(e)
    if "Library Not Found" in msg or "Driver Not Loaded" in msg:
        msg += " (no NVIDIA driver on this machine?)"
    return f"NVML init failed: {msg}"


@contextmanager
def _nvml() -> Iterator[ModuleType]:
    """An initialised pynvml for the duration of the block (raises _NvmlUnavailable with the reason)."""
    global _users
    try:
        init, shutdown = pynvml.nvmlInit, pynvml.nvmlShutdown  # the first attribute read imports pynvml
    except ImportError:
        raise _NvmlUnavailable("pynvml is not installed (pip install nvidia-ml-py)") from None
    with _lock:
        if _users == 0:
            try:
                init()
            except Exception as e:  # NVMLError, or OSError from loading the library
                raise _NvmlUnavailable(_init_failure(e)) from None
        _users += 1
    try:
        yield pynvml
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                try:
                    shutdown()
                except Exception:  # a failed shutdown leaves nothing for us to undo
                    pass


def _cuda_driver(nvml: ModuleType) -> str:
    query = getattr(nvml, "nvmlSystemGetCudaDriverVersion_v2", None) or nvml.nvmlSystemGetCudaDriverVersion
    version = int(query())  # 12040 → "12.4"
    return f"{version // 1000}.{version % 1000 // 10}"


def _info(nvml: ModuleType, index: int, driver: str, cuda_driver: str) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    return GpuInfo(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        compute_capability=f"{major}.{minor}",
        sm=f"{major}{minor}",
        memory_total_mb=round(nvml.nvmlDeviceGetMemoryInfo(handle).total / _MB, 1),
        driver=driver,
        cuda_driver=cuda_driver,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
    )


def _probe() -> tuple[list[GpuInfo], str | None]:
    """(the GPUs, None) or ([], why there are none)."""
    try:
        with _nvml() as nvml:
            count = nvml.nvmlDeviceGetCount()
            if count == 0:
                return [], "NVML works but sees no GPU"
            driver, cuda_driver = _text(nvml.nvmlSystemGetDriverVersion()), _cuda_driver(nvml)
            return [_info(nvml, i, driver, cuda_driver) for i in range(count)], None
    except _NvmlUnavailable as e:
        return [], str(e)
    except Exception as e:  # an NVML query failed after a good init (e.g. a GPU fallen off the bus)
        return [], f"NVML query failed: {first_line(e)}"


def gpus() -> list[GpuInfo]:
    """The NVIDIA GPUs NVML sees, in NVML order; [] when there is no driver, no NVML or no GPU."""
    return _probe()[0]


def unavailable_reason() -> str | None:
    """None when NVML works and sees at least one GPU, else one line saying why not."""
    return _probe()[1]


def gpu(index: int = 0) -> GpuInfo:
    """The GPU at NVML `index`; raises RuntimeMissingError (exit 4) with the reason when it is absent."""
    found, reason = _probe()
    if reason:
        raise RuntimeMissingError(f"GPU {index}: {reason}")
    if not 0 <= index < len(found):
        raise RuntimeMissingError(f"GPU {index}: no such GPU; NVML sees {len(found)} (indices 0..{len(found) - 1})")
    return found[index]


class ProcessGpuMemory:
    """Samples one process's GPU memory on one GPU through NVML while the block runs.

        with ProcessGpuMemory() as mem:
            run_the_model()
        mem.peak_mb  # None (with mem.note saying why) where NVML cannot tell

    NVML reports memory per process (what nvidia-smi shows: the CUDA context plus allocations,
    including the caching allocator's reserve), not per allocation. A reading is only ever NVML's
    own number: where NVML has none (no NVML, the process not listed, `usedGpuMemory` unavailable as
    in some containers and under Windows WDDM), the reading is None and `note` says why.
    """

    def __init__(self, index: int = 0, pid: int | None = None, interval_s: float = 0.005) -> None:
        if not interval_s > 0:
            raise ValueError(f"ProcessGpuMemory: interval_s must be > 0, got {interval_s}")
        self.index = index
        self.pid = os.getpid() if pid is None else pid
        self.interval_s = interval_s
        self.peak_mb: float | None = None
        self.last_mb: float | None = None
        self.samples = 0  # readings that gave a number
        self.polls = 0  # readings attempted
        self._miss: str | None = None  # why the latest reading gave no number
        self._errors = 0  # readings that failed with an NVML error
        self._error: str | None = None
        self._state = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._session: Any = None  # the open _nvml() context while active
        self._nvml: ModuleType | None = None
        self._handle: Any = None
        self._query: Any = None

    @property
    def note(self) -> str | None:
        """Why `peak_mb` is None, or what went wrong in some readings; None when every reading worked.

        A process that has not created its CUDA context yet is not listed by NVML; once it has a
        reading, earlier "not listed" polls are not worth a note.
        """
        with self._state:
            if self.samples == 0:
                return self._miss or (None if self.polls else "no reading was taken")
            if self._errors:
                return f"{self._errors} of {self.polls} readings failed: {self._error}"
            return None

    def __enter__(self) -> ProcessGpuMemory:
        session = _nvml()
        try:
            self._nvml = session.__enter__()
        except _NvmlUnavailable as e:
            self._miss = str(e)
            return self
        self._session = session
        try:
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception as e:
            self._miss = f"GPU {self.index}: {first_line(e)}"
            self._close()
            return self
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name=f"gpu{self.index}-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._handle is not None:
            self.sample()  # a block shorter than the interval still gets its end state
        self._close()

    def _close(self) -> None:
        if self._session is not None:
            self._session.__exit__(None, None, None)
        self._session = self._nvml = self._handle = self._query = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> float | None:
        """One reading now: this process's GPU memory in MB, or None (see `note`)."""
        nvml, handle = self._nvml, self._handle
        if nvml is None or handle is None:  # NVML unavailable, or outside the `with` block
            with self._state:
                self._miss = self._miss or "not sampling: readings are taken inside `with ProcessGpuMemory(...)`"
            return None
        try:
            processes = self._processes(nvml, handle)
        except Exception as e:
            with self._state:
                self.polls += 1
                self._errors += 1
                self._error = self._miss = f"NVML process query on GPU {self.index} failed: {first_line(e)}"
            return None
        mine = [p for p in processes if getattr(p, "pid", None) == self.pid]
        used = [p.usedGpuMemory for p in mine if getattr(p, "usedGpuMemory", None) is not None]
        with self._state:
            self.polls += 1
            if not mine:
                self._miss = self._not_listed(processes)
                return None
            if not used:
                self._miss = (
                    f"NVML lists pid {self.pid} on GPU {self.index} but reports its memory as unavailable "
                    "(usedGpuMemory is None: a container without access to the host's process table, "
                    "or Windows WDDM)"
                )
                return None
            # one process can hold several contexts (MIG instances, MPS): its memory is their sum
            mb = sum(used) / _MB
            self.last_mb = mb
            self.peak_mb = mb if self.peak_mb is None else max(self.peak_mb, mb)
            self.samples += 1
            return mb

    def _not_listed(self, processes: list[Any]) -> str:
        why = f"pid {self.pid} is not among the {len(processes)} process(es) NVML lists on GPU {self.index}"
        hints = ["it has no CUDA context there yet", "or its PID differs from the host's (a container)"]
        if os.environ.get("CUDA_VISIBLE_DEVICES"):
            hints.append(f"or CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} maps it to another NVML index")
        return f"{why} ({', '.join(hints)})"

    def _processes(self, nvml: ModuleType, handle: Any) -> list[Any]:
        if self._query is not None:
            return list(self._query(handle))
        error: BaseException | None = None
        for name in _PROCESS_QUERIES:
            query = getattr(nvml, name, None)
            if query is None:
                continue
            try:
                result = list(query(handle))
            except Exception as e:
                if _missing_function(nvml, e):
                    error = e
                    continue  # this driver's NVML predates that struct version: try the older one
                raise
            self._query = query
            return result
        raise RuntimeError(
            "no nvmlDeviceGetComputeRunningProcesses variant works with this driver"
            + (f" ({first_line(error)})" if error else "")
        )


def _missing_function(nvml: ModuleType, e: BaseException) -> bool:
    """True when `e` says the driver's NVML lacks the function (not that the call failed)."""
    mismatch = getattr(nvml, "NVMLLibraryMismatchError", None)
    if mismatch is not None and isinstance(e, mismatch):
        return True
    return getattr(e, "value", None) == getattr(nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", _FUNCTION_NOT_FOUND)
