#!/usr/bin/env bash
# Builds sdserve if needed and runs the service. With no --model, it serves the bundled tiny
# model (models/tiny-sd15). Any argument is passed to `sdserve serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
exec build/sdserve serve "$@"
