# Sourced by one-off device-call scripts (reports/bench/*/*.sh) after tools/gpu_env.sh: records
# the device in $OUT/device.txt and defines
#   el                 seconds since the call began, as "[N s]";
#   go                 true while fewer than $LIMIT (default 500) seconds have passed, so that a
#                      step starts only where the call can still finish;
#   gpu_tests          gpu_backend and gpu_finetune with --include-ignored, logs in $L;
#   bench TAG P [ENV]  `aimc bench --suite gpu` on the four shapes with preset P (and ENV
#                      assignments), its table in $L/bench-TAG.md, the cuBLAS and analog rows
#                      echoed; AIMC=path runs another build of aimc (a candidate's);
#   pack               $L as one archive, $OUT/logs.tar.xz: the device returns only a few
#                      files per call, and drops the rest.
{ date -u +%FT%TZ; nvidia-smi -L; ptxas --version | tail -1; } | tee "$OUT/device.txt"
t0=$(date +%s)
L=$OUT/logs
mkdir -p "$L"
el() { echo "[$(( $(date +%s) - t0 )) s]"; }
go() { (( $(date +%s) - t0 < ${LIMIT:-500} )); }
gpu_tests() {
  timeout 300 $B/gpu_backend --include-ignored --test-threads=1 > "$L/gpu_backend.log" 2>&1
  echo "gpu_backend rc=$? $(el)"; grep -E "test result|FAILED|panicked" "$L/gpu_backend.log" | head -20
  timeout 100 $B/gpu_finetune --include-ignored --test-threads=1 > "$L/gpu_finetune.log" 2>&1
  echo "gpu_finetune rc=$? $(el)"; grep -E "test result|FAILED|panicked" "$L/gpu_finetune.log" | head
}
bench() {
  local tag=$1 preset=$2; shift 2
  env "$@" AIMC_CACHE_DIR=/tmp/cache-$tag timeout 120 "${AIMC:-$B/aimc}" bench --suite gpu \
    --shapes olmoe,fine-grained,mixtral,expert --repeats 9 --gpu-preset "$preset" \
    --report "$L/bench-$tag.md" > "$L/bench-$tag.log" 2>&1
  echo "== $tag rc=$? $(el)"; grep -E "^\| " "$L/bench-$tag.md" | grep -E "\(a\)|\(c\)" | cut -c1-190
}
pack() {
  tar -C "$OUT" -cJf /tmp/logs.tar.xz logs && rm -rf "$L" && mv /tmp/logs.tar.xz "$OUT/"
}
