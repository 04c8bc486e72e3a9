#!/bin/bash
# Parity of HEAD's kernels (single-clamp ADC, straight-line periphery rows, 64-column analog
# wgmma tile), speed against e0a5825's kernels (AIMC_KERNEL_DIR), and where the analog kernels stall.
. tools/gpu_env.sh
{ date -u +%FT%TZ; nvidia-smi -L; ptxas --version | tail -1; } | tee "$OUT/device.txt"
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s]"; }
# Steps start only while LIMIT seconds have not passed, so the logs are always packed.
go() { (( $(date +%s) - t0 < ${LIMIT:-480} )); }
L=$OUT/logs; mkdir -p $L
timeout 200 $B/gpu_backend --include-ignored --test-threads=1 > "$L/gpu_backend.log" 2>&1; echo "gpu_backend rc=$? $(el)"
grep -E "test result|FAILED|panicked|wgmma vs|wgmma store" "$L/gpu_backend.log" | head -30
timeout 100 $B/gpu_finetune --include-ignored --test-threads=1 > "$L/gpu_finetune.log" 2>&1; echo "gpu_finetune rc=$? $(el)"
grep -E "test result|FAILED|panicked" "$L/gpu_finetune.log" | head
bench() {  # tag preset [env...]
  local tag=$1 preset=$2; shift 2
  env "$@" AIMC_CACHE_DIR=/tmp/cache-$tag timeout 120 $B/aimc bench --suite gpu --shapes olmoe,fine-grained,mixtral,expert \
    --repeats 9 --gpu-preset $preset --report "$L/bench-$tag.md" > "$L/bench-$tag.log" 2>&1
  echo "== $tag rc=$? $(el)"; grep -E "^\| " "$L/bench-$tag.md" | cut -c1-220
}
go && bench light-new $BASIC
go && timeout 150 $B/kernels_compile --include-ignored --nocapture --test-threads=1 > "$L/kernels_compile.log" 2>&1; echo "kernels_compile rc=$? $(el)"
grep -E "test result|panicked|lane instructions|spill" "$L/kernels_compile.log" | head
go && bench light-old $BASIC AIMC_KERNEL_DIR=.dev/kernels-old AIMC_ANALOG_WGMMA_TILE=128,4,1
go && bench hwa-new standard-hwa
go && bench hwa-exp2 standard-hwa AIMC_KERNEL_DIR=.dev/kernels-exp2
go && bench light-exp1 $BASIC AIMC_KERNEL_DIR=.dev/kernels-exp1
go && bench light-wg64p0 $BASIC AIMC_ANALOG_WGMMA_TILE=64,3,0
go && bench hwa-new-k64 standard-hwa AIMC_GEMM_TILE=64,4,2,3,64
go && bench hwa-exp2-k64 standard-hwa AIMC_KERNEL_DIR=.dev/kernels-exp2 AIMC_GEMM_TILE=64,4,2,3,64
go && for k in moe_analog_wgmma:64,3,1 moe_analog_wgmma:128,4,1 moe_gemm:128,4,1; do
  go || break; name=${k%%:*} cols=${k##*:}
  AIMC_ANALOG_WGMMA_TILE=$cols timeout 100 ncu --clock-control none --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    -k "regex:^$name\$" --launch-skip 12 -c 1 $B/aimc bench --suite gpu --shapes olmoe --cases analog --repeats 6 \
    --gpu-preset $BASIC > "$L/ncu-$name-${cols%%,*}.txt" 2>&1
  echo "ncu $k rc=$? $(el)"
  grep -E "Duration|Registers Per|Block Limit|Achieved Active Warps|Issue Slots Busy|No Eligible|Eligible Warps|Warp Cycles Per Issued|issue_stalled" "$L/ncu-$name-${cols%%,*}.txt" | awk '$NF+0 > 0.05 || !/issue_stalled/' | cut -c1-150 | head -40
done
go && bench hwa-old standard-hwa AIMC_KERNEL_DIR=.dev/kernels-old
tar -C $OUT -cf - logs | xz -9 > $OUT/logs.tar.xz; rm -rf $L; ls $OUT
