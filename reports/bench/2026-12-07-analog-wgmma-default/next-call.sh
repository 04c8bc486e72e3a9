#!/bin/bash
# The next call: the GPU tests, kernels_compile under ptxas 13.0 (~200 s there), the benches,
# AIHWKIT-Lightning in the same call, and where the analog wgmma kernel's issue goes (Nsight
# Compute pipes). Run from the repository root with LIMIT=500; carry .dev/cuda.tar.xz,
# .dev/wheels and this script.
. tools/gpu_env.sh
. tools/gpu_call.sh
gpu_tests
go && bench light $BASIC
go && bench hwa standard-hwa
go && { pip install -q --no-deps --target /tmp/ahl .dev/wheels/aihwkit_lightning-*.whl &&
  PYTHONPATH=/tmp/ahl timeout 90 python3 tools/aihwkit_lightning_bench.py > "$L/lightning.json" 2> "$L/lightning.err"
  echo "lightning rc=$? $(el)"; cat "$L/lightning.json"; tail -3 "$L/lightning.err"; }
(( $(date +%s) - t0 < ${KC_BY:-250} )) && {
  timeout 280 $B/kernels_compile --include-ignored --nocapture --test-threads=1 > "$L/kernels_compile.log" 2>&1
  echo "kernels_compile rc=$? $(el)"; grep -E "test result|panicked|lane instructions" "$L/kernels_compile.log" | head
  xz -9 "$L/kernels_compile.log"; }
go && { timeout 60 ncu --clock-control none --section ComputeWorkloadAnalysis --section InstructionStats \
    --section SchedulerStats -k "regex:^moe_analog_wgmma\$" --launch-skip 12 -c 1 $B/aimc bench --suite gpu \
    --shapes olmoe --cases analog --repeats 6 --gpu-preset $BASIC > "$L/ncu-wgmma64.txt" 2>&1
  echo "ncu rc=$? $(el)"; grep -E "Duration|Issue Slots|Executed Ipc|Pipe|pipe|Inst|Issued" "$L/ncu-wgmma64.txt" | cut -c1-140 | head -40; }
ls "$L"
