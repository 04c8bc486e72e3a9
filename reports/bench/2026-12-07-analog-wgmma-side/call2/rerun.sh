#!/bin/bash
# The same machine, a minute after run.sh: the device returns only a few files per call, and
# run.sh's stall tables and the g4 bench were among those left out. This call re-ran them and
# returned its logs as one archive (base, g4, stall sampling of the kernel at HEAD).
. tools/gpu_env.sh
. tools/gpu_call.sh
bench base standard-hwa
bench g4 standard-hwa AIMC_KERNEL_DIR=.dev/kexp/g4
timeout 90 ncu --clock-control none --section WarpStateStats --section SourceCounters --section SchedulerStats \
  --metrics regex:smsp__pcsamp_warps_issue_stalled_.* -k "regex:^moe_analog_wgmma\$" --launch-skip 12 -c 1 \
  -o "$L/side" $B/aimc bench --suite gpu --shapes olmoe --cases analog --repeats 6 --gpu-preset standard-hwa \
  > "$L/ncu-side.log" 2>&1
ncu -i "$L/side.ncu-rep" --print-details all > "$L/ncu-side.txt" 2>&1
ncu -i "$L/side.ncu-rep" --page source --print-source sass --csv > "$L/sass-side.csv" 2>&1
grep -E "stalled_[a-z_]+ " "$L/ncu-side.txt" | grep -v not_issued | cut -c1-120
tar -C $OUT -cJf /tmp/all.tar.xz logs && rm -rf $L && mv /tmp/all.tar.xz $OUT/
