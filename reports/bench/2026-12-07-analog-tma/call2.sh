#!/bin/bash
# The 64-column analog tile with TMA stages where the A rows are in sorted-pair order (a
# layer's second GEMM) and cp.async where they are gathered per token (its first),
# AIMC_ANALOG_WGMMA_TILE=64,3,2,0, against pipe 0 throughout (the default): the Lightning set
# and standard-hwa, each pair in one call. Both schedules passed the GPU tests in call1.sh.
# Run from the repository root with LIMIT=150; carry .dev/cuda.tar.xz. The logs come back as
# one archive (pack).
. tools/gpu_env.sh
. tools/gpu_call.sh
go && bench light $BASIC
go && bench light-mix $BASIC AIMC_ANALOG_WGMMA_TILE=64,3,2,0
go && bench hwa standard-hwa
go && bench hwa-mix standard-hwa AIMC_ANALOG_WGMMA_TILE=64,3,2,0
pack
