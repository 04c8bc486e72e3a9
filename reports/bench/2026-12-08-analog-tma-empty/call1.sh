#!/bin/bash
# Two candidates against the committed analog wgmma kernel, each preset's benches in one call:
# - TMA stages (pipe 2) with an empty barrier per slot instead of the CTA barrier per step (the
#   candidate kernels in .dev/kernels-empty, passed through AIMC_KERNEL_DIR), on pipe 2 and on
#   the mix 64,3,2,0 (cp.async where the gate/up rows are gathered per token, TMA in the down
#   GEMM); the committed kernels run pipe 0 (the default), the mix and pipe 2 beside them;
# - the warp-specialised kernel (pipe 3: loading, MMA and periphery warpgroups;
#   reports/bench/2026-12-08-analog-ws.md), a build of its own in $B/ws.
# Then each candidate's parity test against the mma.sync kernel, and Nsight Compute's stall
# sampling, pipe utilisation and instruction statistics of both on the Lightning set's OLMoE
# gate/up GEMM (which pipe throttles the issue). The full GPU tests are in the next call
# (reports/bench/2026-12-07-analog-wgmma-default/next-call.sh). The logs come back as one
# archive (pack).
# Here, first: `bash tools/gpu_prepare.sh`, then
#   bash reports/bench/2026-12-08-analog-ws/prepare.sh   (adds .dev/cuda/ws, packs again)
#   rm -rf .dev/kernels-empty && cp -r kernels .dev/kernels-empty &&
#     patch -s -p2 -d .dev/kernels-empty < reports/bench/2026-12-08-analog-tma-empty/empty-barriers.patch
# Then on the device, from the repository root: LIMIT=470 bash <this script>, carrying
# .dev/cuda.tar.xz and .dev/kernels-empty.
. tools/gpu_env.sh
. tools/gpu_call.sh
E=.dev/kernels-empty
# Without the patch applied the candidate rows would time the committed kernels.
if [ ! -f $E/gemm_wgmma_analog.cuh ] || cmp -s $E/gemm_wgmma_analog.cuh kernels/gemm_wgmma_analog.cuh; then
  echo "$E/gemm_wgmma_analog.cuh is missing or main's: apply empty-barriers.patch (see above)"; exit 1
fi
[ -x $B/ws/aimc ] || { echo "$B/ws/aimc is missing: run reports/bench/2026-12-08-analog-ws/prepare.sh"; exit 1; }
# Nsight Compute on one analog GEMM launch of the OLMoE layer: profile TAG AIMC [ENV].
profile() {
  local tag=$1 aimc=$2; shift 2
  go || return
  env "$@" AIMC_CACHE_DIR=/tmp/cache-$tag-ncu timeout 90 ncu --clock-control none --section SpeedOfLight \
    --section WarpStateStats --section SourceCounters --section SchedulerStats --section ComputeWorkloadAnalysis \
    --section InstructionStats --metrics regex:smsp__pcsamp_warps_issue_stalled_.* -k "regex:^moe_analog_wgmma\$" \
    --launch-skip 12 -c 1 -o "$L/$tag" "$aimc" bench --suite gpu --shapes olmoe --cases analog --repeats 6 \
    --gpu-preset $BASIC > "$L/ncu-$tag.log" 2>&1
  echo "ncu $tag rc=$? $(el)"
  ncu -i "$L/$tag.ncu-rep" --print-details all > "$L/ncu-$tag.txt" 2>&1
  ncu -i "$L/$tag.ncu-rep" --page source --print-source sass --csv > "$L/sass-$tag.csv" 2>&1
  grep -E "Duration|Issue Slots|Eligible|Pipe|stalled_[a-z_]+ " "$L/ncu-$tag.txt" | grep -v not_issued | cut -c1-120 | head -40
}
go && bench light $BASIC
go && AIMC=$B/ws/aimc bench light-ws $BASIC AIMC_ANALOG_WGMMA_TILE=64,4,3
go && bench light-mix $BASIC AIMC_ANALOG_WGMMA_TILE=64,3,2,0
go && bench light-tma $BASIC AIMC_ANALOG_WGMMA_TILE=64,3,2
go && bench light-empty $BASIC AIMC_ANALOG_WGMMA_TILE=64,3,2 AIMC_KERNEL_DIR=$E
go && bench light-empty-mix $BASIC AIMC_ANALOG_WGMMA_TILE=64,3,2,0 AIMC_KERNEL_DIR=$E
go && bench hwa standard-hwa
go && bench hwa-mix standard-hwa AIMC_ANALOG_WGMMA_TILE=64,3,2,0
go && { AIMC_CACHE_DIR=/tmp/cache-ws-test timeout 120 $B/ws/gpu_backend --include-ignored --test-threads=1 \
    analog_ws_layer > "$L/gpu_backend-ws.log" 2>&1
  echo "gpu_backend (warp-specialised) rc=$? $(el)"; grep -E "test result|FAILED|panicked" "$L/gpu_backend-ws.log" | head; }
go && { AIMC_KERNEL_DIR=$E AIMC_CACHE_DIR=/tmp/cache-empty-test timeout 200 $B/gpu_backend --include-ignored \
    --test-threads=1 analog_wgmma_layer > "$L/gpu_backend-empty.log" 2>&1
  echo "gpu_backend (candidate kernels) rc=$? $(el)"; grep -E "test result|FAILED|panicked" "$L/gpu_backend-empty.log" | head; }
profile ws $B/ws/aimc AIMC_ANALOG_WGMMA_TILE=64,4,3
profile empty $B/aimc AIMC_KERNEL_DIR=$E AIMC_ANALOG_WGMMA_TILE=64,3,2
pack
