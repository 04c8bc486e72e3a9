#!/bin/bash
# The 64-column analog tile with TMA stages where the A rows are in sorted-pair order (a
# layer's second GEMM) and cp.async where they are gathered per token (its first),
# AIMC_ANALOG_WGMMA_TILE=64,3,2,0, against pipe 0 throughout (the default): the Lightning set
# and standard-hwa, each pair in one call. Both schedules passed the GPU tests in call1.sh.
# Then Nsight Compute's issue and stall sampling on the Lightning set's OLMoE gate/up GEMM with
# TMA stages throughout, to see why 13 % fewer instructions gave 2-5 % (compare
# 2026-12-07-analog-wgmma-default.md's sections of the pipe-0 kernel). Run from the repository
# root with LIMIT=250; carry .dev/cuda.tar.xz. The logs come back as one archive (pack).
. tools/gpu_env.sh
. tools/gpu_call.sh
go && bench light $BASIC
go && bench light-mix $BASIC AIMC_ANALOG_WGMMA_TILE=64,3,2,0
go && bench hwa standard-hwa
go && bench hwa-mix standard-hwa AIMC_ANALOG_WGMMA_TILE=64,3,2,0
go && { AIMC_ANALOG_WGMMA_TILE=64,3,2 timeout 90 ncu --clock-control none --section SpeedOfLight \
    --section WarpStateStats --section SourceCounters --section SchedulerStats \
    --metrics regex:smsp__pcsamp_warps_issue_stalled_.* -k "regex:^moe_analog_wgmma\$" --launch-skip 12 -c 1 \
    -o "$L/tma" $B/aimc bench --suite gpu --shapes olmoe --cases analog --repeats 6 --gpu-preset $BASIC \
    > "$L/ncu-tma.log" 2>&1
  echo "ncu rc=$? $(el)"
  ncu -i "$L/tma.ncu-rep" --print-details all > "$L/ncu-tma.txt" 2>&1
  ncu -i "$L/tma.ncu-rep" --page source --print-source sass --csv > "$L/sass-tma.csv" 2>&1
  grep -E "Duration|Issue Slots|Eligible|stalled_[a-z_]+ " "$L/ncu-tma.txt" | grep -v not_issued | cut -c1-120 | head -30; }
pack
