"""`optimize plan RECIPE`: every unit of cached work a run of the recipe would do, with its cache key, whether
the stage cache holds it, why not (which input, config field, library version, device or code changed since
that unit last ran) and how long it took then. Like `terraform plan` or `dvc status`.

The plan is made from the same declarations the run executes (optimize/stage.py), with identities read from
the files (optimize.load.plan_identities) and, for units after the first miss, from what the cache holds: it
builds no model and imports no torch, ONNX Runtime or MLflow. A unit whose input only a miss upstream can
make is `after` that unit; one whose model or data only a run can identify (an entry point) is `unknown`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from optimize import bench, engine, evaluate, export, load, preflight
from optimize.cache import StageCache, cache_root, key_of
from optimize.console import Say
from optimize.files import sha256_file
from optimize.machine import environment
from optimize.precision import build, fusion
from optimize.recipe import GPU_TARGETS, load_recipe
from optimize.serving import stage as serving
from optimize.stage import Context, Identities, Unit

# The stages with units of cached work, in the order a run makes them (optimize.pipeline.STAGES); the serving
# stage's load tests run only with `serving.loadtest: true`.
WORK = (export.STAGE, fusion.STAGE, build.STAGE, engine.STAGE, evaluate.STAGE, bench.STAGE, serving.STAGE)
_SHOWN_CHANGES = 4  # per kind of change, at most this many named in a reason


@dataclass(frozen=True)
class PlannedUnit:
    """One unit in the plan. `status`: hit (cached), miss (will be made), after (waits for a miss upstream, so
    its key is not known yet), unknown (its identity needs a run). `last_s`: its seconds when it last ran."""

    stage: str
    unit: str
    status: str
    key: str | None = None
    why: list[str] = field(default_factory=list)
    last_s: float | None = None


@dataclass(frozen=True)
class Plan:
    recipe: str
    units: list[PlannedUnit]
    targets: dict[str, dict[str, Any]]

    @property
    def to_make(self) -> list[PlannedUnit]:
        """The units a run will make: misses and what comes after them (their inputs change)."""
        return [u for u in self.units if u.status in ("miss", "after")]

    @property
    def unknown(self) -> list[PlannedUnit]:
        """The units whose keys only the run can tell (an entry point's model or data)."""
        return [u for u in self.units if u.status == "unknown"]

    @property
    def estimate_s(self) -> float:
        """Seconds of the units to make, as they took when they last ran (those never run count 0)."""
        return sum(u.last_s or 0.0 for u in self.to_make)

    def as_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "targets": self.targets,
            "units": [asdict(u) for u in self.units],
            "hits": len(self.units) - len(self.to_make) - len(self.unknown),
            "to_make": len(self.to_make),
            "unknown": len(self.unknown),
            "estimate_s": round(self.estimate_s, 1),
        }


def make(
    recipe_path: Path, require_targets: tuple[str, ...] = (), rebench: bool = False, cache: StageCache | None = None
) -> Plan:
    """The plan of `optimize run RECIPE` on this machine and stage cache (a missing required target: exit 4)."""
    cache = cache or StageCache(cache_root())
    ctx, unknown = context(Path(recipe_path), require_targets, rebench, cache.remembered_sha256)
    planned: list[PlannedUnit] = []
    missed: dict[str, str] = {}  # identity name → the unit that makes it, which is not cached
    for unit in units(ctx):
        planned.append(_plan_unit(cache, ctx, unit, unknown, missed))
    return Plan(ctx.recipe.name, planned, ctx.targets)


def context(
    recipe_path: Path,
    require_targets: tuple[str, ...] = (),
    rebench: bool = False,
    file_sha256: Callable[[Path], str] = sha256_file,
) -> tuple[Context, dict[str, str]]:
    """A planning context for a recipe: what a run would know before its first unit, read from the files; and
    why each identity it cannot know is unknown."""
    recipe = load_recipe(recipe_path)
    preflight.check(recipe, recipe_path)
    targets = load.resolve_targets(recipe, require_targets, reason=load.installed_reason)
    # the GPUs are in the keys of GPU targets only
    env = environment(probe_gpus=any(t in GPU_TARGETS for t, s in targets.items() if s["status"] == "ran"))
    ids, unknown = load.plan_identities(recipe, file_sha256)
    ctx = Context(
        recipe=recipe,
        recipe_file=recipe_path.resolve(),
        targets=targets,
        versions=env["versions"],
        hardware=env["hardware"],
        task_metric_code=lambda: load.task_metric_sha256(recipe, planning=True),
        say=Say(quiet=True),
        planning=True,
        rebench=rebench,
        ids=Identities(dict(ids)),
    )
    return ctx, unknown


def units(ctx: Context) -> Iterator[Unit]:
    """The units of every stage that runs, in run order (declared as they come: an identity a unit produces is
    put in `ctx.ids` by whoever consumes them before the next is declared)."""
    for stage in WORK:
        if stage.when(ctx):
            yield from stage.units(ctx)


def _plan_unit(
    cache: StageCache, ctx: Context, unit: Unit, unknown: dict[str, str], missed: dict[str, str]
) -> PlannedUnit:
    def last_run() -> dict[str, Any] | None:  # the unit's newest entry: for a unit not taken from the cache
        return cache.latest(unit.stage, f"{ctx.recipe.name}/{unit.name}")

    if not unit.known:
        last = last_run()
        last_s = last.get("record", {}).get("seconds") if last else None
        waiting = [n for n, v in unit.inputs.items() if v is None]
        why = []
        for name in waiting:
            if name in missed:
                why.append(f"{name} is made by {missed[name]}, which is not cached")
            else:
                why.append(unknown.get(name, f"{name} is not known before a run"))
        if unit.produces:
            missed[unit.produces] = f"{unit.stage} {unit.name}"
        status = "after" if all(n in missed for n in waiting) else "unknown"
        return PlannedUnit(unit.stage, unit.name, status, None, list(dict.fromkeys(why)), last_s)
    description = unit.description(ctx.versions)
    key = key_of(description)
    entry = None if unit.refresh else cache.peek(unit.stage, key)
    if entry is not None:
        if unit.produces:
            ctx.ids[unit.produces] = entry["record"]["record"].get("sha256")
        return PlannedUnit(unit.stage, unit.name, "hit", key, [], entry["record"].get("seconds"))
    if unit.produces:
        missed[unit.produces] = f"{unit.stage} {unit.name}"
    last = last_run()
    last_s = last.get("record", {}).get("seconds") if last else None
    if unit.refresh:
        why = ["--rebench measures it anew"]
    elif last is None:
        why = ["never made in this stage cache"]
    else:
        why = explain(description, last.get("description") or {})
    return PlannedUnit(unit.stage, unit.name, "miss", key, why, last_s)


def explain(now: dict[str, Any], before: dict[str, Any]) -> list[str]:
    """What differs between a unit's key description now and when it last ran, in words."""
    why: list[str] = []
    if now.get("format") != before.get("format"):
        return [f"the stage cache's format changed ({before.get('format')} → {now.get('format')})"]
    inputs_now, inputs_before = now.get("inputs", {}), before.get("inputs", {})
    changed = sorted(k for k in {*inputs_now, *inputs_before} if inputs_now.get(k) != inputs_before.get(k))
    why += [f"input {k} changed" for k in changed[:_SHOWN_CHANGES]]
    fields = _changed_fields(now.get("config"), before.get("config"), "")
    if fields:
        more = f" and {len(fields) - _SHOWN_CHANGES} more" if len(fields) > _SHOWN_CHANGES else ""
        why.append("config " + ", ".join(fields[:_SHOWN_CHANGES]) + more)
    versions_now, versions_before = now.get("versions", {}), before.get("versions", {})
    why += [
        f"{lib} {versions_before.get(lib, 'absent')} → {versions_now.get(lib, 'absent')}"
        for lib in sorted({*versions_now, *versions_before})
        if versions_now.get(lib) != versions_before.get(lib)
    ]
    if now.get("device") != before.get("device"):
        why.append("the device changed (CPU instruction sets, GPU or machine)")
    code_now, code_before = now.get("code", {}), before.get("code", {})
    files = sorted(f for f in {*code_now, *code_before} if code_now.get(f) != code_before.get(f))
    if files:
        more = f" and {len(files) - _SHOWN_CHANGES} more" if len(files) > _SHOWN_CHANGES else ""
        why.append("code changed: " + ", ".join(f"optimize/{f}" for f in files[:_SHOWN_CHANGES]) + more)
    return why or ["its key changed"]


def _changed_fields(a: Any, b: Any, path: str) -> list[str]:
    """Dotted paths where two JSON values differ (`precision.variants` → `variant.method: max → minmax`)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted({*a, *b}, key=str):
            out += _changed_fields(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [f for i, (x, y) in enumerate(zip(a, b, strict=True)) for f in _changed_fields(x, y, f"{path}[{i}]")]
    if a == b:
        return []
    return [f"{path or 'section'}: {_short(b)} → {_short(a)}"]


def _short(value: Any) -> str:
    text = "unset" if value is None else str(value)
    return text if len(text) <= 40 else text[:37] + "…"


_MARK = {
    "hit": "[green]✓ hit[/]",
    "miss": "[yellow]● miss[/]",
    "after": "[yellow]○ after[/]",
    "unknown": "[red]? unknown[/]",
}


def render(plan: Plan, con: Console) -> None:
    """The plan as a table, then its summary."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("stage", "unit", "key", "status", "last", "why"):
        table.add_column(column, overflow="fold")
    for u in plan.units:
        table.add_row(
            u.stage,
            escape(u.unit),
            u.key[:12] if u.key else "-",
            _MARK[u.status],
            _seconds(u.last_s),
            escape("; ".join(u.why)),
        )
    con.print(table)
    summarise(plan, con, misses=False)


def summarise(plan: Plan, con: Console, misses: bool = True) -> None:
    """One line: how many units are cached, how many will be made (in about how long by their last runs) and
    how many only the run can tell; then (`misses`) each unit to make with why, and why some are unknown."""
    todo, unknown = plan.to_make, plan.unknown
    hits = len(plan.units) - len(todo) - len(unknown)
    line = f"plan {plan.recipe}: {hits} of {len(plan.units)} units cached, {len(todo)} to make"
    if todo and plan.estimate_s:
        line += f" (about {_seconds(plan.estimate_s)} by their last runs)"
    if unknown:
        line += f", {len(unknown)} known only when the run builds the model or data"
    con.print(escape(line), highlight=False)
    if misses:
        for u in todo:
            why = f": {'; '.join(u.why)}" if u.why else ""
            con.print(escape(f"  {u.status} {u.stage} {u.unit}{why}"), highlight=False)
        reasons = dict.fromkeys(w for u in unknown for w in u.why if "which is not cached" not in w)
        for why in reasons:
            con.print(escape(f"  unknown: {why}"), highlight=False)


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 90 else f"{s / 60:.1f} min"
