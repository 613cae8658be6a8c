"""Fixtures for the deploy renderers: a DeployInputs made from recipes/fp16.yaml's `serving:` and `rollout:`
sections, a canary and a stable registered version, and a first rollout (no stable version).

The numbers in `Measured` below are STATED inputs for rendering, chosen so the arithmetic is easy to check by
hand (0.245 cores / 0.7 -> 350m; 409.6 MB / 0.8 -> 512Mi); they are not measurements of anything."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from optimize.deploy.inputs import DeployInputs, Measured, Version
from optimize.recipe import Recipe, RolloutSection, ServingSection, load_recipe
from optimize.runtimes.base import TensorSpec

REPO = Path(__file__).resolve().parents[2]

# Stated, not measured (see the module docstring): the load test's numbers a registered version would carry.
CANARY_MEASURED = Measured(max_rps_at_slo=120.0, cpu_cores=0.245, rss_peak_mb=409.6, target="onnxruntime-cpu")
STABLE_MEASURED = Measured(max_rps_at_slo=110.0, cpu_cores=0.25, rss_peak_mb=400.0, target="onnxruntime-cpu")

# all-MiniLM-L6-v2's exported I/O (recipes/bases/minilm.yaml's export section)
MINILM_INPUTS = tuple(
    TensorSpec(name, "int64", ("batch", "sequence")) for name in ("input_ids", "attention_mask", "token_type_ids")
)
MINILM_OUTPUTS = (TensorSpec("sentence_embedding", "float32", ("batch", 384)),)


@pytest.fixture(scope="session")
def fp16_recipe() -> Recipe:
    """recipes/fp16.yaml, loaded once."""
    return load_recipe(REPO / "recipes" / "fp16.yaml")


@pytest.fixture
def deploy_inputs(tmp_path: Path, fp16_recipe: Recipe) -> DeployInputs:
    """A canary (version 3) replacing a stable (version 2) of minilm-fp16, with the recipe's own `serving:` and
    `rollout:` sections and STATED load-test numbers (CANARY_MEASURED, STABLE_MEASURED: inputs for rendering, not
    measurements). `model_file` is a placeholder file, not a real ONNX model: a test that needs a real one (the
    Triton repository's check) builds its own and replaces it with dataclasses.replace."""
    model_file = tmp_path / "model.onnx"
    model_file.write_bytes(b"placeholder: not an ONNX model")
    name = fp16_recipe.registry.model_name or fp16_recipe.name
    return DeployInputs(
        canary=Version(
            model=name, number=3, sha256="c" * 64, variant="fp16", precision="fp16", measured=CANARY_MEASURED
        ),
        stable=Version(
            model=name, number=2, sha256="5" * 64, variant="fp16", precision="fp16", measured=STABLE_MEASURED
        ),
        image="registry.example/optimize:1.0",
        tracking_uri="http://mlflow.mlops:5000",
        serving=fp16_recipe.serving,
        rollout=fp16_recipe.rollout,
        inputs=MINILM_INPUTS,
        outputs=MINILM_OUTPUTS,
        model_file=model_file,
    )


@pytest.fixture
def first_rollout(deploy_inputs: DeployInputs) -> DeployInputs:
    """`deploy_inputs` with no stable version: the first rollout of the model, the canary takes all traffic."""
    return dataclasses.replace(deploy_inputs, stable=None)


@pytest.fixture
def with_sections() -> Callable[..., DeployInputs]:
    """A function `(inputs, rollout={...}, serving={...}, **fields) -> DeployInputs`: `inputs` with some of its
    recipe sections' fields changed (validated as the recipe would be, nested dicts merged one level) and other
    DeployInputs fields replaced, e.g. `with_sections(deploy_inputs, rollout={"namespace": "ml", "rps": 500})`."""

    def change(
        inputs: DeployInputs,
        *,
        rollout: dict[str, Any] | None = None,
        serving: dict[str, Any] | None = None,
        **fields: Any,
    ) -> DeployInputs:
        if rollout:
            fields["rollout"] = RolloutSection.model_validate(_merged(inputs.rollout.model_dump(), rollout))
        if serving:
            fields["serving"] = ServingSection.model_validate(_merged(inputs.serving.model_dump(), serving))
        return dataclasses.replace(inputs, **fields)

    return change


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out
