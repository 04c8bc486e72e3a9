#!/bin/bash
# `aimc finetune --backend cuda` at OLMoE-1B-7B size on one GPU (after tools/gpu_prepare.sh here;
# carry .dev/cuda.tar.xz). Writes to $OUT:
#   gpu_finetune.log     step 1: the GPU fine-tuning tests (loss and gradient against the CPU
#                        objective, training lowers the loss and is bit-identical for a seed)
#   olmoe-size-make.log  step 2: the random OLMoE-size checkpoint (tools/make_olmoe_size_checkpoint.py)
#   finetune-olmoe.log, finetune-olmoe.json
#                        step 3: aimc finetune --backend cuda, FT_TOKENS calibration tokens
#                        (16,384) × FT_STEPS steps (200) per layer on the MoE layers FT_LAYERS
#                        (default: all 16; e.g. FT_LAYERS=0,1 to stay inside a device call),
#                        preset FT_PRESET (pcm-3d-8tier), one year of drift; wall time, the
#                        phases (model load, calibration on the GPU, training, writing), aimc's
#                        peak device memory (the memory pool's high-water mark, per layer) and
#                        nvidia-smi's peak (every 100 ms, all processes).
#   finetune-profile.log step 4 (not in the default STEPS): one layer, 2,048 calibration tokens,
#                        20 steps, with AIMC_PROFILE_FORWARD=1: the time per stage of a step
#                        (mapping, programming, drift, GDC readouts, forward, loss, backward, Adam).
# About 1 min for step 1 (most of it NVRTC, cached for step 3), ~1 min for step 2, and for
# step 3 about 4 min on an H100 (reports/bench/2026-12-07-finetune-olmoe16.md: load 10 s,
# calibration 10 s, 13 s per layer, writing 10 s): FT_LIMIT (default 420 s) bounds it.
. "$(dirname "$0")/gpu_env.sh"
STEPS=${STEPS:-"1 2 3"}
step() { [[ " $STEPS " == *" $1 "* ]]; }
{ date -u +%FT%TZ; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; } | tee "$OUT/device.txt"

if step 1; then
timeout 300 $B/gpu_finetune --include-ignored --nocapture --test-threads=1 > "$OUT/gpu_finetune.log" 2>&1
echo "gpu_finetune rc=$?"
grep -E "^test |test result|panicked|loss CPU|noisy loss GPU|running on" "$OUT/gpu_finetune.log" | head -40
fi

CK=/tmp/olmoe-size
if step 2; then
s=$(date +%s)
[ -f $CK/config.json ] || python3 tools/make_olmoe_size_checkpoint.py --out $CK --layers 16 > "$OUT/olmoe-size-make.log" 2>&1
echo "checkpoint ready in $(( $(date +%s) - s )) s: $(du -sh $CK | cut -f1)"
fi

if step 3; then
LAYERS=()
[ -n "${FT_LAYERS:-}" ] && LAYERS=(--layers "$FT_LAYERS")
FT_OUT=/tmp/olmoe-finetuned
rm -rf $FT_OUT
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/ft-gpumem.txt 2>/dev/null &
SMI=$!
TIME=""; [ -x /usr/bin/time ] && TIME="/usr/bin/time -v"
s=$(date +%s%N)
$TIME timeout ${FT_LIMIT:-420} $B/aimc finetune --backend cuda --model $CK --calib data/kjv-calib.txt \
  --calib-tokens ${FT_TOKENS:-16384} --steps ${FT_STEPS:-200} --preset ${FT_PRESET:-pcm-3d-8tier} \
  --drift-time 1y "${LAYERS[@]}" --out $FT_OUT > "$OUT/finetune-olmoe.log" 2>&1
rc=$?
echo "finetune rc=$rc wall $(( ($(date +%s%N) - s) / 1000000 )) ms"
kill $SMI
echo "nvidia-smi peak device memory used: $(sort -n /tmp/ft-gpumem.txt | tail -1) MiB" | tee -a "$OUT/finetune-olmoe.log"
grep -E "^finetune|noisy loss .* →|peak device memory|note|rror|Maximum resident|Elapsed" "$OUT/finetune-olmoe.log" | head -60
if [ -f $FT_OUT/finetune.json ]; then
  cp $FT_OUT/finetune.json "$OUT/finetune-olmoe.json"
  python3 - "$OUT/finetune-olmoe.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
gib = lambda b: b / 2**30 if b is not None else float("nan")
print(f"backend {r['backend']}: {len(r['layers'])} layers, {r['calibration_tokens']} calibration tokens, "
      f"{r['config']['steps']} steps per layer")
print(f"wall {r['wall_seconds']:.1f} s = load {r['load_seconds']:.1f} s + calibration {r['calibration_seconds']:.1f} s "
      f"({r['calibration_backend']}) + training {r['training_seconds']:.1f} s + writing {r['write_seconds']:.1f} s")
print(f"peak device memory: {gib(r.get('device_peak_bytes')):.2f} GiB (pool high-water mark, largest layer), "
      f"{gib(r.get('device_in_use_bytes')):.2f} GiB in use at a layer's end")
for l in r["layers"]:
    print(f"  layer {l['layer']:2d}: {l['seconds']:6.1f} s (+{l.get('transfer_seconds') or 0:.1f} s set-up and read-back), loss {l['loss_before']:.5f} -> {l['loss_after']:.5f}, "
          f"peak {gib(l.get('device_peak_bytes')):.2f} GiB")
EOF
fi
fi

if step 4; then
rm -rf /tmp/olmoe-finetuned-profile
AIMC_PROFILE_FORWARD=1 timeout ${FT_LIMIT:-420} $B/aimc finetune --backend cuda --model $CK --calib data/kjv-calib.txt \
  --calib-tokens 2048 --steps 20 --preset ${FT_PRESET:-pcm-3d-8tier} --drift-time 1y --layers 0 \
  --out /tmp/olmoe-finetuned-profile > "$OUT/finetune-profile.log" 2>&1
echo "finetune (profiled) rc=$?"
grep -E "^layer 0: |^finetune" "$OUT/finetune-profile.log" | head -60
fi
