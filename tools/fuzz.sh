#!/usr/bin/env bash
# Fuzzes sdserve's parsers with libFuzzer (ASan + UBSan) for a bounded time; CI runs it.
#
#   tools/fuzz.sh [seconds_per_target] [target ...]     (default 60 s; all targets)
#
# Targets: request_body multipart ws_command safetensors config tokenizer prompt_syntax image
# (see tests/fuzz/README.md).
# Installs clang/libFuzzer when missing, builds tests/fuzz into build-fuzz/, then per target:
#  1. replays every input in tests/fuzz/regressions/<target>/ (crashes found before, kept forever;
#     one that fails again is reported and fails the run, and fuzzing goes on regardless);
#  2. fuzzes for the given seconds on build-fuzz/run/<target>/corpus, a working copy seeded from
#     tests/fuzz/corpus/<target>/ (the repository's corpus is never written to).
# A crash, sanitizer report, leak, timeout or out-of-memory is copied into
# tests/fuzz/regressions/<target>/ and makes the script exit 1 (after the other targets ran).
# Sequential: one core per fuzzer, so it fits CI's 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET=${1:-60}
shift || true
ALL_TARGETS=(request_body multipart ws_command safetensors config tokenizer prompt_syntax image)
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")
BUILD=build-fuzz

if ! [[ "$SECONDS_PER_TARGET" =~ ^[0-9]+$ ]]; then
  echo "usage: tools/fuzz.sh [seconds_per_target] [target ...]" >&2
  exit 2
fi

# Largest input per target: enough for every interesting structure, small enough to stay fast.
max_len() {
  case "$1" in
    request_body) echo 16384 ;;
    multipart) echo 16384 ;;  # a form of every field, a small image file and room to damage
    ws_command) echo 4096 ;;
    safetensors) echo 16384 ;;
    config) echo 8192 ;;
    tokenizer) echo 8192 ;;  # above the tokenizer's 4096-byte chunks
    prompt_syntax) echo 16384 ;;  # past 16 chunks of 75 tokens
    image) echo 65536 ;;  # the fixtures' PNGs (up to 20 KB), WebPs (up to 4 KB) and room to grow
    *) echo "fuzz: unknown target '$1' (known: ${ALL_TARGETS[*]})" >&2; exit 2 ;;
  esac
}
for t in "${TARGETS[@]}"; do max_len "$t" > /dev/null; done

# --- toolchain ---------------------------------------------------------------------------------
PACKAGES=(clang libclang-rt-14-dev cmake make pkg-config nlohmann-json3-dev libutf8proc-dev
  libpng-dev libturbojpeg0-dev libwebp-dev)
tools/install_packages.sh fuzz "${PACKAGES[@]}"

# --- build -------------------------------------------------------------------------------------
# Configured every time (quick once configured): a target added since the last run must exist.
CC=clang CXX=clang++ cmake -S tests/fuzz -B "$BUILD" > /dev/null
echo "fuzz: building ${TARGETS[*]}"
build_targets=()
for t in "${TARGETS[@]}"; do build_targets+=(--target "fuzz_$t"); done
cmake --build "$BUILD" -j2 "${build_targets[@]}" > "$BUILD/build.log" 2>&1 || {
  tail -n 50 "$BUILD/build.log"
  echo "fuzz: build failed (full log: $BUILD/build.log)" >&2
  exit 2
}

export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

# Prints what a failed run says about the crash: the sanitizer's or libFuzzer's error lines and
# the top of the stack without the sanitizer, libFuzzer and C/C++ runtime frames.
explain() {
  grep -E "^==[0-9]+==ERROR|runtime error:|^SUMMARY:|uncaught exception|what\(\):|\
terminate called|ALARM: working on the last Unit|out-of-memory|^fuzz_[a-z_]+: " "$1" \
    | head -n 8 | cut -c1-240 | sed 's/^/    /' || true
  local frames
  frames=$(grep -E "^ +#[0-9]+ " "$1" | grep -vE "__sanitizer|__asan|__ubsan|__interceptor|\
fuzzer::|libc\.so|libstdc\+\+|nptl/|stdlib/|csu/|signal/|compiler-rt|in main |in _start" \
    | sed -E 's/ \(BuildId: [0-9a-f]+\)//' || true)
  # Where it happened, then the project's own frames (this repository's files).
  { echo "$frames" | head -n 1; echo "$frames" | grep -F "$PWD/" | head -n 5; } \
    | awk 'NF && !seen[$0]++' | cut -c1-240 | sed 's/^/    /'
}

# Copies libFuzzer's crash/leak/timeout/oom artifacts into the regressions folder.
save_artifacts() {
  local target=$1 dir=$2 saved=0
  mkdir -p "tests/fuzz/regressions/$target"
  for f in "$dir"/crash-* "$dir"/leak-* "$dir"/timeout-* "$dir"/oom-*; do
    [ -f "$f" ] || continue
    cp "$f" "tests/fuzz/regressions/$target/"
    echo "    saved tests/fuzz/regressions/$target/$(basename "$f")"
    saved=1
  done
  [ $saved -eq 1 ] || echo "    (libFuzzer left no input to save; see the log)"
}

failed=()
total_execs=0
total_secs=0
summary=()
for t in "${TARGETS[@]}"; do
  bin="$BUILD/fuzz_$t"
  work="$BUILD/run/$t"
  mkdir -p "$work/corpus" "$work/artifacts"
  rm -f "$work"/artifacts/*
  common=(-rss_limit_mb=2048 -timeout=10 -max_len="$(max_len "$t")")
  [ ! -f "tests/fuzz/dict/$t.dict" ] || common+=(-dict="tests/fuzz/dict/$t.dict")

  # 1. Regressions: each input once, in its own process, so that every failing one is named.
  regression_failed=0
  if [ -d "tests/fuzz/regressions/$t" ]; then
    while IFS= read -r -d '' f; do
      if ! "$bin" "${common[@]}" "$f" > "$work/regression.log" 2>&1; then
        echo "fuzz: $t: regression input $f fails again"
        explain "$work/regression.log"
        regression_failed=1
      fi
    done < <(find "tests/fuzz/regressions/$t" -type f ! -name .gitkeep -print0 | sort -z)
  fi
  [ $regression_failed -eq 0 ] || failed+=("$t")

  # 2. Fuzzing, on a working copy of the seeds.
  cp -r "tests/fuzz/corpus/$t/." "$work/corpus/"
  echo "fuzz: $t: fuzzing for ${SECONDS_PER_TARGET}s (log: $work/fuzz.log)"
  start=$(date +%s)
  rc=0
  "$bin" "${common[@]}" -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 \
    -artifact_prefix="$work/artifacts/" "$work/corpus" > "$work/fuzz.log" 2>&1 || rc=$?
  secs=$(($(date +%s) - start))
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$work/fuzz.log" | tail -n 1 |
            grep -o '[0-9]*$' || true)
  if [ -z "$execs" ]; then  # no final stats: take libFuzzer's last status line
    execs=$(grep -oE '^#[0-9]+' "$work/fuzz.log" | tail -n 1 | tr -d '#' || true)
  fi
  execs=${execs:-0}
  total_execs=$((total_execs + execs))
  total_secs=$((total_secs + secs))
  corpus_n=$(find "$work/corpus" -type f | wc -l)
  status=ok
  [ $regression_failed -eq 0 ] || status="REGRESSION FAILS"
  if [ $rc -ne 0 ]; then
    status="FAILED (exit $rc)"
    [ $regression_failed -eq 0 ] || status="REGRESSION FAILS, FAILED (exit $rc)"
    [ $regression_failed -eq 1 ] || failed+=("$t")
    echo "fuzz: $t: FAILED after ${secs}s"
    explain "$work/fuzz.log"
    save_artifacts "$t" "$work/artifacts"
  fi
  summary+=("$(printf '%-12s %12d  %6d  %6d/s  corpus %5d  %s' "$t" "$execs" "$secs" \
    $((execs / (secs > 0 ? secs : 1))) "$corpus_n" "$status")")
done

echo
printf '%-12s %12s  %6s\n' target executions seconds
for line in "${summary[@]}"; do echo "$line"; done
printf '%-12s %12d  %6d\n' total "$total_execs" "$total_secs"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: findings in ${failed[*]}: inputs are in tests/fuzz/regressions/<target>/" >&2
  exit 1
fi
