#!/usr/bin/env bash
# Register the finished runs in the MLflow registry (main branch only, after the gates passed): every run
# directory given, else every one under $CI_OUT/runs. Idempotent per run (`optimize register` never makes a
# second version for the same run). The store is MLFLOW_TRACKING_URI (credentials: MLFLOW_TRACKING_USERNAME
# and MLFLOW_TRACKING_PASSWORD), else each recipe's registry.tracking_uri, else ./mlflow.db.
#
#   MLFLOW_TRACKING_URI=https://mlflow.example.com bash ci/publish.sh
# shellcheck source=ci/common.sh
source "$(dirname "$0")/common.sh"
need_optimize

runs=()
for run in "$@"; do runs+=("$(abspath "$run")"); done
if ((${#runs[@]} == 0)); then
  while IFS= read -r verdict; do
    runs+=("$(dirname "$verdict")")
  done < <(find "$CI_OUT/runs" -mindepth 3 -maxdepth 3 -name verdict.json 2>/dev/null | sort)
fi
((${#runs[@]})) || die "no finished runs under $CI_OUT/runs: run ci/run-recipes.sh first, or pass RUN_DIR..."
need_tracking_uri

for run in "${runs[@]}"; do
  say "optimize register $run"
  optimize register "$run"
done
