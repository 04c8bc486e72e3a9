#!/bin/bash
# GPU verification of the table normals and binary16 operands (docs/model.md §3, §6) in one call,
# run from the repo root on the GPU machine:
#   1. kernels_compile and gpu_backend with --include-ignored (NVRTC + ptxas, parity of every
#      stream bit for bit, ADC-code and layer parity bounds);
#   2. `aimc bench --suite gpu` on the issue's shapes (OLMoE, fine-grained, Mixtral, one expert)
#      at the AIHWKIT-Lightning feature set and at the default physics (standard-hwa), analog
#      wgmma kernel off and on, with the earlier build beside it on the Lightning set;
#   3. the full default embedded eval on CUDA (this build and the earlier one) and on the CPU
#      (this build), tables compared.
# Prepare here (tools/gpu_prepare.sh builds the first three): .dev-k29/cuda.tar.xz holding
# cuda/{aimc, gpu_backend, kernels_compile, aimc-main} (stripped release binaries; aimc-main = main's
# aimc before this change), add /.dev-k29/ to .git/info/exclude, and carry [".dev-k29"]. About 8 of
# the 10 minutes one device call allows: the steps run in order of importance.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
D=.dev-k29; B=$D/cuda
[ -x $B/aimc ] || tar -C $D -xJf $D/cuda.tar.xz
export AIMC_CACHE_DIR=/tmp/aimc-kernel-cache PATH=/usr/local/cuda/bin:$PATH
LIGHTNING=tools/presets/standard-hwa-no-pcm-read-no-ir-drop.json
{ date -u +%FT%TZ; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; } | tee "$OUT/device.txt"

s=$(date +%s)
timeout 150 $B/kernels_compile --include-ignored --nocapture --test-threads=1 > "$OUT/kernels_compile.log" 2>&1
echo "kernels_compile rc=$? $(( $(date +%s) - s )) s"; grep -E "test result|panicked" "$OUT/kernels_compile.log" | head -5
s=$(date +%s)
timeout 240 $B/gpu_backend --include-ignored --test-threads=1 --nocapture > "$OUT/gpu_backend.log" 2>&1
echo "gpu_backend rc=$? $(( $(date +%s) - s )) s"
grep -E "^test .*(ok|FAILED|ignored)$|test result|panicked" "$OUT/gpu_backend.log" | tail -40
grep -E "adc codes|bit-identical|differ|rel\. RMS|perplexity CPU" "$OUT/gpu_backend.log" | head -40

# Layer benchmarks: Lightning set (this build, then main's), default physics, analog wgmma opt-in.
bench() {  # name binary preset [env]
  local name=$1 bin=$2 preset=$3; shift 3
  s=$(date +%s)
  env "$@" timeout 150 $B/$bin bench --suite gpu --shapes olmoe,fine-grained,mixtral,expert --repeats 5 \
    --gpu-preset "$preset" > "$OUT/bench-$name.md" 2>&1
  echo "bench $name rc=$? $(( $(date +%s) - s )) s"
  grep -E "^\|" "$OUT/bench-$name.md" | head -60
}
bench lightning aimc "$LIGHTNING"
bench lightning-main aimc-main "$LIGHTNING"
bench default aimc standard-hwa
bench lightning-mma aimc "$LIGHTNING" AIMC_ANALOG_WGMMA=0

# The embedded eval (default preset, 5 seeds × 7 times): CUDA new, CUDA main, CPU new.
for run in "aimc cuda" "aimc-main cuda" "aimc cpu"; do
  set -- $run
  s=$(date +%s)
  timeout 400 $B/$1 eval --backend $2 --out /tmp/e-$1-$2 > "$OUT/eval-$1-$2.log" 2>&1
  echo "eval $1 --backend $2 rc=$? $(( $(date +%s) - s )) s"
  sed -n '/drift time/,$p' /tmp/e-$1-$2/eval.md | head -9
done
python3 - <<'PY' | tee "$OUT/eval-compare.txt"
import json
def pts(p):
    out = {}
    for r in json.load(open(p + "/eval.json"))["runs"]:
        for q in r["report"]["points"]:
            out[(q.get("seed"), q.get("t_seconds"))] = (q["perplexity"], q["agreement"], q["kl"])
    return out
new_cuda, main_cuda, new_cpu = (pts(f"/tmp/e-{b}") for b in ("aimc-cuda", "aimc-main-cuda", "aimc-cpu"))
for name, a, b in (("new CUDA vs new CPU", new_cuda, new_cpu), ("new CUDA vs main CUDA", new_cuda, main_cuda)):
    rel = sorted(abs(a[k][0] - b[k][0]) / b[k][0] for k in a)
    agr = max(abs(a[k][1] - b[k][1]) for k in a)
    print(f"{name}: perplexity rel. diff max {rel[-1]:.2e} median {rel[len(rel)//2]:.2e}; "
          f"agreement max diff {agr:.4f} over {len(rel)} points")
PY
