#!/bin/bash
# One device call: GPU fine-tuning tests (calibration parity new), the 16-layer OLMoE-size
# finetune with GPU calibration, then gpu_backend with the time left.
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
. tools/gpu_env.sh
rm -rf .dev/cuda; tar -C .dev -xJf .dev/cuda.tar.xz
{ date -u +%FT%TZ; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; free -g | head -2; df -h /tmp | tail -1; } > "$OUT/device.txt" 2>&1
CK=/tmp/olmoe-size
( s=$(date +%s); python3 tools/make_olmoe_size_checkpoint.py --out $CK --layers 16 > "$OUT/olmoe-size-make.log" 2>&1; echo "make rc=$? in $(( $(date +%s) - s )) s" >> "$OUT/olmoe-size-make.log" ) &
MK=$!
timeout 200 $B/gpu_finetune --include-ignored --nocapture --test-threads=1 > "$OUT/gpu_finetune.log" 2>&1
echo "gpu_finetune rc=$? at $(el) s"
grep -E "^test |test result|panicked|layer [0-9]+: same|noisy loss GPU" "$OUT/gpu_finetune.log" | head -30
wait $MK; tail -2 "$OUT/olmoe-size-make.log"; echo "ckpt at $(el) s"; du -sh $CK
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > /tmp/ft-gpumem.txt 2>/dev/null &
SMI=$!
s=$(date +%s%N)
timeout ${FT_LIMIT:-340} $B/aimc finetune --backend cuda --model $CK --calib data/kjv-calib.txt \
  --calib-tokens 16384 --steps 200 --preset pcm-3d-8tier --drift-time 1y --out /tmp/olmoe-ft > "$OUT/finetune-olmoe.log" 2>&1
echo "finetune rc=$? wall $(( ($(date +%s%N) - s) / 1000000 )) ms at $(el) s"
kill $SMI
echo "nvidia-smi peak MiB: $(sort -n /tmp/ft-gpumem.txt | tail -1)" | tee -a "$OUT/finetune-olmoe.log"
grep -E "^finetune|→|set-up|rror" "$OUT/finetune-olmoe.log" | head -60
cp /tmp/olmoe-ft/finetune.json "$OUT/finetune-olmoe.json" 2>/dev/null
AIMC_PROFILE_FORWARD=1 timeout 90 $B/aimc finetune --backend cuda --model $CK --calib data/kjv-calib.txt \
  --calib-tokens 2048 --steps 20 --preset pcm-3d-8tier --drift-time 1y --layers 0 \
  --out /tmp/olmoe-ft-profile > "$OUT/finetune-profile.log" 2>&1
echo "profile rc=$? at $(el) s"
grep -E "^layer 0: " "$OUT/finetune-profile.log" | tail -25
left=$(( 570 - $(el) ))
if [ $left -gt 30 ]; then
  timeout $left $B/gpu_backend --include-ignored --test-threads=1 > "$OUT/gpu_backend.log" 2>&1
  echo "gpu_backend rc=$? at $(el) s"
  grep -E "test result|FAILED|panicked" "$OUT/gpu_backend.log" | head
  grep -c "\.\.\. ok" "$OUT/gpu_backend.log"
fi
cd "$OUT" && tar czf /tmp/all.tar.gz . && mv /tmp/all.tar.gz "$OUT/all.tar.gz"
