#!/bin/bash
# One GPU-machine call for issue 5 (after tools/gpu_prepare.sh here; carry .dev/cuda and
# .dev/wheels). Writes to $OUT:
#   device.txt, kernels_compile.log, gpu_backend.log, gpu-bench.md + bench.log, lightning.json,
#   eval-{cuda,cpu}.log (whole embedded-model analog eval, wall time of each backend).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
B=.dev/cuda
export PATH=/usr/local/cuda/bin:$PATH AIMC_CACHE_DIR=/tmp/aimc-kernel-cache
{ date -u +%FT%TZ; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; } | tee "$OUT/device.txt"

# 1. Every kernel configuration through NVRTC and ptxas (registers, spills, .param sizes).
$B/kernels_compile --nocapture --test-threads=1 > "$OUT/kernels_compile.log" 2>&1
echo "kernels_compile rc=$?"; grep -E "test result|panicked" "$OUT/kernels_compile.log"

# 2. Parity tests: Philox streams, programming/drift, routing sort, ADC codes, MoE layers (with
#    bound management), whole-model eval GPU vs CPU.
$B/gpu_backend --nocapture --test-threads=1 > "$OUT/gpu_backend.log" 2>&1
echo "gpu_backend rc=$?"
grep -E "^test |test result|panicked|rel\.|codes differ|perplexity|forwards|running on|skipped" "$OUT/gpu_backend.log" | head -80

# 3. Speed: cuBLAS vs digital vs analog grouped layers on the shapes + one expert.
timeout 300 $B/aimc bench --suite gpu --shapes olmoe,fine-grained,mixtral,expert --repeats 21 \
  --report "$OUT/gpu-bench.md" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; cat "$OUT/bench.log" | tail -30

# 4. AIHWKIT-Lightning on the same expert (matched settings, see the script).
pip install -q --no-deps --target /tmp/ahl .dev/wheels/aihwkit_lightning-*.whl &&
  PYTHONPATH=/tmp/ahl timeout 120 python3 tools/aihwkit_lightning_bench.py > "$OUT/lightning.json" 2> "$OUT/lightning.err"
echo "lightning rc=$?"; cat "$OUT/lightning.json"; tail -5 "$OUT/lightning.err"

# 5. Whole embedded-model analog eval, GPU experts vs CPU (same arguments, wall time).
for be in cuda cpu; do
  s=$(date +%s%N)
  timeout 240 $B/aimc eval --backend $be --seeds 2 --times 0,1d,1y --out "$OUT/eval-$be" > "$OUT/eval-$be.log" 2>&1
  rc=$?
  echo "eval $be rc=$rc wall $(( ($(date +%s%N) - s) / 1000000 )) ms"
  tail -12 "$OUT/eval-$be.log"
done
ls -la "$OUT"
