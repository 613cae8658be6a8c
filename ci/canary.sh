#!/usr/bin/env bash
# The canary rollout of each recipe's registered model, with an approval between the two steps (the
# Jenkinsfile's `input`, the GitHub environment `production`):
#
#   bash ci/canary.sh canary RECIPE...       promote candidate → canary, smoke-check canary on this machine,
#                                            then load-test it against the recipe's SLO (`optimize loadtest`,
#                                            served on 127.0.0.1); when either fails, roll canary back and fail,
#                                            so it cannot go to production
#   bash ci/canary.sh production RECIPE...   promote canary → production, smoke-check it; roll back on failure
#   bash ci/canary.sh abort RECIPE...        the canary was rejected: roll canary back
#   bash ci/canary.sh rollback ALIAS RECIPE...   move ALIAS back to the version before its last promotion
#
# Every promotion verifies the artifact's sha256 first; the smoke check compares the stored sample inputs'
# outputs with the golden outputs and the recipe's latency budget (`optimize smoke`). The store is
# MLFLOW_TRACKING_URI, as for ci/publish.sh.
# shellcheck source=ci/common.sh
source "$(dirname "$0")/common.sh"
need_optimize

usage="usage: bash ci/canary.sh canary|production|abort RECIPE... | rollback ALIAS RECIPE..."
(($# >= 2)) || die "$usage"
step="$1"
shift
need_tracking_uri

# roll ALIAS of MODEL back after a failed CHECK (exit CODE)
roll_back_after() {
  local model=$1 alias=$2 check=$3 code=$4
  say "$model: $check of $alias failed (exit $code): rolling $alias back"
  optimize rollback "$model" --alias "$alias" || echo "$model@$alias could not be rolled back: move it by hand" >&2
}

# promote FROM → TO, then smoke TO, and load-test the canary (RECIPE's serving section and SLO; loadtest.json in
# $CI_OUT/loadtest/); when a check fails, roll TO back and fail with that check's status (a load test over the
# SLO is exit 1)
promote_and_check() {
  local model=$1 from=$2 to=$3 recipe=$4 code=0
  say "$model: $from → $to"
  optimize promote "$model" --from "$from" --to "$to"
  say "$model: smoke check of $to"
  optimize smoke "models:/$model@$to" || code=$?
  if ((code != 0)); then
    roll_back_after "$model" "$to" "smoke check" "$code"
    return "$code"
  fi
  if [[ $to == canary ]]; then
    say "$model: load test of $to"
    mkdir -p "$CI_OUT/loadtest"
    optimize loadtest "models:/$model@$to" --recipe "$recipe" --out "$CI_OUT/loadtest/$model-$to.json" || code=$?
    if ((code != 0)); then
      roll_back_after "$model" "$to" "load test" "$code"
      return "$code"
    fi
  fi
}

case "$step" in
  canary | production)
    from=candidate
    if [[ $step == production ]]; then from=canary; fi
    names="$(model_names "$@")" # a recipe that does not validate stops here (exit 2)
    mapfile -t models <<<"$names"
    recipes=("$@") # every recipe validated: model i is recipe i's
    for i in "${!models[@]}"; do
      promote_and_check "${models[$i]}" "$from" "$step" "$(abspath "${recipes[$i]}")"
    done
    ;;
  abort | rollback)
    alias=canary
    if [[ $step == rollback ]]; then
      alias="$1"
      shift
      (($#)) || die "$usage"
    fi
    names="$(model_names "$@")" # a recipe that does not validate stops here (exit 2)
    mapfile -t models <<<"$names"
    for model in "${models[@]}"; do
      say "$model: rolling $alias back"
      optimize rollback "$model" --alias "$alias"
    done
    ;;
  *) die "$usage" ;;
esac
