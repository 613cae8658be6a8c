"""The Runner interface every runtime implements: load one artifact on one device, run feeds to outputs."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from optimize.lazy import lazy

np = lazy("numpy")


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of a model: name, numpy dtype name, shape (ints, or axis names when dynamic)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


class Runner(abc.ABC):
    """Runs one model artifact on one target. Use as a context manager; `close()` frees the session."""

    target: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @abc.abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns host arrays keyed by output name (results are complete on return)."""

    def close(self) -> None:  # noqa: B027 - a no-op default; runners with resources override it
        """Release the session and its memory."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class DeviceRunner(Runner):
    """A runner whose model runs on a CUDA GPU. Besides `run`, it exposes the phases that GPU timing
    brackets with CUDA events; all but `prepare` are enqueued on `stream` (a `torch.cuda.Stream`):

        prepare(feeds)  host copy of the feeds into the runner's pinned host buffers (not timed: as in
                        trtexec, H2D is the copy from pinned memory to the device)
        stage()         pinned host → device copy of the inputs (sets the input shapes)
        compute()       the model on the staged inputs (enqueue only; returns before the GPU is done)
        fetch()         device → pinned host copy of the outputs

    After `stream.synchronize()`, `outputs_host()` returns the fetched outputs. `run` does all of it.
    """

    stream: Any

    @abc.abstractmethod
    def prepare(self, feeds: dict[str, np.ndarray]) -> None:
        """Copy `feeds` into the pinned host input buffers (waits until the last `stage` has read them)."""

    @abc.abstractmethod
    def stage(self) -> None:
        """Enqueue the pinned host → device copy of the prepared inputs."""

    @abc.abstractmethod
    def compute(self) -> None:
        """Enqueue the model on the staged inputs."""

    @abc.abstractmethod
    def fetch(self) -> None:
        """Enqueue the device → host copy of the outputs."""

    @abc.abstractmethod
    def outputs_host(self) -> dict[str, np.ndarray]:
        """The fetched outputs (valid once the stream is synchronised); copies, keyed by output name."""

    def device_memory(self) -> dict[str, float]:
        """Device memory the runtime reports for this model (MB), e.g. a TensorRT engine's activation memory."""
        return {}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Prepare, stage, compute and fetch one batch, wait for the stream, return the outputs."""
        self.prepare(feeds)
        self.stage()
        self.compute()
        self.fetch()
        self.stream.synchronize()
        return self.outputs_host()
