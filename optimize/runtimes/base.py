"""The Runner interface every runtime implements: load one artifact on one device, run feeds to outputs."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from types import TracebackType

import numpy as np


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
