#!/usr/bin/env bash
# Builds the torch-free parts of sdserve with clang under AddressSanitizer + UndefinedBehavior-
# Sanitizer (tests/sanitize/CMakeLists.txt) into build-sanitize/ and runs their unit tests.
# Exits non-zero on a build error, a failed test or any sanitizer report. Extra arguments go to
# the test binary (e.g. --gtest_filter='SanitizeTokenizer.*').
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

# clang 14 and its sanitizer runtimes, plus what the sources and tests need (Debian 12; the Redis
# client's tests start a real redis-server).
PACKAGES=(clang libclang-rt-14-dev cmake ninja-build pkg-config nlohmann-json3-dev
  libgtest-dev libutf8proc-dev libpng-dev libturbojpeg0-dev libwebp-dev libhiredis-dev libboost1.81-dev
  redis-server)
tools/install_packages.sh sanitize "${PACKAGES[@]}"

BUILD=build-sanitize
if [ ! -f "$BUILD/build.ninja" ]; then
  CC=clang CXX=clang++ cmake -S tests/sanitize -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=
fi
cmake --build "$BUILD" -j2

# detect_leaks: LeakSanitizer at exit; abort_on_error / halt_on_error: the first report kills the
# process with a non-zero status, so nothing goes unnoticed.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
log="$BUILD/sanitize_tests.log"
status=0
"$BUILD/sanitize_tests" --gtest_color=no "$@" > "$log" 2>&1 || status=$?

passed=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) tests\{0,1\}\..*/\1/p' "$log" | tail -1)
total=$(sed -n 's/^\[==========\] \([0-9]*\) tests\{0,1\} from .* ran\..*/\1/p' "$log" | tail -1)
reports=$(grep -cE '^==[0-9]+==ERROR: |runtime error: |^SUMMARY: (Address|Leak|UndefinedBehavior)Sanitizer' \
  "$log" || true)
elapsed=$(( $(date +%s) - start ))
if [ "$status" -ne 0 ] || [ "$reports" -ne 0 ] || [ -z "$total" ]; then
  cat "$log"
  echo "sanitize: FAILED (exit $status, ${reports} sanitizer report line(s), ${passed:-0}/${total:-?} tests passed) in ${elapsed}s; log: $log" >&2
  exit 1
fi
echo "sanitize: ${total} tests passed under ASan+UBSan in ${elapsed}s (log: $log)"
