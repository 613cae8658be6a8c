"""optimize.gpu: GPU facts and per-process GPU memory through NVML.

Without a GPU: the real behaviour (reasons, exit 4, no made-up numbers). The sampler's logic runs
against FakeNvml, a test double of `pynvml` installed in sys.modules. Tests marked `gpu` run on an
NVIDIA machine (with torch, numpy, pynvml; no mlflow or onnx is imported here).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import pytest

from optimize.errors import RuntimeMissingError
from optimize.gpu import GpuInfo, ProcessGpuMemory, gpu, gpus, unavailable_reason

MIB = 1024 * 1024
ME = 4242  # the pid the sampler watches in FakeNvml tests

no_gpu = pytest.mark.skipif(unavailable_reason() is None, reason="this machine has a working NVIDIA GPU")


# --- FakeNvml: a test double of pynvml ------------------------------------------------------------


class FakeNVMLError(Exception):
    """Like pynvml.NVMLError: carries the NVML return code in `value`."""

    def __init__(self, value: int, text: str = "") -> None:
        super().__init__(text or f"NVML error {value}")
        self.value = value


@dataclass
class Proc:
    pid: int
    usedGpuMemory: int | None  # noqa: N815 (pynvml's field name)


class FakeNvml:
    """The parts of pynvml that optimize.gpu uses, with scripted answers.

    `processes` is what the process queries return now (a list, or an exception to raise);
    `missing` names query functions that this "driver" lacks (they raise FUNCTION_NOT_FOUND).
    """

    NVMLError = FakeNVMLError
    NVML_ERROR_FUNCTION_NOT_FOUND = 13

    def __init__(self, count: int = 1, init_error: Exception | None = None) -> None:
        self.count = count
        self.init_error = init_error
        self.inits = 0
        self.shutdowns = 0
        self.processes: list[Proc] | Exception = []
        self.missing: set[str] = set()
        self.calls: list[str] = []

    @property
    def open(self) -> int:
        return self.inits - self.shutdowns

    def nvmlInit(self) -> None:  # noqa: N802 (pynvml's names)
        if self.init_error:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def _live(self) -> None:
        assert self.open > 0, "NVML used outside nvmlInit/nvmlShutdown"

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        self._live()
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        self._live()
        if not 0 <= index < self.count:
            raise FakeNVMLError(2, "Invalid Argument")
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:  # noqa: N802
        return b"NVIDIA H100 80GB HBM3" if handle == 0 else b"NVIDIA L4"  # old pynvml returned bytes

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:  # noqa: N802
        return (9, 0) if handle == 0 else (8, 9)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:  # noqa: N802
        return type("Memory", (), {"total": 81559 * MIB if handle == 0 else 23034 * MIB})()

    def nvmlDeviceGetUUID(self, handle: int) -> str:  # noqa: N802
        return f"GPU-0000000{handle}-aaaa-bbbb-cccc-dddddddddddd"

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        return "575.57.08"

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:  # noqa: N802
        return 12090

    def _query(self, name: str, handle: int) -> list[Proc]:
        self._live()
        self.calls.append(name)
        if name in self.missing:
            raise FakeNVMLError(13, "Function Not Found")
        if isinstance(self.processes, Exception):
            raise self.processes
        return list(self.processes)

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: int) -> list[Proc]:  # noqa: N802
        return self._query("v3", handle)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: int) -> list[Proc]:  # noqa: N802
        return self._query("v2", handle)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Proc]:  # noqa: N802
        return self._query("v1", handle)


@pytest.fixture()
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    """A FakeNvml with one GPU, installed as `pynvml`."""
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def sampler(**kwargs: Any) -> ProcessGpuMemory:
    """A sampler for pid ME whose thread stays idle, so that only explicit sample() calls read."""
    return ProcessGpuMemory(pid=ME, interval_s=kwargs.pop("interval_s", 60.0), **kwargs)


# --- the real behaviour on a machine without a GPU ------------------------------------------------


def test_importing_gpu_does_not_touch_nvml() -> None:
    code = "import sys, optimize.gpu; print('pynvml' in sys.modules, 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False", "False"], proc.stderr


@no_gpu
def test_no_gpu_here_gives_empty_list_and_one_line_reason() -> None:
    assert gpus() == []
    reason = unavailable_reason()
    assert reason and "\n" not in reason
    assert re.match(r"(pynvml is not installed|NVML init failed: |NVML works but sees no GPU)", reason), reason


@no_gpu
def test_no_gpu_here_gpu_raises_exit_4_with_the_reason() -> None:
    with pytest.raises(RuntimeMissingError) as e:
        gpu()
    assert e.value.exit_code == 4
    assert str(e.value) == f"GPU 0: {unavailable_reason()}"


@no_gpu
def test_no_gpu_here_sampler_leaves_peak_none_and_says_why() -> None:
    with ProcessGpuMemory() as mem:
        assert mem.sample() is None
    assert (mem.peak_mb, mem.last_mb, mem.samples) == (None, None, 0)
    assert mem.note == unavailable_reason()


def test_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert gpus() == []
    assert unavailable_reason() == "pynvml is not installed (pip install nvidia-ml-py)"
    with pytest.raises(RuntimeMissingError, match="pynvml is not installed"):
        gpu()
    with ProcessGpuMemory() as mem:
        pass
    assert mem.peak_mb is None
    assert mem.note == "pynvml is not installed (pip install nvidia-ml-py)"


# --- GPU facts, against FakeNvml ------------------------------------------------------------------


def test_init_failure_is_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(init_error=FakeNVMLError(9, "Driver Not Loaded"))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert gpus() == []
    assert unavailable_reason() == "NVML init failed: Driver Not Loaded (no NVIDIA driver on this machine?)"
    assert fake.inits == fake.shutdowns == 0


def test_no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(count=0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert gpus() == []
    assert unavailable_reason() == "NVML works but sees no GPU"
    with pytest.raises(RuntimeMissingError, match="^GPU 0: NVML works but sees no GPU$"):
        gpu(0)
    assert fake.open == 0


def test_gpus_describes_each_device(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(count=2)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    found = gpus()
    assert found == [
        GpuInfo(
            index=0,
            name="NVIDIA H100 80GB HBM3",
            compute_capability="9.0",
            sm="90",
            memory_total_mb=81559.0,
            driver="575.57.08",
            cuda_driver="12.9",
            uuid="GPU-00000000-aaaa-bbbb-cccc-dddddddddddd",
        ),
        GpuInfo(
            index=1,
            name="NVIDIA L4",
            compute_capability="8.9",
            sm="89",
            memory_total_mb=23034.0,
            driver="575.57.08",
            cuda_driver="12.9",
            uuid="GPU-00000001-aaaa-bbbb-cccc-dddddddddddd",
        ),
    ]
    assert unavailable_reason() is None
    assert gpu(1).name == "NVIDIA L4"
    assert found[0].record() == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "sm": "90",
        "memory_total_mb": 81559.0,
        "driver": "575.57.08",
        "cuda_driver": "12.9",
        "uuid": "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd",
    }
    assert fake.inits == fake.shutdowns == 3  # every call opens and closes its own NVML session


def test_gpu_index_out_of_range_exits_4(nvml: FakeNvml) -> None:
    with pytest.raises(RuntimeMissingError, match=r"^GPU 3: no such GPU; NVML sees 1 \(indices 0..0\)$") as e:
        gpu(3)
    assert e.value.exit_code == 4


def test_cuda_driver_version_falls_back_to_the_unversioned_query(monkeypatch: pytest.MonkeyPatch) -> None:
    class OldNvml(FakeNvml):
        nvmlSystemGetCudaDriverVersion_v2 = None  # type: ignore[assignment]

        def nvmlSystemGetCudaDriverVersion(self) -> int:  # noqa: N802
            return 13000

    monkeypatch.setitem(sys.modules, "pynvml", OldNvml())
    assert gpu().cuda_driver == "13.0"


# --- ProcessGpuMemory, against FakeNvml -----------------------------------------------------------


def test_sampler_tracks_peak_and_last(nvml: FakeNvml) -> None:
    nvml.processes = [Proc(ME, 100 * MIB)]
    with sampler() as mem:
        assert mem.sample() == 100.0
        nvml.processes = [Proc(1, 5000 * MIB), Proc(ME, 300 * MIB)]
        assert mem.sample() == 300.0
        nvml.processes = [Proc(ME, 200 * MIB)]
    # __enter__ and __exit__ read too, so a block shorter than the interval still has both ends
    assert (mem.peak_mb, mem.last_mb, mem.samples, mem.note) == (300.0, 200.0, 4, None)
    assert nvml.open == 0


def test_sampler_sums_the_contexts_of_one_process(nvml: FakeNvml) -> None:
    nvml.processes = [Proc(ME, 100 * MIB), Proc(ME, 28 * MIB), Proc(ME + 1, 1 * MIB)]
    with sampler() as mem:
        pass
    assert mem.peak_mb == 128.0


def test_sampler_thread_polls_without_explicit_samples(nvml: FakeNvml) -> None:
    nvml.processes = [Proc(ME, 10 * MIB)]
    with ProcessGpuMemory(pid=ME, interval_s=0.001) as mem:
        deadline = time.monotonic() + 10
        while mem.samples < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        nvml.processes = [Proc(ME, 64 * MIB)]
        while mem.last_mb != 64.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        nvml.processes = [Proc(ME, 32 * MIB)]
    assert mem.samples >= 5
    assert (mem.peak_mb, mem.last_mb) == (64.0, 32.0)
    assert nvml.open == 0


def test_sampler_memory_unavailable_gives_none_and_a_note(nvml: FakeNvml) -> None:
    nvml.processes = [Proc(ME, None)]
    with sampler() as mem:
        assert mem.sample() is None
    assert (mem.peak_mb, mem.last_mb, mem.samples) == (None, None, 0)
    assert mem.note is not None
    assert f"NVML lists pid {ME} on GPU 0 but reports its memory as unavailable" in mem.note


def test_sampler_other_pid_only_gives_none_and_a_note(nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml.processes = [Proc(ME + 1, 500 * MIB)]
    with sampler() as mem:
        pass
    assert mem.peak_mb is None
    assert mem.note == (
        f"pid {ME} is not among the 1 process(es) NVML lists on GPU 0 "
        "(it has no CUDA context there yet, or its PID differs from the host's (a container))"
    )


def test_sampler_not_listed_note_names_cuda_visible_devices(nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with sampler() as mem:
        pass
    assert mem.note and "CUDA_VISIBLE_DEVICES=3" in mem.note


def test_sampler_not_listed_before_its_context_is_not_worth_a_note(nvml: FakeNvml) -> None:
    with sampler() as mem:  # no CUDA context yet: NVML lists nobody
        nvml.processes = [Proc(ME, 500 * MIB)]
    assert (mem.peak_mb, mem.samples, mem.note) == (500.0, 1, None)


def test_sampler_nvml_error_gives_none_and_a_note(nvml: FakeNvml) -> None:
    nvml.processes = FakeNVMLError(4, "Insufficient Permissions")
    with sampler() as mem:
        assert mem.sample() is None
    assert mem.peak_mb is None
    assert mem.note == "NVML process query on GPU 0 failed: Insufficient Permissions"
    assert nvml.open == 0


def test_sampler_some_failed_readings_are_counted_in_the_note(nvml: FakeNvml) -> None:
    nvml.processes = [Proc(ME, 100 * MIB)]
    with sampler() as mem:
        nvml.processes = FakeNVMLError(999, "Unknown Error")
        mem.sample()
        nvml.processes = [Proc(ME, 50 * MIB)]
    assert (mem.peak_mb, mem.last_mb) == (100.0, 50.0)
    assert mem.note == "1 of 3 readings failed: NVML process query on GPU 0 failed: Unknown Error"


def test_sampler_falls_back_to_older_query_versions(nvml: FakeNvml) -> None:
    nvml.missing = {"v3"}
    nvml.processes = [Proc(ME, 10 * MIB)]
    with sampler() as mem:
        mem.sample()
    assert mem.peak_mb == 10.0
    assert nvml.calls == ["v3", "v2", "v2", "v2"]  # the working version is remembered


def test_sampler_uses_whichever_query_pynvml_has(monkeypatch: pytest.MonkeyPatch) -> None:
    class OldNvml(FakeNvml):
        nvmlDeviceGetComputeRunningProcesses_v3 = None  # type: ignore[assignment]
        nvmlDeviceGetComputeRunningProcesses_v2 = None  # type: ignore[assignment]

    fake = OldNvml()
    fake.processes = [Proc(ME, 7 * MIB)]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with sampler() as mem:
        pass
    assert mem.peak_mb == 7.0
    assert set(fake.calls) == {"v1"}


def test_sampler_with_no_working_query_says_so(nvml: FakeNvml) -> None:
    nvml.missing = {"v1", "v2", "v3"}
    with sampler() as mem:
        pass
    assert mem.peak_mb is None
    assert mem.note and "no nvmlDeviceGetComputeRunningProcesses variant works with this driver" in mem.note


def test_sampler_on_a_missing_gpu_says_so(nvml: FakeNvml) -> None:
    with sampler(index=5) as mem:
        pass
    assert (mem.peak_mb, mem.note) == (None, "GPU 5: Invalid Argument")
    assert nvml.open == 0


def test_sampler_shares_one_nvml_session_and_closes_it_on_error(nvml: FakeNvml) -> None:
    nvml.processes = [Proc(ME, 1 * MIB)]
    with pytest.raises(KeyError), sampler() as mem:
        assert len(gpus()) == 1  # a query inside the block reuses the open session
        assert nvml.inits == 1
        raise KeyError("the block's own error propagates")
    assert mem.peak_mb == 1.0
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_sample_outside_the_block_reads_nothing(nvml: FakeNvml) -> None:
    nvml.processes = [Proc(ME, 1 * MIB)]
    mem = sampler()
    assert mem.sample() is None
    assert mem.note == "not sampling: readings are taken inside `with ProcessGpuMemory(...)`"
    assert nvml.inits == 0


def test_sampler_defaults_to_this_process() -> None:
    assert ProcessGpuMemory().pid == os.getpid()


def test_sampler_refuses_a_busy_loop() -> None:
    with pytest.raises(ValueError, match="interval_s must be > 0, got 0"):
        ProcessGpuMemory(interval_s=0)


# --- on a real NVIDIA GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
def test_real_gpus_are_described() -> None:
    assert unavailable_reason() is None, unavailable_reason()
    found = gpus()
    assert found
    for g in found:
        major, minor = (int(x) for x in g.compute_capability.split("."))
        assert 5 <= major <= 15 and 0 <= minor <= 9, g
        assert g.sm == f"{major}{minor}"
        assert g.memory_total_mb > 1000, g
        assert re.fullmatch(r"\d+\.\d+", g.cuda_driver), g
        assert g.driver and g.name and g.uuid.startswith(("GPU-", "MIG-")), g
    assert gpu(0) == found[0]


def _nvml_index_of_cuda_device(torch: Any, device: int) -> int:
    """NVML's index of torch's CUDA `device` (they differ under CUDA_VISIBLE_DEVICES), matched by UUID."""
    uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", "")).lower()
    for g in gpus():
        if uuid and g.uuid.lower().removeprefix("gpu-") == uuid.removeprefix("gpu-"):
            return g.index
    return device


@pytest.mark.gpu
def test_real_sampler_sees_torch_allocate_256_mb() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    torch.zeros(1, device="cuda:0")  # create the CUDA context first: the baseline includes it
    torch.cuda.synchronize()
    with ProcessGpuMemory(index=_nvml_index_of_cuda_device(torch, 0), interval_s=0.002) as mem:
        before = mem.sample()
        if before is None:
            assert mem.note
            pytest.skip(f"NVML gives no per-process memory here: {mem.note}")
        block = torch.empty(256 * MIB, dtype=torch.uint8, device="cuda:0")
        block.fill_(1)
        torch.cuda.synchronize()
        time.sleep(0.05)
        after = mem.sample()
        del block
        torch.cuda.empty_cache()
    assert after is not None and mem.peak_mb is not None, mem.note
    assert mem.peak_mb - before >= 200, (before, after, mem.peak_mb)
    assert mem.samples >= 3
