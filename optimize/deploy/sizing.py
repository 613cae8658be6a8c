"""How big a serving pod is and how many of them a stated load takes, derived from a version's load test (or the
recipe's stated `rollout.cpu` / `rollout.memory_mb`) and the SLO's headroom; every number carries its reason."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from optimize.deploy.inputs import DeployInputs, Measured, Version
from optimize.errors import RecipeError

# The preStop hook's pause: the time kube-proxy and the Istio sidecars of other pods take to stop sending new
# requests after the pod is marked terminating, before SIGTERM starts `optimize serve`'s drain.
PRESTOP_S = 5
# What the kubelet needs after the drain (process exit, sidecar shutdown) before it would SIGKILL.
EXIT_MARGIN_S = 5
# A CPU limit this many times the request: room for batch bursts above the HPA's target before CFS throttling adds
# to p99, and the alert "CPU over 70 % of the limit" then means 1.4 x the load a pod is sized for (autoscaling is
# not keeping up) rather than every pod at its normal scaling point.
CPU_LIMIT_FACTOR = 2


@dataclass(frozen=True)
class Sizing:
    """One version's pod resources, its expected replica count for `rollout.rps`, the HPA's queue-depth target and
    the shutdown timings; `notes` says where each number comes from (render.json records it)."""

    version: int  # the registered version these numbers are for
    cpu_request_m: int  # millicores
    cpu_limit_m: int
    memory_mib: int  # request = limit: memory is not compressible, a pod past its request may be evicted
    queue_depth_target: int  # HPA Pods metric optimize_queue_depth, averageValue per pod
    expected_replicas: int | None  # pods for rollout.rps at max_rps_at_slo each; None without rps or a load test
    rps: float | None  # rollout.rps
    max_rps_at_slo: float | None  # what one pod carries within the SLO (the load test); None when not load-tested
    prestop_s: int
    termination_grace_s: int
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def cpu_request(self) -> str:
        """The CPU request as a Kubernetes quantity, e.g. "350m"."""
        return f"{self.cpu_request_m}m"

    @property
    def cpu_limit(self) -> str:
        """The CPU limit as a Kubernetes quantity, e.g. "1000m"."""
        return f"{self.cpu_limit_m}m"

    @property
    def memory(self) -> str:
        """The memory request and limit as a Kubernetes quantity, e.g. "512Mi"."""
        return f"{self.memory_mib}Mi"


def size(inputs: DeployInputs) -> Sizing:
    """The canary's sizing. Raises RecipeError (exit 2) when neither its load test nor `rollout.cpu` and
    `rollout.memory_mb` give its resources, or when `rollout.rps` needs more pods than `rollout.replicas.max`."""
    return _size(inputs, inputs.canary, inputs.canary.measured, strict=True)


def size_stable(inputs: DeployInputs) -> Sizing | None:
    """The stable version's sizing from its own load test (so a re-render reproduces the Deployment it runs under),
    the canary's where the stable version was not load-tested; None on a first rollout. Never fails on
    `rollout.replicas.max`: the stable version already serves, the check is the canary's."""
    stable = inputs.stable
    if stable is None:
        return None
    if stable.measured is not None:
        return _size(inputs, stable, stable.measured, strict=False)
    borrowed = f"{stable.uri} was not load-tested: sized from the canary's load test ({inputs.canary.uri})"
    return _size(inputs, stable, inputs.canary.measured, strict=False, measured_note=borrowed)


def _ceil(x: float) -> int:
    # 0.245 / 0.7 is 0.35000000000000003 in binary: round off the float noise before rounding up
    return math.ceil(round(x, 6))


def _size(
    inputs: DeployInputs, version: Version, measured: Measured | None, *, strict: bool, measured_note: str = ""
) -> Sizing:
    rollout, serving, slo = inputs.rollout, inputs.serving, inputs.serving.slo
    notes: dict[str, str] = {"measured": measured_note} if measured_note and measured is not None else {}
    if measured is None and (rollout.cpu is None or rollout.memory_mb is None):
        missing = " and ".join(f"rollout.{k}" for k in ("cpu", "memory_mb") if getattr(rollout, k) is None)
        raise RecipeError(
            f"deploy render: {version.uri} was not load-tested, so nothing gives its pods' resources: state {missing} "
            "in the recipe, or register it from a run with `serving.loadtest: true`"
        )
    if rollout.cpu is not None:
        request_m = max(1, _ceil(rollout.cpu * 1000))
        notes["cpu_request"] = f"rollout.cpu: {rollout.cpu:g} cores, as stated"
    else:
        assert measured is not None
        request_m = max(1, _ceil(measured.cpu_cores / slo.cpu_utilisation * 1000))
        notes["cpu_request"] = (
            f"{measured.cpu_cores:g} cores used at max_rps_at_slo {measured.max_rps_at_slo:g} rps (load test on "
            f"{measured.target or 'an unrecorded target'}) / slo.cpu_utilisation {slo.cpu_utilisation:g}: at that "
            "load a pod sits at the HPA's CPU target"
        )
    threads = serving.threads or 1
    limit_m = max(CPU_LIMIT_FACTOR * request_m, 1000 * threads)
    notes["cpu_limit"] = (
        f"max({CPU_LIMIT_FACTOR} x the request, {threads} whole core(s) for serving.threads): headroom for batch "
        "bursts before CFS throttling adds to p99, and never less than the cores one model run uses at once"
        + (
            "; serving.threads is unset, so the runtime starts a thread per core of the node, which this limit "
            "throttles: state serving.threads"
            if serving.threads is None
            else ""
        )
    )
    if rollout.memory_mb is not None:
        memory_mib = max(1, _ceil(rollout.memory_mb))
        notes["memory"] = f"rollout.memory_mb: {rollout.memory_mb:g} MiB, as stated (request = limit)"
    else:
        assert measured is not None
        memory_mib = max(1, _ceil(measured.rss_peak_mb / slo.memory_utilisation))
        notes["memory"] = (
            f"peak RSS {measured.rss_peak_mb:g} MiB in the load test / slo.memory_utilisation "
            f"{slo.memory_utilisation:g} (request = limit: a pod is never evicted for using what it was given)"
        )
    expected = _expected_replicas(inputs, version, measured, notes, strict=strict)
    grace = _ceil(PRESTOP_S + serving.drain_s + EXIT_MARGIN_S)
    notes["queue_depth_target"] = (
        f"serving.max_batch_size {serving.max_batch_size}: a pod with more requests waiting than one batch holds "
        "adds latency to each; the HPA adds pods before the queue grows further"
    )
    notes["termination_grace_s"] = (
        f"preStop {PRESTOP_S} s (endpoints and sidecars stop sending) + serving.drain_s {serving.drain_s:g} s "
        f"(answer what is queued and running) + {EXIT_MARGIN_S} s to exit, rounded up"
    )
    return Sizing(
        version=version.number,
        cpu_request_m=request_m,
        cpu_limit_m=limit_m,
        memory_mib=memory_mib,
        queue_depth_target=serving.max_batch_size,
        expected_replicas=expected,
        rps=rollout.rps,
        max_rps_at_slo=measured.max_rps_at_slo if measured is not None else None,
        prestop_s=PRESTOP_S,
        termination_grace_s=grace,
        notes=notes,
    )


def _expected_replicas(
    inputs: DeployInputs, version: Version, measured: Measured | None, notes: dict[str, str], *, strict: bool
) -> int | None:
    rollout = inputs.rollout
    if rollout.rps is None:
        notes["expected_replicas"] = "no rollout.rps stated: the HPA alone decides"
        return None
    if measured is None or measured.max_rps_at_slo <= 0:
        if strict and measured is not None:
            raise RecipeError(
                f"deploy render: rollout.rps: {version.uri} met its SLO at no load its test tried "
                f"(max_rps_at_slo {measured.max_rps_at_slo:g}): no number of pods carries {rollout.rps:g} rps; "
                "fix the version's latency or the budget (serving.slo)"
            )
        notes["expected_replicas"] = f"{version.uri} has no max_rps_at_slo (not load-tested): unknown"
        return None
    expected = math.ceil(round(rollout.rps / measured.max_rps_at_slo, 6))
    floor = rollout.replicas.min
    notes["expected_replicas"] = (
        f"rollout.rps {rollout.rps:g} / max_rps_at_slo {measured.max_rps_at_slo:g} per pod, rounded up"
        + (f" (below rollout.replicas.min {floor}, which the HPA keeps)" if expected < floor else "")
    )
    if strict and expected > rollout.replicas.max:
        raise RecipeError(
            f"deploy render: rollout.rps: {rollout.rps:g} rps takes {expected} pods of {version.uri} "
            f"({measured.max_rps_at_slo:g} rps each within the SLO), above rollout.replicas.max "
            f"{rollout.replicas.max}; raise rollout.replicas.max or lower rollout.rps"
        )
    return expected
