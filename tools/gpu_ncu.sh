#!/bin/bash
# Nsight Compute sections of one grouped-GEMM launch (the digital gate/up GEMM, then the first
# analog one) of `aimc bench --suite gpu` on the OLMoE shape, into $OUT/ncu-*.txt.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
B=.dev/cuda
[ -x $B/aimc ] || tar -C .dev -xJf .dev/cuda.tar.xz
export AIMC_CACHE_DIR=/tmp/aimc-kernel-cache PATH=/usr/local/cuda/bin:$PATH
BASIC=tools/presets/standard-hwa-no-pcm-read-no-ir-drop.json
sections="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section InstructionStats"
for skip in ${SKIPS:-0 12}; do
  timeout 200 ncu $sections -k regex:moe_gemm --launch-skip $skip -c 1 \
    $B/aimc bench --suite gpu --shapes olmoe --repeats 3 --gpu-preset $BASIC > "$OUT/ncu-$skip.txt" 2>&1
  echo "== launch-skip $skip rc=$?"
  grep -E "MOE_|Duration|Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issued Ipc|Issue Slots|Warp Cycles Per Issued|Block Limit|stalled|Executed Ipc|Bank|L2 Hit|Pipe" "$OUT/ncu-$skip.txt" | cut -c1-220 | head -40
done
