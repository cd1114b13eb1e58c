#!/usr/bin/env bash
# /readyz when one GPU's warm-up fails, on a real two-GPU machine: another process (PyTorch, from
# the GPU machine's Python) holds all but HEADROOM_GIB of cuda:1's memory, so the model loads there
# but its warm-up (CUDA graphs up to max_batch 16) runs out of memory. Expected: the service turns
# ready on cuda:0 alone, /readyz lists cuda:1 as failed with the reason, the log names the device,
# and jobs succeed (on cuda:0).
#   loadtest/gpu_readyz_fault.sh BUILD_DIR OUT_DIR
set -euo pipefail
build=${1:-build-gpu} out=${2:-/tmp/sdserve-fault}
mkdir -p "$out"
model=/tmp/sdserve-bench/sd15-random
[ -d "$model" ] || "$build/sdserve" bench --batches 1 --steps 1 --repeats 1 >"$out/bench.txt" 2>&1

python3 - "${HEADROOM_GIB:-4}" >"$out/hog.log" 2>&1 <<'PY' &
import sys, time, torch
free, total = torch.cuda.mem_get_info(1)
keep = int(float(sys.argv[1]) * 2**30)
held = torch.empty(free - keep, dtype=torch.uint8, device="cuda:1")
print(f"holding {held.numel() / 2**30:.1f} GiB of cuda:1 ({total / 2**30:.1f} GiB)", flush=True)
time.sleep(600)
PY
hog=$!
for _ in $(seq 1 60); do grep -q holding "$out/hog.log" && break; sleep 1; done
cat "$out/hog.log"

"$build/sdserve" serve --model "$model" --device auto --port 8090 --max-batch 16 \
  >"$out/serve.log" 2>&1 &
pid=$!
status() {  # prints "CODE BODY" of /readyz
  python3 -c '
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1]); print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
except Exception as e:
    print(0, e)' http://127.0.0.1:8090/readyz
}
for _ in $(seq 1 300); do
  s=$(status)
  case "$s" in 0*) ;; *warming_up*) ;; *) break ;; esac
  sleep 1
done
echo "readyz: $s" | tee "$out/readyz.txt"
"$build/loadtest/sdload" --url http://127.0.0.1:8090 --rate 2 --duration 10 --drain-timeout 60 \
  --width 512 --height 512 --steps 30 --quiet --report "$out/fault-load.json" \
  >"$out/fault-load.txt" 2>&1 || true
cat "$out/fault-load.txt"
grep -iE "failed|error|ready|accepting" "$out/serve.log" | head -20
kill "$pid" "$hog" 2>/dev/null || true
wait || true
