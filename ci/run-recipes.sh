#!/usr/bin/env bash
# `optimize run` for each recipe given, unregistered (ci/publish.sh registers on the main branch), all of
# them even when one fails:
#   $CI_OUT/junit/optimize-<file>.xml  one test case per gate per variant and target (an <error> case when a
#                                      run stops before its gates)
#   $CI_OUT/summary.md                 the gate tables, also appended to $GITHUB_STEP_SUMMARY when set
#   $CI_OUT/runs/<recipe>/<run-id>/    the run directories (report.md, metrics, verdict, artifacts)
# Exit status: 0 when every run passed, else the first failing run's (1 a gate failed, 2 bad recipe,
# 3 a stage failed, 4 a required runtime is missing).
#
#   bash ci/run-recipes.sh [--require-target TARGET]... RECIPE...
# shellcheck source=ci/common.sh
source "$(dirname "$0")/common.sh"
need_optimize

usage="usage: bash ci/run-recipes.sh [--require-target TARGET]... RECIPE..."
options=()
recipes=()
while (($#)); do
  case "$1" in
    --require-target)
      (($# >= 2)) || die "$usage"
      options+=(--require-target "$2")
      shift 2
      ;;
    -*) die "unknown option $1; $usage" ;;
    *)
      recipes+=("$(abspath "$1")")
      shift
      ;;
  esac
done
((${#recipes[@]})) || die "$usage"

mkdir -p "$CI_OUT/junit" "$CI_OUT/runs"
: >"$CI_OUT/summary.md"
status=0
for recipe in "${recipes[@]}"; do
  name="$(basename "$recipe")"
  say "optimize run $recipe ${options[*]}"
  code=0
  optimize run "$recipe" --no-register --quiet --runs-dir "$CI_OUT/runs" "${options[@]}" \
    --junit "$CI_OUT/junit/optimize-${name%.*}.xml" --summary "$CI_OUT/summary.md" || code=$?
  if ((code != 0)); then
    printf '%s: exit %d\n' "$recipe" "$code" >&2
    ((status != 0)) || status=$code
  fi
done
if [[ -n ${GITHUB_STEP_SUMMARY:-} ]]; then
  cat "$CI_OUT/summary.md" >>"$GITHUB_STEP_SUMMARY"
fi
exit "$status"
