#!/usr/bin/env bash
# Builds sdserve if needed and runs the whole test suite (CPU; GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
ctest --test-dir build --output-on-failure -j2 "$@"
