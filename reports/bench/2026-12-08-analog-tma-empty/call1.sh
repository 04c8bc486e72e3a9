#!/bin/bash
# The analog wgmma kernel's TMA stages (pipe 2) with an empty barrier per slot instead of the
# CTA barrier per step (the candidate kernels in .dev/kernels-empty, passed through
# AIMC_KERNEL_DIR), against the committed kernels with pipe 0 (the default), pipe 2, and the
# mix 64,3,2,0 (cp.async where the gate/up rows are gathered per token, TMA in the down GEMM);
# each preset's benches in one call. Then the candidate's parity test, the GPU tests on the
# committed kernels (whose parity test now runs the mix too: the host's choice of schedule per
# GEMM) and Nsight Compute's stall sampling of the candidate on the Lightning set's OLMoE
# gate/up GEMM, with its pipe utilisation (which pipe throttles the issue:
# reports/bench/2026-12-08-analog-ws.md). The logs come back as one archive (pack).
# Here, first: `bash tools/gpu_prepare.sh`, then the candidate kernels beside the committed ones,
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
go && bench light $BASIC
go && bench light-mix $BASIC AIMC_ANALOG_WGMMA_TILE=64,3,2,0
go && bench light-tma $BASIC AIMC_ANALOG_WGMMA_TILE=64,3,2
go && bench light-empty $BASIC AIMC_ANALOG_WGMMA_TILE=64,3,2 AIMC_KERNEL_DIR=$E
go && bench light-empty-mix $BASIC AIMC_ANALOG_WGMMA_TILE=64,3,2,0 AIMC_KERNEL_DIR=$E
go && bench hwa standard-hwa
go && bench hwa-mix standard-hwa AIMC_ANALOG_WGMMA_TILE=64,3,2,0
go && { AIMC_KERNEL_DIR=$E AIMC_CACHE_DIR=/tmp/cache-empty-test timeout 200 $B/gpu_backend --include-ignored \
    --test-threads=1 analog_wgmma_layer > "$L/gpu_backend-empty.log" 2>&1
  echo "gpu_backend (candidate kernels) rc=$? $(el)"; grep -E "test result|FAILED|panicked" "$L/gpu_backend-empty.log" | head; }
go && { timeout 300 $B/gpu_backend --include-ignored --test-threads=1 > "$L/gpu_backend.log" 2>&1
  echo "gpu_backend rc=$? $(el)"; grep -E "test result|FAILED|panicked" "$L/gpu_backend.log" | head -20; }
go && { AIMC_KERNEL_DIR=$E AIMC_ANALOG_WGMMA_TILE=64,3,2 AIMC_CACHE_DIR=/tmp/cache-empty-ncu timeout 90 ncu \
    --clock-control none --section SpeedOfLight --section WarpStateStats --section SourceCounters \
    --section SchedulerStats --section ComputeWorkloadAnalysis --section InstructionStats --metrics regex:smsp__pcsamp_warps_issue_stalled_.* -k "regex:^moe_analog_wgmma\$" \
    --launch-skip 12 -c 1 -o "$L/empty" $B/aimc bench --suite gpu --shapes olmoe --cases analog --repeats 6 \
    --gpu-preset $BASIC > "$L/ncu-empty.log" 2>&1
  echo "ncu rc=$? $(el)"
  ncu -i "$L/empty.ncu-rep" --print-details all > "$L/ncu-empty.txt" 2>&1
  ncu -i "$L/empty.ncu-rep" --page source --print-source sass --csv > "$L/sass-empty.csv" 2>&1
  grep -E "Duration|Issue Slots|Eligible|Pipe|stalled_[a-z_]+ " "$L/ncu-empty.txt" | grep -v not_issued | cut -c1-120 | head -40; }
pack
