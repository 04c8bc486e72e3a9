#!/bin/bash
# Per-kernel durations (Nsight Compute, real clocks) of the forward kernels of one `aimc eval`
# point on the GPU (default preset, one seed, t = 0): after the programming and drift launches,
# LAUNCHES launches of the attention, router and routed-expert kernels, into
# $OUT/eval-kernels.txt. Run after tools/gpu_prepare.sh, like tools/gpu_session.sh.
. "$(dirname "$0")/gpu_env.sh"
timeout 120 $B/aimc eval --backend cuda --seeds 1 --times 0 --out /tmp/eval-warm > /dev/null 2>&1
timeout 300 ncu --clock-control none --section SpeedOfLight \
  -k 'regex:causal_attention|route_topk|moe_|swiglu|rms_norm|token_metrics' \
  --launch-skip ${SKIP:-40} -c ${LAUNCHES:-80} \
  $B/aimc eval --backend cuda --seeds 1 --times 0 --out /tmp/eval-ncu 2>&1 |
  grep -E "^  [a-z_]+.*\(|Duration" > "$OUT/eval-kernels.txt"
# name, duration (µs) per launch
paste - - < "$OUT/eval-kernels.txt" | awk '{n=$1; for(i=1;i<=NF;i++) if($i=="Duration") {u=$(i+1); v=$(i+2)}; if(u ~ /^(ms|msecond)/) v*=1000; if(u ~ /^(ns|nsecond)/) v/=1000; print n, v}' |
  awk '{s[$1]+=$2; c[$1]++} END {for (k in s) printf "%-28s %4d launches %10.1f us total %8.1f us each\n", k, c[k], s[k], s[k]/c[k]}' | sort -k4 -nr
