#!/bin/bash
# Per-kernel durations (Nsight Compute, real clocks) of one OLMoE-shape digital layer forward of
# `aimc bench --suite gpu`: the routing/quantize kernels and the two wgmma GEMMs, into
# $OUT/breakdown.txt. Run after tools/gpu_prepare.sh, like tools/gpu_session.sh.
. "$(dirname "$0")/gpu_env.sh"
run() {
  timeout 200 ncu --clock-control none --section SpeedOfLight --section LaunchStats -k "regex:$1" -c $2 \
    $B/aimc bench --suite gpu --shapes ${SHAPE:-olmoe} --repeats 20 --gpu-preset $BASIC 2>&1 |
    grep -E "^  [a-z_]+.*\(|Duration|Registers Per|Grid Size|Memory Throughput|Compute \(SM\)" 
}
{ run 'moe_count|moe_scan|moe_scatter|moe_quantize' 4; run moe_gemm_wgmma 2; } | tee "$OUT/breakdown.txt"
