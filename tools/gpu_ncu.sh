#!/bin/bash
# Nsight Compute sections of one grouped-GEMM launch of `aimc bench --suite gpu` on the OLMoE
# shape, into $OUT/ncu-*.txt: the digital gate/up GEMM (skip 0) and the first analog one (skip
# 46: the digital case runs 3 warm-ups + 20 timed runs, the least `--repeats` allows, of 2 GEMMs).
. "$(dirname "$0")/gpu_env.sh"
sections="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section InstructionStats"
# KERNEL=moe_gemm_wgmma SKIPS=0 profiles the sm_90a digital GEMM's first gate/up launch.
for skip in ${SKIPS:-0 46}; do
  timeout 200 ncu $sections -k regex:${KERNEL:-moe_gemm} --launch-skip $skip -c 1 \
    $B/aimc bench --suite gpu --shapes olmoe --repeats 3 --gpu-preset $BASIC > "$OUT/ncu-$skip.txt" 2>&1
  echo "== launch-skip $skip rc=$?"
  grep -E "MOE_|Duration|Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issued Ipc|Issue Slots|Warp Cycles Per Issued|Block Limit|stalled|Executed Ipc|Bank|L2 Hit|Pipe" "$OUT/ncu-$skip.txt" | cut -c1-220 | head -40
done
