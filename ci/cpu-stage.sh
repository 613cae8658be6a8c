#!/usr/bin/env bash
# The CPU stage, as Jenkins and GitHub Actions run it and as it runs by hand on a developer machine:
# set-up, lint and tests, every recipe validated, then the CPU recipes run and gated.
#
#   bash ci/cpu-stage.sh                       # the default CPU recipes
#   bash ci/cpu-stage.sh recipes/fp16.yaml     # these recipes instead
#   SKIP_TESTS=1 bash ci/cpu-stage.sh          # set-up, validation and recipes only
# Results in $CI_OUT (default ci-out/): junit/*.xml, summary.md, runs/.
# shellcheck source=ci/common.sh
source "$(dirname "$0")/common.sh"

recipes=("$@")
((${#recipes[@]})) || recipes=(recipes/fp16.yaml recipes/digits-int8.yaml)

bash ci/setup.sh cpu
if [[ -z ${SKIP_TESTS:-} ]]; then
  bash ci/test.sh
fi
say "optimize validate recipes/*.yaml"
optimize validate recipes/*.yaml
bash ci/run-recipes.sh "${recipes[@]}"
