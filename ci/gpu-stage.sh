#!/usr/bin/env bash
# The GPU stage for one or more recipes, in NVIDIA's TensorRT container on a GPU runner: set-up, what the
# machine has (a missing TensorRT or GPU is exit 4 here, not a skip), then the recipes with TensorRT required.
#
#   bash ci/gpu-stage.sh recipes/fp16.yaml
# Results in $CI_OUT as ci/run-recipes.sh writes them. The timing cache lives in $OPTIMIZE_CACHE_DIR/tensorrt:
# mount a volume there to keep it between builds (ci/README.md).
# shellcheck source=ci/common.sh
source "$(dirname "$0")/common.sh"
(($#)) || die "usage: bash ci/gpu-stage.sh RECIPE..."

bash ci/setup.sh gpu
say "optimize doctor --require-target tensorrt"
optimize doctor --require-target tensorrt
bash ci/run-recipes.sh --require-target tensorrt "$@"
