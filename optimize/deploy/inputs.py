"""What a render is made from: the canary (and stable) registered version, its measured serving numbers, its
tensors and the recipe's `serving:` and `rollout:` sections, as frozen dataclasses the renderers take."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from optimize.recipe import RolloutSection, ServingSection
from optimize.runtimes.base import TensorSpec


@dataclass(frozen=True)
class Measured:
    """The version's load test (its `loadtest.*` tags): the highest load within the SLO, and at the judged step
    the server's CPU (cores: CPU seconds per second) and peak RSS."""

    max_rps_at_slo: float
    cpu_cores: float
    rss_peak_mb: float
    target: str  # where it was measured, e.g. onnxruntime-cpu


@dataclass(frozen=True)
class Version:
    """One registered model version as a rollout names it."""

    model: str  # registered model name
    number: int
    sha256: str
    variant: str
    precision: str
    measured: Measured | None  # None: the version was not load-tested

    @property
    def uri(self) -> str:
        """The pinned URI pods serve (an alias could move under running pods; a number does not)."""
        return f"models:/{self.model}/{self.number}"

    @property
    def label(self) -> str:
        """The pods' `version` label (what Istio's `destination_version` reports): `v<N>`."""
        return f"v{self.number}"


@dataclass(frozen=True)
class DeployInputs:
    """Everything a render takes. `stable` is None on a first rollout (no production version yet): the canary
    then takes all traffic at once and nothing compares against a stable version."""

    canary: Version
    stable: Version | None
    image: str
    tracking_uri: str  # what the pods download their version from (MLFLOW_TRACKING_URI)
    serving: ServingSection
    rollout: RolloutSection
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    model_file: Path  # the canary's verified model.onnx (the Triton repository copies it)
    engine_file: Path | None = None  # a TensorRT plan for Triton's tensorrt_plan platform

    @property
    def app(self) -> str:
        """The Kubernetes name of the service: the model name as a DNS-1035 label."""
        return k8s_name(self.canary.model)


def k8s_name(name: str, max_len: int = 50) -> str:
    """`name` as a DNS-1035 label (lowercase alphanumerics and '-', starting with a letter), short enough that
    suffixes such as `-canary` and `-stable` still fit in 63 characters."""
    out = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not out or not out[0].isalpha():
        out = "m-" + out
    return out[:max_len].rstrip("-")
