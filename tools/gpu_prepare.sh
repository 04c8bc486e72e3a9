#!/bin/bash
# Build here (no GPU needed) what tools/gpu_session.sh runs on the GPU machine, into the
# git-ignored .dev/ (pass `carry: [".dev/cuda", ".dev/wheels"]` to the device call, ~60 MB):
#   .dev/cuda/{aimc, gpu_backend, kernels_compile}  release binary and the two GPU test binaries
#   .dev/wheels/aihwkit_lightning-*.whl             pure-Python wheel for the Lightning timing
set -eu
cd "$(dirname "$0")/.."
cargo build --release
cargo test --release --no-run --test gpu_backend --test kernels_compile
mkdir -p .dev/cuda .dev/wheels
cp target/release/aimc .dev/cuda/
for t in gpu_backend kernels_compile; do
  bin=$(ls -t target/release/deps/$t-* | grep -v '\.d$' | head -1)
  cp "$bin" .dev/cuda/$t
done
ls .dev/wheels/aihwkit_lightning-*.whl >/dev/null 2>&1 ||
  pip download --no-deps --dest .dev/wheels "aihwkit-lightning==2.1.0"
du -sh .dev/cuda .dev/wheels
