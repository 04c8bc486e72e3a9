#!/bin/bash
# Duration of every kernel launch (Nsight Compute, gpu__time_duration, real clocks) of a short
# `aimc eval` on the OLMoE-size checkpoint of tools/gpu_session.sh step 8 (ARGS overrides the
# eval arguments; KERNELS the name filter), summed per kernel name and grid, into
# $OUT/eval-ncu-times.txt. Run after tools/gpu_eval_nsys.sh or step 8 (checkpoint and PTX
# cache in place), like tools/gpu_session.sh.
. "$(dirname "$0")/gpu_env.sh"
CK=/tmp/olmoe-size
ARGS=${ARGS:-"eval --backend cuda --model $CK --preset aimc-3d --tokens 512 --seeds 1 --times 0"}
s=$(date +%s%N)
timeout ${NCU_LIMIT:-400} ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum -k "${KERNELS:-regex:.}" \
  $B/aimc $ARGS --out /tmp/eval-ncu-times > "$OUT/eval-ncu-raw.txt" 2>&1
echo "ncu eval rc=$? wall $(( ($(date +%s%N) - s) / 1000000 )) ms"
python3 - "$OUT/eval-ncu-raw.txt" > "$OUT/eval-ncu-times.txt" <<'PY'
import re, sys, collections
tot, cnt = collections.Counter(), collections.Counter()
name = None
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"\s+(\S+?)(?:\(.*?\))? \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\)", line)
    if m:
        name = f"{m.group(1)[:60]} grid {m.group(2)}x{m.group(3)}"
        continue
    m = re.search(r"gpu__time_duration.sum\s+(\S+)\s+([\d.,]+)", line)
    if m and name:
        v = float(m.group(2).replace(",", ""))
        v *= {"usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "nsecond": 1e-3, "ns": 1e-3, "second": 1e6, "s": 1e6}[m.group(1)]
        tot[name] += v; cnt[name] += 1; name = None
all_us = sum(tot.values())
print(f"total {all_us / 1e3:.1f} ms over {sum(cnt.values())} launches")
by = collections.Counter()
for k, v in tot.items(): by[k.split(" grid")[0]] += v
for k, v in by.most_common(25): print(f"{v / 1e3:10.1f} ms  {k}")
print("by grid:")
for k, v in tot.most_common(40): print(f"{v / 1e3:10.1f} ms {cnt[k]:5d}x  {k}")
PY
head -75 "$OUT/eval-ncu-times.txt"
