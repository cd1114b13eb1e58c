#!/usr/bin/env python3
"""Sums the CUDA kernel time of a Chrome trace (sdserve bench --trace) by kernel name."""
import collections
import json
import sys

events = json.load(open(sys.argv[1]))
events = events.get("traceEvents", events)
by_name = collections.Counter()
count = collections.Counter()
for e in events:
    if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e:
        name = e["name"]
        by_name[name] += e["dur"]
        count[name] += 1
total = sum(by_name.values())
print(f"{sys.argv[1]}: {total / 1000:.2f} ms of GPU time in {sum(count.values())} kernels")
for name, dur in by_name.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 25):
    print(f"{dur / 1000:9.2f} ms {100 * dur / total:5.1f}% x{count[name]:5d}  {name[:110]}")
