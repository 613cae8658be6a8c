# Sourced by the ci/ scripts: strict mode, the repository root as working directory, where results go,
# and the project's virtual environment first on PATH.
#   CI_OUT         results folder (default ci-out/): junit/, summary.md, runs/
#   OPTIMIZE_VENV  the virtual environment ci/setup.sh made (default .venv/)
# shellcheck shell=bash
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CALLER_DIR="$PWD"

# A path the caller gave, relative to where they called from (the scripts work from the repository root).
abspath() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$CALLER_DIR/$1" ;;
  esac
}

CI_OUT="$(abspath "${CI_OUT:-$ROOT/ci-out}")"
VENV="$(abspath "${OPTIMIZE_VENV:-$ROOT/.venv}")"
cd "$ROOT"
export CI_OUT VENV PYTHONUNBUFFERED=1
# the Istio, Argo Rollouts and PrometheusRule schemas `optimize deploy validate` checks against (ci/setup.sh cpu)
export OPTIMIZE_NODE_MODULES="${OPTIMIZE_NODE_MODULES:-$ROOT/ci/tools/node_modules}"
export PATH="$VENV/bin:$PATH"

say() { printf '\n== %s\n' "$*" >&2; }

die() {
  printf 'error: %s\n' "$1" >&2
  exit "${2:-2}"
}

need_optimize() {
  [[ -x "$VENV/bin/optimize" ]] || die "$VENV has no optimize: run \`bash ci/setup.sh cpu\` (or \`gpu\`) first"
}

# In CI (GitHub Actions sets CI, Jenkins JENKINS_URL) the registry must be named: a build that registered
# into a sqlite file in its workspace would report success and ship nothing.
need_tracking_uri() {
  if [[ -z ${MLFLOW_TRACKING_URI:-} ]]; then
    if [[ -n ${CI:-} || -n ${JENKINS_URL:-} ]]; then
      die "MLFLOW_TRACKING_URI is not set: point it at the team's MLflow server (ci/README.md)"
    fi
    echo "MLFLOW_TRACKING_URI is not set: using each recipe's registry.tracking_uri, else ./mlflow.db" >&2
  fi
}

# The registered model name of each recipe (`optimize validate --json`), one per line.
model_names() {
  local recipes=() recipe
  for recipe in "$@"; do recipes+=("$(abspath "$recipe")"); done
  optimize validate --json "${recipes[@]}" | python -c '
import json, sys
described = json.load(sys.stdin)
for r in described:
    if not r["ok"]:
        print("\n".join(r["errors"]), file=sys.stderr)
print("\n".join(r["model_name"] for r in described if r["ok"]))
sys.exit(0 if all(r["ok"] for r in described) else 2)'
}
