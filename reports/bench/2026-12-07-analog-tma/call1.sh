#!/bin/bash
# First GPU run of the analog wgmma kernel with TMA stages (pipe 2: one thread copies each
# stage's sorted-pair A rows and weight rows by TMA; the first GEMM's DAC codes gathered into
# sorted-pair order first), also under the persistent side-product kernel (c591cec), and of
# that kernel and the noise root without its slow path (cff6d34), both re-applied on top of
# main. The GPU tests (the analog wgmma parity test runs pipe 2 on every preset, with side
# products on 5 CTAs that walk ~20 tiles each), then the Lightning set and standard-hwa, each
# on pipe 0 (the default) and pipe 2. Run from the repository root with LIMIT=380; carry
# .dev/cuda.tar.xz. The logs come back as one archive (pack).
. tools/gpu_env.sh
. tools/gpu_call.sh
gpu_tests
grep -E "analog wgmma store" "$L/gpu_backend.log" | head -40
go && bench light $BASIC
go && bench light-tma $BASIC AIMC_ANALOG_WGMMA_TILE=64,3,2
go && bench hwa-tma standard-hwa AIMC_ANALOG_WGMMA_TILE=64,3,2
go && bench hwa standard-hwa
pack
