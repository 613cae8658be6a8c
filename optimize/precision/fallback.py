"""Accuracy-aware fallback for INT8: when a quantised model misses the recipe's accuracy gates, rank the
quantised nodes by the error each one adds, keep the most sensitive in high precision, and retry within a
budget of trials and seconds. Of the trials that pass, the fastest is kept (not the first).

The search itself takes its steps as functions (build, judge, time, rank), so the policy is testable on
its own; `sensitivity` is the ranking the pipeline uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimize.lazy import lazy
from optimize.progress import NO_PROGRESS, Progress
from optimize.recipe import FallbackSection, Gate

np = lazy("numpy")


@dataclass
class Trial:
    """One quantisation tried: what was kept in high precision and what it measured."""

    index: int
    excluded: list[str]
    path: Path
    accuracy: dict[str, Any]
    failed_gates: list[str]
    p50_speedup: float | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """True when every accuracy gate passed."""
        return not self.failed_gates

    def record(self) -> dict[str, Any]:
        """JSON-able form (report, metrics.json, MLflow)."""
        return {
            "trial": self.index,
            "excluded": list(self.excluded),
            "excluded_count": len(self.excluded),
            "passed": self.passed,
            "failed_gates": list(self.failed_gates),
            "accuracy": {k: v for k, v in self.accuracy.items() if not isinstance(v, dict)},
            "p50_speedup": self.p50_speedup,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Outcome:
    """The search's result: the kept trial, every trial, and why the search stopped."""

    chosen: Trial
    trials: list[Trial] = field(default_factory=list)
    stopped: str = ""
    ranking: list[tuple[str, float]] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """JSON-able form (report, metrics.json, MLflow)."""
        return {
            "chosen_trial": self.chosen.index,
            "passed": self.chosen.passed,
            "excluded": list(self.chosen.excluded),
            "stopped": self.stopped,
            "trials": [t.record() for t in self.trials],
            "ranking": [{"node": n, "added_error": round(e, 6)} for n, e in self.ranking[:20]],
        }


def accuracy_gates(gates: list[Gate], variant: str, ran: list[str] | tuple[str, ...] = ()) -> list[Gate]:
    """The recipe's accuracy gates that cover `variant` on a target that runs here: what the fallback must
    satisfy, each with its `output` scope as the evaluation will judge it. A gate scoped to a target that is
    skipped here (TensorRT on a CPU box) is not searched for.

    The trials are measured on ONNX Runtime's CPU provider only, so a gate scoped to another target that runs
    is judged there too (its target dropped): kept as it was, it would be skipped in every trial, and a trial
    passing it untested then failed it in the evaluation. Gates that become the same are kept once."""
    out: list[Gate] = []
    for g in gates:
        if not (
            g.metric.startswith("accuracy.")
            and (g.variants is None or variant in g.variants)
            and (g.target is None or g.target in ran)
        ):
            continue
        judged = g.model_copy(update={"variants": [variant], "target": None})  # this variant, on the CPU
        if judged not in out:
            out.append(judged)
    return out


def judged_outputs(gates: list[Gate]) -> list[str] | None:
    """The outputs the accuracy gates judge: the ones they name, or None (every output) when one is not
    scoped to an output. The sensitivity ranking measures the error there."""
    if any(g.output is None for g in gates):
        return None
    return sorted({g.output for g in gates if g.output is not None})


def search(
    settings: FallbackSection,
    build: Callable[[int, list[str]], Path],
    judge: Callable[[Path], tuple[dict[str, Any], list[str]]],
    speed: Callable[[Path], float],
    rank: Callable[[Path], list[tuple[str, float]]],
    clock: Callable[[], float] = time.monotonic,
    on_trial: Callable[[Trial], None] = lambda _: None,
    progress: Progress = NO_PROGRESS,
) -> Outcome:
    """Find the fastest quantisation that passes the accuracy gates within the budget.

    `build(i, excluded)` quantises with `excluded` nodes kept in high precision and returns the model path;
    `judge(path)` returns (accuracy, failed gate descriptions); `speed(path)` a p50 speed-up against FP32;
    `rank(path)` the quantised nodes of the first model, most error-adding first; `on_trial` sees each trial.

    Trial 0 is the model as configured. If it fails, the top-k ranked nodes are excluded for k = 1, 2, 4, …
    until a trial passes; then the count is bisected down between the last failing and the passing k, since
    fewer exclusions usually run faster. Every trial is timed; the fastest passing one is chosen. With no
    passing trial, the last (most excluded) one is kept and the gates fail later with every trial reported.
    `progress` counts trials against the trial budget.
    """
    start = clock()
    trials: list[Trial] = []
    progress.start(settings.max_trials, "fallback trials")

    def out_of_budget() -> str | None:
        if len(trials) >= settings.max_trials:
            return f"trial budget ({settings.max_trials}) used"
        if clock() - start >= settings.max_seconds:
            return f"time budget ({settings.max_seconds:g} s) used"
        return None

    def attempt(excluded: list[str]) -> Trial:
        t0 = clock()
        path = build(len(trials), excluded)
        accuracy, failed = judge(path)
        trial = Trial(len(trials), excluded, path, accuracy, failed)
        trial.p50_speedup = speed(path)
        trial.seconds = clock() - t0
        trials.append(trial)
        progress.advance()
        on_trial(trial)
        return trial

    first = attempt([])
    if first.passed:
        return Outcome(first, trials, "the model as configured passed")
    ranking = [(n, e) for n, e in rank(first.path)]
    # Excluding every quantised node would leave nothing INT8: at most all but one are tried.
    names = [n for n, _ in ranking][: max(len(ranking) - 1, 0)]
    if not names:
        return Outcome(first, trials, "too few quantised nodes to move any to high precision", ranking)
    stopped = ""
    low, high = 0, None  # the largest failing and the smallest passing exclusion counts seen
    k = 1
    while high is None:
        stopped = out_of_budget() or ""
        if stopped:
            break
        if attempt(names[:k]).passed:
            high = k
        else:
            low = k
            if k >= len(names):
                stopped = f"{len(names)} of {len(ranking)} quantised nodes kept high-precision and the gates still fail"
                break
            k = min(2 * k, len(names))
    while high is not None and high - low > 1:
        stopped = out_of_budget() or ""
        if stopped:
            break
        mid = (low + high) // 2
        if attempt(names[:mid]).passed:
            high = mid
        else:
            low = mid
    passing = [t for t in trials if t.passed]
    if passing:
        best = max(passing, key=lambda t: (t.p50_speedup or 0.0, -len(t.excluded)))
        return Outcome(best, trials, stopped or f"smallest passing exclusion count found ({high})", ranking)
    return Outcome(trials[-1], trials, stopped or "no trial passed", ranking)


# --- sensitivity ---------------------------------------------------------------------------------


# Ops that only move data: Q/DQ passes through them, and keeping one in float changes nothing worth a trial.
DATA_MOVEMENT = frozenset(
    {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Split", "Pad", "Concat", "Where",
     "GatherElements", "TopK", "CumSum", "ArgMax", "Resize", "MaxPool", "Relu", "Clip"}
)  # fmt: skip


def quantised_nodes(source: Any, quantised: Any, op_types: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Nodes of the source graph the quantiser changed: replaced by integer kernels (name or op type gone), or
    fed through a DequantizeLinear (Q/DQ). Only nodes of `op_types` (the quantiser's), and no data-movement
    ops: in Q/DQ graphs every consumer of a quantised tensor reads the DequantizeLinear output, quantised or not."""
    kept = {n.name: n for n in quantised.graph.node}
    dq_outputs = {o for n in quantised.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    out = []
    for node in source.graph.node:
        if node.op_type in DATA_MOVEMENT or (op_types and node.op_type not in op_types):
            continue
        q = kept.get(node.name)
        if q is None or q.op_type != node.op_type or any(i in dq_outputs for i in q.input):
            out.append(node.name)
    return out


def output_error(
    reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray], only: list[str] | None = None
) -> float:
    """Relative L2 error of a model's outputs against the reference outputs (all outputs together, or the
    outputs in `only`)."""
    ref = {k: v for k, v in reference.items() if only is None or k in only}
    num = sum(float(np.sum((outputs[k].astype(np.float64) - v.astype(np.float64)) ** 2)) for k, v in ref.items())
    den = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in ref.values())
    return (num / den) ** 0.5 if den > 0 else num**0.5


def rank_isolated(
    candidates: list[str],
    quantise_only: Callable[[str], Path | None],
    outputs_of: Callable[[Path], dict[str, np.ndarray]],
    reference: dict[str, np.ndarray],
    progress: Progress = NO_PROGRESS,
    only: list[str] | None = None,
) -> list[tuple[str, float]]:
    """Rank nodes by the error of the model's outputs (those in `only`, when given: the outputs the accuracy
    gates judge) when only that node is quantised (most harmful first).

    One quantisation and one short run per node (about 2 s per node on MiniLM). This measures what the
    fallback acts on; a node's own local error does not: on MiniLM the attention-score MatMuls had the largest
    local error and almost no effect on the embedding, the FFN down-projections the reverse.
    `quantise_only(name)` returns None when that node cannot be quantised alone (it then ranks last).
    `progress` counts the nodes ranked.
    """
    scores = []
    progress.start(len(candidates), "ranking quantised nodes")
    for name in candidates:
        path = quantise_only(name)
        scores.append((name, output_error(reference, outputs_of(path), only) if path is not None else 0.0))
        progress.advance()
    return sorted(scores, key=lambda kv: (-kv[1], kv[0]))
