#!/bin/bash
# Short: parity of the step-loop cut (analog wgmma) and the shared-memory total (mma.sync side
# accumulators, 64-column K step); then the benches as time allows.
. tools/gpu_env.sh
{ date -u +%FT%TZ; nvidia-smi -L; ptxas --version | tail -1; } | tee "$OUT/device.txt"
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s]"; }
L=$OUT/logs; mkdir -p $L
timeout 175 $B/gpu_backend --include-ignored --test-threads=1 > "$L/gpu_backend.log" 2>&1; echo "gpu_backend rc=$? $(el)"
grep -E "test result|FAILED|panicked" "$L/gpu_backend.log" | head -20
timeout 30 $B/gpu_finetune --include-ignored --test-threads=1 > "$L/gpu_finetune.log" 2>&1; echo "gpu_finetune rc=$? $(el)"
grep -E "test result|FAILED|panicked" "$L/gpu_finetune.log" | head
bench() {  # tag preset shapes
  env AIMC_CACHE_DIR=/tmp/cache-$1 timeout 40 $B/aimc bench --suite gpu --shapes $3 \
    --repeats 7 --gpu-preset $2 --report "$L/bench-$1.md" > "$L/bench-$1.log" 2>&1
  echo "== $1 rc=$? $(el)"; grep -E "^\| " "$L/bench-$1.md" | grep -E "\(a\)|\(c\)" | cut -c1-190
}
(( $(date +%s) - t0 < 205 )) && bench light $BASIC olmoe,mixtral,expert
(( $(date +%s) - t0 < 230 )) && bench hwa standard-hwa olmoe,mixtral
ls $L
