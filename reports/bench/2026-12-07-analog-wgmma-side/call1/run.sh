#!/bin/bash
# Needs the kernel re-applied first (git revert 783d504) and the bundle built from that tree.
# First call for the analog wgmma kernel with side products (PCM_READ, IR drop): the GPU tests,
# then standard-hwa benched (mma.sync and wgmma rows in one process), then Nsight Compute on
# the side kernel while time is left. Run from the repository root with LIMIT=440; carry
# .dev/cuda.tar.xz.
. tools/gpu_env.sh
. tools/gpu_call.sh
gpu_tests
grep -E "wgmma|standard-hwa" "$L/gpu_backend.log" | grep -E "differ|rel|FAILED|panicked" | head -30
go && bench hwa standard-hwa
go && { timeout 60 ncu --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section InstructionStats --section SchedulerStats --section WarpStateStats -k "regex:^moe_analog_wgmma\$" \
    --launch-skip 12 -c 1 $B/aimc bench --suite gpu --shapes olmoe --cases analog --repeats 6 \
    --gpu-preset standard-hwa > "$L/ncu-side.txt" 2>&1
  echo "ncu rc=$? $(el)"; grep -E "Duration|Issue Slots|Executed Ipc|Pipe|Throughput|Stall|Warp Cycles|Registers|Eligible" "$L/ncu-side.txt" | cut -c1-140 | head -40; }
ls "$L"
