#!/bin/bash
# Nsight Compute's throughput, occupancy, warp-stall, scheduler and instruction sections of one
# launch of the kernels matching KERNEL (default: the grouped GEMM) in one `aimc eval`
# point (default preset, one seed, t = 0), after SKIP launches of it (default 16: the GDC
# readouts of programming and drift come first), into $OUT/sections-<name>.txt, with the
# headline lines printed. Run after tools/gpu_prepare.sh, like tools/gpu_session.sh.
. "$(dirname "$0")/gpu_env.sh"
K=${KERNEL:-moe_gemm}
timeout 120 $B/aimc eval --backend cuda --seeds 1 --times 0 --out /tmp/eval-warm > /dev/null 2>&1
timeout 400 ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
  --section SchedulerStats --section LaunchStats --section ComputeWorkloadAnalysis \
  --section MemoryWorkloadAnalysis --section InstructionStats \
  -k "regex:$K" --launch-skip ${SKIP:-16} -c 1 \
  $B/aimc eval --backend cuda --seeds 1 --times 0 --out /tmp/eval-ncu > "$OUT/sections-$K.txt" 2>&1
grep -E "Duration|Registers Per|Occupancy|Stall|Issued Warp|No Eligible|Eligible Warps|Active Warps Per|Hit Rate|Memory Throughput|Compute \(SM\) Throughput|Executed Ipc A|Block Limit|Grid Size|Warp Cycles Per Issued|Executed Instructions  " \
  "$OUT/sections-$K.txt" | head -60
