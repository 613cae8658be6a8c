"""`optimize deploy validate`: check a rendered folder with the tools the target systems use themselves, and with
the cross-object checks no schema makes.

- Kubernetes objects: kubernetes-validate's bundled schemas in strict mode, for every Kubernetes version from
  1.29 through the newest it ships; a kind it has no schema for is an error.
- Istio, Argo Rollouts and Prometheus Operator objects: the @kubernetes-models npm packages' schemas, run by node
  (crd_validate.cjs beside this module), plus the fields those schemas do not know (the API server refuses them).
- Semantics: route weights, subsets, hosts, the HPA's target, selectors against pod labels, the Argo references,
  and the metrics every PromQL reads.
- promtool `check rules` and `test rules` on the plain rule file and its unit tests.
- Triton's model repository through optimize.deploy.triton.check_repository.

A missing tool is reported in `skipped`, not as an error: the CLI turns it into exit 4 unless told to allow it.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from optimize.deploy import queries, tools, triton
from optimize.deploy.kubernetes import NAME, PART_OF, PROJECT
from optimize.errors import RuntimeMissingError, StageError, first_line
from optimize.lazy import lazy

kv = lazy("kubernetes_validate.utils")

OLDEST_KUBERNETES = "1.29"
# API groups kubernetes-validate has no schema for: their objects go to crd_validate.cjs
CRD_GROUPS = ("networking.istio.io", "argoproj.io", "monitoring.coreos.com")
# metric families Istio's proxies, cAdvisor and kube-state-metrics export (the rules read them; the server does not)
EXTERNAL_METRIC_PREFIXES = ("istio_", "container_", "kube_")
NODE_MODULES_ENV = "OPTIMIZE_NODE_MODULES"
CRD_SCRIPT = Path(__file__).with_name("crd_validate.cjs")
TOOL_TIMEOUT_S = 120
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "ReplicaSet", "Rollout")

Finding = tuple[str, str, str]  # (file relative to the folder, "Kind/name" or "", message)
RuleFiles = list[tuple[str, dict[str, Any]]] | tuple  # (file, content) of the plain Prometheus rule files

# the validators, as `checked` and `skipped` name them
K8S, CRD, SEMANTIC, PROMTOOL, TRITON = "kubernetes-validate", "crd-schemas", "semantic", "promtool", "triton"


@dataclass(frozen=True)
class ValidationReport:
    """What validate_folder found: `errors` as (file, "Kind/name", message), `skipped` validators as (validator,
    why: a tool missing), and `checked`: how many objects (or files) each validator looked at."""

    errors: list[Finding]
    skipped: list[tuple[str, str]]
    checked: dict[str, int]
    allow_missing: bool = False

    @property
    def ok(self) -> bool:
        """No error, and no validator skipped unless that was allowed."""
        return self.exit_code == 0

    @property
    def exit_code(self) -> int:
        """1 on any error (GateFailedError's), else 4 when a validator was skipped and that was not allowed
        (RuntimeMissingError's), else 0."""
        if self.errors:
            return 1
        return 4 if self.skipped and not self.allow_missing else 0


@dataclass(frozen=True)
class Doc:
    """One Kubernetes object of the folder: its file (relative to the folder) and the object."""

    file: str
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        """The object's kind."""
        return str(self.obj.get("kind", ""))

    @property
    def api_version(self) -> str:
        """The object's apiVersion (group/version, or the core group's version alone)."""
        return str(self.obj.get("apiVersion", ""))

    @property
    def name(self) -> str:
        """metadata.name ("" when missing)."""
        return str((self.obj.get("metadata") or {}).get("name", ""))

    @property
    def namespace(self) -> str | None:
        """metadata.namespace; None when the object leaves it to kubectl."""
        return (self.obj.get("metadata") or {}).get("namespace")

    @property
    def ref(self) -> str:
        """`Kind/name`, as errors name the object."""
        return f"{self.kind}/{self.name}"

    @property
    def spec(self) -> dict[str, Any]:
        """The object's spec ({} when it has none)."""
        return self.obj.get("spec") or {}

    @property
    def group(self) -> str:
        """The object's set: the folder's first-level directory (kubernetes/ and argo-rollouts/ are two
        alternative deployments of the same app; the semantic checks look at one set at a time)."""
        parts = Path(self.file).parts
        return parts[0] if len(parts) > 1 else "."


@dataclass
class _Found:
    """What the folder holds, sorted by what checks it."""

    objects: list[Doc] = field(default_factory=list)
    rule_files: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # plain Prometheus rule files
    rule_tests: list[str] = field(default_factory=list)  # promtool unit test files
    errors: list[Finding] = field(default_factory=list)


def validate_folder(folder: Path, *, allow_missing: bool = False) -> ValidationReport:
    """Check every object and file of a rendered folder (see the module docstring). Raises StageError (exit 3)
    when the folder does not exist or a validator itself crashes; a missing tool only lands in `skipped`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StageError(f"{folder}: not a folder; render one with `optimize deploy render ... --out {folder}`")
    found = _load(folder)
    errors = list(found.errors)
    skipped: list[tuple[str, str]] = []
    checked: dict[str, int] = {}

    core = [d for d in found.objects if _group_of(d.api_version) not in CRD_GROUPS]
    crds = [d for d in found.objects if _group_of(d.api_version) in CRD_GROUPS]
    errors += kubernetes_errors(core)
    checked[K8S] = len(core)

    found_crd, why = crd_errors(crds)
    errors += found_crd
    if why:
        skipped.append((CRD, why))
    checked[CRD] = 0 if why else len(crds)

    errors += semantic_errors(found.objects, found.rule_files)
    checked[SEMANTIC] = len(found.objects) + len(found.rule_files)

    promtool_errors, count, why = _promtool(folder, found)
    errors += promtool_errors
    if why:
        skipped.append((PROMTOOL, why))
    checked[PROMTOOL] = count

    triton_errors, count, why = _triton(folder)
    errors += triton_errors
    if why:
        skipped.append((TRITON, why))
    checked[TRITON] = count
    return ValidationReport(errors=errors, skipped=skipped, checked=checked, allow_missing=allow_missing)


def format_report(report: ValidationReport) -> str:
    """The report as lines: each error (`file: Kind/name: message`), each skipped validator, then a summary."""
    lines = [
        f"error: {file}: {ref}: {message}" if ref else f"error: {file}: {message}"
        for file, ref, message in report.errors
    ]
    for validator, why in report.skipped:
        lines.append(f"skipped: {validator}: {why}" + (" (allowed)" if report.allow_missing else ""))
    checked = ", ".join(f"{name} {count}" for name, count in report.checked.items())
    verdict = "valid" if report.exit_code == 0 else "NOT valid"
    lines.append(f"{verdict}: {len(report.errors)} error(s), {len(report.skipped)} skipped; checked: {checked}")
    return "\n".join(lines)


# --- reading the folder ----------------------------------------------------------------------------------------


def _load(folder: Path) -> _Found:
    found = _Found()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith("triton/"):
            continue
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
        except yaml.YAMLError as e:
            found.errors.append((rel, "", f"not YAML: {first_line(e)}"))
            continue
        for doc in docs:
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                found.objects.append(Doc(rel, doc))
            elif isinstance(doc, dict) and "rule_files" in doc:
                found.rule_tests.append(rel)
            elif isinstance(doc, dict) and "groups" in doc:
                found.rule_files.append((rel, doc))
            else:
                found.errors.append(
                    (rel, "", "neither a Kubernetes object (apiVersion, kind) nor a Prometheus rule or test file")
                )
    return found


def _group_of(api_version: str) -> str:
    return api_version.rpartition("/")[0]


# --- kubernetes-validate ---------------------------------------------------------------------------------------


def kubernetes_versions() -> list[str]:
    """The Kubernetes versions (major.minor) checked: from OLDEST_KUBERNETES through the newest schema
    kubernetes-validate ships."""
    versions = {kv.major_minor(v) for v in kv.all_versions()}
    oldest = _version_key(OLDEST_KUBERNETES)
    return sorted((v for v in versions if _version_key(v) >= oldest), key=_version_key)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


@contextmanager
def _schemas_read_once() -> Iterator[None]:
    """kubernetes-validate's validate() reads and parses a version's schemas (its _definitions.json: 4-5 MB) on
    every call; while this is open, each schema file is parsed once (3x faster over a folder)."""
    original = kv.schema_contents
    kv.schema_contents = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        kv.schema_contents = original


def kubernetes_errors(docs: list[Doc]) -> list[Finding]:
    """kubernetes-validate in strict mode on each object, for every version of kubernetes_versions(); one error
    per message, naming the versions it failed for."""
    versions = kubernetes_versions()
    errors = []
    with _schemas_read_once():
        for doc in docs:
            failed: dict[str, list[str]] = defaultdict(list)  # message -> the versions it failed for
            for version in versions:
                for message in _k8s_messages(doc.obj, version):
                    failed[message].append(version)
            for message, where in failed.items():
                span = (
                    where[0] if len(where) == 1 else f"{where[0]}-{where[-1]}" if len(where) > 2 else ", ".join(where)
                )
                errors.append((doc.file, doc.ref, f"{message} (Kubernetes {span}, strict)"))
    return errors


def _k8s_messages(obj: dict[str, Any], version: str) -> Iterator[str]:
    try:
        kv.validate(obj, version, strict=True)
    except kv.SchemaNotFoundError as e:
        yield (
            f"no Kubernetes schema for {e.kind} in {e.api_version}: not a core kind (kubernetes-validate has none); "
            "check apiVersion and kind"
        )
    except kv.ValidationError as e:
        where = ".".join(str(p) for p in e.path) or "(object)"
        yield f"{where}: {first_line(Exception(e.message))}"


# --- CRD schemas (node) ----------------------------------------------------------------------------------------


def node_modules() -> Path | None:
    """Where the @kubernetes-models packages are: $OPTIMIZE_NODE_MODULES (ci/tools/node_modules after
    `bash ci/setup.sh cpu`); None when unset."""
    value = os.environ.get(NODE_MODULES_ENV)
    return Path(value) if value else None


def crd_errors(docs: list[Doc]) -> tuple[list[Finding], str | None]:
    """crd_validate.cjs on the Istio, Argo Rollouts and Prometheus Operator objects: its errors and, when it could
    not run, why (a skip, not an error)."""
    if not docs:
        return [], None
    node = tools.find_tool("node")
    modules = node_modules()
    if node is None:
        return [], "node is not installed (apt-get install nodejs)"
    if modules is None or not modules.is_dir():
        where = f"{NODE_MODULES_ENV}={modules}" if modules else f"{NODE_MODULES_ENV} is not set"
        return [], f"{where}: point it at ci/tools/node_modules (npm ci --prefix ci/tools)"
    try:
        proc = subprocess.run(
            [str(node), str(CRD_SCRIPT), str(modules)],
            input=json.dumps([d.obj for d in docs]),
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise StageError(f"{CRD_SCRIPT.name}: no answer in {TOOL_TIMEOUT_S} s; run it by hand to see why") from e
    if proc.returncode == 3:
        return [], proc.stderr.strip() or f"the @kubernetes-models packages are not in {modules}"
    if proc.returncode != 0:
        raise StageError(f"{CRD_SCRIPT.name} failed (exit {proc.returncode}): {first_line(Exception(proc.stderr))}")
    result = json.loads(proc.stdout)
    return [(docs[f["index"]].file, docs[f["index"]].ref, f["message"]) for f in result["findings"]], None


# --- promtool and Triton ---------------------------------------------------------------------------------------


def _promtool(folder: Path, found: _Found) -> tuple[list[Finding], int, str | None]:
    """`promtool check rules` on each rule file, `promtool test rules` on each test file (run in its folder: the
    test's rule_files are relative to it)."""
    runs = [(["check", "rules"], rel) for rel, _ in found.rule_files] + [
        (["test", "rules"], rel) for rel in found.rule_tests
    ]
    if not runs:
        return [], 0, None
    promtool = tools.find_tool("promtool")
    if promtool is None:
        return [], 0, "promtool is not installed (bash ci/setup.sh cpu: Debian's prometheus package)"
    errors = []
    for args, rel in runs:
        path = folder / rel
        try:
            proc = subprocess.run(
                [str(promtool), *args, path.name],
                cwd=path.parent,
                capture_output=True,
                text=True,
                timeout=TOOL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise StageError(f"promtool {' '.join(args)} {rel}: no answer in {TOOL_TIMEOUT_S} s") from e
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
            text = " | ".join(lines[:40]) + (" | ..." if len(lines) > 40 else "")
            errors.append((rel, "", f"promtool {' '.join(args)} failed: {text}"))
    return errors, len(runs), None


def _triton(folder: Path) -> tuple[list[Finding], int, str | None]:
    repository = folder / "triton"
    if not repository.is_dir():
        return [], 0, None
    try:
        problems = triton.check_repository(repository)
    except RuntimeMissingError as e:
        return [], 0, first_line(e).removeprefix(f"{TRITON}: ")  # the skip is reported under the validator's name
    count = sum(1 for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    return [("triton/", "", message) for message in problems], count, None


# --- semantic checks -------------------------------------------------------------------------------------------


def semantic_errors(docs: list[Doc], rule_files: RuleFiles = ()) -> list[Finding]:
    """The cross-object checks, set by set (a folder's first-level directory): labels and namespace, routes
    (weights, subsets, hosts), the HPA's target, selectors against pod labels, Argo's references; then the
    metrics every query in the folder reads."""
    errors: list[Finding] = []
    sets: dict[str, list[Doc]] = defaultdict(list)
    for doc in docs:
        sets[doc.group].append(doc)
    for members in sets.values():
        errors += _label_errors(members)
        errors += _route_errors(members)
        errors += _scale_target_errors(members)
        errors += _selector_errors(members)
        errors += _subset_label_errors(members)
        errors += _argo_errors(members)
    errors += _query_errors(docs, rule_files)
    return errors


def _label_errors(docs: list[Doc]) -> Iterator[Finding]:
    namespaces = {d.namespace for d in docs}
    for doc in docs:
        labels = (doc.obj.get("metadata") or {}).get("labels") or {}
        if not doc.name:
            yield doc.file, doc.ref, "metadata.name is missing"
        if not labels.get(NAME) or labels.get(PART_OF) != PROJECT:
            yield doc.file, doc.ref, f"metadata.labels need {NAME} and {PART_OF}: {PROJECT}"
        if len(namespaces) > 1:
            yield (
                doc.file,
                doc.ref,
                f"namespace {doc.namespace!r}: one folder's objects share one, found {sorted(map(str, namespaces))}",
            )


def _service_key(host: str, namespace: str | None) -> tuple[str, str | None] | None:
    """(service name, namespace or None) for a host Istio resolves to a Kubernetes Service: `name` (the object's
    own namespace), `name.ns`, `name.ns.svc` or `name.ns.svc.cluster.local`; None for any other host."""
    parts = host.split(".")
    if len(parts) == 1:
        return parts[0], namespace
    if len(parts) == 2 or parts[2:] in (["svc"], ["svc", "cluster", "local"]):
        return parts[0], parts[1]
    return None


def _find_service(host: str, owner: Doc, docs: list[Doc]) -> Doc | None:
    """The folder's Service `host` names. A host that names a namespace matches only a Service of that namespace:
    objects without one land in whatever namespace kubectl applies them to, which the folder cannot know."""
    key = _service_key(host, owner.namespace)
    if key is None:
        return None
    name, namespace = key
    for doc in docs:
        if doc.kind == "Service" and doc.name == name and doc.namespace == namespace:
            return doc
    return None


def _routes(vs: Doc) -> Iterator[tuple[str, dict[str, Any]]]:
    for protocol in ("http", "tcp", "tls"):
        for i, route in enumerate(vs.spec.get(protocol) or []):
            yield f"spec.{protocol}[{i}]" + (f" ({route['name']})" if route.get("name") else ""), route


def _route_errors(docs: list[Doc]) -> Iterator[Finding]:
    rules = [d for d in docs if d.kind == "DestinationRule"]
    for vs in (d for d in docs if d.kind == "VirtualService"):
        for host in vs.spec.get("hosts") or []:
            if _find_service(host, vs, docs) is None:
                yield vs.file, vs.ref, f"host {host!r} names no Service in this folder ({_services(docs)})"
        for where, route in _routes(vs):
            destinations = route.get("route") or []
            weights = [d.get("weight", 100 if len(destinations) == 1 else 0) for d in destinations]
            if destinations and sum(weights) != 100:
                yield vs.file, vs.ref, f"{where}: the weights {weights} sum to {sum(weights)}, not 100"
            for dest in destinations:
                yield from _destination_errors(vs, where, dest.get("destination") or {}, docs, rules)
    for dr in rules:
        host = dr.spec.get("host", "")
        if _find_service(host, dr, docs) is None:
            yield dr.file, dr.ref, f"host {host!r} names no Service in this folder ({_services(docs)})"


def _destination_errors(
    vs: Doc, where: str, dest: dict[str, Any], docs: list[Doc], rules: list[Doc]
) -> Iterator[Finding]:
    host, subset = dest.get("host", ""), dest.get("subset")
    service = _find_service(host, vs, docs)
    if service is None:
        yield vs.file, vs.ref, f"{where}: destination host {host!r} names no Service in this folder ({_services(docs)})"
        return
    if subset is None:
        return
    matching = [r for r in rules if _find_service(r.spec.get("host", ""), r, docs) is service]
    subsets = {s.get("name") for r in matching for s in r.spec.get("subsets") or []}
    if subset not in subsets:
        have = f"its subsets are {sorted(map(str, subsets))}" if matching else "no DestinationRule has that host"
        yield vs.file, vs.ref, f"{where}: subset {subset!r} of host {host!r} is not defined: {have}"


def _services(docs: list[Doc]) -> str:
    names = sorted(d.name for d in docs if d.kind == "Service")
    return "Services: " + (", ".join(names) if names else "none")


def _scale_target_errors(docs: list[Doc]) -> Iterator[Finding]:
    for hpa in (d for d in docs if d.kind == "HorizontalPodAutoscaler"):
        ref = hpa.spec.get("scaleTargetRef") or {}
        kind, api, name = ref.get("kind"), ref.get("apiVersion"), ref.get("name")
        if not any(d.kind == kind and d.api_version == api and d.name == name for d in docs):
            workloads = ", ".join(f"{d.ref} ({d.api_version})" for d in docs if d.kind in WORKLOAD_KINDS) or "none"
            yield (
                hpa.file,
                hpa.ref,
                f"scaleTargetRef {kind}/{name} ({api}) names no object in this folder; workloads: {workloads}",
            )


def _template_labels(docs: list[Doc]) -> list[tuple[Doc, dict[str, str]]]:
    return [
        (d, ((d.spec.get("template") or {}).get("metadata") or {}).get("labels") or {})
        for d in docs
        if d.kind in WORKLOAD_KINDS
    ]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _selector_errors(docs: list[Doc]) -> Iterator[Finding]:
    templates = _template_labels(docs)
    for workload, labels in templates:
        selector = (workload.spec.get("selector") or {}).get("matchLabels") or {}
        if not _matches(selector, labels):
            yield workload.file, workload.ref, f"spec.selector {selector} does not match its pod labels {labels}"
    for doc in docs:
        if doc.kind == "Service":
            selector = doc.spec.get("selector") or {}
        elif doc.kind == "PodDisruptionBudget":
            selector = (doc.spec.get("selector") or {}).get("matchLabels") or {}
        else:
            continue
        if not selector:
            yield doc.file, doc.ref, "no selector: it would select no pods of this folder (or every pod)"
        elif not any(_matches(selector, labels) for _, labels in templates):
            yield doc.file, doc.ref, f"selector {selector} matches no pod template in this folder"


def _canary(rollout: Doc) -> dict[str, Any]:
    """A Rollout's canary strategy ({} when it has none)."""
    return (rollout.spec.get("strategy") or {}).get("canary") or {}


def _istio_routing(rollout: Doc) -> dict[str, Any]:
    """A Rollout's canary traffic routing through Istio ({} when it has none)."""
    return (_canary(rollout).get("trafficRouting") or {}).get("istio") or {}


def _argo_managed(dr: Doc, docs: list[Doc]) -> bool:
    return any(
        (_istio_routing(rollout).get("destinationRule") or {}).get("name") == dr.name
        for rollout in docs
        if rollout.kind == "Rollout"
    )


def _subset_label_errors(docs: list[Doc]) -> Iterator[Finding]:
    """Each subset of a DestinationRule that Argo does not manage selects some pods of its host (Argo injects
    its rollouts-pod-template-hash into the subsets it manages: they are empty by design)."""
    templates = _template_labels(docs)
    for dr in (d for d in docs if d.kind == "DestinationRule"):
        if _argo_managed(dr, docs):
            continue
        service = _find_service(dr.spec.get("host", ""), dr, docs)
        selector = (service.spec.get("selector") or {}) if service else {}
        for subset in dr.spec.get("subsets") or []:
            labels = subset.get("labels") or {}
            if not labels:
                yield dr.file, dr.ref, f"subset {subset.get('name')!r} has no labels: it selects every pod of its host"
            elif not any(_matches({**selector, **labels}, pod) for _, pod in templates):
                yield (
                    dr.file,
                    dr.ref,
                    f"subset {subset.get('name')!r} labels {labels} match no pod template of its host",
                )


def _argo_errors(docs: list[Doc]) -> Iterator[Finding]:
    """A Rollout's Istio routing names a VirtualService (and its routes) and a DestinationRule (and its subsets)
    of the folder; each analysis step names an AnalysisTemplate and gives every argument it declares without a
    value."""
    by_kind = defaultdict(dict)
    for doc in docs:
        by_kind[doc.kind][doc.name] = doc
    for rollout in by_kind["Rollout"].values():
        yield from _argo_routing_errors(rollout, _istio_routing(rollout), by_kind)
        for i, step in enumerate(_canary(rollout).get("steps") or []):
            analysis = step.get("analysis")
            if analysis is None:
                continue
            given = {a.get("name") for a in analysis.get("args") or []}
            for ref in analysis.get("templates") or []:
                template = by_kind["AnalysisTemplate"].get(ref.get("templateName"))
                if template is None:
                    yield (
                        rollout.file,
                        rollout.ref,
                        f"steps[{i}]: AnalysisTemplate {ref.get('templateName')!r} is not in this folder",
                    )
                    continue
                needed = {
                    a.get("name") for a in template.spec.get("args") or [] if "value" not in a and "valueFrom" not in a
                }
                if needed - given:
                    yield rollout.file, rollout.ref, f"steps[{i}]: {template.ref} needs args {sorted(needed - given)}"


def _argo_routing_errors(rollout: Doc, istio: dict[str, Any], by_kind: dict) -> Iterator[Finding]:
    vs_ref = istio.get("virtualService") or {}
    if vs_ref:
        vs = by_kind["VirtualService"].get(vs_ref.get("name"))
        if vs is None:
            yield (
                rollout.file,
                rollout.ref,
                f"trafficRouting.istio: VirtualService {vs_ref.get('name')!r} is not in this folder",
            )
        else:
            names = {r.get("name") for r in vs.spec.get("http") or []}
            for route in vs_ref.get("routes") or []:
                if route not in names:
                    yield rollout.file, rollout.ref, f"trafficRouting.istio: {vs.ref} has no http route {route!r}"
    dr_ref = istio.get("destinationRule") or {}
    if dr_ref:
        dr = by_kind["DestinationRule"].get(dr_ref.get("name"))
        if dr is None:
            yield (
                rollout.file,
                rollout.ref,
                f"trafficRouting.istio: DestinationRule {dr_ref.get('name')!r} is not in this folder",
            )
            return
        subsets = {s.get("name") for s in dr.spec.get("subsets") or []}
        for key in ("canarySubsetName", "stableSubsetName"):
            if dr_ref.get(key) not in subsets:
                yield (
                    rollout.file,
                    rollout.ref,
                    f"trafficRouting.istio.{key} {dr_ref.get(key)!r} is not a subset of {dr.ref}",
                )


def _queries(docs: list[Doc], rule_files: RuleFiles) -> Iterator[tuple[str, str, str, str]]:
    """(file, object, where, PromQL) of every query in the folder."""
    for doc in docs:
        if doc.kind == "AnalysisTemplate":
            for i, metric in enumerate(doc.spec.get("metrics") or []):
                query = ((metric.get("provider") or {}).get("prometheus") or {}).get("query")
                if query:
                    yield doc.file, doc.ref, f"spec.metrics[{i}] ({metric.get('name')})", query
        elif doc.kind == "PrometheusRule":
            yield from _rule_queries(doc.file, doc.ref, "spec.", doc.spec)
    for rel, content in rule_files:
        yield from _rule_queries(rel, "", "", content)


def _rule_queries(file: str, ref: str, prefix: str, content: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    for g, group in enumerate(content.get("groups") or []):
        for r, rule in enumerate(group.get("rules") or []):
            name = rule.get("alert") or rule.get("record")
            yield file, ref, f"{prefix}groups[{g}].rules[{r}] ({name})", str(rule.get("expr", ""))


def _recorded(docs: list[Doc], rule_files: RuleFiles) -> set[str]:
    contents = [d.spec for d in docs if d.kind == "PrometheusRule"] + [c for _, c in rule_files]
    return {
        rule["record"]
        for content in contents
        for group in content.get("groups") or []
        for rule in group.get("rules") or []
        if rule.get("record")
    }


def _query_errors(docs: list[Doc], rule_files: RuleFiles) -> Iterator[Finding]:
    """Every query reads only what `optimize serve` exports, the external families (Istio, cAdvisor,
    kube-state-metrics) and the folder's own recording rules."""
    known = queries.exported_metric_names() | _recorded(docs, rule_files)
    for file, ref, where, query in _queries(docs, rule_files):
        unknown = sorted(
            n for n in queries.metric_names(query) if n not in known and not n.startswith(EXTERNAL_METRIC_PREFIXES)
        )
        if unknown:
            yield (
                file,
                ref,
                f"{where}: reads {', '.join(unknown)}: neither exported by optimize serve ({', '.join(sorted(known))}) "
                f"nor an {'/'.join(p + '*' for p in EXTERNAL_METRIC_PREFIXES)} family",
            )
