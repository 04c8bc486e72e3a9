#!/bin/bash
# Verify the analog wgmma default (whole model, fine-tuning), pipe 0 parity and the IR table; bench.
. tools/gpu_env.sh
{ date -u +%FT%TZ; nvidia-smi -L; ptxas --version | tail -1; } | tee "$OUT/device.txt"
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s]"; }
go() { (( $(date +%s) - t0 < ${LIMIT:-500} )); }
L=$OUT/logs; mkdir -p $L
timeout 220 $B/gpu_backend --include-ignored --test-threads=1 > "$L/gpu_backend.log" 2>&1; echo "gpu_backend rc=$? $(el)"
grep -E "test result|FAILED|panicked|wgmma vs|wgmma store" "$L/gpu_backend.log" | head -40
timeout 100 $B/gpu_finetune --include-ignored --test-threads=1 > "$L/gpu_finetune.log" 2>&1; echo "gpu_finetune rc=$? $(el)"
grep -E "test result|FAILED|panicked" "$L/gpu_finetune.log" | head
bench() {  # tag preset [env...]
  local tag=$1 preset=$2; shift 2
  env "$@" AIMC_CACHE_DIR=/tmp/cache-$tag timeout 120 $B/aimc bench --suite gpu --shapes olmoe,fine-grained,mixtral,expert \
    --repeats 9 --gpu-preset $preset --report "$L/bench-$tag.md" > "$L/bench-$tag.log" 2>&1
  echo "== $tag rc=$? $(el)"; grep -E "^\| " "$L/bench-$tag.md" | cut -c1-200
}
go && bench light $BASIC
go && timeout 150 $B/kernels_compile --include-ignored --nocapture --test-threads=1 > "$L/kernels_compile.log" 2>&1; echo "kernels_compile rc=$? $(el)"
grep -E "test result|panicked|lane instructions" "$L/kernels_compile.log" | head
go && timeout 200 env AIMC_KERNEL_DIR=.dev/kernels-exp AIMC_CACHE_DIR=/tmp/cache-exp $B/gpu_backend --include-ignored --test-threads=1 > "$L/gpu_backend-exp.log" 2>&1; echo "gpu_backend exp rc=$? $(el)"
grep -E "test result|FAILED|panicked|wgmma vs|wgmma store" "$L/gpu_backend-exp.log" | head -40
go && bench light-exp $BASIC AIMC_KERNEL_DIR=.dev/kernels-exp
go && bench hwa standard-hwa
go && bench hwa-k64 standard-hwa AIMC_GEMM_TILE=64,4,2,3,64
tar -C $OUT -cf - logs | xz -9 > $OUT/logs.tar.xz; rm -rf $L; ls $OUT
