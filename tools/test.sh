#!/usr/bin/env bash
# Builds sdserve if needed and runs the whole test suite (CPU; GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
# The npm A1111 client's test (tests/a1111/js): Node from Debian where none is installed, then
# the locked modules. No install scripts: sharp's binary comes in a registry package.
command -v npm > /dev/null || tools/install_packages.sh test nodejs npm
# Without the registry (an offline machine) the test skips, saying so, instead of failing the run.
(cd tests/a1111/js && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) ||
  echo "tools/test.sh: npm ci failed (no registry?); A1111.NpmClient will be skipped" >&2
ctest --test-dir build --output-on-failure -j2 "$@"
