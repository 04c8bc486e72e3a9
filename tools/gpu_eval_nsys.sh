#!/bin/bash
# Kernel time per name (Nsight Systems) of a short `aimc eval` on the OLMoE-size checkpoint of
# tools/gpu_session.sh step 8 (ARGS overrides the eval arguments), after a warm-up run that
# fills the PTX cache and prints the per-stage profile (AIMC_PROFILE_FORWARD). Writes to $OUT:
# eval-profile.log, nsys.log, kernels.csv (cuda_gpu_kern_sum), trace.csv.gz (every launch with
# its grid, for telling the GDC readout GEMMs from the forward's). Run after
# tools/gpu_prepare.sh, like tools/gpu_session.sh.
. "$(dirname "$0")/gpu_env.sh"
CK=/tmp/olmoe-size
s=$(date +%s)
[ -f $CK/config.json ] || python3 tools/make_olmoe_size_checkpoint.py --out $CK > "$OUT/olmoe-size-make.log" 2>&1
echo "checkpoint ready in $(( $(date +%s) - s )) s"
ARGS=${ARGS:-"eval --backend cuda --model $CK --preset aimc-3d --tokens 2048 --seeds 1 --times 0,1y"}
s=$(date +%s%N)
AIMC_PROFILE_FORWARD=1 timeout 200 $B/aimc $ARGS --out /tmp/eval-warm > "$OUT/eval-profile.log" 2>&1
echo "warm-up eval rc=$? wall $(( ($(date +%s%N) - s) / 1000000 )) ms"
grep -E "stage|analog sweep" "$OUT/eval-profile.log"
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
[ -n "$NSYS" ] || { echo "no nsys on this machine"; exit 0; }
s=$(date +%s%N)
timeout 300 $NSYS profile -t cuda -o /tmp/eval-nsys --force-overwrite true $B/aimc $ARGS --out /tmp/eval-nsys \
  > "$OUT/nsys.log" 2>&1
echo "nsys eval rc=$? wall $(( ($(date +%s%N) - s) / 1000000 )) ms"
$NSYS stats -q -r cuda_gpu_kern_sum -f csv /tmp/eval-nsys.nsys-rep > "$OUT/kernels.csv" 2>> "$OUT/nsys.log"
$NSYS stats -q -r cuda_gpu_trace -f csv /tmp/eval-nsys.nsys-rep 2>> "$OUT/nsys.log" | gzip > "$OUT/trace.csv.gz"
python3 - "$OUT/kernels.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if r]
head = next(i for i, r in enumerate(rows) if "Name" in r)
h = rows[head]
t, n, name = h.index("Total Time (ns)"), h.index("Instances"), h.index("Name")
for r in rows[head + 1:head + 30]:
    print(f"{float(r[t]) / 1e6:10.1f} ms {int(r[n]):6d}x  {r[name][:90]}")
PY
