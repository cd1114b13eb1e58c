#!/usr/bin/env bash
# Builds sdserve if needed and runs the whole test suite (CPU; GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
# The npm A1111 client's test (tests/a1111/js): Node from Debian where none is installed, then
# the locked modules. No install scripts: sharp's binary comes in a registry package.
command -v npm > /dev/null || tools/install_packages.sh test nodejs npm
(cd tests/a1111/js && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
ctest --test-dir build --output-on-failure -j2 "$@"
