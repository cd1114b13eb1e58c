#!/usr/bin/env bash
# Configures and builds sdserve with CMake and Ninja (Release). The one build script: tools/setup.sh
# (and so CI), deploy/docker/Dockerfile and deploy/docker/Dockerfile.cpu all build through it.
#   deploy/docker/build.sh [BUILD_DIR [CMAKE_ARG...]]
# BUILD_DIR (default build) is relative to the repository root. The configure step runs only when
# BUILD_DIR/build.ninja is missing; it passes $SDSERVE_CMAKE_ARGS (split on spaces) and then the
# CMAKE_ARGs, e.g. -DCMAKE_PREFIX_PATH=... for a CUDA libtorch or -DSDSERVE_BUILD_TESTS=OFF.
# Parallel jobs: $CMAKE_BUILD_PARALLEL_LEVEL, else one per core (nproc). SDSERVE_CMAKE_ARGS is
# for the build only: sdserve refuses to start with an SDSERVE_ variable that is not a setting.
set -euo pipefail
cd "$(dirname "$0")/../.."
build_dir=${1:-build}
[ $# -eq 0 ] || shift

if [ ! -f "$build_dir/build.ninja" ]; then
  # shellcheck disable=SC2086  # SDSERVE_CMAKE_ARGS holds several arguments on purpose
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release ${SDSERVE_CMAKE_ARGS:-} "$@"
fi
cmake --build "$build_dir" -j"${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
