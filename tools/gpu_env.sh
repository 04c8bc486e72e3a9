# Sourced by tools/gpu_{session,sweep,profile,ncu}.sh on the GPU machine (after
# tools/gpu_prepare.sh here; carry .dev/cuda.tar.xz and .dev/wheels): $OUT, the unpacked
# binaries in $B, the PTX cache, CUDA tools on PATH, and $BASIC, the bench preset with the
# AIHWKIT-Lightning feature set (standard-hwa without PCM_READ and IR drop).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
B=.dev/cuda
[ -x $B/aimc ] || tar -C .dev -xJf .dev/cuda.tar.xz
export AIMC_CACHE_DIR=/tmp/aimc-kernel-cache PATH=/usr/local/cuda/bin:$PATH
BASIC=tools/presets/standard-hwa-no-pcm-read-no-ir-drop.json
