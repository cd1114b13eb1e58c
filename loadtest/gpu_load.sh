#!/usr/bin/env bash
# The service under load on a GPU machine, as issue #7 measures it: `sdserve bench` for the
# pipeline's best images/s, then sdload's open-loop sweep against `serve --max-batch 16`, and the
# same traffic against `--max-batch 1` (one job at a time, as ComfyUI and A1111 run).
# SD 1.5 architecture with seeded random fp16 weights, 512x512, 30 steps, CFG 7.5, mixed samplers.
#   [BENCH=0] [DURATION=30] [SERVE_FLAGS=...] [COMPARE_FLAGS=--max-batch 1]
#   loadtest/gpu_load.sh BUILD_DIR OUT_DIR RATES [COMPARE_RATES] [DEVICE]
# e.g. loadtest/gpu_load.sh build-gpu $OUT 3,6,9 3 auto
# SERVE_FLAGS are added to the measured server's command line, COMPARE_FLAGS to the compared one's.
set -euo pipefail
build=${1:-build-gpu} out=${2:-/tmp/sdserve-load} rates=${3:-3,6,9} compare=${4:-} device=${5:-auto}
mkdir -p "$out"
model=/tmp/sdserve-bench/sd15-random
duration=${DURATION:-30}

if [ "${BENCH:-1}" = 1 ]; then  # BENCH=0 skips it; the server still needs the model it writes
  "$build/sdserve" bench --batches 8,16,32 --repeats 2 --json "$out/bench.json" >"$out/bench.txt" 2>&1
  grep -E "^\| (8|16|32) " "$out/bench.txt" || true
elif [ ! -d "$model" ]; then
  "$build/sdserve" bench --batches 1 --steps 1 --repeats 1 >"$out/bench.txt" 2>&1
fi

serve() {  # port log flags...
  local port=$1 log=$2
  shift 2
  "$build/sdserve" serve --model "$model" --device "$device" --port "$port" --max-queue 512 \
    "$@" >"$log" 2>&1 &
  echo $!
}
get() {  # url: prints the body, fails on an error status (python3: the GPU machines have it)
  python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())' "$1"
}
wait_ready() {  # until every device's worker has finished warming up (ready or failed)
  for _ in $(seq 1 300); do
    get "http://127.0.0.1:$1/readyz" 2>/dev/null | grep -q warming_up || {
      get "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
    }
    sleep 1
  done
  echo "server on port $1 never became ready" >&2
  return 1
}
load() {  # url rates name [extra...]
  local url=$1 r=$2 name=$3
  shift 3
  "$build/loadtest/sdload" --url "$url" --sweep "$r" --duration "$duration" --drain-timeout 60 \
    --width 512 --height 512 --steps 30 --quiet --report "$out/$name.json" \
    --chart "$out/$name.png" "$@" >"$out/$name.txt" 2>&1 || true
  cat "$out/$name.txt"
}

# shellcheck disable=SC2086 # the flags are words
pid=$(serve 8080 "$out/serve16.log" --max-batch 16 ${SERVE_FLAGS:-})
wait_ready 8080
get http://127.0.0.1:8080/readyz >"$out/readyz.json"
load http://127.0.0.1:8080 "$rates" sweep16
if [ -n "$compare" ]; then
  # shellcheck disable=SC2086
  pid1=$(serve 8081 "$out/serve1.log" ${COMPARE_FLAGS:---max-batch 1})
  wait_ready 8081
  load http://127.0.0.1:8080 "$compare" compare --compare http://127.0.0.1:8081
  kill "$pid1" || true
fi
kill "$pid" || true
wait || true
