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
#   bash ci/canary.sh rollout RECIPE...      the canary in the cluster: render its rollout (`optimize deploy render`,
#                                            image OPTIMIZE_IMAGE) into $CI_OUT/deploy/MODEL/ and validate it; with
#                                            cluster credentials (KUBECONFIG), apply it and step the Istio weights of
#                                            rollout.steps, each judged by `optimize canary analyze` against
#                                            PROMETHEUS_URL; a failed analysis sends all traffic back to stable, rolls
#                                            the canary alias back and fails. Without credentials: render and
#                                            validate only, with a notice. OPTIMIZE_ROLLOUT=argo applies the Argo
#                                            Rollouts objects instead, and the cluster steps and judges on its own.
#
# Every promotion verifies the artifact's sha256 first; the smoke check compares the stored sample inputs'
# outputs with the golden outputs and the recipe's latency budget (`optimize smoke`). The store is
# MLFLOW_TRACKING_URI, as for ci/publish.sh.
# shellcheck source=ci/common.sh
source "$(dirname "$0")/common.sh"
need_optimize

usage="usage: bash ci/canary.sh canary|production|abort|rollout RECIPE... | rollback ALIAS RECIPE..."
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

# Send CANARY_WEIGHT % of MODEL's traffic to the canary subset, the rest to stable: the rendered VirtualService
# with its weights set by subset name, applied.
set_weight() {
  local dir=$1 weight=$2
  python - "$dir/kubernetes/virtualservice.yaml" "$weight" >"$dir/virtualservice.applied.yaml" <<'PY'
import sys, yaml
path, canary = sys.argv[1], int(sys.argv[2])
vs = yaml.safe_load(open(path))
for route in vs["spec"]["http"]:
    subsets = {d["destination"]["subset"] for d in route["route"]}
    for d in route["route"]:
        if subsets == {"canary"}:
            d["weight"] = 100
        else:
            d["weight"] = canary if d["destination"]["subset"] == "canary" else 100 - canary
yaml.safe_dump(vs, sys.stdout, sort_keys=False)
PY
  kubectl apply -f "$dir/virtualservice.applied.yaml"
}

# The analysis of one step: `optimize canary analyze` (exit 0 pass, 1 failed: it rolled the alias back, 2 not enough
# data yet: asked again up to ANALYSIS_RETRIES times)
analyze_step() {
  local model=$1 recipe=$2 tries=0 code
  while :; do
    code=0
    optimize canary analyze --prometheus "$PROMETHEUS_URL" --recipe "$recipe" "$model" \
      --json >"$CI_OUT/deploy/$model/analysis-$weight.json" || code=$?
    if ((code != 2)) || ((++tries > ${ANALYSIS_RETRIES:-3})); then return "$code"; fi
    say "$model: not enough canary traffic yet at $weight %: analysing again ($tries)"
  done
}

# Render and validate MODEL's rollout; with cluster credentials apply it and step the canary's weights.
rollout() {
  local model=$1 recipe=$2 dir="$CI_OUT/deploy/$1" code=0 weight
  [[ -n ${OPTIMIZE_IMAGE:-} ]] || die "OPTIMIZE_IMAGE is not set: the container image with optimize installed (ci/README.md)"
  if [[ -z ${KUBECONFIG:-} && -n ${KUBECONFIG_DATA:-} ]]; then # a kubeconfig given as a secret's text
    mkdir -p "$CI_OUT"
    (umask 077 && printf '%s\n' "$KUBECONFIG_DATA" >"$CI_OUT/kubeconfig")
    export KUBECONFIG="$CI_OUT/kubeconfig"
  fi
  say "$model: render the rollout of $model@canary into $dir"
  optimize deploy render "models:/$model@canary" --image "$OPTIMIZE_IMAGE" --recipe "$recipe" --out "$dir" \
    --prometheus "${PROMETHEUS_URL:-http://prometheus.monitoring:9090}"
  optimize deploy validate "$dir"
  if [[ -z ${KUBECONFIG:-} ]] || ! command -v kubectl >/dev/null; then
    echo "notice: $model: no cluster credentials (KUBECONFIG and kubectl): rendered and validated only; nothing applied" >&2
    return 0
  fi
  if [[ ${OPTIMIZE_ROLLOUT:-istio} == argo ]]; then
    say "$model: kubectl apply (Argo Rollouts steps and analyses the canary in the cluster)"
    kubectl apply -f "$dir/monitoring/prometheusrule.yaml" -f "$dir/argo-rollouts"
    return 0
  fi
  [[ -n ${PROMETHEUS_URL:-} ]] || die "PROMETHEUS_URL is not set: the Prometheus that judges the canary (ci/README.md)"
  say "$model: kubectl apply"
  kubectl apply -f "$dir/monitoring/prometheusrule.yaml" -f "$dir/kubernetes"
  # the weights of rollout.steps, as the render read them (render.json)
  for weight in $(python -c 'import json,sys; print(*json.load(open(sys.argv[1]))["rollout"]["steps"])' "$dir/render.json"); do
    say "$model: $weight % of the traffic to the canary"
    set_weight "$dir" "$weight"
    sleep "${STEP_WAIT_S:-0}"
    analyze_step "$model" "$recipe" || code=$?
    if ((code != 0)); then
      say "$model: the analysis at $weight % failed (exit $code): all traffic back to stable"
      set_weight "$dir" 0 || echo "$model: could not send the traffic back to stable: do it by hand" >&2
      ((code == 1)) || roll_back_after "$model" canary "analysis" "$code"
      return "$code"
    fi
  done
}

case "$step" in
  rollout)
    names="$(model_names "$@")" # a recipe that does not validate stops here (exit 2)
    mapfile -t models <<<"$names"
    recipes=("$@")
    for i in "${!models[@]}"; do
      rollout "${models[$i]}" "$(abspath "${recipes[$i]}")"
    done
    ;;
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
