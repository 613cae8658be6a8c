"""Every tag and alias name the registry writes or reads, in one place (as MLflow keeps its own in
`mlflow/utils/mlflow_tags.py`): a name changed here changes for the writer and every reader at once."""

from __future__ import annotations

# --- tags of the MLflow run that logs one `optimize run` ----------------------------------------------------
RUN_ID = "optimize.run_id"  # the optimize run id (manifest `run_id`): what a retried registration finds it by
RUN_RECIPE = "optimize.recipe"
RUN_RECIPE_SHA256 = "optimize.recipe_sha256"
RUN_VERDICT = "optimize.verdict"
RUN_DIR = "optimize.run_dir"
RUN_OPTIMIZE_VERSION = "optimize.version"

# --- tags of a model version (and of the LoggedModel it is registered from) -------------------------------
# What the version is: the same values make the same model (`IDENTITY`).
VARIANT = "variant"
SHA256 = "sha256"  # of model.onnx (with its external data), verified after every download
PRECISION = "precision"
TARGET = "target"  # the targets it was gated on, comma-separated
RECIPE = "recipe"  # the recipe's name
VERDICT = "verdict"  # "passed": only such a version takes an alias
FORMAT = "format"  # "onnx"
GPU_SM = "gpu_sm"  # e.g. sm90, where an engine was built
GPU = "gpu"
TENSORRT = "tensorrt"  # TensorRT version, where an engine was built
# Where it came from (provenance: a new registration of the same model differs only here).
RECIPE_SHA256 = "recipe_sha256"
OPTIMIZE_RUN_ID = "optimize_run_id"
MLFLOW_RUN_ID = "mlflow_run_id"
# MLflow's own name for a git commit (mlflow.utils.mlflow_tags.MLFLOW_GIT_COMMIT), written on the version and on
# the MLflow run. Versions registered before it have `git_commit` instead (nothing reads either back today).
GIT_COMMIT = "mlflow.source.git.commit"
LEGACY_GIT_COMMIT = "git_commit"

# A version is the same model as another when these tags are equal: the same bytes, verified on the same
# targets (GPU and TensorRT included) with the same verdict. Which run registered it (optimize and MLflow run
# ids, the recipe's hash, the git commit) is provenance: a new gate threshold makes no new model.
IDENTITY = (VARIANT, SHA256, PRECISION, TARGET, RECIPE, VERDICT, FORMAT, GPU_SM, GPU, TENSORRT)

# What the version's load test measured (`serving.loadtest: true`) on its first served target: measurements, not
# identity (a model measured again is the same model). `loadtest.rps` is the judged step's rate (the recipe's
# `serving.load.target_rps`, else `max_rps_at_slo`); p99 and error rate are at that rate. Named `loadtest.*`, not
# after the `serving.*` gate metrics, which judge the same numbers in the run.
LOADTEST_TARGET = "loadtest.target"
LOADTEST_MAX_RPS_AT_SLO = "loadtest.max_rps_at_slo"
LOADTEST_RPS = "loadtest.rps"
LOADTEST_P99_MS = "loadtest.p99_ms"
LOADTEST_ERROR_RATE = "loadtest.error_rate"
LOADTEST_SLO_P99_MS = "loadtest.slo_p99_ms"  # the p99 budget max_rps_at_slo was found under
# What the server used at max_rps_at_slo (the load test's `capacity`): `optimize deploy render` sizes pods from it.
LOADTEST_CPU_CORES = "loadtest.cpu_cores"  # CPU seconds per second
LOADTEST_RSS_PEAK_MB = "loadtest.rss_peak_mb"

# --- how alias moves are recorded (see optimize/registry/promotion.py) -------------------------------------
ALIAS_HISTORY = "alias_history.{alias}"  # registered-model tag: the alias's moves, a JSON list, newest last
PREVIOUS_VERSION = "previous_{alias}_version"  # version tag: the version the alias left when this one took it
AUDIT = "audit"  # version tag: who moved which alias from/to this version, a JSON list, newest last

# --- aliases ----------------------------------------------------------------------------------------------------
CANDIDATE = "candidate"  # a registration's default alias (recipe `registry.alias`)
CANARY = "canary"
PRODUCTION = "production"


def alias_history(alias: str) -> str:
    """The registered-model tag that holds `alias`'s history."""
    return ALIAS_HISTORY.format(alias=alias)


def previous_version(alias: str) -> str:
    """The version tag that names the version `alias` left when this version took it."""
    return PREVIOUS_VERSION.format(alias=alias)


def variant_alias(alias: str, variant: str) -> str:
    """The alias a registration gives one variant's version beside `alias` (which names its first variant's)."""
    return f"{alias}-{variant}"
