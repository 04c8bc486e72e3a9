#!/bin/bash
# Builds the warp-specialised candidate (ws-analog.patch, applied to this checkout's commit in a
# worktree of its own) beside the committed binaries: run after `bash tools/gpu_prepare.sh`; it
# adds .dev/cuda/ws/{aimc,gpu_backend} and packs .dev/cuda.tar.xz again (one xz stream: the
# code the two builds share costs little). The call script runs them as $B/ws/... .
set -eu
cd "$(dirname "$0")/../../.."
root=$PWD
W=.dev/ws-tree
[ -x .dev/cuda/aimc ] || { echo "run tools/gpu_prepare.sh first"; exit 1; }
git worktree remove --force $W 2>/dev/null || rm -rf $W
git worktree prune
git worktree add --detach $W HEAD
git -C $W apply "$root/reports/bench/2026-12-08-analog-ws/ws-analog.patch"
(cd $W && export CARGO_TARGET_DIR="$root/.dev/ws-target" &&
  cargo build --release && cargo test --release --no-run --test gpu_backend)
mkdir -p .dev/cuda/ws
cp .dev/ws-target/release/aimc .dev/cuda/ws/
cp "$(ls -t .dev/ws-target/release/deps/gpu_backend-* | grep -v '\.d$' | head -1)" .dev/cuda/ws/gpu_backend
strip .dev/cuda/ws/*
git worktree remove --force $W
tar -C .dev -cf - cuda | xz -T1 -9 > .dev/cuda.tar.xz
du -sh .dev/cuda.tar.xz
