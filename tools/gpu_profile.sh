#!/bin/bash
# Per-kernel GPU time of one grouped MoE layer forward (OLMoE shape) for the digital and the
# analog kernels, with Nsight Systems when the GPU machine has it (else Nsight Compute), into
# $OUT/profile-*.txt. Run after tools/gpu_prepare.sh, like tools/gpu_session.sh.
. "$(dirname "$0")/gpu_env.sh"
NSYS=$(command -v nsys || ls /opt/nvidia/nsight-systems*/bin/nsys /usr/local/cuda/nsight-systems*/bin/nsys 2>/dev/null | head -1)
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute*/ncu /usr/local/cuda/nsight-compute*/ncu 2>/dev/null | head -1)
echo "nsys: ${NSYS:-none}  ncu: ${NCU:-none}"
for preset in ${PRESETS:-$BASIC standard-hwa}; do
  tag=$(basename $preset .json)
  cmd="$B/aimc bench --suite gpu --shapes ${SHAPES:-olmoe} --repeats ${REPEATS:-3} --gpu-preset $preset --report $OUT/profile-$tag.md"
  if [ -n "$NSYS" ]; then
    timeout 200 $NSYS profile -t cuda -o /tmp/prof-$tag --force-overwrite true $cmd > "$OUT/profile-$tag.log" 2>&1
    timeout 100 $NSYS stats -q -r cuda_gpu_kern_sum --format csv /tmp/prof-$tag.nsys-rep 2>/dev/null |
      python3 -c '
import csv, sys
rows = list(csv.DictReader(sys.stdin))
for r in rows[:14]:
    print(f"{float(r[\"Time (%)\"]):5.1f}%  {int(float(r[\"Med (ns)\"]))/1e6:9.3f} ms med  x{r[\"Instances\"]:>4}  {r[\"Name\"][:60]}")
' | tee "$OUT/profile-$tag.txt"
  elif [ -n "$NCU" ]; then
    timeout 250 $NCU --metrics gpu__time_duration.sum -k regex:'moe|swiglu|scatter|to_bf16|quantize|split' -c 60 $cmd > "$OUT/profile-$tag.txt" 2>&1
    grep -E "moe_|swiglu|scatter|to_bf16|quantize|split_f16|gpu__time" "$OUT/profile-$tag.txt" | paste - - | awk '{print $1, $(NF)}' | sort | uniq -c | head -30
  fi
  grep -E "^\| Olmoe" "$OUT/profile-$tag.md" | awk -F'|' '{print $3 "|" $4 "|" $6}'
done
