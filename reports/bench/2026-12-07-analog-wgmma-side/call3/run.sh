#!/bin/bash
# Next call, for the persistent analog wgmma kernel with side products (c591cec, first as
# ae7b235) and the noise root without its slow path (cff6d34); main reverts both (46d0174,
# 0a26596): re-apply with `git revert 0a26596 46d0174`, then `bash tools/gpu_prepare.sh`. One CTA
# per multiprocessor walks its tiles; a tile's last periphery runs beside the next tile's first
# block. The GPU tests (the analog wgmma parity test runs standard-hwa with a CTA per
# multiprocessor and with 5 CTAs walking ~20 tiles each), standard-hwa and the Lightning set
# benched, then the stall sampling per SASS instruction of the gate/up GEMM, to compare with
# call2/stalls.txt. Run from the repository root with LIMIT=330; carry .dev/cuda.tar.xz. The
# logs come back as one archive (pack).
. tools/gpu_env.sh
. tools/gpu_call.sh
gpu_tests
grep -E "analog wgmma store" "$L/gpu_backend.log" | head -24
go && bench hwa standard-hwa
go && bench light $BASIC
go && { timeout 90 ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section SourceCounters \
    --section SchedulerStats --metrics regex:smsp__pcsamp_warps_issue_stalled_.* -k "regex:^moe_analog_wgmma\$" \
    --launch-skip 12 -c 1 -o "$L/side" $B/aimc bench --suite gpu --shapes olmoe --cases analog --repeats 6 \
    --gpu-preset standard-hwa > "$L/ncu-side.log" 2>&1
  echo "ncu rc=$? $(el)"
  ncu -i "$L/side.ncu-rep" --print-details all > "$L/ncu-side.txt" 2>&1
  ncu -i "$L/side.ncu-rep" --page source --print-source sass --csv > "$L/sass-side.csv" 2>&1
  grep -E "Duration|Issue Slots|Eligible|stalled_[a-z_]+ " "$L/ncu-side.txt" | grep -v not_issued | cut -c1-120 | head -30; }
pack
