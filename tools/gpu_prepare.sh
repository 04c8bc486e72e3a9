#!/bin/bash
# Build here (no GPU needed) what tools/gpu_session.sh runs on the GPU machine, into the
# git-ignored .dev/ (pass `carry: [".dev/cuda.tar.xz", ".dev/wheels"]` to the device call; the
# device tool takes 64 MiB with the tracked tree, ~31 MB, so the binaries travel stripped and xz'd):
#   .dev/cuda.tar.xz: cuda/{aimc, gpu_backend, kernels_compile, gpu_finetune}  release binary, GPU test binaries
#   .dev/wheels/aihwkit_lightning-*.whl             pure-Python wheel for the Lightning timing
set -eu
cd "$(dirname "$0")/.."
cargo build --release
cargo test --release --no-run --test gpu_backend --test kernels_compile --test gpu_finetune
# Fresh each time: a candidate's binaries (reports/bench/*/prepare.sh) go in after this.
rm -rf .dev/cuda
mkdir -p .dev/cuda .dev/wheels
cp target/release/aimc .dev/cuda/
for t in gpu_backend kernels_compile gpu_finetune; do
  bin=$(ls -t target/release/deps/$t-* | grep -v '\.d$' | head -1)
  cp "$bin" .dev/cuda/$t
done
strip .dev/cuda/*
# One xz thread at -9: its 64 MiB window spans the binaries, whose code is mostly shared (31 MB
# at -T0 -6, 17 MB here with a second aimc build beside them).
tar -C .dev -cf - cuda | xz -T1 -9 > .dev/cuda.tar.xz
ls .dev/wheels/aihwkit_lightning-*.whl >/dev/null 2>&1 ||
  pip download --no-deps --dest .dev/wheels "aihwkit-lightning==2.1.0"
du -sh .dev/cuda.tar.xz .dev/wheels
