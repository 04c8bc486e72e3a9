#!/bin/bash
# The next call: kernels_compile under ptxas 13.0 (~200 s there), the benches, AIHWKIT-Lightning
# in the same call, and where the analog wgmma kernel's issue goes (Nsight Compute pipes).
. tools/gpu_env.sh
{ date -u +%FT%TZ; nvidia-smi -L; ptxas --version | tail -1; } | tee "$OUT/device.txt"
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s]"; }
go() { (( $(date +%s) - t0 < ${LIMIT:-520} )); }
L=$OUT/logs; mkdir -p $L
timeout 220 $B/gpu_backend --include-ignored --test-threads=1 > "$L/gpu_backend.log" 2>&1; echo "gpu_backend rc=$? $(el)"
grep -E "test result|FAILED|panicked|wgmma vs|wgmma store" "$L/gpu_backend.log" | head -40
timeout 100 $B/gpu_finetune --include-ignored --test-threads=1 > "$L/gpu_finetune.log" 2>&1; echo "gpu_finetune rc=$? $(el)"
grep -E "test result|FAILED|panicked" "$L/gpu_finetune.log" | head
bench() {  # tag preset [env...]
  local tag=$1 preset=$2; shift 2
  env "$@" AIMC_CACHE_DIR=/tmp/cache-$tag timeout 120 $B/aimc bench --suite gpu --shapes olmoe,fine-grained,mixtral,expert \
    --repeats 9 --gpu-preset $preset --report "$L/bench-$tag.md" > "$L/bench-$tag.log" 2>&1
  echo "== $tag rc=$? $(el)"; grep -E "^\| " "$L/bench-$tag.md" | grep -E "\(a\)|\(c\)" | cut -c1-190
}
go && bench light $BASIC
go && bench hwa standard-hwa
go && { pip install -q --no-deps --target /tmp/ahl .dev/wheels/aihwkit_lightning-*.whl &&
  PYTHONPATH=/tmp/ahl timeout 90 python3 tools/aihwkit_lightning_bench.py > "$L/lightning.json" 2> "$L/lightning.err"
  echo "lightning rc=$? $(el)"; cat "$L/lightning.json"; tail -3 "$L/lightning.err"; }
# kernels_compile under ptxas 13.0 (~200 s here) only where it can finish within the call.
(( $(date +%s) - t0 < ${KC_BY:-250} )) && { timeout 280 $B/kernels_compile --include-ignored --nocapture --test-threads=1 > "$L/kernels_compile.log" 2>&1; echo "kernels_compile rc=$? $(el)"
  grep -E "test result|panicked|lane instructions" "$L/kernels_compile.log" | head; }
go && { timeout 60 ncu --clock-control none --section ComputeWorkloadAnalysis --section InstructionStats --section SchedulerStats \
    -k "regex:^moe_analog_wgmma\$" --launch-skip 12 -c 1 $B/aimc bench --suite gpu --shapes olmoe --cases analog --repeats 6 \
    --gpu-preset $BASIC > "$L/ncu-wgmma64.txt" 2>&1; echo "ncu rc=$? $(el)";
  grep -E "Duration|Issue Slots|Executed Ipc|Pipe|pipe|Inst|Issued" "$L/ncu-wgmma64.txt" | cut -c1-140 | head -40; }
xz -9 "$L/kernels_compile.log" 2>/dev/null; ls $OUT $L
