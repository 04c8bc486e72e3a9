#!/bin/bash
# Second call for the analog wgmma kernel with side products (after call1/run.sh: tests passed,
# OLMoE 26.6 -> 22.7 ms): where its warps stall, per SASS instruction (Nsight Compute source
# page); then the split of each step's side wgmma between the group issued before the periphery
# and the group after it (WG_SIDE_G1 = 1..4 k16 steps before, kernel sources in
# .dev/kexp/g*/ through AIMC_KERNEL_DIR), each benched and the layer parity test run on the
# candidates. Run from the repository root with LIMIT=330; carry .dev/cuda.tar.xz, .dev/kexp.
. tools/gpu_env.sh
. tools/gpu_call.sh
stalls() {  # stalls TAG PRESET [ENV]: the analog wgmma kernel's stall sampling, per instruction
  local tag=$1 preset=$2; shift 2
  env "$@" timeout 90 ncu --clock-control none --section WarpStateStats --section SourceCounters \
    --section LaunchStats --section SchedulerStats --metrics regex:smsp__pcsamp_warps_issue_stalled_.* \
    -k "regex:^moe_analog_wgmma\$" --launch-skip 12 -c 1 -o "$L/$tag" $B/aimc bench --suite gpu \
    --shapes olmoe --cases analog --repeats 6 --gpu-preset "$preset" > "$L/ncu-$tag.log" 2>&1
  echo "ncu $tag rc=$? $(el)"
  ncu -i "$L/$tag.ncu-rep" --print-details all > "$L/ncu-$tag.txt" 2>&1
  ncu -i "$L/$tag.ncu-rep" --page source --print-source sass --csv > "$L/sass-$tag.csv" 2>&1
  echo "source page rc=$? $(wc -l < "$L/sass-$tag.csv") lines"
  grep -E "Registers|Stall|stalled|Warp Cycles|Eligible|Duration" "$L/ncu-$tag.txt" | cut -c1-150 | head -30
  xz -9 "$L/$tag.ncu-rep" "$L/sass-$tag.csv"
}
parity() {  # parity TAG: the analog wgmma layer parity test with .dev/kexp/TAG's kernels
  AIMC_KERNEL_DIR=.dev/kexp/$1 timeout 120 $B/gpu_backend --include-ignored --test-threads=1 --exact \
    analog_wgmma_layer_matches_the_mma_sync_kernel > "$L/parity-$1.log" 2>&1
  echo "parity $1 rc=$? $(el)"; grep -E "test result|panicked|differ" "$L/parity-$1.log" | head -5
}
go && stalls side standard-hwa
go && bench base standard-hwa
for g in 4 2 3 1; do go && bench g$g standard-hwa AIMC_KERNEL_DIR=.dev/kexp/g$g; done
go && parity g4
go && parity g2
go && stalls side-g4 standard-hwa AIMC_KERNEL_DIR=.dev/kexp/g4
ls -la "$L"
