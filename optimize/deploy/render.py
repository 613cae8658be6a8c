"""`optimize deploy render`: resolve the canary (and stable) registered versions, derive the rollout from the
recipe's `serving:` and `rollout:` sections and the canary's measured load test, and write plain YAML (and a Triton
model repository) into one folder, all at once or not at all."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import yaml

from optimize import __version__
from optimize.deploy import alerts, argo, istio, kubernetes, sizing, triton
from optimize.deploy.argo import DEFAULT_PROMETHEUS
from optimize.deploy.inputs import DeployInputs, Measured, Version
from optimize.errors import OptimizeError, RecipeError, first_line
from optimize.files import write_json, write_text
from optimize.recipe import Recipe, RolloutSection, ServingSection, load_recipe
from optimize.registry import tags as tag
from optimize.registry.connection import resolve_tracking_uri, session
from optimize.registry.smoke import (
    download_version,
    parse_model_uri,
    recorded_recipe,
    resolve_version,
    verify_sha256,
)
from optimize.runtimes import open_runner

MODEL_FILE = "model.onnx"
FORMATS = ("kubernetes", "triton")
RENDER_RECORD = "render.json"


@dataclass(frozen=True)
class Rendered:
    """What a render wrote: the folder, its files (relative paths, sorted) and the derived sizes."""

    out: Path
    files: tuple[str, ...]
    sizing: sizing.Sizing | None


# --- what to render from ---------------------------------------------------------------------------------------


def resolve(
    canary_uri: str,
    *,
    stable_uri: str | None,
    image: str,
    tracking_uri: str | None,
    recipe: Path | None,
    workdir: Path,
    engine: Path | None = None,
    cluster_tracking_uri: str | None = None,
) -> DeployInputs:
    """The DeployInputs for `canary_uri` (models:/NAME@ALIAS or models:/NAME/N): the canary version downloaded into
    `workdir` and verified against its sha256 tag (exit 6), the stable version (`stable_uri`, else the model's
    `production` alias when it has one and it is not the canary), and the `serving:` / `rollout:` sections of
    `recipe`, else of the recipe recorded with the canary's run."""
    name, _, _ = parse_model_uri(canary_uri, "deploy render")
    if stable_uri is not None and parse_model_uri(stable_uri, "deploy render")[0] != name:
        raise RecipeError(f"deploy render: --stable {stable_uri}: not a version of {name!r}; name one of its versions")
    if engine is not None and not engine.is_file():
        raise RecipeError(f"deploy render: --engine {engine}: no such file (a TensorRT plan for Triton)")
    store = resolve_tracking_uri(tracking_uri, None)
    with session(store) as client:
        mv = resolve_version(client, canary_uri, store, command="deploy render")
        canary_tags = dict(mv.tags or {})
        folder = download_version(client, mv, workdir / "canary", store)
        plain = (recorded_recipe(client, mv) or {}) if recipe is None else {}
        stable_mv = _stable(client, name, stable_uri, int(mv.version), store)
    where = f"deploy render: {canary_uri} (version {mv.version})"
    model_file = folder / MODEL_FILE
    if not model_file.is_file():
        raise RecipeError(f"{where}: its artifacts lack {MODEL_FILE}; it was not registered by optimize")
    verify_sha256(model_file, canary_tags, where)
    serving, rollout = _sections(recipe, plain, where)
    with open_runner("onnxruntime-cpu", model_file) as runner:
        inputs, outputs = tuple(runner.inputs), tuple(runner.outputs)
    stable = _version(name, stable_mv) if stable_mv is not None else None
    return DeployInputs(
        canary=_version(name, mv),
        stable=stable,
        image=image,
        tracking_uri=cluster_tracking_uri or store,
        serving=serving,
        rollout=rollout,
        inputs=inputs,
        outputs=outputs,
        model_file=model_file,
        engine_file=engine,
    )


def _stable(client: Any, name: str, stable_uri: str | None, canary: int, store: str) -> Any | None:
    """The stable version: `stable_uri`, else the `production` alias when the model has one; never the canary."""
    if stable_uri is None:
        aliases = dict(client.get_registered_model(name).aliases or {})
        if tag.PRODUCTION not in aliases or int(aliases[tag.PRODUCTION]) == canary:
            return None
        stable_uri = f"models:/{name}@{tag.PRODUCTION}"
    mv = resolve_version(client, stable_uri, store, command="deploy render")
    if int(mv.version) == canary:
        raise RecipeError(
            f"deploy render: --stable {stable_uri} is version {canary}, the canary itself; name the version in "
            "production, or leave --stable out for a first rollout"
        )
    return mv


def _sections(recipe: Path | None, plain: dict[str, Any], where: str) -> tuple[ServingSection, RolloutSection]:
    """`serving:` and `rollout:` from `recipe` when given, else from the recorded recipe (defaults where absent)."""
    if recipe is not None:
        loaded: Recipe = load_recipe(recipe)
        return loaded.serving, loaded.rollout
    try:
        return (
            ServingSection.model_validate(plain.get("serving") or {}),
            RolloutSection.model_validate(plain.get("rollout") or {}),
        )
    except pydantic.ValidationError as e:
        raise RecipeError(f"{where}: its recorded recipe.json: {first_line(e)}; pass --recipe") from None


def _version(name: str, mv: Any) -> Version:
    tags = dict(mv.tags or {})
    return Version(
        model=name,
        number=int(mv.version),
        sha256=tags.get(tag.SHA256, ""),
        variant=tags.get(tag.VARIANT, ""),
        precision=tags.get(tag.PRECISION, ""),
        measured=measured_from_tags(tags),
    )


def measured_from_tags(tags: dict[str, str]) -> Measured | None:
    """The version's load test from its `loadtest.*` tags; None when it was not load-tested (or predates the
    capacity tags)."""
    keys = (tag.LOADTEST_MAX_RPS_AT_SLO, tag.LOADTEST_CPU_CORES, tag.LOADTEST_RSS_PEAK_MB)
    try:
        rps, cpu, rss = (float(tags[k]) for k in keys)
    except (KeyError, ValueError):
        return None
    if rps <= 0 or cpu <= 0 or rss <= 0:
        return None
    return Measured(max_rps_at_slo=rps, cpu_cores=cpu, rss_peak_mb=rss, target=tags.get(tag.LOADTEST_TARGET, ""))


# --- writing ---------------------------------------------------------------------------------------------------


def objects(inputs: DeployInputs, prometheus_address: str = DEFAULT_PROMETHEUS) -> tuple[dict[str, dict], Any]:
    """Every Kubernetes object of the rollout by its file path in the output folder, and the sizing they use."""
    sized = sizing.size(inputs)
    out: dict[str, dict] = {}
    for part in (
        kubernetes.render(inputs, sized),
        istio.render(inputs),
        argo.render(inputs, sized, prometheus_address=prometheus_address),
        alerts.render(inputs),
    ):
        clash = set(out) & set(part)
        if clash:
            raise OptimizeError(f"deploy render: two renderers wrote {sorted(clash)}")  # our bug, not the user's
        out.update(part)
    return out, sized


def check_formats(formats: tuple[str, ...]) -> None:
    """Each of `formats` is one of FORMATS, and there is at least one (RecipeError, exit 2, otherwise)."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise RecipeError(f"deploy render: --format {','.join(unknown) or '(none)'}: use {' and/or '.join(FORMATS)}")


def render(
    inputs: DeployInputs,
    out: Path,
    formats: tuple[str, ...] = ("kubernetes",),
    prometheus_address: str = DEFAULT_PROMETHEUS,
) -> Rendered:
    """Write the rollout into `out`: `kubernetes` (kubernetes/, argo-rollouts/, monitoring/) and/or `triton`
    (triton/<app>/), plus render.json (what it was rendered from and how each size was derived). The folder is
    built beside `out` and swapped in whole: a failed render leaves `out` as it was."""
    check_formats(formats)
    sized = None
    with _swapped_in(out) as tmp:
        written: list[str] = []
        if "kubernetes" in formats:
            objs, sized = objects(inputs, prometheus_address)
            for rel, obj in objs.items():
                write_text(tmp / rel, _yaml(obj, inputs))
                written.append(rel)
        if "triton" in formats:
            triton.write_repository(inputs, tmp / "triton")
            written += [p.relative_to(tmp).as_posix() for p in sorted((tmp / "triton").rglob("*")) if p.is_file()]
        write_json(tmp / RENDER_RECORD, record(inputs, sized, formats, sorted(written)))
    return Rendered(out=out, files=tuple(sorted(written)), sizing=sized)


def record(inputs: DeployInputs, sized: Any, formats: tuple[str, ...], files: list[str]) -> dict[str, Any]:
    """render.json: the versions, the measured numbers, the derived sizes with their reasons, the files."""

    def version(v: Version | None) -> dict[str, Any] | None:
        return None if v is None else {**dataclasses.asdict(v), "uri": v.uri}

    return {
        "optimize_version": __version__,
        "app": inputs.app,
        "canary": version(inputs.canary),
        "stable": version(inputs.stable),
        "image": inputs.image,
        "tracking_uri": inputs.tracking_uri,
        "formats": list(formats),
        "slo": inputs.serving.slo.model_dump(mode="json"),
        "rollout": inputs.rollout.model_dump(mode="json"),
        "sizing": dataclasses.asdict(sized) if sized is not None else None,
        "files": files,
    }


def _yaml(obj: dict[str, Any], inputs: DeployInputs) -> str:
    head = (
        f"# Rendered by optimize {__version__} (`optimize deploy render`) for {inputs.canary.uri}"
        + (f", stable {inputs.stable.uri}" if inputs.stable else "")
        + ".\n# Re-render rather than edit: the numbers come from the recipe and the measured load test.\n"
    )
    return head + yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, width=120)


@contextmanager
def _swapped_in(out: Path) -> Iterator[Path]:
    """A fresh folder beside `out`; on success it replaces `out` (the old one removed), on failure it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(
    canary_uri: str,
    *,
    stable_uri: str | None,
    image: str,
    out: Path,
    formats: tuple[str, ...],
    tracking_uri: str | None,
    recipe: Path | None,
    engine: Path | None,
    cluster_tracking_uri: str | None,
    prometheus_address: str,
    echo: Callable[[str], None],
) -> Rendered:
    """`optimize deploy render`: resolve (the canary downloaded into a temporary folder), render, and `echo` what
    was written and the canary's pod size."""
    check_formats(formats)  # before anything is downloaded
    with tempfile.TemporaryDirectory(prefix="optimize-deploy-") as tmp:
        inputs = resolve(
            canary_uri,
            stable_uri=stable_uri,
            image=image,
            tracking_uri=tracking_uri,
            recipe=recipe,
            workdir=Path(tmp),
            engine=engine,
            cluster_tracking_uri=cluster_tracking_uri,
        )
        done = render(inputs, out, formats, prometheus_address)
    stable = f", stable {inputs.stable.uri}" if inputs.stable else " (first rollout: no stable version)"
    echo(f"rendered {inputs.canary.uri}{stable} into {out}: {len(done.files)} files")
    sized = done.sizing
    if sized is not None:
        line = f"canary pods: CPU {sized.cpu_request} (limit {sized.cpu_limit}), memory {sized.memory}"
        if sized.expected_replicas is not None:
            line += f"; {sized.expected_replicas} pod(s) for {sized.rps:g} req/s at {sized.max_rps_at_slo:g} each"
        echo(line + f" (how: {out / RENDER_RECORD})")
    return done
