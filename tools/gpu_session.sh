#!/bin/bash
# One GPU-machine call for issue 5 (after tools/gpu_prepare.sh here; carry .dev/cuda.tar.xz and
# .dev/wheels). Writes to $OUT:
#   device.txt, kernels_compile.log, gpu_backend.log, gpu-bench-<preset>.md + bench-<preset>.log,
#   lightning.json,
#   eval-{cuda,cpu}.log (whole embedded-model analog eval, wall time of each backend),
#   wgmma-<tile>.md (step 6), eval-full-{cuda,cpu}*.log (step 7: the full default eval).
. "$(dirname "$0")/gpu_env.sh"
# STEPS picks a subset (default 1–5), e.g. STEPS="1 2" to fit one 600 s device call; 6 is the
# wgmma tile sweep (WG_TILES, WG_SHAPES); 7–11 are described where they run.
STEPS=${STEPS:-"1 2 3 4 5"}
step() { [[ " $STEPS " == *" $1 "* ]]; }
{ date -u +%FT%TZ; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; } | tee "$OUT/device.txt"

if step 1; then
# 1. Every kernel configuration through NVRTC and ptxas (registers, spills, .param sizes); the
#    tests that need CUDA are #[ignore]d for CI, hence --include-ignored here and in step 2.
timeout 200 $B/kernels_compile --include-ignored --nocapture --test-threads=1 > "$OUT/kernels_compile.log" 2>&1
echo "kernels_compile rc=$?"; grep -E "test result|panicked" "$OUT/kernels_compile.log"

fi
if step 2; then
# 2. Parity tests: Philox streams, programming/drift, routing sort, ADC codes, MoE layers (with
#    bound management), whole-model eval GPU vs CPU.
timeout 400 $B/gpu_backend --include-ignored --nocapture --test-threads=1 > "$OUT/gpu_backend.log" 2>&1
echo "gpu_backend rc=$?"
grep -E "^test |test result|panicked|rel\.|codes differ|outputs differ|perplexity|forwards|running on|skipped" "$OUT/gpu_backend.log" | head -100

fi
if step 3; then
# 3. Speed: cuBLAS vs digital vs analog grouped layers on the issue's shapes + one expert, with
#    standard-hwa and with the AIHWKIT-Lightning feature set (no PCM_READ, no IR drop).
for preset in standard-hwa $BASIC; do
  tag=$(basename $preset .json)
  timeout 150 $B/aimc bench --suite gpu --shapes olmoe,fine-grained,mixtral,expert --repeats 21 \
    --gpu-preset $preset --report "$OUT/gpu-bench-$tag.md" > "$OUT/bench-$tag.log" 2>&1
  echo "bench $tag rc=$?"; grep -E "^\| (Olmoe|Fine|Mixtral|Expert)" "$OUT/gpu-bench-$tag.md" | awk -F'|' '{print $2 "|" $3 "|" $4 "|" $6}'
done
fi
if step 4; then
# 4. AIHWKIT-Lightning on the same expert (matched settings, see the script).
pip install -q --no-deps --target /tmp/ahl .dev/wheels/aihwkit_lightning-*.whl &&
  PYTHONPATH=/tmp/ahl timeout 120 python3 tools/aihwkit_lightning_bench.py > "$OUT/lightning.json" 2> "$OUT/lightning.err"
echo "lightning rc=$?"; cat "$OUT/lightning.json"; tail -5 "$OUT/lightning.err"

fi
if step 5; then
# 5. Whole embedded-model analog eval, GPU experts vs CPU (same arguments, wall time).
for be in cuda cpu; do
  s=$(date +%s%N)
  timeout 120 $B/aimc eval --backend $be --seeds 2 --times 0,1d,1y --out "$OUT/eval-$be" > "$OUT/eval-$be.log" 2>&1
  rc=$?
  echo "eval $be rc=$rc wall $(( ($(date +%s%N) - s) / 1000000 )) ms"
  tail -12 "$OUT/eval-$be.log"
done
fi
if step 6; then
# 6. wgmma tile sweep (AIMC_WGMMA_TILE=cols,stages,pipe) of the digital case (b') on the OLMoE
#    and Mixtral shapes, beside cuBLAS and the mma.sync kernel of the same process.
for tile in ${WG_TILES:-256,4,1 256,4,2 256,4,3 128,6,3}; do
  AIMC_WGMMA_TILE=$tile timeout 150 $B/aimc bench --suite gpu --shapes ${WG_SHAPES:-olmoe,mixtral} --repeats 21 \
    --gpu-preset $BASIC --report "$OUT/wgmma-${tile//,/x}.md" > "$OUT/wgmma-${tile//,/x}.log" 2>&1
  echo "wgmma tile $tile rc=$?"; grep -E "^\| .*\((a|b|b')\)" "$OUT/wgmma-${tile//,/x}.md" | awk -F'|' '{print $2 "|" $3 "|" $4 "|" $6}'
done
fi
if step 7; then
# 7. The full default `aimc eval` (7 drift times × 5 seeds, 4,096 tokens) on each backend: one
#    warm-up run (fills the PTX cache), then timed runs; the eval prints its phases.
timeout 120 $B/aimc eval --backend cuda --out /tmp/eval-warm > /dev/null 2>&1
for run in 1 2; do
  s=$(date +%s%N)
  timeout 120 $B/aimc eval --backend cuda --out "$OUT/eval-full-cuda-$run" > "$OUT/eval-full-cuda-$run.log" 2>&1
  echo "eval cuda run $run rc=$? wall $(( ($(date +%s%N) - s) / 1000000 )) ms"
  grep -E "analog sweep|note|backend" "$OUT/eval-full-cuda-$run.log" | head -6
done
AIMC_PROFILE_FORWARD=1 timeout 120 $B/aimc eval --backend cuda --out /tmp/eval-prof > "$OUT/eval-full-cuda-profile.log" 2>&1
grep -E "stage" "$OUT/eval-full-cuda-profile.log"
s=$(date +%s%N)
timeout 120 $B/aimc eval --backend cpu --out "$OUT/eval-full-cpu" > "$OUT/eval-full-cpu.log" 2>&1
echo "eval cpu rc=$? wall $(( ($(date +%s%N) - s) / 1000000 )) ms"
grep -E "analog sweep" "$OUT/eval-full-cpu.log"
fi
if step 8; then
# 8. An OLMoE-1B-7B-size checkpoint (random bf16 weights, tools/make_olmoe_size_checkpoint.py;
#    6.4 B routed-expert weights) through `aimc eval --backend cuda` on the aimc-3d chip (4096
#    stacks of 8 tiers hold it): phases, wall time, peak host RSS, peak device memory (nvidia-smi
#    every 100 ms). OLMOE_RUNS lists the sweeps as tokens:seeds:times (default: a short one and
#    the full default sweep, 4,096 tokens × 5 seeds × 7 times), with an optional fourth field
#    for --gpu-memory (auto|resident|transient|streamed). OLMOE_LAYERS (default 16) deepens the
#    model: 32 layers (13.7 B weights) only fit an 80 GB GPU with the digital weights streamed.
L=${OLMOE_LAYERS:-16}
CK=/tmp/olmoe-size; [ "$L" = 16 ] || CK=/tmp/olmoe-size-$L
s=$(date +%s)
[ -f $CK/config.json ] || python3 tools/make_olmoe_size_checkpoint.py --out $CK --layers $L > "$OUT/olmoe-size-$L-make.log" 2>&1
echo "checkpoint ready in $(( $(date +%s) - s )) s: $(du -sh $CK | cut -f1)"
# aimc-3d's 4,096 stacks hold 16 layers' experts; a deeper model gets a chip scaled with it.
PRESET=aimc-3d
if [ "$L" != 16 ]; then
  PRESET=/tmp/aimc-3d-$L.json
  sed "s/\"stacks\": 4096/\"stacks\": $(( (4096 * L + 15) / 16 ))/" tiles/aimc-3d.json > $PRESET
fi
TIME=""; [ -x /usr/bin/time ] && TIME="/usr/bin/time -v"
for run in ${OLMOE_RUNS:-2048:2:0,1d,1y 4096:5:0,60,1h,1d,1w,1mo,1y}; do
  IFS=: read -r tokens seeds times memory <<< "$run"
  memory=${memory:-auto}
  tag=olmoe-size-$L-$tokens-$seeds-$memory
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/gpumem.txt 2>/dev/null &
  SMI=$!
  s=$(date +%s%N)
  $TIME timeout ${OLMOE_LIMIT:-300} $B/aimc eval --backend cuda --model $CK --preset $PRESET \
    --tokens $tokens --seeds $seeds --times $times --gpu-memory $memory --out "$OUT/eval-$tag" > "$OUT/eval-$tag.log" 2>&1
  echo "$tag eval rc=$? wall $(( ($(date +%s%N) - s) / 1000000 )) ms"
  kill $SMI
  echo "peak device memory used: $(sort -n /tmp/gpumem.txt | tail -1) MiB" | tee -a "$OUT/eval-$tag.log"
  grep -E "analog sweep|note|backend|evaluating|Maximum resident|Elapsed|rror|^\| [0-9]" "$OUT/eval-$tag.log" | head -30
  rm -f "$OUT/eval-$tag"/*.png
done
fi
if step 9; then
# 9. The digital grouped layers beside cuBLAS (DIGITAL_SHAPES), DIGITAL_RUNS times each with the
#    memory pool keeping its freed blocks (the bench's default) and with it unmapping them at
#    each repetition's synchronisation (AIMC_BENCH_RELEASE_POOL, the timing before session 14),
#    alternating; then Nsight Compute's duration of every kernel of one layer forward of
#    NCU_SHAPE (olmoe; the bench's last repetition, the mma.sync case's kernels come first).
for rep in $(seq ${DIGITAL_RUNS:-2}); do
  for pool in retain release; do
    tag=$pool-$rep
    ( [ $pool = release ] && export AIMC_BENCH_RELEASE_POOL=1
      timeout 120 $B/aimc bench --suite gpu --cases digital --shapes ${DIGITAL_SHAPES:-olmoe,fine-grained,mixtral} \
        --repeats 21 --report "$OUT/digital-$tag.md" > "$OUT/digital-$tag.log" 2>&1 )
    echo "digital layers, pool $tag rc=$?"; grep -E "^\| .*\((a|b')\)" "$OUT/digital-$tag.md" | awk -F'|' '{print $2 "|" $3 "|" $4 "|" $6}'
  done
done
timeout 120 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
  $B/aimc bench --suite gpu --cases digital --shapes ${NCU_SHAPE:-olmoe} --repeats 1 > "$OUT/ncu-digital-${NCU_SHAPE:-olmoe}.csv" 2> "$OUT/ncu-digital.err"
echo "ncu rc=$?"
python3 - "$OUT/ncu-digital-${NCU_SHAPE:-olmoe}.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
hdr = rows[0]; rows = rows[1:]
ki, vi, ui = hdr.index("Kernel Name"), hdr.index("Metric Value"), hdr.index("Metric Unit")
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
start = max(i for i, r in enumerate(rows) if r[ki].startswith("moe_count"))  # the last forward
tot = 0.0
for r in rows[start:]:
    v = float(r[vi].replace(",", "")) * scale[r[ui]]
    tot += v; print(f"  {r[ki][:60]:60s} {v:9.1f} us")
print(f"  total {tot:.1f} us")
PY
fi
if step 10; then
# 10. Nsight Compute sections of the digital wgmma layer's first NCU_COUNT (2) GEMMs on the
#     NCU_SHAPE (olmoe) shape (gate/up, then down; NCU_KERNELS="nvjet" NCU_COUNT=1 takes cuBLAS's
#     GEMM instead).
timeout 300 ncu --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis \
  --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section LaunchStats \
  --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,gpc__cycles_elapsed.avg.per_second,dram__bytes_read.sum,dram__bytes_write.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio \
  -k "regex:${NCU_KERNELS:-moe_gemm_wgmma}" -c ${NCU_COUNT:-2} \
  $B/aimc bench --suite gpu --cases digital --shapes ${NCU_SHAPE:-olmoe} --repeats 1 > "$OUT/ncu-gemms-${NCU_SHAPE:-olmoe}.txt" 2> "$OUT/ncu-gemms.err"
echo "ncu sections rc=$?"
grep -E "^  [a-z_0-9]+.*\(|Duration|Tensor|hmma|SM Frequency|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|DRAM Throughput|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Registers Per|Shared Memory Configuration Size|dram__bytes|gpc__cycles|issue_stalled" "$OUT/ncu-gemms-${NCU_SHAPE:-olmoe}.txt" | awk '!/issue_stalled/ || $NF+0 >= 0.05' | head -120
fi
if step 11; then
# 11. Instruction counts and issue rate of the analog grouped GEMMs (default mma.sync kernel,
#     fp16, Lightning feature set) on the OLMoE shape: gate/up then down.
M="gpu__time_duration.sum,smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.per_cycle_active,sm__cycles_elapsed.avg.per_second,launch__registers_per_thread,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,regex:smsp__inst_executed_pipe_.*\.sum$,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
timeout 250 ncu --clock-control none --metrics "$M" -k regex:'^moe_gemm$' -c 2 \
  $B/aimc bench --suite gpu --cases analog --shapes olmoe --repeats 1 --gpu-preset $BASIC > "$OUT/ncu-analog.txt" 2> "$OUT/ncu-analog.err"
echo "ncu analog rc=$?"
grep -E "moe_gemm \(|gpu__time|inst_executed.sum |issue_active|registers" "$OUT/ncu-analog.txt"
fi
