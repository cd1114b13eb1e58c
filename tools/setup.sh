#!/usr/bin/env bash
# Installs the Debian 12 packages sdserve needs (when missing) and builds it into build/.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(build-essential cmake ninja-build pkg-config
  libtorch-dev libboost1.81-dev nlohmann-json3-dev libspdlog-dev libfmt-dev
  libhiredis-dev prometheus-cpp-dev libgtest-dev libgmock-dev
  libutf8proc-dev libpng-dev libturbojpeg0-dev libwebp-dev libopenblas0-pthread redis-server
  python3 python3-requests python3-pil python3-websocket chromium)
tools/install_packages.sh setup "${PACKAGES[@]}"
# libopenblas0-pthread: Debian's alternatives then point libblas.so.3 / liblapack.so.3 (which
# libtorch links) at OpenBLAS instead of the reference BLAS: CPU matrix products several times
# faster (docs/PERFORMANCE.md, 2026-12-07). Check: update-alternatives --display
# libblas.so.3-x86_64-linux-gnu

# Configure (when build/build.ninja is missing; Ninja, Release, $SDSERVE_CMAKE_ARGS) and build with
# -j$(nproc): the same script the Dockerfiles use (deploy/docker/).
deploy/docker/build.sh build
