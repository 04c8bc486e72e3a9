#!/bin/bash
# Per-kernel durations (Nsight Compute, real clocks) of the forward kernels of one `aimc eval`
# point on the GPU (default preset, one seed, t = 0): after SKIP launches (programming, drift),
# LAUNCHES launches of the kernels matching KERNELS (default: the attention, router and
# routed-expert kernels; KERNELS=regex:. for every kernel, cuBLAS's included), into
# $OUT/eval-kernels.txt and a per-name summary $OUT/eval-kernels-summary.txt. Run after
# tools/gpu_prepare.sh, like tools/gpu_session.sh.
. "$(dirname "$0")/gpu_env.sh"
timeout 120 $B/aimc eval --backend cuda --seeds 1 --times 0 --out /tmp/eval-warm > /dev/null 2>&1
timeout 300 ncu --clock-control none --metrics gpu__time_duration.sum \
  -k "${KERNELS:-regex:causal_attention|route_topk|moe_|swiglu|rms_norm|token_metrics}" \
  --launch-skip ${SKIP:-40} -c ${LAUNCHES:-80} \
  $B/aimc eval --backend cuda --seeds 1 --times 0 --out /tmp/eval-ncu 2>&1 |
  grep -E "Context [0-9]+, Stream|gpu__time_duration" > "$OUT/eval-kernels.txt"
# name, duration (µs) per launch
paste - - < "$OUT/eval-kernels.txt" |
  awk '{n=$1; for(i=1;i<=NF;i++) if($i=="gpu__time_duration.sum") {u=$(i+1); v=$(i+2)}; if(u ~ /^(ms|msecond)/) v*=1000; if(u ~ /^(ns|nsecond)/) v/=1000; print n, v}' |
  awk '{s[$1]+=$2; c[$1]++} END {for (k in s) printf "%-40s %4d launches %10.1f us total %8.1f us each\n", k, c[k], s[k], s[k]/c[k]}' |
  sort -k4 -nr | tee "$OUT/eval-kernels-summary.txt"
