#!/bin/bash
# Tile sweep of the grouped GEMM (AIMC_GEMM_TILE=cols,warps_m,warps_n,stages[,k_step]) on the OLMoE and
# Mixtral shapes, by default on the preset without PCM_READ / IR drop (the AIHWKIT-Lightning
# feature set; PRESETS=standard-hwa adds the full one, whose extra accumulators spill on wide
# tiles and run for minutes), into $OUT/sweep-*.md. Run after tools/gpu_prepare.sh, like tools/gpu_session.sh.
. "$(dirname "$0")/gpu_env.sh"
SHAPES=${SHAPES:-olmoe,mixtral}
for tile in ${TILES:-default}; do
  for preset in ${PRESETS:-$BASIC}; do
    tag=$(echo "$tile-$(basename $preset .json)" | tr ',' 'x')
    if [ "$tile" = default ]; then unset AIMC_GEMM_TILE; else export AIMC_GEMM_TILE=$tile; fi
    timeout 200 $B/aimc bench --suite gpu --shapes $SHAPES --repeats ${REPEATS:-11} --gpu-preset $preset \
      --report "$OUT/sweep-$tag.md" > "$OUT/sweep-$tag.log" 2>&1
    echo "== tile $tile preset $preset rc=$?"
    grep -E "^\| (Olmoe|Mixtral|Expert|Fine)" "$OUT/sweep-$tag.md" | awk -F'|' '{print $2 "|" $3 "|" $4 "|" $6}'
    tail -2 "$OUT/sweep-$tag.log" | grep -i error
  done
done
