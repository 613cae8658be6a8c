"""optimize/deploy/sizing.py: pod resources from the load test and the SLO's headroom, stated resources, expected
replicas for a stated rate, the shutdown timings, and the exit-2 errors when none of it can be derived."""

from __future__ import annotations

import dataclasses

import pytest

from optimize.deploy.sizing import size, size_stable
from optimize.errors import RecipeError


def test_resources_follow_the_load_test_and_the_slo_headroom(deploy_inputs):
    sized = size(deploy_inputs)
    # 0.245 cores at max_rps_at_slo / slo.cpu_utilisation 0.7; 409.6 MiB peak RSS / slo.memory_utilisation 0.8
    assert (sized.cpu_request, sized.memory) == ("350m", "512Mi")
    assert sized.cpu_limit == "1000m"  # 2 x 350m is below one whole core for the (unset: 1) serving.threads
    assert sized.version == 3 and sized.max_rps_at_slo == 120.0
    assert sized.queue_depth_target == deploy_inputs.serving.max_batch_size == 16
    assert sized.expected_replicas is None and sized.rps is None  # the recipe states no rps
    assert set(sized.notes) >= {"cpu_request", "cpu_limit", "memory", "expected_replicas", "termination_grace_s"}
    assert "0.245" in sized.notes["cpu_request"] and "slo.cpu_utilisation 0.7" in sized.notes["cpu_request"]
    assert "state serving.threads" in sized.notes["cpu_limit"]
    assert dataclasses.asdict(sized)["notes"] == sized.notes  # render.json records it as it is


def test_cpu_limit_is_twice_the_request_or_the_threads_cores(deploy_inputs, with_sections):
    big = with_sections(deploy_inputs, rollout={"cpu": 1.2})
    assert (size(big).cpu_request, size(big).cpu_limit) == ("1200m", "2400m")
    threaded = with_sections(deploy_inputs, serving={"threads": 4})
    assert size(threaded).cpu_limit == "4000m"
    assert "state serving.threads" not in size(threaded).notes["cpu_limit"]


def test_stated_resources_override_the_load_test(deploy_inputs, with_sections):
    sized = size(with_sections(deploy_inputs, rollout={"cpu": 0.5, "memory_mb": 300}))
    assert (sized.cpu_request, sized.cpu_limit, sized.memory) == ("500m", "1000m", "300Mi")
    assert "as stated" in sized.notes["cpu_request"] and "as stated" in sized.notes["memory"]


def test_grace_period_covers_prestop_and_drain(deploy_inputs, with_sections):
    sized = size(with_sections(deploy_inputs, serving={"drain_s": 12.5}))
    assert sized.prestop_s == 5
    assert sized.termination_grace_s == 23  # ceil(5 + 12.5 + 5)
    assert sized.termination_grace_s >= sized.prestop_s + 12.5


@pytest.mark.parametrize(("rps", "pods"), [(100, 1), (240, 2), (241, 3), (1200, 10)])
def test_expected_replicas_for_a_stated_rate(deploy_inputs, with_sections, rps, pods):
    sized = size(with_sections(deploy_inputs, rollout={"rps": rps}))
    assert sized.expected_replicas == pods  # ceil(rps / 120 rps per pod)
    assert sized.rps == rps


def test_expected_replicas_over_max_is_exit_2(deploy_inputs, with_sections):
    inputs = with_sections(deploy_inputs, rollout={"rps": 1300, "replicas": {"min": 2, "max": 10}})
    with pytest.raises(RecipeError) as e:
        size(inputs)
    assert e.value.exit_code == 2
    message = str(e.value)
    assert "rollout.rps" in message and "11 pods" in message and "rollout.replicas.max 10" in message
    assert "models:/minilm-fp16/3" in message


def test_not_load_tested_and_nothing_stated_is_exit_2(deploy_inputs, with_sections):
    untested = dataclasses.replace(deploy_inputs, canary=dataclasses.replace(deploy_inputs.canary, measured=None))
    with pytest.raises(RecipeError) as e:
        size(untested)
    assert e.value.exit_code == 2
    message = str(e.value)
    assert "rollout.cpu and rollout.memory_mb" in message and "serving.loadtest: true" in message
    assert "models:/minilm-fp16/3" in message
    with pytest.raises(RecipeError, match=r"state rollout\.memory_mb in"):
        size(with_sections(untested, rollout={"cpu": 0.5}))


def test_not_load_tested_with_stated_resources(deploy_inputs, with_sections):
    untested = dataclasses.replace(deploy_inputs, canary=dataclasses.replace(deploy_inputs.canary, measured=None))
    sized = size(with_sections(untested, rollout={"cpu": 0.25, "memory_mb": 256, "rps": 5000}))
    assert (sized.cpu_request, sized.memory) == ("250m", "256Mi")
    assert sized.expected_replicas is None and sized.max_rps_at_slo is None  # unknown, not an error
    assert "not load-tested" in sized.notes["expected_replicas"]


def test_stable_is_sized_from_its_own_load_test(deploy_inputs, first_rollout, with_sections):
    stable = size_stable(deploy_inputs)
    assert stable is not None and stable.version == 2
    assert (stable.cpu_request, stable.memory) == ("358m", "500Mi")  # 0.25 / 0.7, 400 / 0.8
    assert size_stable(first_rollout) is None
    untested = dataclasses.replace(deploy_inputs, stable=dataclasses.replace(deploy_inputs.stable, measured=None))
    borrowed = size_stable(untested)
    assert borrowed is not None and borrowed.cpu_request == "350m" and "canary" in borrowed.notes["measured"]
    # the replicas check is the canary's: the stable version already serves
    slow = dataclasses.replace(
        deploy_inputs,
        stable=dataclasses.replace(
            deploy_inputs.stable, measured=dataclasses.replace(deploy_inputs.stable.measured, max_rps_at_slo=10.0)
        ),
    )
    assert size_stable(with_sections(slow, rollout={"rps": 1000})).expected_replicas == 100
