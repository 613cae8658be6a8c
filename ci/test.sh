#!/usr/bin/env bash
# Lint and tests: the whole pytest suite (ruff in tests/test_lint.py; shellcheck, actionlint and groovyc on the
# CI files in tests/test_ci_files.py), JUnit results in $CI_OUT/junit/pytest.xml. Extra arguments go to pytest.
#
#   bash ci/setup.sh cpu && bash ci/test.sh
# shellcheck source=ci/common.sh
source "$(dirname "$0")/common.sh"
need_optimize
mkdir -p "$CI_OUT/junit"
say "pytest $*"
python -m pytest --junitxml="$CI_OUT/junit/pytest.xml" "$@"
