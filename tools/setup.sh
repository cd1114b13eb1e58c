#!/usr/bin/env bash
# Installs the Debian 12 packages sdserve needs (when missing) and builds it into build/.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(build-essential cmake ninja-build pkg-config
  libtorch-dev libboost1.81-dev nlohmann-json3-dev libspdlog-dev libfmt-dev
  libhiredis-dev prometheus-cpp-dev libgtest-dev libgmock-dev
  libutf8proc-dev libpng-dev libturbojpeg0-dev redis-server)
tools/install_packages.sh setup "${PACKAGES[@]}"

if [ ! -f build/build.ninja ]; then
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release ${SDSERVE_CMAKE_ARGS:-}
fi
cmake --build build -j"$(nproc)"
