#!/usr/bin/env bash
# Refresh constraints/cpu.txt, the lock of the CPU environment: every package that `pip install -e '.[test]'`
# brings, at the exact version the suite was run with. README's commands and ci/setup.sh cpu install through
# it, so a fresh clone tests what CI tested; only an edit of this file (a reviewed commit) moves a version.
#
#   bash ci/lock.sh    resolve the newest versions pyproject.toml allows (torch pinned to the CPU build) in a
#                      throw-away venv and write them to constraints/cpu.txt; then run the suite on them
#                      (`bash ci/setup.sh cpu && .venv/bin/python -m pytest`) before committing the new lock.
#
# The lock is for Linux x86-64 and the Python that runs this script (CI's: 3.11). GPU runners do not use it:
# they keep their image's TensorRT, CUDA and torch.
# shellcheck source=ci/common.sh
source "$(dirname "$0")/common.sh"

torch_pin="torch==2.13.0" # the CPU build on this project's machines; PyPI's Linux wheel is the CUDA one
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
say "resolving '.[test]' with $torch_pin in a throw-away venv"
python3 -m venv "$tmp/venv"
printf '%s\n' "$torch_pin" >"$tmp/torch.txt"
"$tmp/venv/bin/pip" install -q -c "$tmp/torch.txt" -e '.[test]'
"$tmp/venv/bin/pip" install -q --no-deps tritonclient # as ci/setup.sh installs it: its own pins clash with ml_dtypes
{
  echo "# The CPU lock: exact versions of everything '.[test]' installs (Linux x86-64, $("$tmp/venv/bin/python" -V))."
  echo "# Written by \`bash ci/lock.sh\` on $(date -u +%Y-%m-%d); edit only through it. torch is the CPU build."
  "$tmp/venv/bin/pip" freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/' | LC_ALL=C sort -f
} >"$tmp/cpu.txt"
grep -qx "$torch_pin" "$tmp/cpu.txt" || die "the resolved torch is not $torch_pin: $(grep -i '^torch==' "$tmp/cpu.txt")"
mv "$tmp/cpu.txt" constraints/cpu.txt
say "constraints/cpu.txt: $(grep -vc '^#' constraints/cpu.txt) packages"
