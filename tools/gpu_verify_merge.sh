#!/bin/bash
# GPU verification of a change against an earlier build (run from the repo root on the GPU machine):
# CUDA-tool and GPU tests with --include-ignored, the full default embedded eval on CUDA three times
# with this tree's binary and three with the earlier one (so a binary's change is read against the
# run-to-run spread of the float-atomic combine), and the shipped task on CUDA.
# Prepare here: .dev-final/cuda.tar.xz holding cuda/{aimc, aimc-main, gpu_backend, kernels_compile}
# (stripped release binaries as tools/gpu_prepare.sh builds them; aimc-main = the earlier aimc), add
# /.dev-final/ to .git/info/exclude, and carry [".dev-final"].
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
D=.dev-final; B=$D/cuda
[ -x $B/aimc ] || tar -C $D -xJf $D/cuda.tar.xz
export AIMC_CACHE_DIR=/tmp/aimc-kernel-cache PATH=/usr/local/cuda/bin:$PATH
{ date -u +%FT%TZ; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; } | tee "$OUT/device.txt"
s=$(date +%s)
timeout 150 $B/kernels_compile --include-ignored --nocapture --test-threads=1 > "$OUT/kernels_compile.log" 2>&1
echo "kernels_compile rc=$? $(( $(date +%s) - s )) s"; grep -E "test result|panicked" "$OUT/kernels_compile.log" | head -5
s=$(date +%s)
timeout 240 $B/gpu_backend --include-ignored --test-threads=1 --nocapture > "$OUT/gpu_backend.log" 2>&1
echo "gpu_backend rc=$? $(( $(date +%s) - s )) s"
grep -E "^test .*(ok|FAILED|ignored)$|test result|panicked" "$OUT/gpu_backend.log" | tail -40
for i in 1 2 3; do for bin in aimc aimc-main; do
  s=$(date +%s%N)
  timeout 60 $B/$bin eval --backend cuda --out /tmp/e-$bin-$i > /tmp/e-$bin-$i.log 2>&1
  echo "eval $bin #$i rc=$? wall $(( ($(date +%s%N) - s) / 1000000 )) ms"
done; done
cp /tmp/e-aimc-1.log "$OUT/eval-cuda.log"; cp /tmp/e-aimc-main-1.log "$OUT/eval-cuda-main.log"
python3 - <<'PY' | tee "$OUT/eval-spread.txt"
import json, itertools
def pts(p):
    j = json.load(open(p + "/eval.json"))
    out = {}
    for r in j["runs"]:
        for q in r["report"]["points"]:
            out[(q.get("seed"), q.get("t_seconds"))] = (q["perplexity"], q["agreement"], q["kl"])
    return out
runs = {f"{b}-{i}": pts(f"/tmp/e-{b}-{i}") for b in ("aimc", "aimc-main") for i in (1, 2, 3)}
def cmp(a, b):
    A, B = runs[a], runs[b]
    rel = [abs(A[k][0] - B[k][0]) / B[k][0] for k in A]
    agr = sum(A[k][1] != B[k][1] for k in A)
    return max(rel), sorted(rel)[len(rel)//2], agr
for a, b in itertools.combinations(sorted(runs), 2):
    m, med, agr = cmp(a, b)
    print(f"{a:12} vs {b:12}: perplexity rel. diff max {m:.2e} median {med:.2e}; agreement differs at {agr} points")
PY
diff <(sed -n '/drift time/,$p' /tmp/e-aimc-1/eval.md) <(sed -n '/drift time/,$p' /tmp/e-aimc-main-1/eval.md) && echo "eval tables identical (run 1)"
s=$(date +%s)
timeout 120 $B/aimc eval --backend cuda --task data/tasks/kjv-verse-continuation.jsonl --seeds 2 --times 0,1y --out "$OUT/task-cuda" > "$OUT/task-cuda.log" 2>&1
echo "task eval cuda rc=$? $(( $(date +%s) - s )) s"; tail -15 "$OUT/task-cuda.log"
