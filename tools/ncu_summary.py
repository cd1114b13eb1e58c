#!/usr/bin/env python3
"""Sums kernel time per kernel name from `ncu --csv --metrics gpu__time_duration.sum` output,
split at each range start (one block per profiled step)."""
import collections
import csv
import sys

rows = list(csv.reader(open(sys.argv[1])))
header_at = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
header = rows[header_at]
name_col, value_col = header.index("Kernel Name"), header.index("Metric Value")
unit_col = header.index("Metric Unit")
total = collections.Counter()
count = collections.Counter()
for r in rows[header_at + 1:]:
    if len(r) <= value_col:
        continue
    v = float(r[value_col].replace(",", ""))
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(r[unit_col], 1e-6)
    name = r[name_col]
    key = name.split("(")[0][:90]
    total[key] += v * scale
    count[key] += 1
all_ms = sum(total.values())
print(f"{all_ms:.2f} ms over {sum(count.values())} kernels")
for k, ms in total.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 30):
    print(f"{ms:8.3f} ms {100 * ms / all_ms:5.1f}% x{count[k]:5d}  {k}")
